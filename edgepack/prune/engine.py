"""Structured channel pruning on torch-pruning's dependency graph.

Channels are physically removed (conv filters, linear rows, the matching BatchNorm entries and
every consumer's input slices), so the exported model is a smaller dense model. What edgepack
decides: which layers must keep their width (the output layer, user-named layers, attention
output projections), how many channels to keep (ratio, MACs target), and that the model's
input/output shapes never change.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from ..errors import EdgepackError
from .config import PruneConfig
from .measure import attention_heads, count_macs_params, layer_widths
from .record import LayerChange, PruneRecord
from .verify import GroupVerifier


class UnprunableModel(EdgepackError):
    """The model (or a named layer) cannot be structurally pruned. Callers that allow it may
    catch this and continue with the unpruned model."""


def _tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat_outputs(o)]


def resolve_layers(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Module objects for user-given names; an unknown name is an error listing close matches."""
    modules = dict(model.named_modules())
    found = []
    for name in names:
        if name not in modules:
            scored = sorted((-difflib.SequenceMatcher(None, name, k).ratio(), k) for k in modules if k)
            close = [k for score, k in scored[:5] if -score >= 0.4]  # best first, ties alphabetical
            raise EdgepackError(
                f"ignore_layers: the model has no layer named {name!r}"
                + (f"; close matches: {', '.join(close)}" if close else ""),
                "names are module paths as in model.named_modules(), e.g. 'layers.0.conv1.0'")
        found.append(modules[name])
    return found


@torch.no_grad()
def output_layers(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Conv/linear layers whose output is a model output (the classifier head): their output
    width is the model's output shape, so they are never pruned. Falls back to the last conv or
    linear layer executed when the output goes through further ops."""
    executed: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: executed.append((n, out)))
             for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        outputs = _flat_outputs(model(*example_inputs))
    finally:
        for h in hooks:
            h.remove()
    direct = [n for n, t in executed if any(t is o for o in outputs)]
    return direct or ([executed[-1][0]] if executed else [])


def attention_projections(model: nn.Module) -> list[str]:
    """Output projections of attention modules: keeping them unpruned keeps the residual stream
    (embedding width, position embeddings, LayerNorms) intact, so only heads and MLP widths shrink."""
    names = []
    for name in attention_heads(model):
        for attr in ("proj", "out_proj", "o_proj"):
            if isinstance(getattr(model.get_submodule(name), attr, None), nn.Linear):
                names.append(f"{name}.{attr}")
    return names


class _KeepPermutation(tp.pruner.function.BasePruningFunc):
    """torch-pruning handler for channel-permuting modules (channel shuffle). It has no channel
    count of its own and refuses to be pruned; `ChannelPruner` keeps every group touching one."""

    def prune_out_channels(self, layer, idxs):
        raise RuntimeError(f"{type(layer).__name__} permutes channels and cannot be pruned")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return None

    def get_in_channels(self, layer):
        return None


def permutation_modules(model: nn.Module) -> dict[type, _KeepPermutation]:
    """Channel shuffles (torch's nn.ChannelShuffle, the test fixtures (tests/fixtures/zoo.py)'s, or any class of that name)."""
    return {type(m): _KeepPermutation() for m in model.modules() if type(m).__name__ == "ChannelShuffle"}


def groups_through_permutations(model: nn.Module, example_inputs, pruners: dict) -> list[str]:
    """Layers whose output channels reach a channel shuffle: removing one of them would change
    which channels the shuffle pairs up, so they keep their width."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs, customized_pruners=pruners,
                                               verbose=False)
    names = {m: n for n, m in model.named_modules()}
    keep = []
    for group in dg.get_all_groups():
        if any(type(dep.target.module) in pruners for dep, _ in group):
            keep += [names[dep.target.module] for dep, _ in group
                     if dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names
                     and isinstance(dep.target.module, (nn.modules.conv._ConvNd, nn.Linear))]
    return list(dict.fromkeys(keep))


def _untraceable(model: nn.Module, e: Exception) -> UnprunableModel:
    return UnprunableModel(
        f"cannot build the channel dependency graph of {type(model).__name__}: {type(e).__name__}: {e}",
        "torch-pruning traces the forward pass with the example input; reshapes that move channels "
        "(a view/transpose channel shuffle) are not traceable: write the shuffle as a module named "
        "ChannelShuffle (see the test fixtures (tests/fixtures/zoo.py)), or build without pruning")


def make_importance(name: str):
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "random": tp.importance.RandomImportance,
    }[name]()


