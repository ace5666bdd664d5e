"""Recover accuracy after pruning: knowledge distillation from the unpruned model.

The model's inputs are the dataset's arrays in input order (`Dataset.arrays`); its outputs
(tensor, tuple, dict, nested) are flattened in order. The loss:
- on outputs of class scores: alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)), plus
  (1 - alpha) * cross-entropy with the labels on the first of them when the labels are class
  ids (the T^2 keeps the soft-target gradients on CE's scale, Hinton et al., 2015);
- on every other float output: the mean squared error to the teacher's output.
Class scores, when the labels are class ids: the first (N, C) float output with C = the number
of class names, else the first whose C can hold every label; without labels, a model's lone
(N, C) output. Labels that are not
class ids (regression targets, masks) only enter a metric of the caller's, not this loss.
The schedule is bounded by epochs and wall-clock minutes; the best epoch on the eval set is kept:
best by the build's --metric when one is given (`UserMetric`), else by top-1.
`progress=`: an edgepack.progress.Progress (a task per epoch, batches k/N, the loss and eval
figure in its text), or a callable taking one dict per epoch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..progress import reporter_and_events
from ..quality import call_metric
from .config import FinetuneConfig
from .measure import flat_tensors
from .record import format_score

Progress = Callable[[dict], None]


def input_arrays(data, idx) -> list[np.ndarray]:
    """The batch's input arrays in input order (single-input datasets of old code: `x`)."""
    if hasattr(data, "arrays"):
        return list(data.arrays(idx))
    return [np.asarray(data.x[idx])]


def to_tensors(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def has_class_ids(data) -> bool:
    y = data.y
    return y is not None and y.ndim == 1 and y.dtype.kind in "iu"


def class_output(outputs: list[torch.Tensor], labels, n_classes: int | None = None) -> int | None:
    """Index of the output of class scores for these class-id labels, or None."""
    matrices = [i for i, t in enumerate(outputs) if t.is_floating_point() and t.dim() == 2]
    exact = [i for i in matrices if outputs[i].shape[1] == n_classes]
    if exact:
        return exact[0]
    top = int(np.max(labels)) if labels is not None and len(labels) else 0
    fits = [i for i in matrices if outputs[i].shape[1] > top]
    return fits[0] if fits else None


class Objective:
    """Which output gets which loss term, decided on the model's outputs and the data."""

    def __init__(self, outputs: list[torch.Tensor], data):
        floats = [i for i, t in enumerate(outputs) if t.is_floating_point()]
        self.ce = None
        if has_class_ids(data):
            self.ce = class_output(outputs, data.y, len(data.classes) or None)
            self.kd = [] if self.ce is None else [self.ce]
        elif data.y is None and len(outputs) == 1 and outputs[0].dim() == 2 and floats:
            self.kd = [0]
        else:
            self.kd = []
        self.mse = [i for i in floats if i not in self.kd]

    @property
    def empty(self) -> bool:
        return not self.kd and not self.mse

    def loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor] | None, labels,
             cfg: FinetuneConfig) -> torch.Tensor:
        if teacher is None:  # plain fine-tuning: cross-entropy on the labels
            return F.cross_entropy(student[self.ce], labels)
        total = 0.0
        for i in self.kd:
            y = labels if i == self.ce else None
            total = total + distillation_loss(student[i], teacher[i], y, cfg.temperature, cfg.alpha)
        for i in self.mse:
            total = total + F.mse_loss(student[i].float(), teacher[i].float())
        return total


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                  reduction="batchmean") * t * t
    if labels is None:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)


@dataclass(frozen=True)
class UserMetric:
    """The build's --metric on a PyTorch model: `fn(outputs by name, labels) -> number`, higher
    is better, over the eval set's outputs in `names` order (the ONNX export's output names)."""
    spec: str
    fn: Callable
    names: tuple[str, ...]


def score_name(data, metric: UserMetric | None, unlabelled: str) -> str | None:
    """What `evaluate` measures on `data`: the user's metric, top-1, `unlabelled` (agreement with
    the teacher), or None (nothing it can score)."""
    if data is None:
        return None
    if metric is not None and data.y is not None:
        return metric.spec
    if has_class_ids(data):
        return "top-1 accuracy"
    return unlabelled if data.y is None else None


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256, teacher: nn.Module | None = None,
             metric: UserMetric | None = None) -> float | None:
    """The user's metric on labelled data when one is given; else top-1 accuracy on data labelled
    with class ids, top-1 agreement with `teacher` on unlabelled data, and None when there is no
    output of class scores to compare."""
    if data is None or len(data) == 0:
        return None
    if metric is not None and data.y is not None:
        return _metric_value(model, data, batch_size, metric)
    labelled = has_class_ids(data)
    if not labelled and (teacher is None or data.y is not None):
        return None
    model.eval()
    hits, k = 0, None
    for j in data.batch_indices(batch_size):
        xs = to_tensors(input_arrays(data, j))
        outputs = flat_tensors(model(*xs))
        if k is None:
            k = Objective(outputs, data).ce if labelled else (0 if Objective(outputs, data).kd else None)
            if k is None:
                return None
        pred = outputs[k].argmax(1)
        ref = torch.from_numpy(data.y[j]) if labelled else flat_tensors(teacher.eval()(*xs))[k].argmax(1)
        hits += int((pred == ref).sum())
    return hits / len(data)


