"""Check that each pruning group removes channels exactly, by masking.

Removing channels from a group is equivalent to zeroing them in the unpruned model: the
producers' output rows (and BatchNorm scale/shift) and the consumers' input columns. So before
a group is pruned its channels are zeroed in place (the overwritten values are kept and put
back: no copy of the model), the model is run, and after pruning both outputs must agree. A
mismatch means the dependency graph mis-tracked channels through some operation (a reshape or
gather that moves channels, such as a channel shuffle), which would otherwise give a silently
broken model; the engine undoes such a group and protects its layers. Groups containing layers
that mix channels (LayerNorm, GroupNorm, attention modules, ...) cannot be masked exactly; they
are pruned unchecked (the model must still run and keep its output shapes) and counted.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .measure import flat_tensors

# Channel-wise parameter-free or per-channel modules: zeroed inputs stay ignorable downstream.
_PASSIVE = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
            nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
            nn.AdaptiveAvgPool2d, nn.Flatten)
TOLERANCE = 1e-4  # relative to the output's scale


def check_inputs(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Random float inputs (constant ones can hide a channel mix-up); integer token ids and bool
    masks are kept as given."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t
                 for t in example_inputs)


def mask_plan(group, names: dict, dg) -> list | None:
    """[(module, kind, idxs)] zeroing the group's channels, or None when the group holds a
    module that cannot be masked exactly."""
    plan = []
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Parameter):
            return None
        if module not in names:  # torch-pruning's own op nodes (concat, split, elementwise)
            continue
        idxs = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            depthwise = module.groups == module.in_channels and module.groups > 1
            plan.append((module, "out" if (out or depthwise) else "in", idxs))
        elif isinstance(module, nn.Linear):
            plan.append((module, "out" if out else "in", idxs))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            plan.append((module, "bn", idxs))
        elif not isinstance(module, _PASSIVE):
            return None  # mixes channels or unknown: cannot be masked exactly
    return plan


@torch.no_grad()
def masked_outputs(model: nn.Module, inputs, plan: list) -> list[torch.Tensor]:
    """The model's outputs with the plan's channels zeroed; the model is left as it was."""
    saved: list[tuple[torch.Tensor, object, torch.Tensor]] = []
    try:
        for module, kind, idxs in plan:
            for tensor, index in _mask_targets(module, kind, idxs):
                saved.append((tensor, index, tensor[index].clone()))
                tensor[index] = float("inf") if tensor is getattr(module, "running_var", None) else 0
        return [t.clone() for t in flat_tensors(model(*inputs))]
    finally:
        for tensor, index, values in reversed(saved):
            tensor[index] = values


def _mask_targets(module: nn.Module, kind: str, idxs: list[int]):
    """(tensor, index) pairs to zero (BatchNorm without affine: running_var to inf, which scales
    the normalised value away)."""
    if kind == "bn":
        if module.weight is not None:
            return [(module.weight.data, idxs), (module.bias.data, idxs)]
        return [(module.running_var, idxs)]
    if kind == "out":
        targets = [(module.weight.data, idxs)]
        return targets + ([(module.bias.data, idxs)] if module.bias is not None else [])
    groups = getattr(module, "groups", 1)
    per_group_in = module.weight.shape[1]
    per_group_out = module.weight.shape[0] // groups
    targets = []
    for c in idxs:  # grouped conv: input channel c feeds only its group's filters
        g, local = divmod(c, per_group_in)
        targets.append((module.weight.data, (slice(g * per_group_out, (g + 1) * per_group_out), local)))
    return targets


def compare(want: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    """None when the pruned outputs equal the masked ones; otherwise what differs."""
    if [tuple(t.shape) for t in want] != [tuple(t.shape) for t in got]:
        return f"output shapes changed from {[list(t.shape) for t in want]} to {[list(t.shape) for t in got]}"
    for i, (w, g) in enumerate(zip(want, got)):
        if not w.is_floating_point() or not w.numel():
            continue
        scale = float(w.abs().max())
        diff = float((w - g).abs().max())
        if not diff <= TOLERANCE * max(1.0, scale):  # NaN fails too
            which = f"output {i} moved" if len(want) > 1 else "outputs moved"
            return f"{which} by {diff:.3g} (output scale {scale:.3g})"
    return None