class _Pruner(tp.pruner.BasePruner):
    """torch-pruning's pruner with head removal following the iterative schedule: upstream
    removes ceil(cumulative_ratio * current_heads) per step, which over-prunes when
    iterative_steps > 1 (4 heads, ratio 0.5, 2 steps: 4 -> 3 -> 1). Here each step removes what
    is left to reach round(initial_heads * (1 - cumulative_ratio))."""

    def get_target_head_pruning_ratio(self, module) -> float:
        cumulative = super().get_target_head_pruning_ratio(module)
        current, initial = self.num_heads[module], self.init_num_heads[module]
        remove = max(0, current - max(1, round(initial * (1 - cumulative))))
        # upstream computes ceil(ratio * current); the margin keeps exact quotients from rounding up
        return max(0.0, remove / current - 1e-6)

    def _round_to(self, n_pruned, current_channels, round_to):
        """Keep the nearest multiple of round_to (upstream floors it: with round_to 16, a
        32-channel layer at ratio 0.3 would keep 16 channels instead of 22)."""
        kept = max(round_to, round((current_channels - n_pruned) / round_to) * round_to)
        return max(0, current_channels - min(kept, current_channels))


class ChannelPruner:
    """One model's pruning session: builds the dependency graph once and prunes in
    `cfg.iterative_steps` steps up to `ratio` (fine-tuning may run between steps)."""

    def __init__(self, model: nn.Module, example_inputs, cfg: PruneConfig, ratio: float,
                 round_to: int | None = None):
        self.model, self.cfg, self.ratio = model, cfg, ratio
        self.example_inputs = _tuple(example_inputs)
        self.round_to = cfg.round_to or round_to
        model.eval()  # tracing runs forward passes: do not move BatchNorm statistics
        resolve_layers(model, cfg.ignore_layers)  # unknown names are errors
        permutations = permutation_modules(model)
        try:
            shuffled = groups_through_permutations(model, self.example_inputs, permutations) if permutations else []
        except Exception as e:
            raise _untraceable(model, e) from e
        self.ignored_names = list(dict.fromkeys(
            output_layers(model, self.example_inputs) + attention_projections(model) + cfg.ignore_layers
            + shuffled))
        self.heads_before = attention_heads(model)
        self.widths_before = layer_widths(model)
        self.macs_before, self.params_before = count_macs_params(model, self.example_inputs)
        self.output_shapes = [list(t.shape) for t in _flat_outputs(self._forward())]
        self.ignored = [model.get_submodule(n) for n in self.ignored_names]
        self.permutations = permutations
        self.checked_groups = self.unchecked_groups = 0
        self._make_pruner()  # fails early if the graph cannot be traced
        groups = list(self.pruner.DG.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                                    root_module_types=self.pruner.root_module_types))
        if not groups:
            raise UnprunableModel(
                f"{type(model).__name__} has no prunable channel group: every conv/linear layer is "
                f"ignored or feeds an ignored layer (ignored: {', '.join(self.ignored_names) or 'none'})",
                "remove layers from ignore_layers, or build without pruning")

    def _make_pruner(self) -> None:
        num_heads = {self.model.get_submodule(n).qkv: h for n, h in self.heads_before.items()}
        torch.manual_seed(self.cfg.finetune.seed)  # random importance and ties
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "unwrapped parameters" notices for position embeddings
                self.pruner = _Pruner(
                    self.model, self.example_inputs, importance=make_importance(self.cfg.importance),
                    global_pruning=self.cfg.global_pruning, pruning_ratio=self.ratio,
                    iterative_steps=self.cfg.iterative_steps,
                    max_pruning_ratio=0.9 if self.cfg.global_pruning else 1.0,
                    ignored_layers=self.ignored, round_to=self.round_to,
                    num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
                    head_pruning_ratio=self.ratio if num_heads else 0.0,
                    customized_pruners=self.permutations)
        except Exception as e:  # tracing failures come out as arbitrary exceptions
            raise _untraceable(self.model, e) from e

    def _forward(self):
        with torch.no_grad():
            return self.model(*self.example_inputs)

    def step(self, taylor_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.model.eval()
        if self.cfg.importance == "taylor":
            self._accumulate_gradients(taylor_batches)
        names = {m: n for n, m in self.model.named_modules()}
        verifier = GroupVerifier(self.model, self.example_inputs, self.pruner.DG)
        for group in self.pruner.step(interactive=True):
            problem = verifier.prune(group, names, self._sync_heads)
            if problem:
                root = group[0].dep.target.module
                raise UnprunableModel(
                    f"pruning the channel group of layer {names.get(root, type(root).__name__)!r} is not "
                    f"exact: {problem}. The dependency graph mis-tracks channels somewhere between this "
                    "layer and its consumers (typically a reshape/view that moves channels)",
                    f"add {names.get(root, '?')!r} to ignore_layers, or build without pruning")
        self.checked_groups += verifier.checked
        self.unchecked_groups += verifier.unchecked
        self.model.zero_grad(set_to_none=True)
        self._check_shapes()

    def _sync_heads(self) -> None:
        for name in self.heads_before:  # the attention module computes head size from num_heads
            att = self.model.get_submodule(name)
            att.num_heads = self.pruner.num_heads[att.qkv]

    def _accumulate_gradients(self, batches) -> None:
        if not batches:
            raise EdgepackError("importance 'taylor' needs training data to compute gradients",
                                "pass training data, or use importance l2 / l1 / bn_scale")
        self.model.zero_grad(set_to_none=True)
        for x, y in batches:
            nn.functional.cross_entropy(self.model(x), y).backward()

    def _check_shapes(self) -> None:
        got = [list(t.shape) for t in _flat_outputs(self._forward())]
        if got != self.output_shapes:
            raise UnprunableModel(
                f"pruning changed the model output shape from {self.output_shapes} to {got}",
                f"name the output layer in ignore_layers (kept so far: {', '.join(self.ignored_names)})")

    def record(self, requested: dict) -> PruneRecord:
        macs, params = count_macs_params(self.model, self.example_inputs)
        after = layer_widths(self.model)
        layers = [LayerChange(n, w["type"], w["in"], after[n]["in"], w["out"], after[n]["out"])
                  for n, w in self.widths_before.items() if n in after]
        heads_after = attention_heads(self.model)
        return PruneRecord(
            requested=requested, ratio=round(self.ratio, 4), importance=self.cfg.importance,
            global_pruning=self.cfg.global_pruning, round_to=self.round_to,
            iterative_steps=self.cfg.iterative_steps, macs_before=int(self.macs_before), macs_after=int(macs),
            params_before=int(self.params_before), params_after=int(params),
            input_shapes=[list(t.shape) for t in self.example_inputs], output_shapes=self.output_shapes,
            ignored_layers=self.ignored_names, layers=layers,
            heads={n: [h, heads_after[n]] for n, h in self.heads_before.items()},
            groups_checked=self.checked_groups, groups_unchecked=self.unchecked_groups,
            history=[[n, bool(out), [int(i) for i in idx]] for n, out, idx in self.pruner.pruning_history()])


def prune_model(model: nn.Module, example_inputs, cfg: PruneConfig, *, ratio: float | None = None,
                round_to: int | None = None, train=None,
                between_steps: Callable[[int, nn.Module], None] | None = None,
                ) -> tuple[nn.Module, PruneRecord]:
    """Prune a copy of `model` to `ratio` (default: cfg.ratio, or the ratio meeting
    cfg.macs_target). `train` (a Dataset) feeds Taylor importance; `between_steps(step, model)`
    runs after every iterative step but the last (fine-tuning). The input model is untouched."""
    example_inputs = _tuple(example_inputs)
    requested = {"ratio": cfg.ratio} if ratio is None else {"ratio": ratio}
    if ratio is None and cfg.macs_target is not None:
        ratio = ratio_for_macs(model, example_inputs, cfg, cfg.macs_target, round_to)
        requested = {"macs_target": cfg.macs_target}
    ratio = cfg.ratio if ratio is None else ratio
    if ratio is None or not 0 < ratio < 1:
        raise EdgepackError(f"pruning ratio must be strictly between 0 and 1, got {ratio}",
                            "e.g. ratio 0.5 removes half of each layer's channels")
    pruned = copy.deepcopy(model)
    session = ChannelPruner(pruned, example_inputs, cfg, ratio, round_to)
    batches = _taylor_batches(train, cfg) if cfg.importance == "taylor" else None
    for step in range(cfg.iterative_steps):
        session.step(batches)
        if between_steps is not None and step < cfg.iterative_steps - 1:
            between_steps(step, pruned)
    return pruned.eval(), session.record(requested)


def _taylor_batches(train, cfg: PruneConfig):
    if train is None or not train.labelled:
        return None
    return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in
            train.batches(cfg.finetune.batch_size, shuffle=True, seed=cfg.finetune.seed)][:cfg.taylor_batches]


def ratio_for_macs(model: nn.Module, example_inputs, cfg: PruneConfig, keep_fraction: float,
                   round_to: int | None = None, iterations: int = 10) -> float:
    """Smallest channel ratio whose pruned model keeps at most `keep_fraction` of the MACs
    (bisection: MACs fall monotonically with the ratio up to rounding)."""
    one_shot = cfg.model_copy(update={"iterative_steps": 1, "importance":
                                      "l2" if cfg.importance == "taylor" else cfg.importance})
    macs0, _ = count_macs_params(model, _tuple(example_inputs))

    def kept(r: float) -> float:
        pruned, _ = prune_model(model, example_inputs, one_shot, ratio=r, round_to=round_to)
        return count_macs_params(pruned, _tuple(example_inputs))[0] / macs0

    lo, hi = 0.0, cfg.max_ratio
    if kept(hi) > keep_fraction:
        raise EdgepackError(
            f"cannot reach {keep_fraction:.0%} of the original MACs: at the maximum ratio {hi} the "
            f"model keeps {kept(hi):.1%}", "raise macs_target, or allow more layers to be pruned")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kept(mid) <= keep_fraction else (mid, hi)
    return hi
