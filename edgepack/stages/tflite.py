"""The TFLite stage inside `edgepack build`: convert (fp32, int8), check, and list the artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import Dataset
from ..errors import EdgepackError
from ..onnx_tools.export import check_parity
from .load import LoadedModel
from ..manifest import TensorSpec
from ..targets import TargetProfile
from .validate import quality

MAX_CALIB = 128  # PT2E calibration is slow (FACTS.md: 64 samples took 86-123 s on ResNet-18)


def build_tflite(tmp: Path, loaded: LoadedModel, profile: TargetProfile, calib: Dataset, evals: Dataset,
                 torch_ref: np.ndarray | None, say):
    """Returns (artifacts, stage record, report section). With `tflite_optional` in the profile a
    failed conversion keeps the ONNX artifacts and is reported instead of failing the build."""
    from .. import tflite
    from ..pipeline import _artifact
    try:
        tflite.require_litert_torch()
        tflite.require_torch_model(loaded.module, loaded.source)
        layout, threads = profile.layout, profile.threads
        fp32, int8 = tmp / "model.fp32.tflite", tmp / "model.int8.tflite"
        say(f"converting to TFLite fp32 with litert-torch ({layout})")
        rec32 = tflite.convert_fp32(loaded.module, loaded.example_inputs(), fp32, layout)
        out32 = tflite.run_tflite(fp32, evals.x, layout, threads)
        parity = check_parity(torch_ref, out32, "TFLite fp32") if torch_ref is not None else None
        n_cal = min(len(calib), profile.quantization.calibration_samples, MAX_CALIB)
        say(f"converting to TFLite int8 (PT2E static, {n_cal} calibration samples)")
        rec8 = tflite.convert_int8(loaded.module, loaded.example_inputs(), calib, int8, layout, num_calib=n_cal)
        out8 = tflite.run_tflite(int8, evals.x, layout, threads)
    except EdgepackError as e:
        if not profile.tflite_optional:
            raise
        for f in ("model.fp32.tflite", "model.int8.tflite"):
            (tmp / f).unlink(missing_ok=True)
        say(f"warning: no TFLite artifacts ({e.message}); the profile marks TFLite optional")
        return [], {"skipped": e.message}, f"## TFLite\n\nNot produced: {e.message}\n"
    artifacts = []
    for path, rec, q in ((fp32, rec32, quality(out32, evals, None)), (int8, rec8, quality(out8, evals, out32))):
        specs = ([TensorSpec(**s) for s in rec["inputs"]], [TensorSpec(**s) for s in rec["outputs"]])
        a = _artifact(tmp, path, "tflite", rec["precision"], q, layout, specs)
        if rec["float_ops"]:
            a.notes.append(f"{len(rec['float_ops'])} float op(s) left in the int8 graph: "
                           + ", ".join(sorted(set(rec["float_ops"]))))
        artifacts.append(a)
    drop = (artifacts[0].metrics.accuracy or 0) - (artifacts[1].metrics.accuracy or 0) if evals.labelled else None
    agreement = artifacts[1].metrics.agreement
    say("TFLite int8: " + (f"agreement with TFLite fp32 {agreement:.2f}%" if agreement is not None else
                           f"cosine with TFLite fp32 {artifacts[1].metrics.cosine:.5f}")
        + (f", accuracy drop {drop:.2f} points" if drop is not None else ""))
    keep = ("seconds", "convert_seconds", "calibration_seconds", "process_overhead_seconds", "export_mode",
            "size_bytes", "num_ops", "ops", "quantize_ops", "dequantize_ops", "float_ops", "float_op_counts",
            "converter", "layout")
    stage = {"fp32": {k: rec32.get(k) for k in keep}, "int8": {k: rec8.get(k) for k in keep},
             "parity": parity, "calibration_samples": n_cal, "scheme": tflite.INT8_SCHEME}
    return artifacts, stage, _section(stage, artifacts)


def _section(stage: dict, artifacts) -> str:
    lines = ["## TFLite", "", f"Converted with {stage['int8']['converter']}; int8 scheme: {stage['scheme']}, "
             f"{stage['calibration_samples']} calibration samples.", ""]
    p = stage["parity"]
    if p:
        lines += [f"TFLite fp32 vs PyTorch: max abs diff {p['max_abs_diff']:.3g}, cosine {p['cosine']:.6f}.", ""]
    lines += ["| artifact | layout | convert s | ops | QUANTIZE | DEQUANTIZE | float ops left in graph |",
              "|---|---|---|---|---|---|---|"]
    for a, key in zip(artifacts, ("fp32", "int8")):
        r = stage[key]
        floats = ", ".join(f"{k} x{v}" for k, v in (r["float_op_counts"] or {}).items()) or "-"
        lines.append(f"| {a.path} | {r['layout']} | {r['seconds']:.1f} | {r['num_ops']} | {r['quantize_ops']} "
                     f"| {r['dequantize_ops']} | {floats if key == 'int8' else 'n/a (float model)'} |")
    return "\n".join(lines) + "\n"
