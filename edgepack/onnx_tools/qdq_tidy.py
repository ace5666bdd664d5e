"""A post-pass over a QDQ int8 model (ONNX Runtime's `quantize_static` output) that rewrites the
graph so more of it runs in int8 kernels, and drops Q/DQ pairs that only round-trip a tensor.

Every rewrite keeps the integer arithmetic: outputs equal the untidied model's up to rounding
(exactly, for the convolution rewrites). What each pass is for (bench/int8_profile.py measured it):

- `space_to_depth`: a strided convolution over few input channels (an image stem: 3x7x7/2,
  3x3x3/2) cannot use ONNX Runtime's fast symmetric int8 kernel (it needs input channels in
  multiples of 4) and spends most of its time gathering 3-channel patches. Rewritten as
  Pad -> SpaceToDepth on the uint8 tensor and a stride-1 convolution over s*s*C channels with the
  weights rearranged (zero where the padded kernel has no tap): the same sums, a kernel that fits.
- `pad_channels`: any other group-1 convolution whose input channels are not a multiple of 4 gets
  its uint8 input padded with the zero point and its weights with zero input channels.
- `fold_data_movement`: DQ -> MaxPool/Reshape/Flatten/Transpose/... -> Q with the same scale and
  zero point: the op runs on the uint8 tensor (they commute with a monotonic per-tensor map).
- `share_concat_scales`: the inputs of a Concat are quantized straight to the Concat's output
  scale, so the Concat joins uint8 tensors (one rounding instead of a requantization each).
- `drop_requantize`: DQ -> Q with identical parameters is the identity on the uint8 tensor.
"""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import EdgepackError

# Ops that only move or select elements: they commute with per-tensor (de)quantization.
DATA_MOVEMENT_OPS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                     "SpaceToDepth", "DepthToSpace", "Slice", "Gather", "Split", "Expand", "Tile"}
# ONNX Runtime's symmetric int8 convolution kernels read input channels in groups of 4 (MLAS
# KernelInputChannelAlignment on AVX2, AVX-512 and NEON).
CHANNEL_ALIGN = 4


