"""Stage `fp16`: half-precision artifacts beside the fp32 and int8 ones, `model.fp16.onnx` and
(when the build made TFLite) `model.fp16.tflite`, for targets whose kernels have fp16.

It runs when the target profile lists "fp16" in `precisions`, or when the build asks for it
(`--fp16`, or a `[compress.fp16]` table). The int8 artifact stays the one judged; the fp16 ones
are validated, timed and reported like every other artifact, with their quality against the
float model. Cached by the bytes of the fp32 files they are made from.
"""
from __future__ import annotations

from pydantic import BaseModel

from ..onnx_tools.fp16 import to_fp16
from ..report import fmt, table
from . import tflite as tflite_stage
from .context import BuildContext
from .export import FILE as ONNX32
from .infer import predict

NAME = "fp16"
ONNX16, TFLITE16 = "model.fp16.onnx", "model.fp16.tflite"
RUNTIME_NOTE = ("ONNX Runtime's CPU provider has fp16 kernels for few ops on x86 (the converter keeps the rest in "
                "float32 behind Casts) and more on ARM64; TFLite's fp16 weights are dequantized at load on a CPU "
                "without fp16 arithmetic, and XNNPACK can compute in fp16 on ARMv8.2-FP16 cores (Pi 5, most phones). "
                "The latency figures below are this build machine's only.")


class Config(BaseModel):
    formats: list[str]
    block_ops: list[str] = []  # ONNX op types to keep in float32 besides the converter's own list


def config(ctx: BuildContext) -> Config | None:
    asked = (ctx.cfg.compress or {}).get("fp16")
    if asked is None and "fp16" not in ctx.profile.precisions:
        return None
    formats = ["onnx"] + (["tflite"] if "fp32" in (ctx.records.get(tflite_stage.NAME) or {}) else [])
    return Config(formats=formats, block_ops=list((asked or {}).get("block_ops", [])))


def run(ctx: BuildContext, cfg: Config) -> dict:
    made = {"onnx": (ONNX32, ONNX16), "tflite": (tflite_stage.FP32, TFLITE16)}
    record: dict = {"artifacts": []}
    for f in cfg.formats:
        src, dst = made[f]
        key = ctx.cache.key(f"{NAME}-{f}", config=cfg.model_dump(), files=[ctx.work / src], versions=ctx.versions)
        rec = ctx.restore(f"{NAME} ({f})", key)
        if rec is None:
            ctx.say(f"making {dst} from {src}")
            if f == "onnx":
                rec = to_fp16(ctx.work / src, ctx.work / dst, cfg.block_ops)
            else:
                from ..tflite.fp16 import convert_fp16
                rec = convert_fp16(ctx.work / src, ctx.work / dst)
            rec["from_bytes"] = (ctx.work / src).stat().st_size
            ctx.store(f"{NAME} ({f})", key, {dst: ctx.work / dst}, rec)
        layout = ctx.profile.layout if f == "tflite" else "NCHW"
        ctx.outputs[dst] = predict(ctx.work / dst, ctx.model, ctx.data.report, ctx.profile.threads, layout)
        record[f] = rec
        record["artifacts"].append([dst, f, "fp16"])
    ctx.sections[NAME] = markdown(record)
    return record


def markdown(record: dict) -> str:
    """The report section, from the stage record alone (`edgepack report` rebuilds it from the manifest)."""
    rows = []
    for f, name in (("onnx", ONNX16), ("tflite", TFLITE16)):
        rec = record.get(f)
        if rec:
            ratio = f"{rec['from_bytes'] / rec['size_bytes']:.2f}x" if rec.get("from_bytes") else "-"
            kept = ", ".join(rec.get("float32_ops") or []) or "-"
            rows.append([name, rec["converter"], fmt(rec["size_bytes"] / 1e6, 3), ratio, kept if f == "onnx" else "-"])
    return "\n".join(["## fp16", "", table(["artifact", "made with", "size MB", "smaller than fp32 by",
                                             "op types kept in float32"], rows), "", RUNTIME_NOTE, ""])