def finetune(student: nn.Module, teacher: nn.Module | None, train, eval=None,
             cfg: FinetuneConfig = FinetuneConfig(), progress: Progress | None = None,
             deadline: float | None = None, label: str = "fine-tune",
             regularize: Callable[[nn.Module], None] | None = None, metric: UserMetric | None = None) -> dict:
    """Fine-tune `student` in place; returns a JSON-able summary (also when skipped, with the
    reason in `warnings`). `deadline` (time.monotonic() value) caps this run in addition to
    cfg.max_minutes, so iterative pruning can share one time budget. `label` names the
    progress tasks ("fine-tune epoch 2/5"). `regularize(student)` runs after each backward pass,
    before the optimizer step: a sparsity penalty added to the gradients (torch-pruning's
    `pruner.regularize`, network slimming). `metric`: the build's --metric, which then picks the
    epoch kept (on labelled eval data) instead of top-1."""
    distill = cfg.distill and teacher is not None
    summary = {"distill": distill, "epochs_run": 0, "seconds": 0.0, "train_loss": [], "eval_acc": [],
               "eval_acc_before": None, "eval_acc_after": None, "best_epoch": None, "stopped": None,
               "warnings": []}
    reason = _cannot_train(student, teacher, train, distill, cfg)
    if reason:
        summary["warnings"].append(f"fine-tuning skipped: {reason}; the model is pruned only")
        return summary

    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(student, teacher, train, eval, cfg, progress, deadline, distill, summary, label, regularize,
                      metric)
    finally:
        torch.set_num_threads(threads_before)


@torch.no_grad()
def _metric_value(model: nn.Module, data, batch_size: int, metric: UserMetric) -> float:
    model.eval()
    per_batch = [[t.float().numpy() if t.is_floating_point() else t.numpy()
                  for t in flat_tensors(model(*to_tensors(input_arrays(data, j))))]
                 for j in data.batch_indices(batch_size)]
    outputs = [np.concatenate([b[i] for b in per_batch]) for i in range(len(per_batch[0]))]
    return call_metric(metric.fn, metric.spec, list(metric.names), outputs, data.y)


def _train(student, teacher, train, eval, cfg: FinetuneConfig, progress, deadline, distill: bool,
           summary: dict, label: str, regularize=None, metric: UserMetric | None = None) -> dict:
    start = time.monotonic()
    bars, events = reporter_and_events(progress)
    if cfg.max_minutes is not None:
        deadline = min(deadline or math.inf, start + 60 * cfg.max_minutes)
    torch.manual_seed(cfg.seed)
    batches = math.ceil(len(train) / cfg.batch_size)
    steps = cfg.epochs * batches
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if teacher is not None:
        teacher.eval()
    best = evaluate(student, eval, cfg.batch_size, teacher, metric)
    summary["eval_metric"] = score_name(eval, metric, "top-1 agreement with the teacher")
    summary["eval_acc_before"] = best
    best_state, best_epoch, stale = copy.deepcopy(student.state_dict()), 0, 0
    # The teacher is frozen and the training inputs do not change between epochs: its outputs are
    # computed once, so a distillation epoch costs what a plain one does (it took ~1.7x without).
    if distill:
        bars(f"{label}: running the teacher once over the {len(train)} training samples")
    cached = _teacher_outputs(teacher, train, cfg.batch_size) if distill else None
    objective = _objective(student, train)
    # Cosine decay over the steps, or over the time left when a time limit would cut the epochs
    # short: the learning rate reaches zero by the deadline, not at a step never reached (a run
    # cut off at a high rate keeps nothing of its training).
    sched = CosineSchedule(opt, cfg.lr, max(1, steps), time.monotonic(), deadline)

    for epoch in range(1, cfg.epochs + 1):
        with bars.task(f"{label} epoch {epoch}/{cfg.epochs}", total=batches) as bar:
            acc = _epoch(student, teacher, train, eval, cfg, epoch, opt, sched, objective, cached, deadline, summary,
                         bar, regularize, metric)
        summary["epochs_run"] = epoch
        summary["eval_acc"].append(acc)
        if events is not None:
            events({"epoch": epoch, "epochs": cfg.epochs, "loss": summary["train_loss"][-1],
                    "eval_acc": acc, "seconds": time.monotonic() - start})
        if acc is None or best is None or acc > best:
            best, best_state, best_epoch, stale = acc, copy.deepcopy(student.state_dict()), epoch, 0
        else:
            stale += 1
        if summary["stopped"]:
            break
        if cfg.patience is not None and stale >= cfg.patience:
            summary["stopped"] = f"no eval improvement for {stale} epoch(s)"
            break

    student.load_state_dict(best_state)  # epoch 0 (no fine-tuning) if nothing beat it
    student.eval()
    summary.update(best_epoch=best_epoch, eval_acc_after=best, seconds=round(time.monotonic() - start, 2))
    return summary


