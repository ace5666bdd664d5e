"""Read a `.tflite` flatbuffer: op histogram, quantize/dequantize counts, float ops, IO specs.

Parsed from the file (with the schema module ai-edge-litert ships) rather than through an
Interpreter: an Interpreter applies the XNNPACK delegate first, after which the op list shows
one opaque DELEGATE node instead of what the converter produced.
"""
from __future__ import annotations

import re
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


def _spec(tensor, type_names, layout: str | None, is_input: bool) -> dict:
    shape = [int(s) for s in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
    sig = tensor.ShapeSignatureAsNumpy() if tensor.ShapeSignatureLength() else None
    if sig is not None:  # -1 in the signature marks a dynamic dimension
        shape = [int(d) if d >= 0 else "dynamic" for d in sig]
    dtype = type_names[tensor.Type()].lower()
    q = tensor.Quantization()
    quant = None
    if q is not None and q.ScaleLength() == 1:
        # Integer IO: callers must quantize inputs with these (runtime.TFLiteRunner does).
        quant = {"scale": float(q.ScaleAsNumpy()[0]), "zero_point": int(q.ZeroPointAsNumpy()[0])}
    # A layout labels images: 4-D float tensors (quantized int8 ones were float in PyTorch).
    # Token ids or masks shaped 4-D are not images. Only inputs are transposed for NHWC
    # (litert-torch's to_channel_last_io wraps the arguments), so 4-D outputs stay NCHW.
    image = len(shape) == 4 and (dtype in ("float32", "float16") or quant is not None)
    spec = {"name": tensor.Name().decode(), "shape": shape, "dtype": dtype,
            "layout": (layout if is_input else "NCHW") if image and layout else None}
    if quant is not None:
        spec["quantization"] = quant
    return spec


# litert-torch names signature inputs args_0, args_1... (the PyTorch argument order) and outputs
# output_0, output_1... (the flattened PyTorch output order).
_SIG_NAME = {"inputs": re.compile(r"args_(\d+)$"), "outputs": re.compile(r"output_(\d+)$")}


def _signature_order(model, sg) -> tuple[list[int], list[int], str]:
    """Positions in the subgraph's inputs/outputs (the interpreter's get_*_details() order) of
    each PyTorch argument and output, from the serving signature; identity without one."""
    positions = {"inputs": [int(t) for t in sg.InputsAsNumpy()] if sg.InputsLength() else [],
                 "outputs": [int(t) for t in sg.OutputsAsNumpy()] if sg.OutputsLength() else []}
    identity = (list(range(len(positions["inputs"]))), list(range(len(positions["outputs"]))))
    sig = next((model.SignatureDefs(i) for i in range(model.SignatureDefsLength())
                if model.SignatureDefs(i).SubgraphIndex() == 0), None)
    if sig is None:
        return (*identity, "subgraph")
    orders = []
    for kind, length, get in (("inputs", sig.InputsLength(), sig.Inputs),
                              ("outputs", sig.OutputsLength(), sig.Outputs)):
        keyed = []
        for i in range(length):
            m = _SIG_NAME[kind].match(get(i).Name().decode())
            if m is None:
                return (*identity, "subgraph")
            keyed.append((int(m.group(1)), get(i).TensorIndex()))
        keyed.sort()
        if [k for k, _ in keyed] != list(range(len(positions[kind]))):
            return (*identity, "subgraph")
        # The same tensor can be listed twice (a model returning y twice): take each slot once.
        free = list(positions[kind])
        order = []
        for _, tensor in keyed:
            if tensor not in free:
                return (*identity, "subgraph")
            j = free.index(tensor)
            free[j] = None
            order.append(j)
        orders.append(order)
    return orders[0], orders[1], "signature"


def read_io(path: Path, layout: str | None = None, output_order: list[int] | None = None) -> dict:
    """Only the IO of a `.tflite`: {"inputs", "outputs"} specs in PyTorch order, and
    "input_order"/"output_order": the interpreter position of each (see `_signature_order`).
    `output_order` overrides the signature's (a conversion record's "output_order")."""
    model, schema, _ = _load(path)
    return _io(model, _enum_names(schema.TensorType), layout, output_order)


def _io(model, type_names, layout, output_order=None) -> dict:
    sg = model.Subgraphs(0)
    ins, outs, source = _signature_order(model, sg)
    if output_order is not None:
        if sorted(output_order) != list(range(len(outs))):
            raise EdgepackError(f"output_order {output_order} is not a permutation of the "
                                f"model's {len(outs)} outputs", "use the conversion record's")
        outs, source = [int(j) for j in output_order], "given"
    tin, tout = sg.InputsAsNumpy(), sg.OutputsAsNumpy()
    return {"inputs": [_spec(sg.Tensors(int(tin[j])), type_names, layout, True) for j in ins],
            "outputs": [_spec(sg.Tensors(int(tout[j])), type_names, layout, False) for j in outs],
            "input_order": ins, "output_order": outs, "order_source": source}


def inspect_tflite(path: Path, layout: str | None = None) -> dict:
    """Describe a converted model. `layout` ("NCHW"/"NHWC") labels its 4-D float inputs.

    Returns {"ops": {name: count} over all subgraphs, "num_ops", "quantize_ops",
    "dequantize_ops", "float_ops": [op name, one per op computing in float other than
    QUANTIZE/DEQUANTIZE], "float_op_details": [{"op", "index", "subgraph", "output"}] (the
    output tensor name locates the op), "float_op_counts": {name: count}, "inputs": [spec],
    "outputs": [spec] (in the PyTorch argument and flattened output order), "input_order" /
    "output_order" (the interpreter position of each), "order_source" ("signature" or
    "subgraph"), "size_bytes"}. A spec is {"name" (the tensor's), "shape", "dtype", "layout"}
    plus "quantization": {"scale", "zero_point"} for a quantized tensor.
    """
    model, schema, size = _load(path, check=True)
    return _describe(model, schema, layout, size)


def _load(path: Path, check: bool = False):
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
        if check:
            _check_buffers(model, len(buf))
        model.Subgraphs(0).Tensors(0)  # a cut or foreign file fails here rather than later
        return model, schema, len(buf)
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
        **_io(model, type_names, layout),
        "size_bytes": size,
    }
