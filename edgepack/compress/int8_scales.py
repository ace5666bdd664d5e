"""Per-channel int8 weight scales rounded to a few mantissa bits, so that the artifact compresses.

A per-channel int8 ONNX model stores one float32 scale per output channel (and an int32 bias
quantized with input scale x that scale). Those floats are incompressible: in a clustered
MobileNetV2 (width 0.35) they were a fifth of the deflated file once the weight codes took 3 bits.
`round_weight_scales` rounds each such scale to `bits` mantissa bits (a relative change of at most
2^-(bits+1): 3.1% at 4 bits), so a layer's scales take a few dozen distinct values and deflate
to a fraction; the int8 codes are left alone, and each bias is re-quantized with its new scale
(bias scale = input scale x weight scale, as ONNX Runtime's quantizer writes it). The change is
a per-channel gain error, the same kind BatchNorm folding rounds; callers compare the outputs
(`max_logit_change`). It applies to a plain int8 file just as well: report both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgepackError

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 values rounded to the nearest value with `bits` explicit mantissa bits (ties away)."""
    if not 0 <= bits <= 23:
        raise EdgepackError(f"mantissa bits must be 0..23, not {bits}")
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    if drop:
        u = (u + (1 << (drop - 1))) >> drop << drop
    return u.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def round_weight_scales(src: Path | str, dst: Path | str, bits: int = 4, max_codes: int | None = None) -> dict:
    """Writes `src` to `dst` with every per-channel weight scale rounded to `bits` mantissa bits
    (only weights with at most `max_codes` distinct int8 codes when given: the clustered layers).
    Returns {"tensors", "channels", "max_rel_change", "bits", "skipped" ([{"node", "reason"}])}."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1

    def dq_of(name):
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits else None

    def arr(name):
        return numpy_helper.to_array(inits[name])

    def put(name, a):
        inits[name].CopyFrom(numpy_helper.from_array(a, name))
    done, channels, worst, skipped = 0, 0, 0.0, []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        wdq = dq_of(node.input[1])
        if wdq is None or len(wdq.input) < 2 or wdq.input[1] not in inits:
            continue
        q, scale = arr(wdq.input[0]), arr(wdq.input[1])
        if q.dtype != np.int8 or scale.ndim == 0 or scale.size < 2 or users.get(wdq.input[1], 0) != 1:
            continue
        if max_codes is not None and len(np.unique(q)) > max_codes:
            continue
        new = round_mantissa(scale, bits)
        bdq = dq_of(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        xdq = dq_of(node.input[0]) or producer.get(node.input[0])
        if bdq is not None:
            if xdq is None or xdq.op_type != "DequantizeLinear" or xdq.input[1] not in inits \
                    or users.get(bdq.input[1], 0) != 1 or users.get(bdq.input[0], 0) != 1:
                skipped.append({"node": node.name, "reason": "bias scale shared or not input scale x weight scale"})
                continue  # cannot re-quantize the bias consistently: leave the layer alone
            b, b_scale = arr(bdq.input[0]).astype(np.float64), arr(bdq.input[1]).astype(np.float64)
            new_b_scale = (arr(xdq.input[1]).astype(np.float32) * new).astype(np.float32)
            b_new = np.round(b * b_scale / new_b_scale.astype(np.float64))
            if np.abs(b_new).max(initial=0) >= 2 ** 31 - 1:
                skipped.append({"node": node.name, "reason": "the re-quantized bias would overflow int32"})
                continue
            put(bdq.input[0], b_new.astype(np.int32))
            put(bdq.input[1], new_b_scale)
        put(wdq.input[1], new)
        worst = max(worst, float(np.max(np.abs(new.astype(np.float64) / scale - 1))))
        done += 1
        channels += scale.size
    onnx.save(model, str(dst))
    return {"tensors": done, "channels": channels, "max_rel_change": round(worst, 5), "bits": bits, "skipped": skipped}


def max_logit_change(a: Path | str, b: Path | str, inputs: np.ndarray) -> dict:
    """Both models run by ONNX Runtime on `inputs`: the largest |output difference| over the
    largest |output| of `a`, and the fraction of rows whose argmax agrees."""
    import onnxruntime as ort
    outs = []
    for path in (a, b):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: inputs})[0])
    ref, got = outs
    return {"max_abs_change": float(np.abs(got - ref).max()), "max_abs_output": float(np.abs(ref).max()),
            "argmax_agree": float((got.argmax(1) == ref.argmax(1)).mean()), "n": int(len(inputs))}
