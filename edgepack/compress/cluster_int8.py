"""What int8 makes of clustered weights: the codes ONNX Runtime's per-channel quantization gives a
weight, and the distinct codes per channel and per tensor of an int8 ONNX file (how the cluster
stage and its tests check that int8 kept at most k values). Re-exported by compress.cluster."""
from __future__ import annotations

import numpy as np
import torch

INT8_MAX = 127


def int8_codes(weight: torch.Tensor, axis: int = 0, qmax: int = INT8_MAX) -> np.ndarray:
    """The int8 values ONNX Runtime's symmetric per-channel weight quantization gives `weight`
    (scale = max |w| / qmax per output channel; qmax 64 with reduce_range): what the stage can
    say before export."""
    w = weight.detach().double().movedim(axis, 0).reshape(weight.shape[axis], -1)
    scale = (w.abs().amax(1, keepdim=True) / qmax).clamp(min=1e-30)
    return torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8).numpy()


def distinct_per_channel(codes: np.ndarray) -> int:
    """The largest number of distinct values in one row (output channel) of (C, n) codes."""
    return max((len(np.unique(row)) for row in codes), default=0)


def int8_distinct_per_channel(onnx_path) -> dict[str, int]:
    """Per int8 weight initializer of an ONNX model (those a DequantizeLinear reads), the largest
    number of distinct int8 values in one output channel (the DequantizeLinear's axis)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype != np.int8 or w.ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        out[node.input[0]] = distinct_per_channel(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1))
    return out


def int8_distinct_per_tensor(onnx_path) -> dict[str, int]:
    """Per int8 weight initializer of an ONNX model (those a DequantizeLinear reads), its number of
    distinct int8 values: at most k for a layer clustered with `scaled` (one set of codes)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.dtype == np.int8 and w.ndim >= 2:
                out[node.input[0]] = int(len(np.unique(w)))
    return out
