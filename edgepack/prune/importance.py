"""Channel importances for the pruner: torch-pruning's (l1, l2, bn_scale, taylor, random) and
entropy, which torch-pruning does not have.

Entropy (Luo & Wu, "An Entropy-based Pruning Method for CNN Compression", 2017): forward hooks
record each Conv/Linear layer's output on a few calibration batches, averaged over the spatial
(or token) positions, so each channel has one value per sample; a channel's importance is the
entropy of the histogram of those values over the samples. A channel whose output does not
depend on the input (dead: zero weights, a constant) has entropy 0 and ranks lowest. The entropy
of a histogram spanning a channel's own range does not change under a per-channel affine map, so
the conv output ranks like the BatchNorm output after it. Channels are grouped like the other
importances: torch-pruning's group reduction (mean over the group's layers) and normalizer.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ..errors import EdgepackError

ENTROPY_BINS = 16
_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def make_importance(name: str):
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "entropy": EntropyImportance,
        "random": tp.importance.RandomImportance,
    }[name]()


def ranking_batches(data, cfg) -> list | None:
    """The batches an importance ranks on: labelled (inputs, labels) for taylor, inputs for
    entropy, None for the weight-only importances (or without data)."""
    from .finetune import input_arrays
    if cfg.importance not in ("taylor", "entropy") or data is None or len(data) == 0:
        return None
    if cfg.importance == "taylor" and not getattr(data, "class_labels", data.labelled):
        return None
    count = cfg.taylor_batches if cfg.importance == "taylor" else cfg.entropy_batches
    batches = []
    for j in data.batch_indices(cfg.finetune.batch_size, shuffle=True, seed=cfg.finetune.seed):
        xs = input_arrays(data, j)
        batches.append((xs, data.y[j]) if cfg.importance == "taylor" else xs)
        if len(batches) == count:
            break
    return batches


def channel_entropy(values: torch.Tensor, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """(N, C) per-sample channel values -> (C,) histogram entropy in bits, each channel's
    histogram spanning its own [min, max]; a constant channel gets 0."""
    lo, hi = values.min(0).values, values.max(0).values
    span = hi - lo
    constant = span <= 1e-6 * (hi.abs() + lo.abs() + 1e-12)
    pos = ((values - lo) / torch.where(constant, torch.ones_like(span), span) * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(bins, values.shape[1]).scatter_add_(0, pos, torch.ones_like(values))
    p = counts / values.shape[0]
    ent = -(p * torch.log2(p.clamp_min(1e-12))).sum(0)
    return torch.where(constant, torch.zeros_like(ent), ent)


class EntropyImportance(tp.importance.GroupMagnitudeImportance):
    """Importance from activation entropy; `record(model, batches)` must run before ranking
    (the pruner calls it before every step, since pruning changes the activations)."""

    def __init__(self, group_reduction: str = "mean", normalizer: str = "mean", bins: int = ENTROPY_BINS):
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer)
        self.bins = bins
        self.entropy: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def record(self, model: nn.Module, batches: list) -> None:
        from .finetune import to_tensors
        if not batches:
            raise EdgepackError("importance 'entropy' needs calibration inputs to record activations",
                                "pass --train (or --calib) data, or use importance l2 / l1 / bn_scale")
        pooled: dict[nn.Module, list[torch.Tensor]] = {}

        def hook(module, _inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 2:
                return
            if isinstance(module, nn.Linear):  # (N, ..., F): average over the tokens
                v = output.reshape(output.shape[0], -1, output.shape[-1]).mean(1)
            else:  # (N, C, ...): average over the positions
                v = output.reshape(output.shape[0], output.shape[1], -1).mean(2)
            pooled.setdefault(module, []).append(v.float())

        layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
        handles = [m.register_forward_hook(hook) for m in layers]
        was_training = model.training
        model.eval()
        try:
            for xs in batches:
                model(*to_tensors(xs))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        self.entropy = {m: channel_entropy(torch.cat(v), self.bins) for m, v in pooled.items()}

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if dep.pruning_fn in _OUT_FNS and layer in self.entropy:
                ent = self.entropy[layer]
                if max(idxs) < len(ent):
                    group_imp.append(ent[list(idxs)] + 1e-6)  # + 1e-6: the mean normalizer of all-dead groups
                    group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)
