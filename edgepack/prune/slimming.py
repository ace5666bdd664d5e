"""The gradient hook of sparsity training (network slimming), built on the same channel groups
the pruning will use.

The groups come from one `ChannelPruner` session (engine.py) under the pruning's memory and time
limits, so the layers pruning ignores (output heads, attention projections, groups that reach an
output) are left alone here too. Building torch-pruning's own BNScalePruner on the whole model
without them took ~350 s on a three-head detector (its group search over the reshaped heads),
and GroupNormPruner crashed with an IndexError on an image+tokens model.

- `bn_scale`: L1 on the BatchNorm scales of the prunable groups, l1 * sign(gamma) added to their
  gradients after each backward pass: the penalty of network slimming (Liu et al. 2017), and what
  torch-pruning's BNScalePruner.regularize adds, computed directly.
- `group_norm`: torch-pruning's GroupNormPruner (a group lasso over each channel group), given the
  session's ignored layers; a failure inside its hook is an `UnprunableModel` naming the penalty.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from ..errors import EdgepackError
from .config import PruneConfig
from .engine import HINT, ChannelPruner, UnprunableModel
from .graph import exact_reshapes
from .guard import ResourceGuard, ResourceLimit


def sparsity_hook(student: nn.Module, example_inputs, cfg: PruneConfig) -> Callable[[nn.Module], None]:
    """`regularize(student)`, to run after each backward pass of the sparsity training."""
    sp, name = cfg.slimming, type(student).__name__
    guard = ResourceGuard(cfg.max_memory_mb, cfg.max_prune_minutes)
    try:
        with exact_reshapes(), guard:  # as the pruning itself: reshapes mapped exactly
            guard.step = "finding the channel groups for sparsity training"
            session = ChannelPruner(student, example_inputs, cfg, 0.5, guard=guard)
            if sp.on == "bn_scale":
                hook = _bn_scale_hook(session, sp.l1, name)
            else:
                guard.step = "building torch-pruning's group-lasso hook (GroupNormPruner)"
                hook = _group_norm_hook(student, session, sp.l1, name)
    except EdgepackError:
        raise
    except (ResourceLimit, Exception) as e:
        if guard.exceeded:
            raise UnprunableModel(f"sparsity training of {name} stopped: {guard.exceeded}, while {guard.step}",
                                  f"{HINT}; or raise max_memory_mb / max_prune_minutes") from None
        raise UnprunableModel(f"sparsity training of {name} failed while {guard.step}: {type(e).__name__}: {e}",
                              HINT) from e
    finally:
        student.eval()
    return hook


def _bn_scale_hook(session: ChannelPruner, l1: float, name: str) -> Callable[[nn.Module], None]:
    bns: list[nn.Module] = []
    for group in session.dg.get_all_groups(ignored_layers=session.pruner.ignored_layers,
                                           root_module_types=session.pruner.root_module_types):
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and all(m is not b for b in bns):
                bns.append(m)
    if not bns:
        raise UnprunableModel(
            f"network slimming on bn_scale penalises BatchNorm scales, and no prunable channel group of {name} "
            "has a BatchNorm layer", "set slimming on = \"group_norm\" (a group lasso on the layers' weights), or "
            "drop --slimming-l1 and prune with --prune-importance l2")

    def regularize(_model: nn.Module) -> None:
        with torch.no_grad():
            for m in bns:
                if m.weight.grad is not None:
                    m.weight.grad.add_(l1 * torch.sign(m.weight))
    return regularize


def _group_norm_hook(student: nn.Module, session: ChannelPruner, l1: float, name: str) -> Callable[[nn.Module], None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.GroupNormPruner(student, session.example_inputs, tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=l1, ignored_layers=list(session.pruner.ignored_layers))

    def regularize(model: nn.Module) -> None:
        try:
            with exact_reshapes():  # its hook walks the groups again on every step
                pruner.regularize(model)
        except (IndexError, RuntimeError, ValueError) as e:  # torch-pruning misread a group of this model
            raise UnprunableModel(f"group-norm sparsity training of {name} failed inside torch-pruning's "
                                  f"GroupNormPruner.regularize: {type(e).__name__}: {e}",
                                  "set slimming on = \"bn_scale\", or drop --slimming-l1 and prune with "
                                  "--prune-importance l2") from e
    return regularize
