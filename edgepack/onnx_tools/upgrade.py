"""ONNX files from other frameworks, made ready for ONNX Runtime's int8 quantizer.

Files people ship declare old opsets (11 and lower), keep weights in external data files, or hold
float16 weights and inputs. ORT's `quantize_static` writes per-channel DequantizeLinear nodes with an
`axis` attribute, which exists only from opset 13: on an opset-11 file it writes a model ORT then
refuses to load. Calibration feeds float32 and its ranges are float32 arithmetic, so fp16 graphs go
to float32 first. `prepare_onnx` does both, writes one self-contained file, and checks on a random
input that the prepared model still computes what the original did.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper, version_converter

from ..errors import EdgepackError

# Per-channel DequantizeLinear (`axis`) needs opset 13.
MIN_OPSET = 13
# Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26
# Allowed max |prepared - original| / max |original| on a random input. fp16 keeps about 3
# significant digits and rounds every intermediate tensor; a pure opset conversion keeps fp32 ops.
FP16_TOLERANCE = 3e-2
OPSET_TOLERANCE = 1e-4
# Dims the random check input takes where the model leaves them dynamic (batch axis, other axes).
CHECK_BATCH, CHECK_DIM = 1, 32
# External tensors up to this size are read before the opset conversion, larger ones after.
SMALL_TENSOR = 2**20
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def prepare_onnx(src: Path, dst: Path, min_opset: int = MIN_OPSET,
                 shapes: dict[str, Sequence[int]] | None = None) -> dict:
    """Write `src` to `dst` as one file ORT can quantize; return what was changed.

    `shapes` (input name -> full shape) sizes the random input of the numeric check for inputs
    with dynamic dims; otherwise the batch axis is 1 and other dynamic axes 32.
    Record: original_opset, opset, converted, fp16_to_fp32 (with fp16_inputs / fp16_outputs now
    float32), external_data (src had it), dst_external_data (dst needed it: over 2 GB),
    original_ir_version, ir_version, producer, initializer_inputs_removed, check, seconds.
    """
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    if not src.is_file():
        raise EdgepackError(f"ONNX model {src} does not exist")
    if dst.resolve() == src.resolve():
        raise EdgepackError(f"prepare_onnx would overwrite its source {src}",
                            "write the prepared model to another path")
    model, external = _load(src)
    record = {"original_opset": _default_opset(model), "original_ir_version": model.ir_version,
              "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
              "external_data": external}
    opset = record["original_opset"]
    record["converted"] = opset is not None and opset < min_opset
    if record["converted"]:
        model = _convert_opset(model, min_opset, src)
    record["opset"] = _default_opset(model)
    _load_external(model, src)
    # Opset 13 needs IR version 7; old files also list initializers as graph inputs (IR < 4), which
    # makes ORT treat weights as overridable inputs and skip constant folding.
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(
        [o for o in model.opset_import if o.domain in _DEFAULT_DOMAINS], ignore_unknown=True))
    record["ir_version"] = model.ir_version
    record["initializer_inputs_removed"] = _drop_initializer_inputs(model.graph)
    fp16_in, fp16_out = _fp16_to_fp32(model) if _has_fp16(model) else (None, None)
    record["fp16_to_fp32"] = fp16_in is not None
    if record["fp16_to_fp32"]:
        record["fp16_inputs"], record["fp16_outputs"] = fp16_in, fp16_out
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, data_name = dst.with_name(f".{dst.name}.tmp"), f"{dst.name}.data"
    try:
        record["dst_external_data"] = _save(model, tmp, data_name)
        _check_model(tmp, src)
        if record["converted"] or record["fp16_to_fp32"]:
            tol = FP16_TOLERANCE if record["fp16_to_fp32"] else OPSET_TOLERANCE
            record["check"] = compare_outputs(src, tmp, tol, shapes or {})
        else:
            record["check"] = {"skipped": "nothing was converted"}
        tmp.replace(dst)
    except BaseException:
        if record.get("dst_external_data"):
            dst.with_name(data_name).unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _load(src: Path) -> tuple[onnx.ModelProto, bool]:
    """The model with its small external tensors read in; a missing data file is named.

    Large external tensors stay references until after the opset conversion: the converter
    serialises the model, which protobuf refuses past 2 GB, and it carries references through."""
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as e:
        raise EdgepackError(f"{src} is not an ONNX model: {_first_line(e)}",
                            "check that the file was copied completely") from e
    locations = {}
    for tensor in _tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            locations.setdefault(external_data_helper.ExternalDataInfo(tensor).location, tensor.name)
    for location, tensor_name in locations.items():
        expected = src.parent / location
        if not expected.is_file():
            raise EdgepackError(
                f"{src} keeps tensor '{tensor_name}' in an external data file {expected}, which does not exist",
                f"copy '{location}' next to {src.name}: external data paths are relative to the model file")
    try:
        onnx.checker.check_model(str(src))  # by path: works for external data and files over 2 GB
    except Exception as e:
        raise EdgepackError(f"{src} is not a valid ONNX model: {_first_line(e)}",
                            "re-export it, or check that the model and its data files were copied completely") from e
    # Small tensors now: converter adapters read constant inputs (Upsample scales, Reshape shapes).
    _load_external(model, src, max_bytes=SMALL_TENSOR)
    return model, bool(locations)


def _load_external(model: onnx.ModelProto, src: Path, max_bytes: int | None = None) -> None:
    for tensor in _tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        length = external_data_helper.ExternalDataInfo(tensor).length
        if max_bytes is not None and (length is None or length > max_bytes):
            continue
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(src.parent))
        except Exception as e:
            raise EdgepackError(f"cannot read tensor '{tensor.name}' of {src} from its external data file: "
                                f"{_first_line(e)}", "check that the data file was copied completely") from e
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)


def _convert_opset(model: onnx.ModelProto, target: int, src: Path) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(model, target)
    except Exception as e:
        original = _default_opset(model)
        node, node_error = _failing_node(model, target)
        if node is None:
            raise EdgepackError(
                f"ONNX's version converter cannot take {src.name} from opset {original} to {target}: {_first_line(e)}",
                f"re-export the model from its framework at opset {target} or newer "
                "(torch.onnx.export(..., opset_version=17), python -m tf2onnx.convert --opset 17)") from e
        detail = _first_line(node_error)
        if "no registered schema" in detail:
            detail = f"{node.op_type} is not a standard ONNX op at opset {target}"
        raise EdgepackError(
            f"ONNX's version converter cannot take op {node.op_type} (node '{node.name or node.output[0]}') "
            f"of {src.name} from opset {original} to {target}: {detail}",
            f"re-export the model from its framework at opset {target} or newer "
            f"(torch.onnx.export(..., opset_version=17), python -m tf2onnx.convert --opset 17), "
            f"or rewrite the {node.op_type} nodes with standard ops (onnx.helper) first") from e


def _failing_node(model: onnx.ModelProto, target: int):
    """The first node the converter cannot take alone: the converter's own errors rarely name it."""
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:
        typed = model
    graph = typed.graph
    infos = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    inits = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    tried = set()

    def info(name):
        return infos.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    for node in graph.node:
        key = (node.op_type, tuple(sorted(a.name for a in node.attribute)))
        if (node.domain not in _DEFAULT_DOMAINS or node.op_type == "Constant" or key in tried
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            continue
        tried.add(key)
        names = list(dict.fromkeys(i for i in node.input if i))
        probe = helper.make_graph(
            [constants[i] for i in names if i in constants] + [node], "probe",
            [info(i) for i in names if i not in inits and i not in constants],
            [info(o) for o in node.output if o], [inits[i] for i in names if i in inits])
        try:
            version_converter.convert_version(
                helper.make_model(probe, opset_imports=list(model.opset_import), ir_version=model.ir_version), target)
        except Exception as e:
            return node, e
    return None, None


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph of If / Loop / Scan bodies, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _graphs(sub)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every stored tensor: initializers, sparse ones, and tensor attributes (Constant values)."""
    for g in _graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for g in _graphs(graph):
        yield from g.input
        yield from g.output
        yield from g.value_info


def _drop_initializer_inputs(graph: onnx.GraphProto) -> int:
    inits = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in inits]
    removed = len(graph.input) - len(keep)
    if removed:
        del graph.input[:]
        graph.input.extend(keep)
    return removed


def _has_fp16(model: onnx.ModelProto) -> bool:
    return (any(t.data_type == TensorProto.FLOAT16 for t in _tensors(model.graph))
            or any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in _value_infos(model.graph)))


def _fp16_to_fp32(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Every float16 in the graph becomes float32; returns the graph inputs / outputs that were fp16."""
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    inputs = [v.name for v in model.graph.input if v.type.tensor_type.elem_type == f16]
    outputs = [v.name for v in model.graph.output if v.type.tensor_type.elem_type == f16]
    for tensor in _tensors(model.graph):
        if tensor.data_type == f16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for info in _value_infos(model.graph):
        if info.type.tensor_type.elem_type == f16:
            info.type.tensor_type.elem_type = f32
    for g in _graphs(model.graph):
        for node in g.node:
            if node.domain not in _DEFAULT_DOMAINS:
                continue
            # Cast(to=), and the dtype of generators (RandomNormal, EyeLike, ...).
            for attr in node.attribute:
                if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == f16:
                    attr.i = f32
    return inputs, outputs


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in _tensors(model.graph):
        total += len(t.raw_data) + sum(len(s) for s in t.string_data) + 8 * (
            len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
    return total


def _save(model: onnx.ModelProto, path: Path, data_name: str) -> bool:
    """One file, or (past protobuf's 2 GB) the model plus `data_name` beside it. True if external."""
    if _tensor_bytes(model) <= PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return False
    path.with_name(data_name).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return True


def _check_model(path: Path, src: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise EdgepackError(f"the prepared copy of {src.name} fails ONNX's checker: {_first_line(e)}",
                            "re-export the model from its framework at opset 13 or newer") from e


def compare_outputs(original: Path, prepared: Path, tolerance: float,
                    shapes: dict[str, Sequence[int]] | None = None, seed: int = 0) -> dict:
    """Run both files in ORT on one random input; EdgepackError if `prepared` drifts past `tolerance`.

    The measure per float output is max |prepared - original| / max |original| over the
    positions where the original is finite (an fp16 original overflows where float32 does not).
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    try:
        ref_sess = ort.InferenceSession(str(original), so, providers=["CPUExecutionProvider"])
        feed = _random_feed(ref_sess, shapes or {}, seed)
        ref = ref_sess.run(None, feed)
    except Exception as e:
        return {"skipped": f"ONNX Runtime cannot run the original {original.name}: {_first_line(e)}"}
    try:
        sess = ort.InferenceSession(str(prepared), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {i.name: feed[i.name].astype(np.float32) if i.type == "tensor(float)"
                              else feed[i.name] for i in sess.get_inputs()})
    except Exception as e:
        raise EdgepackError(f"ONNX Runtime runs {original.name} but not its prepared copy: {_first_line(e)}",
                            "re-export the model from its framework at opset 13 or newer") from e
    worst = {"relative_diff": 0.0, "max_abs_diff": 0.0, "output": None}
    for out, a, b in zip(ref_sess.get_outputs(), ref, got):
        if out.type not in _FLOAT_TYPES:
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        finite = np.isfinite(a)
        if a.shape != b.shape or not np.isfinite(b[finite]).all():
            raise EdgepackError(f"the prepared copy of {original.name} gives output '{out.name}' of shape "
                                f"{b.shape} (non-finite values: {int((~np.isfinite(b[finite])).sum())}); "
                                f"the original gives {a.shape}")
        if not finite.any():
            continue
        diff = float(np.abs(a[finite] - b[finite]).max())
        rel = diff / max(float(np.abs(a[finite]).max()), 1e-12)
        if rel >= worst["relative_diff"]:
            worst = {"relative_diff": rel, "max_abs_diff": diff, "output": out.name}
    result = {**worst, "tolerance": tolerance, "input_shapes": {k: list(v.shape) for k, v in feed.items()}}
    if worst["relative_diff"] > tolerance:
        raise EdgepackError(
            f"the prepared copy of {original.name} disagrees with the original on output '{worst['output']}': "
            f"max |diff| {worst['max_abs_diff']:.3g} is {worst['relative_diff']:.2%} of the output's range "
            f"(allowed {tolerance:.2%})",
            "re-export the model from its framework at opset 13 or newer and in float32")
    return {k: round(v, 8) if isinstance(v, float) else v for k, v in result.items()}


def _random_feed(sess, shapes: dict[str, Sequence[int]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        shape = list(shapes.get(inp.name) or [d if isinstance(d, int) and d >= 0 else
                                              (CHECK_BATCH if axis == 0 else CHECK_DIM)
                                              for axis, d in enumerate(inp.shape)])
        if inp.type in _FLOAT_TYPES:
            dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inp.type, np.float32)
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif inp.type == "tensor(bool)":
            feed[inp.name] = rng.random(shape) < 0.5
        else:  # token ids, masks, indices: 0 and 1 are valid for any vocabulary
            feed[inp.name] = rng.integers(0, 2, shape).astype(np.dtype(inp.type[len("tensor("):-1]))
    return feed


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
