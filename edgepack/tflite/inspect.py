"""Read a `.tflite` flatbuffer: op histogram, quantize/dequantize counts, float ops, IO specs.

Parsed from the file (with the schema module ai-edge-litert ships) rather than through an
Interpreter: an Interpreter applies the XNNPACK delegate first, after which the op list shows
one opaque DELEGATE node instead of what the converter produced.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgepackError

_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}
# Ops whose job is to move between float and integer; they are counted, not flagged.
_CONVERSION_OPS = {"QUANTIZE", "DEQUANTIZE"}


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as e:  # ai-edge-litert is a core dependency; this is a broken install
        raise EdgepackError("cannot read .tflite files: ai_edge_litert.schema_py_generated is "
                            "missing", "pip install -U ai-edge-litert") from e
    return schema


def _enum_names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def _spec(tensor, type_names, layout: str | None) -> dict:
    shape = [int(s) for s in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
    sig = tensor.ShapeSignatureAsNumpy() if tensor.ShapeSignatureLength() else None
    if sig is not None:  # -1 in the signature marks a dynamic dimension
        shape = [int(d) if d >= 0 else "dynamic" for d in sig]
    dtype = type_names[tensor.Type()].lower()
    spec = {"name": tensor.Name().decode(), "shape": shape,
            "dtype": {"float32": "float32", "int8": "int8", "uint8": "uint8"}.get(dtype, dtype),
            "layout": layout if len(shape) == 4 else None}
    q = tensor.Quantization()
    if q is not None and q.ScaleLength() == 1:
        # Integer IO: callers must quantize inputs with these (runtime.TFLiteRunner does).
        spec["quantization"] = {"scale": float(q.ScaleAsNumpy()[0]),
                                "zero_point": int(q.ZeroPointAsNumpy()[0])}
    return spec


def inspect_tflite(path: Path, layout: str | None = None) -> dict:
    """Describe a converted model. `layout` ("NCHW"/"NHWC") labels 4-D inputs and outputs.

    Returns {"ops": {name: count} over all subgraphs, "num_ops", "quantize_ops",
    "dequantize_ops", "float_ops": [op name, one per op computing in float other than
    QUANTIZE/DEQUANTIZE], "float_op_details": [{"op", "index", "subgraph", "output"}] (the
    output tensor name locates the op), "float_op_counts": {name: count}, "inputs": [spec],
    "outputs": [spec], "size_bytes"}. A spec is {"name", "shape", "dtype", "layout"} plus
    "quantization": {"scale", "zero_point"} for an integer tensor.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise EdgepackError(f"cannot read {path}: {e.strerror}") from e
    schema = _schema()
    try:
        if not schema.Model.ModelBufferHasIdentifier(buf, 0):
            raise ValueError("missing the TFL3 file identifier")
        model = schema.Model.GetRootAs(buf, 0)
        _check_buffers(model, len(buf))
        return _describe(model, schema, layout, len(buf))
    except EdgepackError:
        raise
    except Exception as e:  # a flatbuffer decode error is a truncated or foreign file
        raise EdgepackError(f"{path} is not a valid TFLite model ({e})",
                            "reconvert it; a partial file means an interrupted conversion") from e


def _check_buffers(model, size: int) -> None:
    """Touch every weight buffer: a truncated file fails here instead of in the runtime."""
    for i in range(model.BuffersLength()):
        b = model.Buffers(i)
        n = b.DataLength()  # raises on a vector header past the end of the file
        if b.Offset() > 1 and b.Offset() + b.Size() > size:  # weights stored after the table
            raise ValueError(f"buffer {i} ends past the end of the file")
        if n and b.DataAsNumpy()[-1:].size != 1:
            raise ValueError(f"buffer {i} is cut short")


def _describe(model, schema, layout, size) -> dict:
    op_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        # Builtin codes above 127 live in BuiltinCode; the deprecated int8 field caps at 127.
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = op_names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM" and oc.CustomCode():
            name = f"CUSTOM:{oc.CustomCode().decode()}"
        codes.append(name)

    hist: dict[str, int] = {}
    float_ops: list[dict] = []
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            name = codes[op.OpcodeIndex()]
            hist[name] = hist.get(name, 0) + 1
            if name in _CONVERSION_OPS:
                continue
            tensors = [int(t) for t in np.concatenate([op.InputsAsNumpy(), op.OutputsAsNumpy()])
                       if t >= 0] if op.InputsLength() + op.OutputsLength() else []
            if any(type_names[sg.Tensors(t).Type()] in _FLOAT_TYPES for t in tensors):
                out = sg.Tensors(int(op.OutputsAsNumpy()[0])).Name().decode() if op.OutputsLength() else ""
                float_ops.append({"op": name, "index": i, "subgraph": s, "output": out})

    sg = model.Subgraphs(0)
    float_counts: dict[str, int] = {}
    for f in float_ops:
        float_counts[f["op"]] = float_counts.get(f["op"], 0) + 1
    return {
        "ops": dict(sorted(hist.items())),
        "num_ops": sum(hist.values()),
        "quantize_ops": hist.get("QUANTIZE", 0),
        "dequantize_ops": hist.get("DEQUANTIZE", 0),
        "float_ops": [f["op"] for f in float_ops],
        "float_op_details": float_ops,
        "float_op_counts": float_counts,
        "inputs": [_spec(sg.Tensors(int(t)), type_names, layout) for t in sg.InputsAsNumpy()],
        "outputs": [_spec(sg.Tensors(int(t)), type_names, layout) for t in sg.OutputsAsNumpy()],
        "size_bytes": size,
    }
