"""The pruning stage of `edgepack build`: goal -> ratio -> prune (+ fine-tune) -> record."""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from ..progress import reporter_and_events
from .config import PruneConfig
from .engine import _tuple, prune_model
from .finetune import UserMetric, evaluate, finetune, score_name
from .latency import ratio_for_macs, search_latency_ratio
from .measure import count_macs_params, flat_tensors
from .record import PruneRecord
from .slimming import sparsity_hook

# progress=: an edgepack.progress.Progress (tasks and messages), or a callable taking event dicts
# ({"stage": "prune" | "fine-tune" | "latency search" | "MACs search", ...}).
Progress = Callable[[dict], None]


def run_prune_stage(model: nn.Module, example_inputs, cfg: PruneConfig, profile, train=None, eval=None,
                    progress: Progress | None = None,
                    metric: UserMetric | None = None) -> tuple[nn.Module, PruneRecord | None]:
    """Prune `model` for `profile` as `cfg` asks and fine-tune it by distillation from the
    original. Returns (model, record); (model, None) when cfg asks for no pruning. The input
    model is not modified. `metric`: the build's --metric, which picks the fine-tuning epoch kept
    and is the figure recorded (on labelled eval data), instead of top-1.

    Raises EdgepackError for bad options or data, and its subclass UnprunableModel when the
    architecture cannot be pruned (callers may catch that one and go on unpruned)."""
    if not cfg.enabled:
        return model, None
    example_inputs = _tuple(example_inputs)
    teacher = copy.deepcopy(model).eval()
    calib = train if train is not None else eval
    search = []
    if cfg.to_latency:
        ratio, search = search_latency_ratio(model, example_inputs, profile, search_config(cfg), calib,
                                             progress=progress)
        if ratio == 0.0:
            return model, unpruned_record(model, example_inputs, cfg, search, profile)
        requested = {"latency_p50_ms": profile.budgets.latency_p50_ms}
    else:
        ratio, requested = None, None
    pruned, record = prune_and_finetune(model, example_inputs, cfg, teacher, train, eval,
                                        ratio=ratio, round_to=profile.simd_width, progress=progress, metric=metric)
    if requested:
        record.requested = requested
    record.latency_search = search
    return pruned, record


def prune_and_finetune(model: nn.Module, example_inputs, cfg: PruneConfig, teacher: nn.Module | None,
                       train=None, eval=None, *, ratio: float | None = None, round_to: int | None = None,
                       progress: Progress | None = None, metric: UserMetric | None = None) -> tuple[nn.Module, PruneRecord]:
    """Prune in cfg.iterative_steps steps with fine-tuning after each; the epochs and the
    max_minutes bound are shared across steps."""
    ft = cfg.finetune
    steps = cfg.iterative_steps
    start = time.monotonic()
    deadline = start + 60 * ft.max_minutes if ft.max_minutes else None
    summaries: list[dict] = []
    bars, events = reporter_and_events(progress)
    acc_before = evaluate(model, eval, ft.batch_size, teacher, metric)

    def tune(step: int, student: nn.Module) -> None:
        epochs = ft.epochs // steps if step < steps - 1 else ft.epochs - (steps - 1) * (ft.epochs // steps)
        if epochs == 0 and step < steps - 1:
            return  # fewer epochs than steps: the last step gets them all
        step_cfg = ft.model_copy(update={"epochs": epochs, "max_minutes": None})
        report = bars if events is None else (lambda info: events({"stage": "fine-tune", "step": step + 1,
                                                                    "steps": steps, **info}))
        label = "fine-tune" + (f" (step {step + 1}/{steps})" if steps > 1 else "")
        summary = finetune(student, teacher, train, eval, step_cfg, report, deadline, label=label, metric=metric)
        summaries.append({"step": step + 1, **summary})

    if events is not None:
        goal = ratio if ratio is not None else cfg.ratio
        events({"stage": "prune", **({"ratio": goal} if goal is not None else {"macs_target": cfg.macs_target})})
    slimming = None
    if cfg.slimming is not None:  # network slimming: the penalty drives channels to zero, pruning removes them
        model, slimming = sparsity_train(model, example_inputs, cfg, teacher, train, bars)
    ranking_data = train if train is not None or cfg.importance != "entropy" else eval
    requested = None
    if ratio is None and cfg.macs_target is not None and cfg.importance == "entropy":
        # the search's candidates get no data: their channel counts come from l2 (per-layer pruning
        # keeps the same counts whatever ranks the channels), and the ratio found is applied here
        ratio = ratio_for_macs(model, example_inputs, search_config(cfg), cfg.macs_target, round_to, progress)
        requested = {"macs_target": cfg.macs_target}
    pruned, record = prune_model(model, example_inputs, cfg, ratio=ratio, round_to=round_to, train=ranking_data,
                                 between_steps=tune, progress=progress)
    if requested:
        record.requested = requested
    acc_pruned = evaluate(pruned, eval, ft.batch_size, teacher, metric) if steps == 1 else None
    tune(steps - 1, pruned)
    record.finetune = ([slimming] if slimming else []) + summaries
    record.warnings += list(dict.fromkeys(w for s in summaries for w in s.pop("warnings")))
    record.accuracy = {"metric": score_name(eval, metric, "top-1 agreement with the unpruned model"),
                       "before": acc_before, "pruned": acc_pruned,
                       "finetuned": evaluate(pruned, eval, ft.batch_size, teacher, metric),
                       "seconds": round(time.monotonic() - start, 2)}
    return pruned, record


