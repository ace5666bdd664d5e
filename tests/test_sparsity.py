"""Sparsity training (network slimming) before pruning, and unstructured magnitude sparsity."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgepack.compress.sparsity import (check_target, magnitude_masks, magnitude_sparsify, onnx_zero_fraction,
                                        polynomial_sparsity, sparsifiable_layers)
from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import to_onnx
from edgepack.prune import FinetuneConfig, evaluate, finetune
from edgepack.prune.config import make_config
from edgepack.prune.stage import bn_scale_summary, prune_and_finetune, sparsity_train
from edgepack.stages import sparsify

torch.set_num_threads(1)
X = torch.zeros(1, 1, 8, 8)


def blobs(n, seed, noise=0.5):
    templates = np.random.default_rng(42).standard_normal((10, 1, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    return Dataset((templates[y] + noise * rng.standard_normal((n, 1, 8, 8))).astype(np.float32),
                   y.astype(np.int64), f"blobs:{seed}", [str(i) for i in range(10)])


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def teacher():
    model = small_cnn()
    finetune(model, None, blobs(512, 1), blobs(128, 2), FinetuneConfig(epochs=3, lr=0.05, distill=False, patience=None))
    assert evaluate(model, blobs(128, 2)) > 0.25  # learning (chance: 0.1); accuracy is not under test here
    return model.eval()


def ort_outputs(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.slow
def test_slimming_drives_bn_scales_to_zero_and_the_pruned_model_exports(teacher, tmp_path):
    train = blobs(256, 3)
    weak = make_config(ratio=0.5, importance="bn_scale", slimming={"l1": 1e-6, "epochs": 2, "lr": 0.05})
    strong = make_config(ratio=0.5, importance="bn_scale", slimming={"l1": 1.0, "epochs": 2, "lr": 0.05})
    _, weak_summary = sparsity_train(teacher, (X,), weak, teacher, train)
    slim, summary = sparsity_train(teacher, (X,), strong, teacher, train)
    assert summary["bn_scales_before"] == bn_scale_summary(teacher)
    assert summary["bn_scales_after"]["mean_abs"] < 0.7 * weak_summary["bn_scales_after"]["mean_abs"]
    assert summary["bn_scales_after"]["fraction_below_0.01"] >= weak_summary["bn_scales_after"]["fraction_below_0.01"]
    strong = strong.model_copy(update={"finetune": strong.finetune.model_copy(update={"epochs": 1})})
    pruned, rec = prune_and_finetune(teacher, X, strong, teacher, train, blobs(64, 4), round_to=1)
    assert rec.finetune[0]["phase"] == "sparsity training" and len(rec.finetune) == 2
    assert rec.macs_after < rec.macs_before
    path = to_onnx(pruned.eval(), (X,), tmp_path / "slim.onnx")
    x = blobs(16, 5).x
    with torch.no_grad():
        want = pruned(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_outputs(path, x), want, rtol=1e-4, atol=1e-4)


def test_polynomial_schedule():
    s = [polynomial_sparsity(t, 100, 0.8) for t in range(0, 121, 10)]
    assert s[0] == 0 and s[10] == pytest.approx(0.8) and s[-1] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(s, s[1:]))
    assert s[5] == pytest.approx(0.8 - 0.8 * 0.5 ** 3)  # Zhu & Gupta: s_f + (s_i - s_f)(1 - t/T)^3


@pytest.mark.slow
def test_magnitude_sparsity_reaches_the_target_and_the_zeros_survive_export(teacher, tmp_path):
    student, rec, summary = magnitude_sparsify(copy.deepcopy(teacher), teacher, blobs(256, 3), 0.8,
                                               finetune_cfg=FinetuneConfig(epochs=2, lr=0.01))
    assert summary["epochs_run"] == 2 and rec.mask_updates > 2  # gradual, not one-shot
    assert rec.to_dict()["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert rec.skipped == [] and [layer["name"] for layer in rec.layers] == ["0", "3", "6", "11"]
    path = to_onnx(student.eval(), (X,), tmp_path / "sparse.onnx")
    zeros = onnx_zero_fraction(path)
    assert zeros["sparsity"] >= 0.79, zeros  # BatchNorm folded into the convs: zeros stay zeros
    x = blobs(16, 5).x
    with torch.no_grad():
        want = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_outputs(path, x), want, rtol=1e-4, atol=1e-4)
    dense = to_onnx(teacher, (X,), tmp_path / "dense.onnx")
    assert onnx_zero_fraction(dense)["sparsity"] < 0.01


def test_one_shot_masks_hold_while_training():
    model = small_cnn()
    with magnitude_masks(model, 0.5, 10, "one_shot") as masks:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for _ in range(3):
            loss = model(torch.randn(4, 1, 8, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=0.01) for layer in masks.record.layers)
    assert masks.record.steps == 3


def test_bad_options_are_clear_errors():
    with pytest.raises(EdgepackError, match="slimming.l1"):
        make_config(ratio=0.5, slimming={"l1": -1})
    with pytest.raises(EdgepackError, match="slimming.penalty: unknown option"):
        make_config(ratio=0.5, slimming={"penalty": 1})
    with pytest.raises(EdgepackError, match="strictly between 0 and 1"):
        check_target(1.5)
    with pytest.raises(EdgepackError, match="matches no Conv/Linear layer"):
        sparsifiable_layers(small_cnn(), ["classifier"])
    ctx = SimpleNamespace(cfg=SimpleNamespace(compress={"sparsity": {"target": 0.8, "shedule": "x"}}),
                          model=SimpleNamespace(kind="torch", module=small_cnn(), source="m.py"))
    with pytest.raises(EdgepackError, match="(?s)invalid \\[compress.sparsity\\].*shedule: unknown option"):
        sparsify.config(ctx)
    ctx.cfg.compress = {"sparsity": {"target": 0}}
    with pytest.raises(EdgepackError, match="strictly between 0 and 1"):
        sparsify.config(ctx)
    ctx.cfg.compress = {"sparsity": {"schedule": "cubic"}}
    with pytest.raises(EdgepackError, match="schedule"):
        sparsify.config(ctx)
    ctx.model.kind = "onnx"
    with pytest.raises(EdgepackError, match="needs a PyTorch model"):
        sparsify.config(ctx)


@dataclass
class _Loaded:
    module: nn.Module
    kind: str = "torch"
    source: str = "test"


@pytest.mark.slow
def test_the_stage_sparsifies_the_build_model_and_records_it(teacher):
    ctx = SimpleNamespace(cfg=SimpleNamespace(compress={"sparsity": {"target": 0.6, "epochs": 1}}, train=None),
                          model=_Loaded(copy.deepcopy(teacher)), say=lambda *_: None, sections={}, metric=None,
                          data=SimpleNamespace(train=blobs(128, 3), choose=blobs(64, 4)))
    record = sparsify.run(ctx, sparsify.config(ctx))
    assert record["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert record["fp32_weights"]["deflate_bytes_after"] < record["fp32_weights"]["deflate_bytes_before"]
    assert ctx.model.module is not teacher
    assert "## Magnitude sparsity" in ctx.sections["sparsify"]


@pytest.mark.slow
def test_group_norm_penalty_shrinks_the_channel_groups():
    model, train = small_cnn().eval(), blobs(128, 3)

    def weight_norm(m):
        return float(sum(layer.weight.detach().norm() for layer in m.modules() if isinstance(layer, nn.Conv2d)))
    runs = {}
    for l1 in (1e-6, 0.5):
        cfg = make_config(ratio=0.5, slimming={"l1": l1, "epochs": 1, "on": "group_norm", "lr": 0.05})
        slim, summary = sparsity_train(model, (X,), cfg, model, train)
        assert summary["penalty"] == "group_norm" and summary["epochs_run"] == 1
        runs[l1] = weight_norm(slim)
    assert runs[0.5] < 0.9 * runs[1e-6]
