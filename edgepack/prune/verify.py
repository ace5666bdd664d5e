"""Check that each pruning group removes channels exactly, by masking.

Removing channels from a group is equivalent to zeroing them in the unpruned model: the
producers' output rows (and BatchNorm scale/shift) and the consumers' input columns. So before
each group is pruned, its channels are zeroed in a reference copy; after pruning, both models
must give the same outputs. A mismatch means the dependency graph mis-tracked channels through
some operation (a reshape that moves channels, say), which would otherwise give a silently
broken model. Groups containing layers that mix channels (LayerNorm, GroupNorm, ...) cannot be
masked exactly; they are pruned unchecked and counted.
"""
from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

# Channel-wise parameter-free or per-channel modules: zeroed inputs stay ignorable downstream.
_PASSIVE = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
            nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
            nn.AdaptiveAvgPool2d, nn.Flatten)


class GroupVerifier:
    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dg):
        self.model, self.dg = model, dg
        gen = torch.Generator().manual_seed(0)
        # random inputs: constant (zero) example inputs can hide a channel mix-up
        self.inputs = tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
                            for t in example_inputs)
        self.checked = self.unchecked = 0

    def prune(self, group, names: dict, after_prune=lambda: None) -> str | None:
        """Prune `group` in the model, then call `after_prune` (to sync attributes such as
        num_heads); returns a description of the mismatch, or None."""
        plan = self._mask_plan(group, names)
        if plan is None:
            group.prune()
            after_prune()
            self.unchecked += 1
            return None
        # a fresh copy per group: indices refer to the model as pruned so far (concat offsets move)
        reference = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, kind, idxs in plan:
                _mask(reference.get_submodule(name), kind, idxs)
        group.prune()
        after_prune()
        self.checked += 1
        with torch.no_grad():
            want, got = reference(*self.inputs), self.model(*self.inputs)
        scale = float(want.abs().max()) if want.numel() else 1.0
        diff = float((want - got).abs().max())
        if diff > 1e-4 * max(1.0, scale):
            return f"outputs moved by {diff:.3g} (output scale {scale:.3g})"
        return None

    def _mask_plan(self, group, names: dict):
        plan = []
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, nn.Parameter):
                return None
            if module not in names:  # torch-pruning's own op nodes (concat, split, elementwise)
                continue
            idxs = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
                depthwise = module.groups == module.in_channels and module.groups > 1
                plan.append((names[module], "out" if (out or depthwise) else "in", idxs))
            elif isinstance(module, nn.Linear):
                plan.append((names[module], "out" if out else "in", idxs))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                plan.append((names[module], "bn", idxs))
            elif not isinstance(module, _PASSIVE):
                return None  # mixes channels or unknown: cannot be masked exactly
        return plan


def _mask(module: nn.Module, kind: str, idxs: list[int]) -> None:
    if kind == "bn":
        if module.weight is not None:
            module.weight[idxs] = 0
            module.bias[idxs] = 0
        else:  # no affine: scale the normalised value away through the running variance
            module.running_var[idxs] = float("inf")
        return
    if kind == "out":
        module.weight[idxs] = 0
        if module.bias is not None:
            module.bias[idxs] = 0
        return
    groups = getattr(module, "groups", 1)
    per_group_in = module.weight.shape[1]
    per_group_out = module.weight.shape[0] // groups
    for c in idxs:  # grouped conv: input channel c feeds only its group's filters
        g, local = divmod(c, per_group_in)
        module.weight[g * per_group_out:(g + 1) * per_group_out, local] = 0