def search_config(cfg: PruneConfig) -> PruneConfig:
    """The config a ratio search prunes its candidates with: entropy needs activations the
    search does not pass, so its candidates rank by l2 (the same per-layer channel counts)."""
    return cfg.model_copy(update={"importance": "l2"}) if cfg.importance == "entropy" else cfg


def sparsity_train(model: nn.Module, example_inputs, cfg: PruneConfig, teacher: nn.Module | None, train,
                   progress=None) -> tuple[nn.Module, dict]:
    """Sparsity training (cfg.slimming) of a copy of `model`: distillation fine-tuning with a
    sparsity penalty added to the gradients each step (slimming.py: l1 * sign(gamma) on the
    BatchNorm scales of the prunable groups, or torch-pruning's GroupNormPruner group lasso). The last epoch is kept (the best eval epoch would be the least sparse). Returns the
    model and the run's summary, with the BatchNorm scales before and after."""
    sp = cfg.slimming
    student = copy.deepcopy(model).eval()
    regularize = sparsity_hook(student, example_inputs, cfg)
    before = bn_scale_summary(student)
    ft = cfg.finetune.model_copy(update={"epochs": sp.epochs, "patience": None, "max_minutes": None,
                                         "lr": sp.lr or cfg.finetune.lr})
    summary = finetune(student, teacher, train, None, ft, progress, label="sparsity training",
                       regularize=regularize)
    summary.update(phase="sparsity training", penalty=sp.on, l1=sp.l1, bn_scales_before=before,
                   bn_scales_after=bn_scale_summary(student))
    return student.eval(), summary


def bn_scale_summary(model: nn.Module, small: float = 1e-2) -> dict | None:
    """Mean |gamma| of the model's BatchNorm scales and the fraction below `small`."""
    scales = [m.weight.detach().abs().flatten() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if not scales:
        return None
    g = torch.cat(scales)
    return {"count": int(g.numel()), "mean_abs": round(float(g.mean()), 5),
            f"fraction_below_{small:g}": round(float((g < small).float().mean()), 4)}


def unpruned_record(model: nn.Module, example_inputs, cfg: PruneConfig, search: list[dict], profile) -> PruneRecord:
    macs, params = count_macs_params(model, example_inputs)
    with torch.no_grad():
        outputs = flat_tensors(model.eval()(*example_inputs))
    return PruneRecord(
        requested={"latency_p50_ms": profile.budgets.latency_p50_ms}, ratio=0.0, importance=cfg.importance,
        global_pruning=cfg.global_pruning, round_to=cfg.round_to or profile.simd_width,
        iterative_steps=0, macs_before=macs, macs_after=macs, params_before=params, params_after=params,
        input_shapes=[list(t.shape) for t in example_inputs], output_shapes=[list(t.shape) for t in outputs],
        input_dtypes=[str(t.dtype).removeprefix("torch.") for t in example_inputs],
        ignored_layers=[], latency_search=search,
        warnings=["the unpruned model already meets the latency budget: nothing was pruned"])
