"""Stage `write`: `manifest.json` and `report.md` in the staging directory (the pipeline then
renames it into place, so a failed build never replaces a good one)."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from ..version import __version__
from ..hashing import sha256_file
from ..manifest import MANIFEST, DataFile, Manifest, write_json_atomic
from ..report import table
from ..report_html import HTML, write_reports
from .context import BuildContext

NAME = "write"


EVAL_SUBSET = "eval/subset.npz"
QUANT_DEBUG = "quant_debug.md"  # --debug-quant: every node's and op's int8 SQNR
MAX_SUBSET_BYTES = 64 << 20  # the subset travels to every device: keep it small


class Config(BaseModel):
    name: str
    config_hash: str
    eval_samples: int = 256  # how many reporting samples ship for evaluation on the device


def config(ctx: BuildContext) -> Config:
    return Config(name=ctx.name, config_hash=ctx.cfg.fingerprint(), eval_samples=ctx.cfg.device_eval_samples)


def run(ctx: BuildContext, cfg: Config) -> dict:
    d, m = ctx.data, ctx.model
    stages = {k: v for k, v in ctx.records.items() if k not in ("write",)}
    stages["data"] = {**d.notes, "evaluation_samples": len(d.report),
                      "classes_in_calibration": _classes(d.calib.sample(ctx.profile.quantization.calibration_samples, seed=0))}
    stages["cache"] = {"reused": list(ctx.reused)}
    manifest = Manifest(
        edgepack_version=__version__, name=cfg.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target=ctx.profile.model_dump(mode="json"), inputs=[_image_layout(s) for s in m.inputs],
        outputs=ctx.artifacts[0].outputs, artifacts=ctx.artifacts, primary=ctx.primary, verdicts=ctx.verdicts,
        passed=all(v.ok is not False for v in ctx.verdicts), stages=stages, versions=ctx.versions,
        config_hash=cfg.config_hash,
        data_hash=f"{d.calib.fingerprint()}-{d.choose.fingerprint()}-{d.report.fingerprint()}")
    manifest.eval_subset = write_eval_subset(ctx, cfg.eval_samples)
    write_json_atomic(ctx.work / MANIFEST, manifest)
    write_reports(ctx.work, manifest, ctx.sections)
    ctx.manifest = manifest
    debug = [QUANT_DEBUG] if ctx.cfg.debug_quant and write_quant_debug(ctx.work / QUANT_DEBUG, stages) else []
    return {"files": [MANIFEST, "report.md", HTML] + ([EVAL_SUBSET] if manifest.eval_subset else []) + debug}


def write_quant_debug(path: Path, stages: dict) -> bool:
    """The whole int8 SQNR tables (the report lists the 10 worst): ONNX nodes, then TFLite ops."""
    onnx_rows = (stages.get("quantize") or {}).get("sensitivity") or []
    tfl = (stages.get("tflite") or {}).get("sensitivity") or {}
    header = ["# int8 SQNR per node and op (--debug-quant)", "",
              "Worst first. SQNR of each node's output in the int8 model against the float model on the "
              "calibration samples; lost dB is what the node itself adds to the SQNR of its inputs.", ""]
    parts = list(header)
    if onnx_rows:
        parts += [f"## model.int8.onnx: {len(onnx_rows)} weighted nodes", "",
                  table(["node", "op", "SQNR dB", "lost dB"],
                        [[r.get("node"), r.get("op"), r.get("sqnr_db"), r.get("lost_db")] for r in onnx_rows]), ""]
    if tfl.get("ops"):
        parts += [f"## model.int8.tflite: {len(tfl['ops'])} ops ({tfl.get('samples')} samples)", "",
                  table(["op", "module", "SQNR dB", "lost dB", "output-limited"],
                        [[o.get("op"), o.get("module") or o.get("name"), o.get("sqnr_db"), o.get("lost_db"),
                          "yes" if o.get("output_limited") else ""] for o in tfl["ops"]]), ""]
    elif tfl.get("skipped"):
        parts += ["## model.int8.tflite", "", f"Not ranked: {tfl['skipped']}", ""]
    if parts == header:  # neither stage ranked anything
        return False
    path.write_text("\n".join(parts))
    return True


def write_eval_subset(ctx: BuildContext, samples: int) -> DataFile | None:
    """A seeded sample of the reporting data, one array per input (plus y), for the device to run
    with its own kernels. Bounded: fewer samples when they would exceed MAX_SUBSET_BYTES."""
    if samples <= 0:
        return None
    report = ctx.data.report
    one = sum(int(np.prod(s.shape[1:] if ctx.model.batchable else s.shape)) * np.dtype(s.dtype).itemsize
              for s in ctx.model.inputs)
    n = max(1, min(samples, len(report), MAX_SUBSET_BYTES // max(one, 1)))
    subset = report.sample(n, seed=0)
    arrays = dict(zip(subset.names, subset.arrays()))
    if subset.y is not None:
        arrays["y"] = np.asarray(subset.y)
    path = ctx.work / EVAL_SUBSET
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return DataFile(path=EVAL_SUBSET, sha256=sha256_file(path), size_bytes=path.stat().st_size, samples=n,
                    labelled=subset.y is not None, inputs=subset.names)


def _image_layout(spec):
    """4-D float inputs are images, NCHW as PyTorch takes them."""
    if len(spec.shape) == 4 and spec.dtype.startswith("float") and spec.layout is None:
        return spec.model_copy(update={"layout": "NCHW"})
    return spec


def _classes(ds) -> int | None:
    """How many distinct classes the calibration sample covers (None: no class labels)."""
    return int(len(np.unique(ds.y))) if ds.y is not None and np.asarray(ds.y).ndim == 1 else None
