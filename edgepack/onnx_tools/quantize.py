"""Static int8 with ONNX Runtime (QDQ, per-channel weights), and per-node sensitivity.

The quantizer is ONNX Runtime's; the ranges come from edgepack's bounded calibrator (ORT's
calibrators, fed and folded batch by batch: calibrate.py) through quantize_static's calibration
cache; edgepack supplies the data reader, the scheme from the target profile, and the
float-vs-int8 comparison used by the accuracy-aware fallback (sensitivity.py).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from onnxruntime import __version__ as ort_version
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..data import Dataset
from ..errors import EdgepackError
from ..targets import Quantization
from .calibrate import DatasetReader, calibrate
from .sensitivity import WEIGHTED_OPS, node_sensitivity, release_heap

__all__ = ["WEIGHTED_OPS", "DatasetReader", "calibration_ranges", "check_calibration_data",
           "node_sensitivity", "preprocess", "quantize_onnx", "release_heap"]

log = logging.getLogger(__name__)


def check_calibration_data(data: Dataset) -> None:
    if len(data) == 0:
        raise EdgepackError(f"calibration data {data.source} is empty",
                            "pass --calib with at least a few dozen representative samples")
    n = data.nonfinite_count()
    if n:
        raise EdgepackError(f"calibration data {data.source} has NaN/Inf values in {n} of {len(data)} samples",
                            "clean or drop those samples; int8 ranges computed from them would be garbage")


def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """ORT's recommended pre-pass (shape inference + graph optimisation) before quantizing.

    Run from a scratch directory: ORT's symbolic shape inference saves its model to the current
    directory when it fails (sym_shape_infer_temp.onnx), which must not land in the user's."""
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    with tempfile.TemporaryDirectory(prefix="edgepack-pre-") as scratch, contextlib.chdir(scratch), \
            redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        try:
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference fails on some graphs; ONNX's is enough
            try:
                quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
            except Exception as e:
                raise EdgepackError(f"ONNX Runtime's quantization pre-pass failed on {Path(fp32_path).name}: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                    "the graph may use an op ONNX shape inference does not know; "
                                    "rerun with --debug for the full trace") from e
    return out_path


def calibration_ranges(pre: Path, calib: Dataset, q: Quantization) -> TensorsData:
    """The per-tensor ranges `quantize_onnx` quantizes `pre` (the preprocessed model) with, from
    `q.calibration_samples` seeded, stratified rows of `calib`, in bounded memory. They do not
    depend on the nodes left in float: compute once, pass as `ranges=` to every fallback try."""
    check_calibration_data(calib)
    return _ranges(pre, calib, q)


def _ranges(pre: Path, calib: Dataset, q: Quantization) -> TensorsData:
    rows = calib.sample_indices(q.calibration_samples, seed=0)  # seeded, stratified: never the first N
    with redirect_stdout(io.StringIO()):
        return calibrate(Path(pre), calib, q.calibration_method, indices=rows, symmetric=False,
                         percentile=q.percentile)


def bounded_supported() -> bool:
    """quantize_static takes precomputed ranges through its calibration cache (`calibration_cache_path`,
    added to onnxruntime in 2026; 1.32 has it)."""
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_onnx(fp32_path: Path, int8_path: Path, calib: Dataset, q: Quantization,
                  threads: int = 1, exclude_nodes: list[str] | tuple = (),
                  preprocessed: Path | None = None, ranges: TensorsData | None = None,
                  calibrator: str = "bounded") -> dict:
    """Quantize `fp32_path` to a QDQ int8 model at `int8_path` (atomic); returns a record.

    `calibrator="bounded"` computes the ranges with edgepack's bounded calibrator (or takes
    `ranges` from `calibration_ranges`) and hands them to ORT's quantizer; "onnxruntime" lets
    quantize_static run ORT's own calibrator, which keeps every batch's intermediates."""
    if calibrator not in ("bounded", "onnxruntime"):
        raise ValueError(f"calibrator must be 'bounded' or 'onnxruntime', not {calibrator!r}")
    check_calibration_data(calib)
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if calibrator == "bounded" and not bounded_supported():
        log.warning("onnxruntime %s cannot take precomputed ranges: calibrating with its own calibrator "
                    "(memory grows with the calibration samples)", ort_version)
        calibrator = "onnxruntime"
    rows = calib.sample_indices(q.calibration_samples, seed=0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepack-q-") as tmpdir:
        pre = preprocessed or preprocess(fp32_path, Path(tmpdir) / "pre.onnx")
        tmp_out = int8_path.with_name(f".{int8_path.name}.tmp")
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 "CalibTensorRangeSymmetric": False}
        if q.calibration_method == "Percentile":
            extra["CalibPercentile"] = q.percentile
        method = getattr(CalibrationMethod, q.calibration_method)
        try:
            if calibrator == "bounded":
                cache = Path(tmpdir) / "ranges.json"
                save_tensors_data(ranges if ranges is not None else _ranges(pre, calib, q), cache)
                source = {"calibration_data_reader": None, "calibration_cache_path": str(cache)}
            else:
                # ORT's histogram calibrators stack all batches into one array: keep them equal
                batch = max(b for b in range(1, 17) if len(rows) % b == 0)
                source = {"calibration_data_reader": DatasetReader.for_model(fp32_path, calib, batch, rows)}
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                quantize_static(
                    str(pre), str(tmp_out), **source,
                    quant_format=QuantFormat.QDQ, per_channel=q.per_channel, reduce_range=q.reduce_range,
                    activation_type=getattr(QuantType, q.activation_type),
                    weight_type=getattr(QuantType, q.weight_type), calibrate_method=method,
                    nodes_to_exclude=list(exclude_nodes), extra_options=extra)
        except EdgepackError:
            raise
        except Exception as e:
            tmp_out.unlink(missing_ok=True)
            raise EdgepackError(f"int8 quantization of {fp32_path.name} failed: {type(e).__name__}: {e}",
                                "try another calibration method in the target profile, or rerun with --debug") from e
        tmp_out.replace(int8_path)
    release_heap()  # ORT's quantizer holds the model as protobuf several times over
    return {"seconds": round(time.perf_counter() - t0, 2), "calibration_samples": len(rows),
            "method": q.calibration_method, "calibrator": calibrator, "activation_type": q.activation_type,
            "weight_type": q.weight_type, "per_channel": q.per_channel,
            "excluded_nodes": list(exclude_nodes)}
