"""Distillation fine-tuning after pruning, and the whole pruning stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgepack.data import Dataset
from edgepack.prune import (FinetuneConfig, PruneConfig, distillation_loss, evaluate, finetune,
                            prune_model, run_prune_stage)
from edgepack.targets import load_profile

torch.set_num_threads(1)


def blobs(n, seed, noise=0.5, labelled=True):
    """Class templates plus noise on 1x8x8 images: learnable in a few epochs."""
    templates = np.random.default_rng(42).standard_normal((10, 1, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = (templates[y] + noise * rng.standard_normal((n, 1, 8, 8))).astype(np.float32)
    return Dataset(x, y.astype(np.int64) if labelled else None, f"blobs:{seed}")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def teacher():
    model = small_cnn()
    finetune(model, None, blobs(1024, 1), blobs(256, 2),
             FinetuneConfig(epochs=5, lr=0.05, distill=False, patience=None))
    assert evaluate(model, blobs(256, 2)) > 0.9
    return model.eval()


X = torch.zeros(1, 1, 8, 8)


def test_distillation_loss_terms():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(distillation_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))
    assert float(distillation_loss(t, t, None, 4.0, 0.7)) == pytest.approx(0, abs=1e-6)
    p_t = F.softmax(t / 2, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2, 1))).sum(1).mean() * 4  # T^2 = 4
    assert float(distillation_loss(s, t, None, 2.0, 1.0)) == pytest.approx(float(kl), rel=1e-5)


def test_distillation_recovers_accuracy_after_heavy_pruning(teacher):
    train, val = blobs(1024, 1), blobs(256, 2)
    base = evaluate(teacher, val)
    pruned, _ = prune_model(teacher, X, PruneConfig(ratio=0.5, importance="random"))
    damaged = evaluate(pruned, val)
    summary = finetune(pruned, teacher, train, val, FinetuneConfig(epochs=4, lr=0.05, patience=None))
    assert damaged < base - 0.5  # random channels removed: near chance
    assert summary["eval_acc_after"] == evaluate(pruned, val) >= base - 0.06
    assert summary["distill"] and summary["epochs_run"] == 4 and summary["eval_acc_before"] == damaged


def test_finetune_is_deterministic(teacher):
    runs = []
    for _ in range(2):
        pruned, _ = prune_model(teacher, X, PruneConfig(ratio=0.5))
        finetune(pruned, teacher, blobs(256, 1), None, FinetuneConfig(epochs=1, seed=3))
        runs.append(pruned.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_cached_teacher_logits_train_like_per_batch_teacher(teacher, monkeypatch):
    """The teacher's logits are computed once per fine-tuning run; past the memory cap (dense
    outputs) it runs per batch instead. Both must train the same student."""
    import importlib
    ft_mod = importlib.import_module("edgepack.prune.finetune")
    results, calls = [], []
    for limit in (ft_mod.CACHE_LIMIT_BYTES, 0):
        monkeypatch.setattr(ft_mod, "CACHE_LIMIT_BYTES", limit)
        pruned, _ = prune_model(teacher, X, PruneConfig(ratio=0.5))
        hook = teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
        finetune(pruned, teacher, blobs(256, 1), None, FinetuneConfig(epochs=2, seed=3))
        hook.remove()
        results.append((pruned.state_dict(), sum(calls)))
        calls.clear()
    (cached, seen_cached), (per_batch, seen_per_batch) = results
    assert seen_cached == 256 and seen_per_batch == 64 + 2 * 256  # probe batch, then every step
    assert all(torch.allclose(cached[k].float(), per_batch[k].float(), atol=1e-5) for k in cached)


def test_threads_apply_while_fine_tuning_only(teacher):
    seen = []
    pruned, _ = prune_model(teacher, X, PruneConfig(ratio=0.5))
    before = torch.get_num_threads()
    finetune(pruned, teacher, blobs(128, 1), blobs(64, 2), FinetuneConfig(epochs=1, threads=2),
             progress=lambda e: seen.append(torch.get_num_threads()))
    assert seen == [2] and torch.get_num_threads() == before


def test_missing_data_is_a_warning_not_an_error(teacher):
    pruned, _ = prune_model(teacher, X, PruneConfig(ratio=0.5))
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    s = finetune(pruned, teacher, None, None, FinetuneConfig())
    assert s["epochs_run"] == 0 and "no training data" in s["warnings"][0]
    s = finetune(pruned, teacher, blobs(64, 1, labelled=False), None, FinetuneConfig(distill=False))
    assert "no labels and distillation is off" in s["warnings"][0]
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    # unlabelled data with distillation trains on the teacher's soft targets and reports agreement
    s = finetune(pruned, teacher, blobs(128, 1, labelled=False), blobs(64, 2, labelled=False),
                 FinetuneConfig(epochs=1))
    assert s["epochs_run"] == 1 and 0 <= s["eval_acc_after"] <= 1 and not s["warnings"]


def test_early_stop_time_limit_and_progress(teacher):
    val = blobs(128, 2)
    events = []
    copy_ = small_cnn()
    copy_.load_state_dict(teacher.state_dict())
    s = finetune(copy_, teacher, blobs(256, 1), val, FinetuneConfig(epochs=5, lr=1.0, patience=1),
                 progress=events.append)
    assert s["stopped"] == "no eval improvement for 1 epoch(s)" and s["epochs_run"] == 1
    assert evaluate(copy_, val) == s["eval_acc_after"] == s["eval_acc_before"]  # lr=1 ruined it: best kept
    assert set(events[0]) >= {"epoch", "epochs", "loss", "eval_acc", "seconds"}
    s = finetune(small_cnn(), teacher, blobs(1024, 1), None, FinetuneConfig(epochs=5, max_minutes=1e-5))
    assert s["stopped"] == "time limit" and s["epochs_run"] == 1


def test_prune_stage_iterative_with_record(teacher):
    cfg = PruneConfig(ratio=0.6, iterative_steps=2, finetune=FinetuneConfig(epochs=4, lr=0.05, patience=None))
    pruned, record = run_prune_stage(teacher, X, cfg, load_profile("x86"), blobs(512, 1), blobs(256, 2))
    assert [f["step"] for f in record.finetune] == [1, 2]
    assert record.accuracy["metric"] == "top-1 accuracy" and record.accuracy["finetuned"] > 0.8
    assert [len(f["eval_acc"]) for f in record.finetune] == [2, 2]  # the epochs are shared by the steps
    assert record.round_to == 16 and pruned[0].out_channels == 16  # 32 * 0.4 = 12.8 -> 16
    md = record.markdown()
    assert "fine-tuning (distillation)" in md and "Eval top-1 accuracy" in md
    untouched, none = run_prune_stage(teacher, X, PruneConfig(), load_profile("x86"))
    assert untouched is teacher and none is None
    _, record = run_prune_stage(teacher, X, PruneConfig(ratio=0.5), load_profile("x86"), None, blobs(64, 2))
    assert any("fine-tuning skipped" in w for w in record.warnings)


def test_cosine_schedule_reaches_zero_by_the_deadline(monkeypatch):
    """A time limit that cuts the planned steps short still anneals the rate to zero by then:
    halfway through the time the rate is half the base, at the deadline it is 0."""
    import importlib
    ft = importlib.import_module("edgepack.prune.finetune")  # the module: the package exports a function of that name

    now = [100.0]
    monkeypatch.setattr(ft.time, "monotonic", lambda: now[0])
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = ft.CosineSchedule(opt, 0.1, steps=1000, start=100.0, deadline=160.0)
    now[0] = 130.0
    sched.step()  # 1 step of 1000, but half the time
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05, abs=1e-6)
    now[0] = 170.0
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    steps_only = ft.CosineSchedule(opt, 0.1, steps=4, start=0.0, deadline=None)
    for _ in range(2):
        steps_only.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05, abs=1e-6)


def test_a_user_metric_picks_the_epoch_kept_and_is_what_the_record_says(teacher):
    """With the build's --metric, fine-tuning keeps the epoch the metric scores best, not top-1.
    The metric here is top-1's error rate (higher is better, for the metric), so the kept epoch
    must be the one with the worst top-1: epoch 0, the pruned model before any training."""
    from edgepack.prune.finetune import UserMetric
    error_rate = UserMetric("tests:error_rate", lambda out, y: float((out["output"].argmax(1) != y).mean()),
                            ("output",))
    train, val = blobs(1024, 1), blobs(256, 2)
    pruned, _ = prune_model(teacher, X, PruneConfig(ratio=0.5, importance="random"))
    damaged = evaluate(pruned, val)
    s = finetune(pruned, teacher, train, val, FinetuneConfig(epochs=2, lr=0.05, patience=None), metric=error_rate)
    assert s["eval_metric"] == "tests:error_rate"
    assert s["eval_acc_before"] == pytest.approx(1 - damaged) and s["best_epoch"] == 0
    assert max(s["eval_acc"]) < s["eval_acc_before"]  # training helped top-1, so the metric fell
    assert evaluate(pruned, val) == pytest.approx(damaged)  # epoch 0's weights are back
    # the whole stage records the metric by name, in its own units
    pruned, record = run_prune_stage(teacher, X, PruneConfig(ratio=0.5, finetune=FinetuneConfig(epochs=1)),
                                     load_profile("x86"), train=train, eval=val, metric=error_rate)
    acc = record.accuracy
    assert acc["metric"] == "tests:error_rate" and acc["finetuned"] == pytest.approx(1 - evaluate(pruned, val))
    assert f"Eval tests:error_rate: {acc['before']:.4g} before" in record.markdown()
