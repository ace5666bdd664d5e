"""Structured channel pruning on torch-pruning's dependency graph.

Channels are physically removed (conv filters, linear rows, the matching BatchNorm entries and
every consumer's input slices), so the exported model is a smaller dense model. What edgepack
decides: which layers must keep their width (layers whose channels reach a model output,
user-named layers, attention output projections), how many channels to keep (ratio, MACs
target), that every group is exact (verify.py: a group that is not, typically because its
channels cross a view/transpose channel shuffle, is undone and its layers are reported as
protected), that attributes holding widths follow them (sync.py), and that a run stays within
its memory and time limits (guard.py).
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from ..errors import EdgepackError
from ..progress import reporter_and_events
from .config import PruneConfig
from .graph import GroupUndo, exact_reshapes, out_layers, reaches_output
from .guard import ResourceGuard, ResourceLimit, rss_mb
from .importance import make_importance, ranking_batches
from .keep import attention_projections, output_layers, resolve_layers
from .measure import attention_heads, count_macs_params, flat_tensors, layer_widths, macs_params_outputs
from .record import LayerChange, PruneRecord
from .sync import AttributeSync
from .verify import check_inputs, compare, mask_plan, masked_outputs

HINT = ("pass --prune-ignore LAYER (edgepack prune: --ignore-layer LAYER) to keep that layer's width, "
        "or --allow-unpruned to build the unpruned model instead")
PROGRESS_SECONDS = 1.0  # at most one progress report per interval while groups are pruned
MAX_BATCH = 16  # groups checked against one masked reference (the batch doubles while they pass)

# progress=: an edgepack.progress.Progress (tasks: which step, groups k/N), or a callable taking
# event dicts ({"stage", "step", "group", "groups", "layer", "rss_mb"}).
Progress = Callable[[dict], None]


class UnprunableModel(EdgepackError):
    """The model (or a named layer) cannot be structurally pruned. Callers that allow it may
    catch this and continue with the unpruned model."""


def _tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


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
                 round_to: int | None = None, progress: Progress | None = None,
                 guard: ResourceGuard | None = None):
        self.model, self.cfg, self.ratio = model, cfg, ratio
        self.example_inputs = _tuple(example_inputs)
        self.round_to = cfg.round_to or round_to
        (self.bars, self.progress), self.guard = reporter_and_events(progress), guard
        self.steps_done, self.checked_groups, self.unchecked_groups = 0, 0, 0
        self.protected: list[dict] = []
        self._last_report = 0.0
        model.eval()  # tracing runs forward passes: do not move BatchNorm statistics
        self._step("reading the model")
        user_ignored = resolve_layers(model, cfg.ignore_layers)  # unknown names are errors
        self.heads_before = attention_heads(model)
        heads, outputs, reads = output_layers(model, self.example_inputs)
        self.sync = AttributeSync(model, self.heads_before, reads)
        self.ignored_names = list(dict.fromkeys(heads + attention_projections(model) + cfg.ignore_layers))
        self.widths_before = layer_widths(model)
        self.output_shapes = [list(t.shape) for t in outputs]
        self.check_inputs = check_inputs(self.example_inputs)
        # MACs depend on shapes only: counted on the check inputs, whose outputs must be finite
        self.macs_before, self.params_before, checked = macs_params_outputs(model, self.check_inputs)
        if not all(torch.isfinite(t).all() for t in checked if t.is_floating_point()):
            self.check_inputs = self.example_inputs  # the model wants inputs like the given ones
        self._step("tracing the channel dependency graph (torch-pruning)")
        self._make_pruner([model.get_submodule(n) for n in self.ignored_names] + user_ignored)
        self._step("finding the channel groups")
        self._find_groups()

    def _step(self, text: str, report: bool = True) -> None:
        """What runs now: named by the guard if a limit is hit, and reported."""
        if self.guard is not None:
            self.guard.step = text
        if report:
            self.bars(f"pruning: {text}")
            self._report(text)

    def _report(self, text: str, **info) -> None:
        now = time.monotonic()
        if self.progress is not None and (not info or now - self._last_report >= PROGRESS_SECONDS
                                          or info.get("group") == info.get("groups")):
            self._last_report = now
            self.progress({"stage": "prune", "step": text, **info, "rss_mb": round(rss_mb())})

    def _make_pruner(self, ignored: list[nn.Module]) -> None:
        num_heads = {self.model.get_submodule(n).qkv: h for n, h in self.heads_before.items()}
        torch.manual_seed(self.cfg.finetune.seed)  # random importance and ties
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unwrapped parameters" notices for position embeddings
            self.pruner = _Pruner(
                self.model, self.example_inputs, importance=make_importance(self.cfg.importance),
                global_pruning=self.cfg.global_pruning, pruning_ratio=self.ratio,
                iterative_steps=self.cfg.iterative_steps,
                max_pruning_ratio=0.9 if self.cfg.global_pruning else 1.0,
                ignored_layers=ignored + self.sync.ignored_parameters(), round_to=self.round_to,
                num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
                head_pruning_ratio=self.ratio if num_heads else 0.0)
        self.dg = self.pruner.DG

    def _find_groups(self) -> int:
        """Counts the prunable groups (none is an error); the layers of groups whose channels
        reach a model output join the ignored layers."""
        names = {m: n for n, m in self.model.named_modules()}
        count, reaching = 0, []
        for group in self.dg.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                            root_module_types=self.pruner.root_module_types):
            if reaches_output(group):
                reaching += out_layers(group, self.dg)
            else:
                count += 1
        for m in reaching:
            self.pruner.ignored_layers.extend(m.modules())
        self.ignored_names = list(dict.fromkeys(self.ignored_names + [names[m] for m in reaching]))
        if not count:
            raise UnprunableModel(
                f"{type(self.model).__name__} has no prunable channel group: every conv/linear layer is "
                f"ignored or feeds an ignored layer (ignored: {', '.join(self.ignored_names) or 'none'})",
                "remove layers from ignore_layers, or build without pruning (--allow-unpruned)")
        return count

    def _forward(self, inputs):
        with torch.no_grad():
            return self.model(*inputs)

    def step(self, taylor_batches: list | None = None) -> None:
        self.model.eval()
        if self.cfg.importance == "taylor":
            self._accumulate_gradients(taylor_batches)
        elif self.cfg.importance == "entropy":  # the activations of the model as it is now
            self.pruner.importance.record(self.model, taylor_batches)
        self.steps_done += 1
        where = f"step {self.steps_done}/{self.cfg.iterative_steps}"
        self._step(f"ranking channels ({where})")
        names = {m: n for n, m in self.model.named_modules()}
        # Roots and channel choices first (torch-pruning ranks every group before yielding any);
        # each group is rebuilt right before it is pruned, since earlier ones move concat offsets.
        roots = [(g[0].dep.target.module, g[0].dep.handler, [int(i) for i in tp._helpers.to_plain_idxs(g[0].idxs)])
                 for g in self.pruner.step(interactive=True)]
        done, size = 0, 1
        with self.bars.task(f"pruning channel groups ({where})", total=len(roots)) as bar:
            while done < len(roots):
                batch = roots[done:done + size]
                layer = names.get(batch[0][0], type(batch[0][0]).__name__)
                what = f"pruning the channel group of layer {layer!r}" + (
                    f" and {len(batch) - 1} more" if size > 1 else "")
                self._step(f"{what} ({where})", report=False)  # reported when done (throttled)
                if len(batch) > 1 and self._prune_batch(batch, names):
                    done, size = done + len(batch), min(2 * size, MAX_BATCH)
                else:
                    module, handler, idxs = batch[0]
                    group = self.dg.get_pruning_group(module, handler, idxs)
                    problem = self._prune_group(group, names)
                    if problem:
                        self._protect(group, names, problem)
                    done, size = done + 1, (1 if len(batch) > 1 else 2)
                bar.update(completed=done, description=f"pruning channel groups ({where}): {layer}")
                self._report(f"{what} ({where})", group=done, groups=len(roots), layer=layer)
        self.model.zero_grad(set_to_none=True)

    def _prune_batch(self, roots: list, names: dict) -> bool:
        """Prune several checkable groups against one masked reference (exact groups compose:
        they remove disjoint channels). False, with everything undone, when any is not exact
        or cannot be masked: the caller then takes them one at a time."""
        plans = []
        for module, handler, idxs in roots:
            plan = mask_plan(self.dg.get_pruning_group(module, handler, idxs), names, self.dg)
            if plan is None:
                return False
            plans += plan
        want = masked_outputs(self.model, self.check_inputs, plans)
        applied, problem = [], None
        for module, handler, idxs in roots:
            done = self._apply(self.dg.get_pruning_group(module, handler, idxs), names)
            if isinstance(done, str):
                problem = done
                break
            applied.append(done)
        problem = problem or self._check(want)
        for undo, heads, attributes in reversed(applied) if problem else []:
            self.sync.undo(attributes)
            self.sync.undo(heads)
            undo.restore()
        self.sync.refresh_heads(self.pruner)
        if not problem:
            self.checked_groups += len(roots)
        return problem is None

    def _prune_group(self, group, names: dict) -> str | None:
        """Prune one group; None when it is exact, else why it was undone."""
        plan = mask_plan(group, names, self.dg)
        want = masked_outputs(self.model, self.check_inputs, plan) if plan is not None else None
        done = self._apply(group, names)
        if isinstance(done, str):
            self.sync.refresh_heads(self.pruner)
            return done
        undo, heads, attributes = done
        problem = self._check(want)
        if problem and attributes:  # the attribute may hold something else: try without it
            tried = ", ".join(f"{path} = {value}" for _, path, value in self.sync.described(attributes))
            self.sync.undo(attributes)
            problem = self._check(want)
            if problem:
                problem += f"; with {tried} (the pruned width) it failed too"
        if problem:
            self.sync.undo(heads)
            undo.restore()
        elif plan is None:
            self.unchecked_groups += 1
        else:
            self.checked_groups += 1
        self.sync.refresh_heads(self.pruner)
        return problem

    def _apply(self, group, names: dict):
        """Prune `group` and bring attributes in step: (undo, head changes, attribute changes),
        or why it could not be pruned (nothing changed then)."""
        removed = self.sync.removed_heads(group, self.dg)
        if isinstance(removed, str):
            return removed
        undo = GroupUndo(group, self.dg, self.model)
        before = {names[m]: _out_width(m) for m in out_layers(group, self.dg) if m in names}
        try:
            group.prune()
        except Exception as e:  # torch-pruning's own checks (e.g. MultiheadAttention divisibility)
            undo.restore()
            return f"torch-pruning cannot prune it ({type(e).__name__}: {_first_line(e)})"
        heads = self.sync.apply_heads(removed)
        widths = {n: (w, _out_width(self.model.get_submodule(n))) for n, w in before.items()}
        return undo, heads, self.sync.apply_widths({n: w for n, w in widths.items() if w[0] != w[1]})

    def _check(self, want) -> str | None:
        try:
            got = flat_tensors(self._forward(self.check_inputs))
        except Exception as e:
            return f"the pruned model no longer runs ({type(e).__name__}: {_first_line(e)})"
        if want is not None:
            return compare(want, got)
        shapes = [list(t.shape) for t in got]
        if [s[1:] for s in shapes] != [s[1:] for s in self.output_shapes]:
            return f"output shapes changed from {self.output_shapes} to {shapes}"
        if not all(torch.isfinite(t).all() for t in got if t.is_floating_point()):
            return "the pruned model's outputs are not finite"
        return None

    def _protect(self, group, names: dict, reason: str) -> None:
        layers = [m for m in out_layers(group, self.dg) if m in names]
        self.protected.append({"layers": [names[m] for m in layers], "reason": reason})
        for m in layers:  # later steps do not offer the group again
            self.pruner.ignored_layers.extend(m.modules())

    def _accumulate_gradients(self, batches) -> None:
        from .finetune import class_output, to_tensors
        if not batches:
            raise EdgepackError("importance 'taylor' needs labelled training data (class ids) to compute gradients",
                                "pass training data with labels, or use importance l2 / l1 / bn_scale")
        self.model.zero_grad(set_to_none=True)
        for xs, y in batches:
            outputs = flat_tensors(self.model(*to_tensors(xs)))
            k = class_output(outputs, y)
            if k is None:
                raise EdgepackError("importance 'taylor' needs an output of class scores (N, C) for the labels",
                                    "use importance l2 / l1 / bn_scale")
            nn.functional.cross_entropy(outputs[k], torch.from_numpy(y)).backward()
        for p in self.model.parameters():  # layers the loss does not reach (other outputs) rank as zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)

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
            input_dtypes=[str(t.dtype).removeprefix("torch.") for t in self.example_inputs],
            ignored_layers=self.ignored_names, protected=self.protected, layers=layers,
            heads={n: [h, heads_after[n]] for n, h in self.heads_before.items()},
            attributes=dict(self.sync.attributes), sliced=list(self.sync.slices),
            groups_checked=self.checked_groups, groups_unchecked=self.unchecked_groups,
            history=[[n, bool(out), [int(i) for i in idx]] for n, out, idx in self.pruner.pruning_history()])


def _out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def prune_model(model: nn.Module, example_inputs, cfg: PruneConfig, *, ratio: float | None = None,
                round_to: int | None = None, train=None,
                between_steps: Callable[[int, nn.Module], None] | None = None,
                progress: Progress | None = None) -> tuple[nn.Module, PruneRecord]:
    """Prune a copy of `model` to `ratio` (default: cfg.ratio, or the ratio meeting
    cfg.macs_target). `train` (a Dataset) feeds Taylor importance; `between_steps(step, model)`
    runs after every iterative step but the last (fine-tuning, outside the time and memory
    limits); `progress(dict)` hears which step and group runs. The input model is untouched.
    Any failure of torch-pruning or of the model under pruning is an UnprunableModel."""
    example_inputs = _tuple(example_inputs)
    requested = {"ratio": cfg.ratio} if ratio is None else {"ratio": ratio}
    if ratio is None and cfg.macs_target is not None:
        from .latency import ratio_for_macs  # latency.py imports this module
        ratio = ratio_for_macs(model, example_inputs, cfg, cfg.macs_target, round_to, progress)
        requested = {"macs_target": cfg.macs_target}
    ratio = cfg.ratio if ratio is None else ratio
    if ratio is None or not 0 < ratio < 1:
        raise EdgepackError(f"pruning ratio must be strictly between 0 and 1, got {ratio}",
                            "e.g. ratio 0.5 removes half of each layer's channels")
    batches = ranking_batches(train, cfg)
    guard = ResourceGuard(cfg.max_memory_mb, cfg.max_prune_minutes)
    name = type(model).__name__
    try:
        with exact_reshapes(), guard:  # the patch is undone after the last delivery
            pruned = copy.deepcopy(model)
            session = ChannelPruner(pruned, example_inputs, cfg, ratio, round_to, progress, guard)
            for step in range(cfg.iterative_steps):
                session.step(batches)
                if between_steps is not None and step < cfg.iterative_steps - 1:
                    guard.step = f"fine-tuning after step {step + 1}"
                    with guard.paused():
                        between_steps(step, pruned)
            if not session.pruner.pruning_history():
                if cfg.importance == "bn_scale" and not session.protected:
                    raise UnprunableModel(
                        f"importance bn_scale ranks channels by their BatchNorm scales, and no prunable channel "
                        f"group of {name} has a BatchNorm layer", "prune with --prune-importance l2 (or l1, taylor, "
                        "entropy)")
                raise UnprunableModel(
                    f"no channel group of {name} could be pruned exactly: "
                    + "; ".join(f"{', '.join(p['layers'])}: {p['reason']}" for p in session.protected[:5]),
                    HINT)
            guard.step = "measuring the pruned model"
            record = session.record(requested)
    except EdgepackError:
        raise
    except (ResourceLimit, Exception) as e:
        # A limit's exception landing inside torch's C++ argument parsing comes out as a TypeError:
        # guard.exceeded says it was the limit all the same (seen under heavy load).
        if guard.exceeded:
            raise UnprunableModel(f"pruning {name} stopped: {guard.exceeded}, while {guard.step}",
                                  f"{HINT}; or raise max_memory_mb / max_prune_minutes") from None
        raise UnprunableModel(f"pruning {name} failed while {guard.step}: {type(e).__name__}: {_first_line(e)}",
                              HINT) from e  # torch-pruning or the model under pruning failed: name where
    record.peak_rss_mb = round(guard.peak_mb)
    record.prune_seconds = round(guard.seconds, 2)
    return pruned.eval(), record

