"""Per-node int8 sensitivity in bounded memory: which weighted nodes lose the most SQNR.

ONNX Runtime's qdq_loss_debug keeps every activation of every sample for both the float and the
int8 model, then compares. Here both models run side by side a batch at a time (batches sized so
one batch of the compared tensors stays under a budget) and each tensor keeps two running sums,
signal energy and noise energy; its SQNR over all samples is the same number qdq_loss_debug's
`compute_signal_to_quantization_noice_ratio` gives on the concatenated activations.
"""
from __future__ import annotations

import ctypes
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import CalibraterBase
from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

from ..data import Dataset
from .calibrate import BUDGET_MB, DatasetReader, batch_size_for, sample_sizes, session

# Ops whose int8 kernels matter; the fallback ranks and may exclude these.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# The quantizer fuses Conv+Relu and puts Q/DQ after the activation: a node's output is measured there.
_FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}
_EPS = np.finfo(float).eps  # qdq_loss_debug's floor on both norms


def matched_tensors(fp32_path: Path, int8_path: Path) -> dict[str, str]:
    """Float activation name -> the int8 model's tensor holding it after its Q/DQ pair, paired
    as qdq_loss_debug's `create_activation_matching` pairs them (same candidate tensors: ORT's
    float tensors with known types in each shape-inferred model)."""
    floats, quantized = _float_tensors(fp32_path), _float_tensors(int8_path)
    matched = {}
    for suffix in (DEQUANT_OUTPUT_SUFFIX + "_1", DEQUANT_OUTPUT_SUFFIX):  # the plain DQ output wins
        for name in quantized:
            pre = name[:-len(suffix)]
            if name.endswith(suffix) and pre in quantized and pre in floats:
                matched[pre] = name
    for name in quantized:  # a graph output: its producer writes X_QuantizeLinear_Input, the DQ writes X
        pre = name[:-len(QUANT_INPUT_SUFFIX)]
        if name.endswith(QUANT_INPUT_SUFFIX) and pre in quantized and pre in floats:
            matched[pre] = pre
    return matched


def tensor_sqnr(fp32_path: Path, int8_path: Path, data: Dataset, tensors: dict[str, str],
                samples: int = 32, budget_mb: float = BUDGET_MB) -> dict[str, float]:
    """SQNR (dB) of each float tensor (key of `tensors`) against its int8 counterpart (value),
    over `samples` seeded rows of `data`, both models unoptimised as qdq_loss_debug runs them."""
    rows = data.sample_indices(samples, seed=0)
    names = list(tensors)
    with tempfile.TemporaryDirectory(prefix="edgepack-sens-") as tmp:
        aug_f, aug_q = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        reader = DatasetReader.for_model(fp32_path, data, 1, rows)
        fed = [n for n in names if n in reader.names]  # a model input: the float value is the feed
        computed = [n for n in names if n not in fed]
        reader.batch_size = batch_size_for(2 * _with_outputs(fp32_path, computed, aug_f, names, reader), budget_mb)
        _with_outputs(int8_path, [tensors[n] for n in names], aug_q)
        reader.rewind()
        sess_f, sess_q = session(aug_f), session(aug_q)
        signal, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        while (feeds := reader.get_next()):
            out_f = [feeds[n] for n in fed] + (sess_f.run(computed, feeds) if computed else [])
            out_q = sess_q.run([tensors[n] for n in fed + computed], feeds)
            for name, f, q in zip(fed + computed, out_f, out_q):
                f = f.reshape(-1)
                d = f - q.reshape(-1)
                signal[name] += float(np.dot(f, f))
                noise[name] += float(np.dot(d, d))
            del out_f, out_q
    return {n: 20 * math.log10(max(math.sqrt(signal[n]), _EPS) / max(math.sqrt(noise[n]), _EPS)) for n in names}


def release_heap() -> None:
    """Hand the heap that freed models and activations leave behind back to the OS.

    glibc keeps freed memory for reuse (its mmap threshold grows to 32 MB once large arrays are
    freed, so later activations come from the heap and stay there). A build forks its TFLite
    children after the ONNX stage: every page the parent still holds then counts in both
    (bench/build_memory.py). malloc_trim(0) returns the free pages; elsewhere this is a no-op.
    No gc.collect(): refcounting frees these, and a full collection in a forked child would touch
    (copy) every object it inherited."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        pass


def node_sensitivity(fp32_path: Path, int8_path: Path, data: Dataset, samples: int = 32,
                     budget_mb: float = BUDGET_MB) -> list[dict]:
    """Rank weighted nodes by the signal-to-quantization-noise (dB) each one loses, worst first:
    [{"node", "op", "sqnr_db", "lost_db"}]. `fp32_path` is the float model the int8 one was
    quantized from (the preprocessed one); only the tensors the ranking reads are compared."""
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    matched = matched_tensors(fp32_path, int8_path)
    weighted = _weighted_nodes(graph, matched)
    needed = {out for _, out in weighted} | {i for node, _ in weighted for i in node.input if i in matched}
    if not needed:
        return []
    sqnr = tensor_sqnr(fp32_path, int8_path, data, {t: matched[t] for t in sorted(needed)}, samples, budget_mb)
    release_heap()  # the two sessions' activations
    return rank_nodes(graph, sqnr)


def rank_nodes(graph: onnx.GraphProto, sqnr: dict[str, float]) -> list[dict]:
    """Cumulative error grows with depth, so a node's own cost is the SQNR of its input minus the
    SQNR of its output (float model vs int8 model on the same inputs): the error it adds."""
    ranked = []
    for node, out in _weighted_nodes(graph, sqnr):
        in_sqnr = [sqnr[i] for i in node.input if i in sqnr]
        before = min(in_sqnr) if in_sqnr else float("inf")
        after = sqnr[out]
        lost = (before - after) if np.isfinite(before) else -after
        ranked.append({"node": node.name, "op": node.op_type, "sqnr_db": round(float(after), 2),
                       "lost_db": round(float(lost), 2)})
    return sorted(ranked, key=lambda r: -r["lost_db"])


def _weighted_nodes(graph: onnx.GraphProto, measured) -> list[tuple]:
    """(weighted node, the tensor its output is measured at) for every one that can be measured."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    pairs = [(node, _measured_output(node.output[0], consumers, measured)) for node in graph.node
             if node.op_type in WEIGHTED_OPS]
    return [(node, out) for node, out in pairs if out is not None]


def _measured_output(tensor: str, consumers: dict, measured) -> str | None:
    """The tensor a node's output is compared at: its own, or after a fused activation."""
    for _ in range(3):
        if tensor in measured:
            return tensor
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1 or nxt[0].op_type not in _FUSED_ACTIVATIONS:
            return None
        tensor = nxt[0].output[0]
    return tensor if tensor in measured else None


def _float_tensors(path: Path) -> set[str]:
    """ORT's candidate tensors (float, typed, not initializers) of the shape-inferred model."""
    saver = CalibraterBase(Path(path), op_types_to_calibrate=[])
    return set(saver.select_tensors_to_calibrate(saver.model)[0])


def _with_outputs(path: Path, tensors: list[str], out: Path, measure=(), reader=None) -> int:
    """`path` with `tensors` also made graph outputs, saved at `out`; the bytes one sample of
    `measure` takes (when given a reader)."""
    model = CalibraterBase(Path(path), op_types_to_calibrate=[]).model  # shape-inferred: every tensor typed
    present = {o.name for o in model.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    for t in tensors:
        if t not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, types[t], None))
            present.add(t)
    onnx.save(model, str(out))
    return sum(sample_sizes(model, measure, reader)) if reader is not None else 0
