"""fp16 ONNX: every float initializer and op in half precision, inputs and outputs kept float32.

ONNX Runtime's own converter (onnxruntime.transformers.float16) does the work; inputs and
outputs stay float32 (`keep_io_types`) so the artifact takes the same feeds as the fp32 one and
the caller does not convert anything. Ops with no fp16 kernel in ONNX Runtime's CPU provider are
left in float32 behind Cast nodes by the converter's own block list; the record counts them.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from ..errors import EdgepackError


def to_fp16(src: Path, dst: Path, block_ops: list[str] | None = None) -> dict:
    """Write the fp16 version of `src` to `dst` (atomically). Returns {size_bytes, casts, float32_ops}."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise EdgepackError(f"{src}: not an ONNX model ({type(e).__name__})", "pass the fp32 .onnx file") from e
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(block_ops or []))
    try:
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    except Exception as e:  # noqa: BLE001  (the converter raises plain exceptions on graphs it cannot type)
        raise EdgepackError(f"{src.name}: the fp16 conversion failed ({type(e).__name__}: {e})",
                            "build without fp16 (drop it from the profile's precisions) and report the model") from e
    tmp = dst.with_name(f".{dst.name}.partial")
    onnx.save(half, str(tmp))
    tmp.replace(dst)
    ops = Counter(n.op_type for n in half.graph.node)
    kept = sorted(op for op in {n.op_type for n in model.graph.node} if op in blocked)
    return {"size_bytes": dst.stat().st_size, "casts": ops.get("Cast", 0), "float32_ops": kept,
            "converter": "onnxruntime.transformers.float16 (keep_io_types)"}
