"""Stage `fp16`: half-precision artifacts beside the fp32 and int8 ones, `model.fp16.onnx` and
(when the build made TFLite) `model.fp16.tflite`, for targets whose kernels have fp16.

It runs when the target profile lists "fp16" in `precisions`, or when the build asks for it
(`--fp16`, or a `[compress.fp16]` table). The int8 artifact stays the one judged; the fp16 ones
are validated, timed and reported like every other artifact, with their quality against the
float model. Cached by the bytes of the fp32 files they are made from.
"""
from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel

from ..errors import EdgepackError
from ..onnx_tools.fp16 import to_fp16
from ..report import fmt, table
from . import tflite as tflite_stage
from .context import BuildContext, feeds
from .export import FILE as ONNX32
from .infer import predict

NAME = "fp16"
ONNX16, TFLITE16 = "model.fp16.onnx", "model.fp16.tflite"
RANGE_SAMPLES = 16  # calibration samples whose activations decide which nodes stay float32 (fp16 ends at 65504)
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
    samples = _range_samples(ctx)
    digest = hashlib.sha256(b"".join(a.tobytes() for feed in samples for a in feed.values())).hexdigest()
    for f in cfg.formats:
        src, dst = made[f]
        key = ctx.cache.key(f"{NAME}-{f}", config=cfg.model_dump(), files=[ctx.work / src],
                            blobs=[digest] if f == "onnx" else [], versions=ctx.versions)
        rec = ctx.restore(f"{NAME} ({f})", key)
        if rec is None:
            ctx.say(f"making {dst} from {src}")
            if f == "onnx":
                rec = to_fp16(ctx.work / src, ctx.work / dst, cfg.block_ops, samples)
                for node in rec["float32_nodes"]:
                    ctx.say(f"  fp16: {node['node']} ({node['op']}) stays float32: {node['reason']}")
            else:
                from ..tflite.fp16 import convert_fp16
                rec = convert_fp16(ctx.work / src, ctx.work / dst)
            rec["from_bytes"] = (ctx.work / src).stat().st_size
            ctx.store(f"{NAME} ({f})", key, {dst: ctx.work / dst}, rec)
        layout = ctx.profile.layout if f == "tflite" else "NCHW"
        ctx.outputs[dst] = predict(ctx.work / dst, ctx.model, ctx.data.report, ctx.profile.threads, layout)
        _check_finite(dst, ctx.outputs[dst], ctx.reference, ctx.model.outputs)
        record[f] = rec
        record["artifacts"].append([dst, f, "fp16"])
    ctx.sections[NAME] = markdown(record)
    return record


def _range_samples(ctx: BuildContext) -> list[dict[str, np.ndarray]]:
    """A few calibration feeds (input name -> array), one sample each (every activation of the
    model is kept while one runs), for the fp16 converter's range check."""
    data = ctx.data.calib.sample(RANGE_SAMPLES, seed=0)
    return [dict(zip(ctx.model.input_names, arrays)) for arrays in feeds(ctx.model, data, batch_size=1)]


def _check_finite(path: str, outputs: list[np.ndarray], reference: list[np.ndarray] | None, names: list[str]) -> None:
    """fp16 that overflows on the evaluation data (inf or NaN where the float model is finite) fails the build."""
    for i, (name, out) in enumerate(zip(names, outputs)):
        ref = None if reference is None else np.asarray(reference[i])
        bad = ~np.isfinite(out) & (np.isfinite(ref) if ref is not None and ref.shape == out.shape else True)
        if bad.any():
            raise EdgepackError(f"{path}: output {name} is inf/NaN on {int(bad.sum())} value(s) where the float model "
                                "is finite (beyond fp16's range, 65504, on data the calibration samples did not cover)",
                                "keep the op types that overflow in float32 with [compress.fp16] block_ops = "
                                "[\"OpType\"], or build without fp16")


def markdown(record: dict) -> str:
    """The report section, from the stage record alone (`edgepack report` rebuilds it from the manifest)."""
    rows = []
    for f, name in (("onnx", ONNX16), ("tflite", TFLITE16)):
        rec = record.get(f)
        if rec:
            ratio = f"{rec['from_bytes'] / rec['size_bytes']:.2f}x" if rec.get("from_bytes") else "-"
            kept = ", ".join((rec.get("float32_ops") or []) + [f"{n['node']} (|x| up to {n['max_abs']:g})"
                                                                for n in rec.get("float32_nodes") or []]) or "-"
            rows.append([name, rec["converter"], fmt(rec["size_bytes"] / 1e6, 3), ratio, kept if f == "onnx" else "-"])
    return "\n".join(["## fp16", "", table(["artifact", "made with", "size MB", "smaller than fp32 by",
                                             "op types kept in float32"], rows), "", RUNTIME_NOTE, ""])