class _Graph:
    """Producer/consumer maps and constant lookup over a ModelProto, rebuilt after each rewrite."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.g = model, model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self._names = itertools.count()
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in set(n.input):
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def fresh(self, hint: str) -> str:
        taken = set(self.producer) | set(self.inits) | {i.name for i in self.g.input}
        while True:
            name = f"{hint}_tidy{next(self._names)}"
            if name not in taken:
                return name

    def add_const(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        init = numpy_helper.from_array(array, name)
        self.g.initializer.append(init)
        self.inits[name] = init
        return name

    def insert_before(self, anchor, *nodes):
        at = list(self.g.node).index(anchor)
        for k, n in enumerate(nodes):
            self.g.node.insert(at + k, n)

    def remove(self, node):
        self.g.node.remove(node)

    def replace_uses(self, old: str, new: str):
        for n in self.consumers.get(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new

    def single_consumer(self, tensor: str):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _qparams(graph: _Graph, node):
    """(scale, zero point, axis) of a Q/DQ node as arrays, or None if not constant."""
    scale = graph.const(node.input[1])
    zp = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        return None
    return scale, zp, _attr(node, "axis", 1)


def _same_qparams(graph: _Graph, a, b) -> bool:
    pa, pb = _qparams(graph, a), _qparams(graph, b)
    if pa is None or pb is None:
        return False
    (sa, za, xa), (sb, zb, xb) = pa, pb
    if sa.shape != sb.shape or not np.array_equal(sa, sb):
        return False
    if (za is None) != (zb is None) or (za is not None and (za.dtype != zb.dtype or not np.array_equal(za, zb))):
        return False
    return sa.size == 1 or xa == xb


def _per_tensor(graph: _Graph, node) -> bool:
    p = _qparams(graph, node)
    return p is not None and p[0].size == 1


def _set_qparams(node, like):
    """Give a Q/DQ node the scale, zero point and axis of another."""
    del node.input[1:]
    node.input.extend(like.input[1:])
    del node.attribute[:]
    node.attribute.extend(a for a in like.attribute if a.name == "axis")


def _producer(graph: _Graph, tensor: str, op: str):
    n = graph.producer.get(tensor)
    return n if n is not None and n.op_type == op else None


def _conv_operands(graph: _Graph, conv):
    """(activation DQ, weight DQ, int8 weight) for a QDQ convolution with symmetric weights."""
    dq_x, dq_w = _producer(graph, conv.input[0], "DequantizeLinear"), _producer(graph, conv.input[1], "DequantizeLinear")
    if dq_x is None or dq_w is None or not _per_tensor(graph, dq_x) or len(dq_x.input) < 3 or not dq_x.input[2]:
        return None  # the zero point is the padding value of the rewrites below
    w, pw = graph.const(dq_w.input[0]), _qparams(graph, dq_w)
    if w is None or pw is None or w.ndim != 4 or (pw[1] is not None and np.any(pw[1] != 0)):
        return None  # zero weight taps must dequantize to exactly 0
    return dq_x, dq_w, w


def _new_weight_dq(graph: _Graph, dq_w, conv, w_new: np.ndarray):
    name = graph.add_const(w_new, conv.input[1] + "_q")
    dq = helper.make_node("DequantizeLinear", [name, *dq_w.input[1:]], [graph.fresh(conv.input[1])],
                          name=graph.fresh(dq_w.name))
    dq.attribute.extend(dq_w.attribute)
    conv.input[1] = dq.output[0]
    return dq


def _requantized_input(graph: _Graph, conv, dq_x, ops: list, hint: str):
    """uint8 input -> ops -> DQ (same parameters) -> conv; returns the new nodes, in order."""
    src = dq_x.input[0]
    for op in ops:
        op.input[0] = src
        src = op.output[0]
    dq = helper.make_node("DequantizeLinear", [src, *dq_x.input[1:]], [graph.fresh(hint + "_dq")],
                          name=graph.fresh(hint + "_dq"))
    dq.attribute.extend(dq_x.attribute)
    conv.input[0] = dq.output[0]
    return [*ops, dq]


def space_to_depth(graph: _Graph, shapes: dict, max_in_channels: int = 4) -> list[str]:
    done = []
    for conv in [n for n in graph.g.node if n.op_type == "Conv"]:
        ops = _conv_operands(graph, conv)
        shape = shapes.get(conv.input[0])
        if ops is None or shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
            continue
        dq_x, dq_w, w = ops
        strides, dil = _attr(conv, "strides", [1, 1]), _attr(conv, "dilations", [1, 1])
        s, (cout, cin, kh, kw) = strides[0], w.shape
        if (_attr(conv, "group", 1) != 1 or len(set(strides)) != 1 or s < 2 or any(d != 1 for d in dil)
                or cin > max_in_channels or min(kh, kw) < s or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        pads = _attr(conv, "pads", [0, 0, 0, 0])
        kh2, kw2 = -(-kh // s), -(-kw // s)
        extra = []
        for size, before, after, k, k2 in ((shape[2], pads[0], pads[2], kh, kh2), (shape[3], pads[1], pads[3], kw, kw2)):
            out = (size + before + after - k) // s + 1
            extra.append(s * (out + k2 - 1) - (size + before + after))  # rows past the last tap read zeros
        if min(extra) < 0:
            continue
        wp = np.zeros((cout, cin, s * kh2, s * kw2), w.dtype)
        wp[:, :, :kh, :kw] = w
        # SpaceToDepth (DCR): channel (dy * s + dx) * C + c holds pixel (s*i + dy, s*j + dx) of channel c.
        w2 = wp.reshape(cout, cin, kh2, s, kw2, s).transpose(0, 3, 5, 1, 2, 4).reshape(cout, s * s * cin, kh2, kw2)
        zp = dq_x.input[2]
        pad_amounts = graph.add_const(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2] + extra[0], pads[3] + extra[1]], np.int64), conv.name + "_pads")
        pad = helper.make_node("Pad", ["", pad_amounts, zp], [graph.fresh(conv.name + "_padded")], name=graph.fresh(conv.name + "_pad"))
        s2d = helper.make_node("SpaceToDepth", [""], [graph.fresh(conv.name + "_s2d")], name=graph.fresh(conv.name + "_s2d"), blocksize=s)
        new = _requantized_input(graph, conv, dq_x, [pad, s2d], conv.name + "_s2d")
        new.append(_new_weight_dq(graph, dq_w, conv, w2))
        kept = [a for a in conv.attribute if a.name not in ("kernel_shape", "strides", "pads", "dilations")]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("kernel_shape", [kh2, kw2]), helper.make_attribute("strides", [1, 1]),
                                    helper.make_attribute("pads", [0, 0, 0, 0]), helper.make_attribute("dilations", [1, 1])])
        graph.insert_before(conv, *new)
        graph.refresh()
        done.append(conv.name)
    return done


def pad_channels(graph: _Graph, align: int = CHANNEL_ALIGN) -> list[str]:
    done = []
    for conv in [n for n in graph.g.node if n.op_type == "Conv"]:
        ops = _conv_operands(graph, conv)
        if ops is None or _attr(conv, "group", 1) != 1 or ops[2].shape[1] % align == 0:
            continue
        dq_x, dq_w, w = ops
        cin = w.shape[1]
        wp = np.zeros((w.shape[0], -(-cin // align) * align, *w.shape[2:]), w.dtype)
        wp[:, :cin] = w
        zp = dq_x.input[2]
        amounts = graph.add_const(np.array([0, 0, 0, 0, 0, wp.shape[1] - cin, 0, 0], np.int64), conv.name + "_channel_pads")
        pad = helper.make_node("Pad", ["", amounts, zp], [graph.fresh(conv.name + "_padded")], name=graph.fresh(conv.name + "_pad_channels"))
        new = _requantized_input(graph, conv, dq_x, [pad], conv.name + "_padded")
        new.append(_new_weight_dq(graph, dq_w, conv, wp))
        graph.insert_before(conv, *new)
        graph.refresh()
        done.append(conv.name)
    return done


def fold_data_movement(graph: _Graph) -> int:
    folded = 0
    uint8_maxpool = max((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), default=0) >= 12
    for node in [n for n in graph.g.node if n.op_type in DATA_MOVEMENT_OPS]:
        if node.op_type == "MaxPool" and (not uint8_maxpool or len(node.output) > 1):
            continue
        dq = _producer(graph, node.input[0], "DequantizeLinear")
        qs = graph.consumers.get(node.output[0], [])
        if (dq is None or not _per_tensor(graph, dq) or len(node.output) != 1 or not qs or node.output[0] in graph.outputs
                or not all(q.op_type == "QuantizeLinear" and _same_qparams(graph, dq, q) for q in qs)):
            continue
        node.input[0] = dq.input[0]
        _bypass(graph, node, qs, [dq])
        folded += 1
    return folded


def _bypass(graph: _Graph, node, qs: list, dqs: list) -> None:
    """`node` now reads the DQs' integer inputs: it writes the first Q's output in place of every Q,
    and DQs nobody reads any more go."""
    keep = qs[0].output[0]
    for q in qs[1:]:
        graph.replace_uses(q.output[0], keep)
    for q in qs:
        graph.remove(q)
    node.output[0] = keep
    graph.refresh()
    for d in {id(d): d for d in dqs}.values():
        if not graph.consumers.get(d.output[0]) and d.output[0] not in graph.outputs:
            graph.remove(d)
    graph.refresh()


def share_concat_scales(graph: _Graph) -> int:
    shared = 0
    for cat in [n for n in graph.g.node if n.op_type == "Concat"]:
        outs = graph.consumers.get(cat.output[0], [])
        if not outs or cat.output[0] in graph.outputs or not all(q.op_type == "QuantizeLinear" for q in outs):
            continue
        q_out = outs[0]
        if not _per_tensor(graph, q_out) or not all(_same_qparams(graph, q_out, q) for q in outs):
            continue
        links = []
        for x in cat.input:
            dq = _producer(graph, x, "DequantizeLinear")
            q = _producer(graph, dq.input[0], "QuantizeLinear") if dq is not None else None
            if (q is None or graph.single_consumer(q.output[0]) is not dq
                    or any(n is not cat for n in graph.consumers.get(dq.output[0], [])) or dq.output[0] in graph.outputs):
                break
            links.append((q, dq))
        else:
            for q, dq in {id(q): (q, dq) for q, dq in links}.values():
                _set_qparams(q, q_out)
                _set_qparams(dq, q_out)
            shared += 1
            graph.refresh()
    return shared


def fold_concats(graph: _Graph) -> int:
    """DQ -> Concat -> Q with one set of parameters everywhere: the Concat joins the uint8 tensors."""
    folded = 0
    for cat in [n for n in graph.g.node if n.op_type == "Concat"]:
        dqs = [_producer(graph, x, "DequantizeLinear") for x in cat.input]
        qs = graph.consumers.get(cat.output[0], [])
        if (any(d is None for d in dqs) or not qs or cat.output[0] in graph.outputs
                or not all(q.op_type == "QuantizeLinear" and all(_same_qparams(graph, d, q) for d in dqs) for q in qs)):
            continue
        for k, d in enumerate(dqs):
            cat.input[k] = d.input[0]
        _bypass(graph, cat, qs, dqs)
        folded += 1
    return folded


def drop_requantize(graph: _Graph) -> int:
    dropped = 0
    for q in [n for n in graph.g.node if n.op_type == "QuantizeLinear"]:
        dq = _producer(graph, q.input[0], "DequantizeLinear")
        if dq is None or q.output[0] in graph.outputs or not _same_qparams(graph, dq, q):
            continue
        graph.replace_uses(q.output[0], dq.input[0])
        graph.remove(q)
        graph.refresh()
        if not graph.consumers.get(dq.output[0]) and dq.output[0] not in graph.outputs:
            graph.remove(dq)
            graph.refresh()
        dropped += 1
    return dropped


def _drop_dead(graph: _Graph):
    """Nodes whose outputs nothing reads (a DQ bypassed by a rewrite), then unread initializers."""
    while True:
        graph.refresh()
        dead = [n for n in graph.g.node if not any(o in graph.consumers or o in graph.outputs for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.remove(n)
    used = {i for n in graph.g.node for i in n.input} | graph.outputs
    for init in [i for i in graph.g.initializer if i.name not in used]:
        graph.g.initializer.remove(init)


def qdq_node_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def tidy_model(model: onnx.ModelProto, stems: bool = True, align_channels: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Tidy a QDQ ModelProto in place; returns it and a JSON-able record of what changed."""
    before, ops_before = qdq_node_count(model), Counter(n.op_type for n in model.graph.node)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    graph = _Graph(model)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    convs = opset >= 13  # Pad with an input constant and SpaceToDepth on integer tensors
    record = {"space_to_depth_convs": space_to_depth(graph, shapes) if stems and convs else [],
              "channel_padded_convs": pad_channels(graph) if align_channels and convs else [],
              "folded_data_movement": fold_data_movement(graph),
              "shared_concat_scales": share_concat_scales(graph),
              "folded_concats": fold_concats(graph),
              "dropped_requantize": drop_requantize(graph)}
    _drop_dead(graph)
    del model.graph.value_info[:]  # retyped tensors (float -> uint8) would contradict stale entries
    record.update(qdq_nodes_before=before, qdq_nodes_after=qdq_node_count(model),
                  nodes_added={k: v for k, v in (Counter(n.op_type for n in model.graph.node) - ops_before).items()})
    return model, record


def tidy_qdq(int8_path: Path, out_path: Path | None = None, *, stems: bool = True,
             align_channels: bool = True) -> dict:
    """Tidy the QDQ model at `int8_path`, writing `out_path` (default: in place, atomically).

    `stems` enables the space-to-depth rewrite, `align_channels` the channel padding (both
    measured faster with ONNX Runtime on x86; OpenVINO ran the untidied file as fast or faster)."""
    int8_path = Path(int8_path)
    out_path = Path(out_path) if out_path else int8_path
    try:
        model = onnx.load(str(int8_path))
    except Exception as e:
        raise EdgepackError(f"cannot read the int8 model {int8_path}: {type(e).__name__}: {e}",
                            "pass the QDQ .onnx file written by the quantize stage") from e
    model, record = tidy_model(model, stems=stems, align_channels=align_channels)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise EdgepackError(f"tidying {int8_path.name} produced an invalid graph: {str(e).splitlines()[0]}",
                            "rebuild without the int8 graph tidy and report the model") from e
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    return record
