"""Questions the build report asks of an ONNX file: which nodes still compute in float after int8
quantization, and which input dims are dynamic."""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from ..errors import EdgepackError

_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# Ops that only move, select or reshape values: int8 passes through them unchanged, so one left in
# float costs memory traffic, not float arithmetic. They are not reported.
DATA_MOVEMENT = {"Shape", "Size", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                 "Cast", "CastLike", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND",
                 "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "Dropout", "Constant",
                 "ConstantOfShape", "Range", "ScatterND", "ScatterElements"}
# Ops whose outputs are not float whatever their inputs (shapes, indices, booleans, int8).
_NON_FLOAT_OUTPUT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "NonMaxSuppression", "QuantizeLinear",
                     "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or",
                     "Xor", "IsNaN", "IsInf"}
# Ops with a second, integer output (indices).
_FIRST_OUTPUT_FLOAT = {"TopK", "MaxPool", "Unique"}


def float_nodes(qdq_model: Path) -> list[dict]:
    """Nodes of a QDQ int8 model that ONNX Runtime still computes in float, in graph order.

    The answer is ORT's own: the model is optimised the way an ORT session does (level EXTENDED,
    where DequantizeLinear -> op -> QuantizeLinear groups become QLinearConv, QGemm, int8 MaxPool...)
    and a node computes in float when a float activation reaches it: a float graph input, a
    DequantizeLinear output, or the output of another float node. A Q/DQ pair around a node is not
    enough: ORT's quantizer wraps LayerNormalization, and the Q/DQ of neighbouring convolutions wrap
    an Erf, yet ORT has no int8 kernel for either. Data-movement ops (DATA_MOVEMENT) are left out.
    Node names are the file's; a node ORT formed by fusing float nodes keeps the name ORT gave it.
    Rows: {"node", "op", "reason"}.
    """
    import onnxruntime as ort
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    qdq_model = Path(qdq_model)
    if not qdq_model.is_file():
        raise EdgepackError(f"quantized model {qdq_model} does not exist")
    with tempfile.TemporaryDirectory(prefix="edgepack-float-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        # Weights of the optimised copy go to a side file: only its graph is read.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(qdq_model), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            text = str(e).strip().splitlines()
            raise EdgepackError(f"ONNX Runtime cannot load {qdq_model}: {text[0] if text else type(e).__name__}",
                                "the quantized model is broken; rebuild it") from e
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    file_graph = onnx.load(str(qdq_model), load_external_data=False).graph
    by_name = {n.name: n for n in file_graph.node if n.name}
    file_float = _float_tensors(file_graph)
    producers = {o: n for n in file_graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in file_graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantizer_ops = set(QDQRegistry) | set(QLinearOpsRegistry)
    float_in = _float_tensors(optimized)
    rows = []
    for node in optimized.node:
        if (node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type in DATA_MOVEMENT
                or not any(i in float_in for i in node.input)):
            continue
        original = by_name.get(node.name)
        if original is None:
            reason = "formed by ONNX Runtime fusing float nodes"
        elif original.op_type not in quantizer_ops:
            reason = f"ONNX Runtime's quantizer does not quantize {original.op_type}"
        elif _wrapped(original, file_float, producers, consumers):
            reason = (f"quantized in the file, but ONNX Runtime has no int8 kernel for {original.op_type}: "
                      "it runs in float between DequantizeLinear and QuantizeLinear")
        else:
            reason = "left in float by the quantizer (excluded, or its inputs could not be quantized)"
        rows.append({"node": node.name or node.output[0], "op": node.op_type, "reason": reason})
    return rows


def _float_tensors(graph: onnx.GraphProto) -> set[str]:
    """Float activations: float graph inputs and DequantizeLinear outputs, through the nodes they reach."""
    inits = {t.name for t in graph.initializer}
    found = {i.name for i in graph.input if i.name not in inits and i.type.tensor_type.elem_type in _FLOAT}
    grew = True
    while grew:  # nodes usually come topologically sorted: this converges in a pass or two
        grew = False
        for node in graph.node:
            if node.op_type == "DequantizeLinear":
                new = set(node.output)
            elif node.op_type in _NON_FLOAT_OUTPUT or not any(i in found for i in node.input):
                continue
            elif node.op_type == "Cast":
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                new = set(node.output) if to in _FLOAT else set()
            elif node.op_type in _FIRST_OUTPUT_FLOAT:
                new = {node.output[0]}
            else:
                new = set(node.output)
            new.discard("")
            if not new <= found:
                found |= new
                grew = True
    return found


def _wrapped(node, float_tensors: set[str], producers: dict, consumers: dict) -> bool:
    """Every float activation input comes from DequantizeLinear and every output goes to QuantizeLinear."""
    acts = [i for i in node.input if i in float_tensors]
    return (bool(acts) and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                               for i in acts)
            and all(consumers.get(o) and all(c.op_type == "QuantizeLinear" for c in consumers[o])
                    for o in node.output if o))


def dynamic_dims(model_path: Path) -> dict[str, list[int | str]]:
    """Each graph input (initializers excluded) with its dims: an int, the symbolic name, or "?"
    for an unnamed unknown dim. An input of unknown rank (or not a tensor) gets ["..."]."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise EdgepackError(f"ONNX model {model_path} does not exist")
    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as e:
        raise EdgepackError(f"{model_path} is not an ONNX model: {type(e).__name__}: {e}",
                            "check that the file was copied completely") from e
    inits = {t.name for t in graph.initializer}
    dims = {}
    for inp in graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not tensor.HasField("shape"):
            dims[inp.name] = ["..."]
            continue
        dims[inp.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                          for d in tensor.shape.dim]
    return dims
