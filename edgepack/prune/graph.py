"""torch-pruning's dependency graph, kept exact and small, and groups that can be undone.

Reshapes. On torch 2 the view/reshape grad_fns no longer expose `_saved_self_sizes`, so
torch-pruning guesses a flatten/unflatten index mapping for every reshape whose neighbours'
channel counts differ, unless some Linear saw a 3-D input. Channels-last windowed attention
(timm's MaxViT, NHWC Swin blocks: every Linear sees (B, H, W, C) or (B', p, p, C)) gets those
guesses at each window partition, head split and batched matmul; chained, they multiply each
channel index into thousands of index objects per group (MaxViT-T at 224: past 5 GB inside one
group after 5 minutes, still growing; the 24 GB kill in ../shared/FACTS.md). `exact_reshapes`
installs a mapping only where the traced input and output shapes prove it: an NCHW flatten
(N, C, H, W) -> (N, C*H*W) into a Linear, or the inverse. Every other reshape keeps channel
indices as they are, which is what torch-pruning itself does for token models; a reshape that
does move channels (a view/transpose channel shuffle) then shows up in the masking check
(verify.py) and its group is undone and protected.

Undo. torch-pruning prunes by assigning new Parameters and attributes, so the old ones can be
kept by reference (no copy) and put back if a group turns out not to be exact.
"""
from __future__ import annotations

import contextlib
import math

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency import shape_infer as _shape_infer

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


def _flatten_stride(graph, node) -> tuple[int, bool] | None:
    """(spatial size S, is_unflatten) when the traced shapes prove an NCHW flatten or its inverse."""
    grad_fn = node.grad_fn
    try:
        src = [int(s) for s in grad_fn._saved_self_sym_sizes]
        dst = [int(s) for s in grad_fn._input_metadata[0].shape]
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None
    if not src or not dst or src[0] != dst[0]:
        return None

    def channels(nodes, infer):
        for n in nodes:
            c = infer(graph, n, [0])
            if c:
                return c
        return None

    if len(src) >= 3 and len(dst) == 2:  # (N, C, *spatial) -> (N, C*S)
        c, s = src[1], math.prod(src[2:])
        if s > 1 and dst[1] == c * s and channels(node.inputs, _shape_infer.infer_out_channels_recursively) == c:
            return s, False
    if len(dst) >= 3 and len(src) == 2:  # (N, C*S) -> (N, C, *spatial)
        c, s = dst[1], math.prod(dst[2:])
        if s > 1 and src[1] == c * s and channels(node.outputs, _shape_infer.infer_in_channels_recursively) == c:
            return s, True
    return None


def _exact_reshape_mapping(graph, node) -> None:
    found = _flatten_stride(graph, node)
    if found is None:
        return
    stride, unflatten = found
    for end in (node.outputs if unflatten else node.inputs):
        for dep in node.dependencies:
            if dep.target == end:
                dep.index_mapping[0] = _index_mapping._FlattenIndexMapping(stride=stride, reverse=True)
        for dep in end.dependencies:
            if dep.target == node:
                dep.index_mapping[0] = _index_mapping._FlattenIndexMapping(stride=stride, reverse=False)


@contextlib.contextmanager
def exact_reshapes():
    """torch-pruning recomputes index mappings at every group it builds, so the replacement
    stays installed for the whole session (and is removed after it)."""
    before = _index_mapping.update_reshape_index_mapping
    _index_mapping.update_reshape_index_mapping = _exact_reshape_mapping
    try:
        yield
    finally:
        _index_mapping.update_reshape_index_mapping = before


def is_output_node(module) -> bool:
    return isinstance(module, tp.ops._OutputOp)


def out_layers(group, dg) -> list[nn.Module]:
    """Conv/linear layers whose output channels the group removes."""
    return [dep.target.module for dep, _ in group
            if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, CONV_LINEAR)]


def reaches_output(group) -> bool:
    """The group's channels are channels of a model output (a classifier's scores, returned
    features): removing them would change the output shape."""
    return any(is_output_node(dep.target.module) for dep, _ in group)


# --- undo -------------------------------------------------------------------------------------

_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _module_state(m: nn.Module) -> tuple:
    attrs = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(m).items() if k not in _CONTAINERS}
    return attrs, dict(m._parameters), dict(m._buffers)


def _set_module_state(m: nn.Module, state: tuple) -> None:
    attrs, params, buffers = state
    for k in [k for k in vars(m) if k not in _CONTAINERS and k not in attrs]:
        delattr(m, k)
    m.__dict__.update(attrs)
    m._parameters.clear()
    m._parameters.update(params)
    m._buffers.clear()
    m._buffers.update(buffers)


class GroupUndo:
    """What pruning `group` will change, by reference: module states (of its modules and their
    submodules, including torch-pruning's concat/split bookkeeping nodes), the unwrapped
    parameters it replaces, and the pruning history entry it appends."""

    def __init__(self, group, dg, model: nn.Module):
        self.dg, self.model = dg, model
        self.modules = {}
        self.params = []
        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                name = dg._param_to_name.get(target)
                if name is not None:
                    self.params.append((name, target))
                continue
            for m in target.modules():
                self.modules.setdefault(id(m), (m, _module_state(m)))
        self.history = len(dg._pruning_history)

    def restore(self) -> None:
        for m, state in self.modules.values():
            _set_module_state(m, state)
        for name, old in self.params:
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            new = getattr(parent, attr)
            if new is old:
                continue
            setattr(parent, attr, old)
            self.dg._param_to_name.pop(new, None)
            self.dg._param_to_name[old] = name
            if new in self.dg.module2node:
                node = self.dg.module2node.pop(new)
                node.module = old
                self.dg.module2node[old] = node
        del self.dg._pruning_history[self.history:]
