"""Stage 3: static int8 with ONNX Runtime (QDQ, per-channel weights), and per-node sensitivity.

Calibrators stay ONNX Runtime's; edgepack supplies the data reader, the scheme from the target
profile, and the float-vs-int8 comparison used by the accuracy-aware fallback.
"""
from __future__ import annotations

import io
import logging
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..data import Dataset
from ..errors import EdgepackError
from ..targets import Quantization

log = logging.getLogger(__name__)
# Ops whose int8 kernels matter; the fallback ranks and may exclude these.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class DatasetReader(CalibrationDataReader):
    """ONNX Runtime's data-reader protocol over a Dataset: one feed dict per batch.

    `fixed=True` (a model exported with a fixed batch size) skips a ragged last batch."""

    def __init__(self, input_name: str, data: Dataset, batch_size: int = 16, fixed: bool = False):
        self.input_name, self.data, self.batch_size, self.fixed = input_name, data, batch_size, fixed
        self.rewind()

    def get_next(self):
        batch = next(self._it, None)
        if batch is not None and self.fixed and len(batch[0]) != self.batch_size:
            batch = None
        return None if batch is None else {self.input_name: batch[0].astype(np.float32)}

    def rewind(self):
        self._it = self.data.batches(self.batch_size)

    @classmethod
    def for_model(cls, model_path: Path, data: Dataset, batch_size: int = 16) -> "DatasetReader":
        """A reader shaped for the model's first input: its fixed batch size, if it has one."""
        inp = onnx.load(str(model_path), load_external_data=False).graph.input[0]
        dims = inp.type.tensor_type.shape.dim
        fixed = dims[0].dim_value if dims and dims[0].dim_value > 0 else 0
        return cls(inp.name, data, fixed or batch_size, fixed=bool(fixed))


def check_calibration_data(data: Dataset) -> None:
    if len(data) == 0:
        raise EdgepackError(f"calibration data {data.source} is empty",
                            "pass --calib with at least a few dozen representative samples")
    bad = ~np.isfinite(data.x)
    if bad.any():
        n = int(bad.reshape(len(data.x), -1).any(1).sum())
        raise EdgepackError(f"calibration data {data.source} has NaN/Inf values in {n} of {len(data)} samples",
                            "clean or drop those samples; int8 ranges computed from them would be garbage")


def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """ORT's recommended pre-pass (shape inference + graph optimisation) before quantizing."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
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


def quantize_onnx(fp32_path: Path, int8_path: Path, calib: Dataset, q: Quantization,
                  threads: int = 1, exclude_nodes: list[str] | tuple = (),
                  preprocessed: Path | None = None) -> dict:
    """Quantize `fp32_path` to a QDQ int8 model at `int8_path` (atomic); returns a record."""
    check_calibration_data(calib)
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    calib = calib.take(q.calibration_samples)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepack-q-") as tmpdir:
        pre = preprocessed or preprocess(fp32_path, Path(tmpdir) / "pre.onnx")
        tmp_out = int8_path.with_name(f".{int8_path.name}.tmp")
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 "CalibTensorRangeSymmetric": False}
        if q.calibration_method == "Percentile":
            extra["CalibPercentile"] = q.percentile
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                quantize_static(
                    str(pre), str(tmp_out), DatasetReader.for_model(fp32_path, calib),
                    quant_format=QuantFormat.QDQ, per_channel=q.per_channel,
                    activation_type=getattr(QuantType, q.activation_type),
                    weight_type=getattr(QuantType, q.weight_type),
                    calibrate_method=getattr(CalibrationMethod, q.calibration_method),
                    nodes_to_exclude=list(exclude_nodes), extra_options=extra)
        except Exception as e:
            tmp_out.unlink(missing_ok=True)
            raise EdgepackError(f"int8 quantization of {fp32_path.name} failed: {type(e).__name__}: {e}",
                                "try another calibration method in the target profile, or rerun with --debug") from e
        tmp_out.replace(int8_path)
    return {"seconds": round(time.perf_counter() - t0, 2), "calibration_samples": len(calib),
            "method": q.calibration_method, "activation_type": q.activation_type,
            "weight_type": q.weight_type, "per_channel": q.per_channel,
            "excluded_nodes": list(exclude_nodes)}


def node_sensitivity(fp32_path: Path, int8_path: Path, data: Dataset, samples: int = 32) -> list[dict]:
    """Rank weighted nodes by the signal-to-quantization-noise (dB) each one loses.

    Cumulative error grows with depth, so a node's own cost is the SQNR of its input minus the
    SQNR of its output (float model vs int8 model on the same inputs): the error it adds.
    """
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)
    graph = onnx.load(str(fp32_path)).graph
    data = data.take(samples)
    with tempfile.TemporaryDirectory(prefix="edgepack-sens-") as tmpdir:
        aug_f, aug_q = Path(tmpdir) / "f.onnx", Path(tmpdir) / "q.onnx"
        with redirect_stdout(io.StringIO()):
            modify_model_output_intermediate_tensors(str(fp32_path), str(aug_f))
            modify_model_output_intermediate_tensors(str(int8_path), str(aug_q))
            acts_f = collect_activations(str(aug_f), DatasetReader.for_model(fp32_path, data, 8))
            acts_q = collect_activations(str(aug_q), DatasetReader.for_model(fp32_path, data, 8))
        errors = compute_activation_error(create_activation_matching(acts_q, acts_f))
    sqnr = {name: e["xmodel_err"] for name, e in errors.items() if "xmodel_err" in e}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    ranked = []
    for node in graph.node:
        out = _measured_output(node.output[0], consumers, sqnr) if node.op_type in WEIGHTED_OPS else None
        if out is None:
            continue
        in_sqnr = [sqnr[i] for i in node.input if i in sqnr]
        before = min(in_sqnr) if in_sqnr else float("inf")
        after = sqnr[out]
        lost = (before - after) if np.isfinite(before) else -after
        ranked.append({"node": node.name, "op": node.op_type, "sqnr_db": round(float(after), 2),
                       "lost_db": round(float(lost), 2)})
    return sorted(ranked, key=lambda r: -r["lost_db"])


_FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}


def _measured_output(tensor: str, consumers: dict, sqnr: dict) -> str | None:
    """The quantizer fuses Conv+Relu and puts Q/DQ after the activation: follow it there."""
    for _ in range(3):
        if tensor in sqnr:
            return tensor
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1 or nxt[0].op_type not in _FUSED_ACTIVATIONS:
            return None
        tensor = nxt[0].output[0]
    return tensor if tensor in sqnr else None
