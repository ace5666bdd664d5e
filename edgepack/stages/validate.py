"""Stage `validate`: every artifact's quality on the reporting samples (top-1, the user metric,
per-output SQNR/cosine/max abs diff against the float model), its size, and its latency and
peak memory measured in a fresh process at exactly the input shapes the build was given."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import onnx
from pydantic import BaseModel

from .. import runtime
from ..compress.size import compressed_bytes
from ..errors import EdgepackError
from ..hashing import sha256_file
from ..manifest import Artifact, ArtifactMetrics, LatencyMs, TensorSpec
from ..quality import measure
from . import tflite as tflite_stage
from .context import BuildContext

NAME = "validate"


class Config(BaseModel):
    threads: int
    latency_runs: int


def config(ctx: BuildContext) -> Config:
    return Config(threads=ctx.profile.threads, latency_runs=ctx.cfg.latency_runs)


def run(ctx: BuildContext, cfg: Config) -> dict:
    m, report = ctx.model, ctx.data.report
    made = [("model.fp32.onnx", "onnx", "fp32"), ("model.int8.onnx", "onnx", "int8")]
    if "int8" in (ctx.records.get("tflite") or {}):
        made += [(tflite_stage.FP32, "tflite", "fp32"), (tflite_stage.INT8, "tflite", "int8")]
    made += [tuple(a) for a in (ctx.records.get("fp16") or {}).get("artifacts", [])]
    for path, fmt, precision in made:
        ref = None if (fmt, precision) == ("onnx", "fp32") and m.kind == "onnx" else ctx.reference
        q = measure(ctx.outputs[path], m.outputs, report.y, ref, ctx.metric)
        if fmt == "tflite":
            # an fp16 .tflite has the fp32 one's inputs and outputs (only weights change)
            specs = tflite_stage.specs(ctx.records["tflite"], "fp32" if precision == "fp16" else precision)
            layout = ctx.profile.layout
        else:
            specs, layout = onnx_specs(ctx.work / path, m.outputs), "NCHW"
        ctx.artifacts.append(artifact(ctx.work, ctx.work / path, fmt, precision, q, layout, specs))
    shapes = {s.name: [int(d) for d in s.shape] for s in m.inputs}
    ctx.say(f"measuring latency and memory ({cfg.threads} thread(s), {cfg.latency_runs} runs, "
            f"inputs {', '.join(f'{n} {chr(120).join(map(str, s))}' for n, s in shapes.items())})")
    for a in ctx.artifacts:
        measured = measure_in_subprocess(ctx.work / a.path, cfg.threads, cfg.latency_runs,
                                         shapes=None if a.format == "tflite" else shapes)
        a.metrics.latency_ms = latency_record(measured)
        a.notes.append(f"peak memory {measured['peak_rss_mb']:.1f} MB, load {measured['load_ms']:.0f} ms")
        ctx.peak_mb[a.path] = measured["peak_rss_mb"]
    ctx.sections["peak_mb"] = ctx.peak_mb
    return {"samples": len(report), "timed_shapes": shapes,
            "dynamic_artifacts": [a.path for a in ctx.artifacts if _dynamic(a.inputs)]}


def artifact(root: Path, path: Path, fmt: str, precision: str, q: dict, layout: str,
             specs: tuple[list[TensorSpec], list[TensorSpec]]) -> Artifact:
    size = path.stat().st_size
    metrics = ArtifactMetrics(size_mb=round(size / 1e6, 4),
                              **{k: q.get(k) for k in ("accuracy", "agreement", "metric", "max_abs_diff", "cosine",
                                                       "sqnr_db", "outputs", "samples")})
    return Artifact(path=path.relative_to(root).as_posix(), format=fmt, precision=precision, sha256=sha256_file(path),
                    size_bytes=size, compressed_bytes=compressed_bytes(path), layout=layout, inputs=specs[0], outputs=specs[1], metrics=metrics)


def onnx_specs(path: Path, output_names: list[str] | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An ONNX file's own input/output specs; symbolic dims keep their names (the artifact stays dynamic)."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def spec(v, image_layout: bool):
        dims = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return TensorSpec(name=v.name, shape=dims, dtype=dtype, layout="NCHW" if image_layout and len(dims) == 4 else None)
    return [spec(v, True) for v in g.input if v.name not in inits], [spec(v, False) for v in g.output]


def _dynamic(specs: list[TensorSpec]) -> bool:
    return any(isinstance(d, str) for s in specs for d in s.shape[1:])


def measure_in_subprocess(path: Path, threads: int, runs: int = 50, warmup: int = 10,
                          timeout_s: float = 600, shapes: dict | None = None) -> dict:
    """Latency and peak memory of one artifact, in a fresh process (as a device would run it)."""
    cmd = [sys.executable, str(Path(runtime.__file__)), str(path), str(threads), str(warmup), str(runs)]
    if shapes:
        cmd.append(json.dumps(shapes))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise EdgepackError(f"measuring {path.name} took longer than {timeout_s:.0f}s") from e
    if proc.returncode != 0:
        raise EdgepackError(f"{path.name} failed to run in {Path(cmd[1]).name}: {proc.stderr.strip()[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["machine"] = platform.machine()
    return result


def latency_record(measured: dict) -> LatencyMs:
    lat = measured["latency_ms"]
    return LatencyMs(p50=round(lat["p50"], 4), p90=round(lat["p90"], 4), p99=round(lat["p99"], 4),
                     mean=round(lat["mean"], 4), runs=lat["runs"], threads=measured["threads"],
                     measured_on=measured.get("machine"), input_shapes=measured.get("input_shapes"),
                     samples_ms=lat.get("samples_ms"))
