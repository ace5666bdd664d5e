"""Recover accuracy after pruning: knowledge distillation from the unpruned model.

Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels).
The T^2 keeps the soft-target gradients on the same scale as CE's (Hinton et al., 2015). With
unlabelled data only the distillation term is used. The schedule is bounded by epochs and
wall-clock minutes; the best epoch on the eval set is kept (early stopping with patience).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import FinetuneConfig

Progress = Callable[[dict], None]


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                  reduction="batchmean") * t * t
    if labels is None:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256, teacher: nn.Module | None = None) -> float | None:
    """Top-1 accuracy on labelled data; top-1 agreement with `teacher` on unlabelled data."""
    if data is None or len(data) == 0 or (not data.labelled and teacher is None):
        return None
    model.eval()
    hits = 0
    for x, y in data.batches(batch_size):
        xt = torch.from_numpy(x)
        pred = model(xt).argmax(1)
        ref = torch.from_numpy(y) if y is not None else teacher.eval()(xt).argmax(1)
        hits += int((pred == ref).sum())
    return hits / len(data)


def finetune(student: nn.Module, teacher: nn.Module | None, train, eval=None,
             cfg: FinetuneConfig = FinetuneConfig(), progress: Progress | None = None,
             deadline: float | None = None) -> dict:
    """Fine-tune `student` in place; returns a JSON-able summary (also when skipped, with the
    reason in `warnings`). `deadline` (time.monotonic() value) caps this run in addition to
    cfg.max_minutes, so iterative pruning can share one time budget."""
    distill = cfg.distill and teacher is not None
    summary = {"distill": distill, "epochs_run": 0, "seconds": 0.0, "train_loss": [], "eval_acc": [],
               "eval_acc_before": None, "eval_acc_after": None, "best_epoch": None, "stopped": None,
               "warnings": []}
    reason = _cannot_train(train, distill, cfg)
    if reason:
        summary["warnings"].append(f"fine-tuning skipped: {reason}; the model is pruned only")
        return summary

    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(student, teacher, train, eval, cfg, progress, deadline, distill, summary)
    finally:
        torch.set_num_threads(threads_before)


def _train(student, teacher, train, eval, cfg: FinetuneConfig, progress, deadline, distill: bool,
           summary: dict) -> dict:
    start = time.monotonic()
    if cfg.max_minutes is not None:
        deadline = min(deadline or math.inf, start + 60 * cfg.max_minutes)
    torch.manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    if teacher is not None:
        teacher.eval()
    best = evaluate(student, eval, cfg.batch_size, teacher)
    summary["eval_acc_before"] = best
    best_state, best_epoch, stale = copy.deepcopy(student.state_dict()), 0, 0
    # The teacher is frozen and the training inputs do not change between epochs: its logits are
    # computed once, so a distillation epoch costs what a plain one does (it took ~1.7x without).
    teacher_logits = _teacher_logits(teacher, train.x, cfg.batch_size) if distill else None

    for epoch in range(1, cfg.epochs + 1):
        student.train()
        losses = []
        for j in train.batch_indices(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            if len(j) < 2:
                continue  # BatchNorm cannot train on a single sample
            xt = torch.from_numpy(train.x[j])
            yt = torch.from_numpy(train.y[j]) if train.y is not None else None
            logits = student(xt)
            if distill:
                if teacher_logits is not None:
                    soft = teacher_logits[torch.from_numpy(j)]
                else:
                    with torch.no_grad():
                        soft = teacher(xt)
                loss = distillation_loss(logits, soft, yt, cfg.temperature, cfg.alpha)
            else:
                loss = F.cross_entropy(logits, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if deadline is not None and time.monotonic() > deadline:
                summary["stopped"] = "time limit"
                break
        acc = evaluate(student, eval, cfg.batch_size, teacher)
        summary["epochs_run"] = epoch
        summary["train_loss"].append(float(np.mean(losses)) if losses else None)
        summary["eval_acc"].append(acc)
        if progress is not None:
            progress({"epoch": epoch, "epochs": cfg.epochs, "loss": summary["train_loss"][-1],
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


CACHE_LIMIT_BYTES = 512 * 2**20  # dense outputs (segmentation maps) would not fit: run the teacher per batch


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: np.ndarray, batch_size: int) -> torch.Tensor | None:
    teacher.eval()
    first = teacher(torch.from_numpy(x[:batch_size]))
    if first[0].numel() * first.element_size() * len(x) > CACHE_LIMIT_BYTES:
        return None
    rest = [teacher(torch.from_numpy(x[i:i + batch_size])) for i in range(batch_size, len(x), batch_size)]
    return torch.cat([first, *rest])


def _cannot_train(train, distill: bool, cfg: FinetuneConfig) -> str | None:
    if cfg.epochs == 0:
        return "epochs is 0"
    if train is None or len(train) == 0:
        return "no training data was given"
    if not train.labelled and not distill:
        return "the training data has no labels and distillation is off"
    return None
