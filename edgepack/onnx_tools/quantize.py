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
    """ONNX Runtime's data-reader protocol over a Dataset: one feed dict per batch (or per sample,
    for a model whose inputs are not all batch-first with a dynamic batch)."""

    def __init__(self, names: list[str], dtypes: list[str], data: Dataset, batch_size: int = 16,
                 batchable: bool = True):
        self.names, self.dtypes, self.data = names, dtypes, data
        self.batch_size, self.batchable = batch_size, batchable
        self.rewind()

    def get_next(self):
        arrays = next(self._it, None)
        if arrays is None:
            return None
        return {n: np.asarray(a, dtype=d) for n, d, a in zip(self.names, self.dtypes, arrays)}

    def rewind(self):
        if self.batchable:
            self._it = (arrays for arrays, _ in self.data.batches(self.batch_size))
        else:
            self._it = ([a[0] for a in self.data.arrays(slice(i, i + 1))] for i in range(len(self.data)))

    @classmethod
    def for_model(cls, model_path: Path, data: Dataset, batch_size: int = 16) -> "DatasetReader":
        """A reader shaped for the model's inputs: batches when every input's batch axis is dynamic."""
        g = onnx.load(str(model_path), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        dims0 = [i.type.tensor_type.shape.dim[0] if i.type.tensor_type.shape.dim else None for i in inputs]
        batchable = all(d is not None and d.dim_value <= 0 for d in dims0)
        dtypes = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in inputs]
        names = [i.name for i in inputs]
        if len(names) == 1:  # a single input may be named anything in the data
            ordered = Dataset({names[0]: next(iter(data.inputs.values()))}, data.y, data.source, data.classes)
        else:
            missing = [n for n in names if n not in data.inputs]
            if missing:
                raise EdgepackError(f"calibration data {data.source} has no input named {', '.join(missing)}",
                                    f"it has: {', '.join(data.names)}")
            ordered = Dataset({n: data.inputs[n] for n in names}, data.y, data.source, data.classes)
        return cls(names, dtypes, ordered, batch_size, batchable)


def check_calibration_data(data: Dataset) -> None:
    if len(data) == 0:
        raise EdgepackError(f"calibration data {data.source} is empty",
                            "pass --calib with at least a few dozen representative samples")
    n = data.nonfinite_count()
    if n:
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
    calib = calib.sample(q.calibration_samples, seed=0)  # seeded, stratified: never the first N
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
    data = data.sample(samples, seed=0)
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
