"""Stage `export`: PyTorch -> `model.fp32.onnx` (opset 17, simplified) with parity checked on
every output, or the user's ONNX file made ready for quantization (old opsets upgraded,
external data inlined, fp16 turned to fp32). Cached by content."""
from __future__ import annotations

import time

import onnx
from pydantic import BaseModel

from ..cache import hash_module
from ..onnx_tools.export import OPSET, check_parity, to_onnx, torch_outputs
from ..onnx_tools.upgrade import prepare_onnx
from .context import BuildContext, feeds
from .infer import predict_onnx

NAME = "export"
FILE = "model.fp32.onnx"


class Config(BaseModel):
    opset: int = OPSET
    simplify: bool = True
    dynamic_batch: bool = True
    inputs: list[dict]
    outputs: list[str]


def config(ctx: BuildContext) -> Config:
    m = ctx.model
    return Config(dynamic_batch=m.batchable, inputs=[s.model_dump() for s in m.inputs], outputs=m.outputs)


def run(ctx: BuildContext, cfg: Config) -> dict:
    m, out = ctx.model, ctx.work / FILE
    if m.kind == "torch":
        key = ctx.cache.key(NAME, config=cfg.model_dump(), blobs=[hash_module(m.module)], versions=ctx.versions)
    else:
        key = ctx.cache.key(NAME, config=cfg.model_dump(), files=[m.onnx_path], versions=ctx.versions)
    record = ctx.restore(NAME, key)
    if record is None:
        t0 = time.perf_counter()
        if m.kind == "torch":
            ctx.say("exporting to ONNX and simplifying")
            to_onnx(m.module, m.example_inputs(), out, cfg.simplify, m.input_names, m.outputs, cfg.dynamic_batch)
            record = {"opset": cfg.opset}
        else:
            ctx.say(f"preparing {m.onnx_path.name} for int8 (opset, external data, fp16)")
            shapes = {s.name: [int(d) for d in s.shape] for s in m.inputs}
            record = {"skipped": "input is already ONNX", "prepared": prepare_onnx(m.onnx_path, out, shapes=shapes)}
        record.update(seconds=round(time.perf_counter() - t0, 2),
                      nodes=len(onnx.load(str(out), load_external_data=False).graph.node))
        ctx.store(NAME, key, {FILE: out}, record)
    fp32_out = predict_onnx(ctx, out)
    if m.kind == "torch":
        ctx.reference = torch_outputs(m.module, feeds(m, ctx.data.report), m.batchable)
        record["parity"] = check_parity(ctx.reference, fp32_out, names=m.outputs)
        p = record["parity"]
        ctx.say(f"ONNX parity with PyTorch: max abs diff {p['max_abs_diff']:.2g}, cosine {p['cosine']:.6f}")
    else:
        ctx.reference = fp32_out
    ctx.outputs[FILE] = fp32_out
    return record