def _epoch(student, teacher, train, eval, cfg: FinetuneConfig, epoch: int, opt, sched, objective, cached,
           deadline, summary: dict, bar, regularize=None, metric: UserMetric | None = None) -> float | None:
    """One epoch over `train` (`bar` counts its batches, with the running loss), then the eval figure."""
    student.train()
    class_ids, title = has_class_ids(train), bar.description
    losses, running = [], 0.0
    for k, j in enumerate(train.batch_indices(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch), 1):
        if len(j) < 2:
            bar.update(completed=k)
            continue  # BatchNorm cannot train on a single sample
        xs = to_tensors(input_arrays(train, j))
        labels = torch.from_numpy(train.y[j]) if class_ids else None
        outputs = flat_tensors(student(*xs))
        soft = None
        if cached is not None:
            soft = [t[torch.from_numpy(j)] for t in cached]
        elif summary["distill"]:
            with torch.no_grad():
                soft = flat_tensors(teacher(*xs))
        loss = objective.loss(outputs, soft, labels, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if regularize is not None:
            regularize(student)
        opt.step()
        sched.step()
        losses.append(loss.item())
        running += losses[-1]
        bar.update(completed=k, description=f"{title}, loss {running / len(losses):.4g}")
        if deadline is not None and time.monotonic() > deadline:
            summary["stopped"] = "time limit"
            break
    summary["train_loss"].append(float(np.mean(losses)) if losses else None)
    bar.update(description=f"{bar.description}, evaluating")
    acc = evaluate(student, eval, cfg.batch_size, teacher, metric)
    loss = summary["train_loss"][-1]
    bar.update(description=f"{title}, loss {'-' if loss is None else f'{loss:.4g}'}, "
                           f"eval {format_score(acc, summary['eval_metric'])}")
    return acc


class CosineSchedule:
    """lr = base * (1 + cos(pi * f)) / 2, f the larger of the steps done and the time used, as
    fractions of the steps planned and of the time until `deadline` (None: steps only)."""

    def __init__(self, opt, base_lr: float, steps: int, start: float, deadline: float | None):
        self.opt, self.base, self.steps, self.start, self.deadline, self.done = opt, base_lr, steps, start, deadline, 0

    def fraction(self) -> float:
        f = self.done / self.steps
        if self.deadline is not None and math.isfinite(self.deadline) and self.deadline > self.start:
            f = max(f, (time.monotonic() - self.start) / (self.deadline - self.start))
        return min(f, 1.0)

    def step(self) -> None:
        self.done += 1
        lr = self.base * 0.5 * (1 + math.cos(math.pi * self.fraction()))
        for group in self.opt.param_groups:
            group["lr"] = lr


CACHE_LIMIT_BYTES = 512 * 2**20  # dense outputs (segmentation maps) would not fit: run the teacher per batch


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module, data, batch_size: int) -> list[torch.Tensor] | None:
    teacher.eval()
    n = len(data)
    first = flat_tensors(teacher(*to_tensors(input_arrays(data, slice(0, batch_size)))))
    per_sample = sum(t[0].numel() * t.element_size() for t in first if t.dim() > 0)
    if per_sample * n > CACHE_LIMIT_BYTES or any(t.dim() == 0 or len(t) != min(batch_size, n) for t in first):
        return None
    parts = [first] + [flat_tensors(teacher(*to_tensors(input_arrays(data, slice(i, i + batch_size)))))
                       for i in range(batch_size, n, batch_size)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(first))]


@torch.no_grad()
def _objective(student: nn.Module, data) -> Objective:
    """Decided on the student's outputs (pruning keeps the teacher's output shapes)."""
    was_training = student.training
    outputs = flat_tensors(student.eval()(*to_tensors(input_arrays(data, slice(0, 2)))))
    student.train(was_training)
    return Objective(outputs, data)


def _cannot_train(student, teacher, train, distill: bool, cfg: FinetuneConfig) -> str | None:
    if cfg.epochs == 0:
        return "epochs is 0"
    if train is None or len(train) == 0:
        return "no training data was given"
    if not train.labelled and not distill:
        return "the training data has no labels and distillation is off"
    objective = _objective(student, train)
    if not distill and objective.ce is None:
        return ("plain fine-tuning needs class-id labels and an output of class scores (N, C), and "
                "distillation is off")
    if distill and objective.empty:
        return "the model has no float output to distil"
    return None
