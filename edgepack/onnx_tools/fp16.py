"""fp16 ONNX: every float initializer and op in half precision, inputs and outputs kept float32.

ONNX Runtime's own converter (onnxruntime.transformers.float16) does the work; inputs and
outputs stay float32 (`keep_io_types`) so the artifact takes the same feeds as the fp32 one and
the caller does not convert anything. Ops with no fp16 kernel in ONNX Runtime's CPU provider are
left in float32 behind Cast nodes by the converter's own block list; the record counts them.

fp16 ends at 65504: the converter clamps larger constants to it without a word (a `+ 2e5` in the
graph becomes `+ 65504`) and a larger activation becomes inf. So every node that reads or writes
a tensor beyond FP16_LIMIT (a constant, or an activation on the sample feeds given) is kept in
float32, and the record names each with the value that sent it there.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import EdgepackError

FP16_MAX = 65504.0
# Activations are seen on a few samples only: keep a node in float32 from half of fp16's range.
FP16_LIMIT = FP16_MAX / 2


def to_fp16(src: Path, dst: Path, block_ops: list[str] | None = None,
            samples: list[dict[str, np.ndarray]] | None = None) -> dict:
    """Write the fp16 version of `src` to `dst` (atomically). `samples`: feeds (input name -> array)
    on which activations beyond FP16_LIMIT are looked for. Returns {size_bytes, casts, float32_ops,
    float32_nodes}."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise EdgepackError(f"{src}: not an ONNX model ({type(e).__name__})", "pass the fp32 .onnx file") from e
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(block_ops or []))
    _constants_to_initializers(model)  # the converter casts Constant values even in blocked nodes
    out_of_range = out_of_range_nodes(model, samples)
    try:
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked,
                                        node_block_list=[n["node"] for n in out_of_range])
    except Exception as e:  # noqa: BLE001  (the converter raises plain exceptions on graphs it cannot type)
        raise EdgepackError(f"{src.name}: the fp16 conversion failed ({type(e).__name__}: {e})",
                            "build without fp16 (drop it from the profile's precisions) and report the model") from e
    if out_of_range:
        _drop_fp16_round_trips(half)  # between two float32 nodes, a trip through fp16 would overflow
    tmp = dst.with_name(f".{dst.name}.partial")
    onnx.save(half, str(tmp))
    tmp.replace(dst)
    ops = Counter(n.op_type for n in half.graph.node)
    kept = sorted(op for op in {n.op_type for n in model.graph.node} if op in blocked)
    return {"size_bytes": dst.stat().st_size, "casts": ops.get("Cast", 0), "float32_ops": kept,
            "float32_nodes": out_of_range, "fp16_limit": FP16_LIMIT,
            "converter": "onnxruntime.transformers.float16 (keep_io_types)"}


def out_of_range_nodes(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]] | None = None) -> list[dict]:
    """Nodes of the main graph that read or write a float tensor with a finite |value| > FP16_LIMIT:
    [{"node", "op", "tensor", "max_abs", "reason"}], in graph order."""
    big: dict[str, tuple[float, str]] = {}  # tensor name -> (max |v|, what it is)
    for init in model.graph.initializer:
        _note(big, init.name, numpy_helper.to_array(init), "constant")
    for name, value in _activations(model, samples or []).items():
        _note(big, name, value, "activation on the sample inputs")
    found = []
    for i, node in enumerate(model.graph.node):
        hits = [(big[t][0], t, big[t][1]) for t in list(node.input) + list(node.output) if t in big]
        if hits:
            value, tensor, what = max(hits)
            name = node.name or f"{node.op_type}_{i}"
            if not node.name:
                node.name = name  # the converter's block list goes by name
            found.append({"node": name, "op": node.op_type, "tensor": tensor, "max_abs": float(f"{value:.4g}"),
                          "reason": f"{what} {tensor} reaches {value:.4g}, beyond fp16's {FP16_MAX:g}"
                          if value > FP16_MAX else f"{what} {tensor} reaches {value:.4g}, within 2x of fp16's "
                          f"{FP16_MAX:g}"})
    return found


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Float Constant nodes of the main graph become initializers (which the converter keeps in
    float32 when only float32 nodes read them)."""
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            init = onnx.TensorProto()
            init.CopyFrom(value)
            init.name = node.output[0]
            model.graph.initializer.append(init)
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _drop_fp16_round_trips(model: onnx.ModelProto) -> None:
    """Cast(float32 -> fp16) read only by Casts back to float32 (what the converter puts between
    two float32 nodes): the casts back become Identity on the float32 tensor, the first goes."""
    g, FLOAT, HALF = model.graph, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    readers: dict[str, list] = {}
    for node in g.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    outputs = {o.name for o in g.output}

    def cast_to(node, to) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    dropped = set()
    for node in g.node:
        if not cast_to(node, HALF) or types.get(node.input[0]) != FLOAT or node.output[0] in outputs:
            continue
        back = readers.get(node.output[0], [])
        if not back or not all(cast_to(r, FLOAT) for r in back):
            continue
        for r in back:
            r.op_type, r.input[0] = "Identity", node.input[0]
            del r.attribute[:]
        dropped.add(id(node))
    if dropped:
        keep = [n for n in g.node if id(n) not in dropped]
        del g.node[:]
        g.node.extend(keep)


def _note(big: dict, name: str, array: np.ndarray, what: str) -> None:
    if array.dtype.kind != "f" or array.size == 0:
        return
    finite = np.abs(array[np.isfinite(array)].astype(np.float64))
    peak = float(finite.max()) if finite.size else 0.0
    if peak > FP16_LIMIT and peak > big.get(name, (0.0, ""))[0]:
        big[name] = (peak, what)


def _activations(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every node output of the fp32 model on `samples`, by name (float ones; max |v| over samples)."""
    if not samples:
        return {}
    import onnxruntime as ort
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in have:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
                have.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (a graph ORT cannot load with its inner tensors as outputs)
        raise EdgepackError(f"fp16: cannot look at the model's activations ({type(e).__name__}: {e})",
                            "build without fp16 and report the model") from e
    names = [o.name for o in sess.get_outputs()]
    peaks: dict[str, np.ndarray] = {}
    for feed in samples:
        for name, value in zip(names, sess.run(None, feed)):
            value = np.asarray(value)
            if value.dtype.kind == "f" and value.size:
                finite = np.abs(value[np.isfinite(value)])
                peak = np.asarray([finite.max() if finite.size else 0.0], np.float64)
                peaks[name] = np.maximum(peaks.get(name, peak), peak)
    return peaks
