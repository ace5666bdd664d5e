"""Sensitivity-weighted entropy-constrained clustering: weight_sensitivity (the Gauss-Newton
diagonal on input samples) and the per-layer rates cluster() derives from it."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.compress.cluster import cluster, clusterable_layers, int8_codes
from edgepack.compress.cluster_steps import cluster_and_finetune, step_groups
from edgepack.compress.sensitivity import layer_rates, weight_sensitivity
from edgepack.data import Dataset
from edgepack.errors import EdgepackError


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def features(n: int, scales, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, len(scales))) * np.asarray(scales)).astype(np.float32)
    return Dataset(x, None, "random", [])


class TwoBranches(nn.Module):
    """out = loud(x) * 10 + quiet(x) / 10: the same kind of layer, 10^4 apart in how much its
    weights move the output; `unused` feeds nothing."""

    def __init__(self, d: int = 32, out: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet, self.unused = nn.Linear(d, out), nn.Linear(d, out), nn.Linear(d, out)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight.flip(0))  # the same values: only sensitivity differs

    def forward(self, x):
        return self.loud(x) * 10 + self.quiet(x) / 10


def test_sensitivity_is_the_gauss_newton_diagonal():
    """For y = W x, d(v.y)/dW_ij = v_i x_j: E[grad^2] = E[x_j^2] / var(y), the same in every row and
    proportional to the input's energy: inputs scaled 1, 2, 4, 8 give 1 : 4 : 16 : 64 (within the
    estimate's noise; each batch is divided by its own output spread)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    data = features(2048, [1, 2, 4, 8])
    before = copy.deepcopy(model.state_dict())
    model[0].weight.requires_grad_(False)  # a frozen layer: measured all the same, and left frozen
    sens = weight_sensitivity(model, data, samples=2048, batch_size=64)["0"]
    assert sens.shape == model[0].weight.shape
    ratios = (sens / sens[:, :1]).mean(0)
    assert np.allclose(ratios.numpy(), [1, 4, 16, 64], rtol=0.2), ratios
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # ran on a copy
    assert not model[0].weight.requires_grad and model[0].weight.grad is None


def test_layer_rates_follow_sensitivity():
    model = TwoBranches()
    data = features(256, [1.0] * 32)
    sens = weight_sensitivity(model, data)
    assert float(sens["unused"].abs().max()) == 0.0
    layers = clusterable_layers(model)
    assert set(layer_rates(layers, 0.05, None, True).values()) == {0.05}
    rates = layer_rates(layers, 0.05, sens, scaled=True)
    with pytest.raises(EdgepackError, match="no sensitivity for layer"):
        layer_rates(layers, 0.05, {"loud": sens["loud"]}, scaled=True)
    # equal weights, 10^4 apart in sensitivity; the geometric mean sits between them (x10^-2, x10^2)
    assert rates["loud"] == pytest.approx(0.05 / 100, rel=0.2)
    assert rates["quiet"] == 1.0  # 0.05 x 100 = 5, capped: a bit costs the whole variance
    assert rates["unused"] == 1.0  # the outputs do not depend on it
    assert layer_rates(layers, 0.0, sens, True) == {n: 0.0 for n in layers}


def code_bits(model: nn.Module) -> float:
    """Order-0 entropy of every layer's per-channel int8 codes, summed (bits)."""
    total = 0.0
    for layer in clusterable_layers(model).values():
        _, counts = np.unique(int8_codes(layer.weight), return_counts=True)
        p = counts / counts.sum()
        total += float(-(p * np.log2(p)).sum() * counts.sum())
    return total


def test_weighted_rates_spend_bits_where_the_outputs_need_them():
    """At one rate, weighting moves bits from the quiet layer to the loud one: fewer bits in all
    and a far smaller output error than one rate for both."""
    model = TwoBranches(d=64, out=32).eval()
    data = features(256, [1.0] * 64)
    x = torch.from_numpy(data.arrays()[0])
    ref = model(x).detach()
    uniform, rec_u = cluster(copy.deepcopy(model), 16, scaled=True, rate=0.1)
    weighted, rec_w = cluster(copy.deepcopy(model), 16, scaled=True, rate=0.1,
                              sensitivity=weight_sensitivity(model, data))
    assert rec_u.rate_by == "uniform" and rec_w.rate_by == "sensitivity"
    assert {layer.name: layer.rate for layer in rec_w.layers}["loud"] < 0.01
    with torch.no_grad():
        err_u, err_w = float((uniform(x) - ref).pow(2).mean()), float((weighted(x) - ref).pow(2).mean())
    assert err_w < 0.25 * err_u, (err_w, err_u)
    assert code_bits(weighted) < code_bits(uniform)
    assert rec_w.to_dict()["rate_by"] == "sensitivity"


def test_missing_sensitivity_is_refused():
    model = TwoBranches()
    sens = weight_sensitivity(model, features(64, [1.0] * 32))
    del sens["quiet"]
    with pytest.raises(EdgepackError, match="no sensitivity for layer"):
        cluster(model, 16, scaled=True, rate=0.05, sensitivity=sens)
    with pytest.raises(ValueError, match="needs input samples"):
        weight_sensitivity(model, None)


def test_cli_flag_makes_the_table():
    from edgepack.cli.build import _compress_tables
    tables = _compress_tables(None, None, [], None, {"clusters": None, "skip": None, "rate": 0.08, "steps": 2,
                                                     "finetune": None}, False, {"target": None}, {"always": None})
    assert tables == {"cluster": {"rate": 0.08, "steps": 2}}


# ------------------------------------------------------------------ clustering in steps

def test_step_groups_put_the_least_sensitive_half_first():
    model = TwoBranches(d=32, out=8)
    layers = {"loud": model.loud, "quiet": model.quiet, "unused": model.unused}
    rates = {"loud": 0.001, "quiet": 0.5, "unused": 1.0}
    assert step_groups(layers, rates, 1) == [["unused", "quiet", "loud"]]
    assert step_groups(layers, rates, 2) == [["unused", "quiet"], ["loud"]]
    assert step_groups(layers, rates, 3) == [["unused"], ["quiet"], ["loud"]]
    assert step_groups(layers, rates, 8) == [["unused"], ["quiet"], ["loud"]]  # never an empty group


def small_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()


def images(n: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 12, 12)).astype(np.float32)
    y = (x[:, 0].mean((1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1].mean((1, 2)) > 0)
    return Dataset(x, y, "random", [str(i) for i in range(4)])


def test_two_steps_train_the_later_group_densely_then_cluster_it():
    from edgepack.prune import FinetuneConfig
    teacher = small_classifier()
    data = images()
    sens = weight_sensitivity(teacher, data)
    snapshots = []

    def progress(info):  # the layers' weights (and centroids, once clustered) at the end of each epoch
        layers = clusterable_layers(student)
        snapshots.append({n: layer.weight.detach().clone() for n, layer in layers.items()}
                         | {(n, "centroids"): layer.parametrizations.weight[0].centroids.detach().clone()
                            for n, layer in layers.items() if hasattr(layer, "parametrizations")})
    student = copy.deepcopy(teacher)
    cfg = FinetuneConfig(epochs=1, lr=0.01, seed=0, patience=None, distill=True, threads=1)
    student, rec, steps = cluster_and_finetune(student, teacher, data, data, cfg, 8, steps=2, sensitivity=sens,
                                               progress=progress, score=lambda m: 0.5, scaled=True, rate=0.05)
    assert len(steps) == 2 and [s["clustered"] for s in steps] == [0.5, 0.5]
    first, second = steps[0]["layers"], steps[1]["layers"]
    assert sorted(first + second) == sorted(clusterable_layers(teacher)) and not set(first) & set(second)
    assert [layer.name for layer in rec.layers] == list(clusterable_layers(teacher))  # model order
    assert rec.rate_by == "sensitivity" and rec.skipped == []
    original = {n: layer.weight.detach() for n, layer in clusterable_layers(teacher).items()}
    for n in second:  # dense during step 1: it moved, and held more than 8 values per channel
        assert not torch.equal(snapshots[0][n], original[n])
        assert max(len(np.unique(row)) for row in int8_codes(snapshots[0][n])) > 8
    for n, layer in clusterable_layers(student).items():  # all clustered at the end, parametrizations gone
        assert len(np.unique(int8_codes(layer.weight))) <= 8, n
        assert not hasattr(layer, "parametrizations")
    assert len(snapshots) == 2
    for n in first:  # clustered in step 1; its centroids kept training in step 2 (snapped to the int8 grid)
        assert not torch.equal(snapshots[0][n, "centroids"], snapshots[1][n, "centroids"])
        assert len(np.unique(int8_codes(snapshots[1][n]))) <= 8
    assert all((n, "centroids") not in snapshots[0] for n in second)


def test_bad_step_counts_are_refused():
    from edgepack.prune import FinetuneConfig
    for steps in (0, 9, 1.5, True):
        with pytest.raises(EdgepackError, match="steps must be a whole number from 1 to 8"):
            cluster_and_finetune(small_classifier(), None, None, None, FinetuneConfig(epochs=0), 8, steps=steps)


def test_steps_with_one_rate_are_recorded_as_uniform():
    from edgepack.prune import FinetuneConfig
    model = small_classifier()
    _, rec, steps = cluster_and_finetune(model, None, None, None, FinetuneConfig(epochs=0), 8, steps=2,
                                         scaled=True, rate=0.05)
    assert len(steps) == 2 and rec.rate_by == "uniform" and {layer.rate for layer in rec.layers} == {0.05}
    # one rate for all: the larger layers first
    assert steps[0]["layers"] == ["3"] and steps[1]["layers"] == ["0", "8"]


def test_outputs_count_alike_and_constant_ones_are_left_out():
    """Two heads of one trunk: a 1-number head and a 64-number head scaled by 1000. Divided by
    spread and size, each head's own layer gets the same sensitivity; a head that is constant in
    the batch (ReLU of a large negative bias) adds nothing, instead of dividing by zero."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.small, self.big, self.dead = nn.Linear(16, 1), nn.Linear(16, 64), nn.Linear(16, 4)
            with torch.no_grad():
                self.big.weight.copy_(self.small.weight.repeat(64, 1))
                self.dead.bias.fill_(-1e3)

        def forward(self, x):
            return self.small(x), self.big(x) * 1000, torch.relu(self.dead(x))
    sens = weight_sensitivity(Heads(), features(512, [1.0] * 16), samples=512)
    per_weight = {n: float(t.sum()) / (1 if n == "small" else 64) for n, t in sens.items() if n != "dead"}
    assert per_weight["big"] == pytest.approx(per_weight["small"] / 64, rel=0.25)  # same head total
    assert float(sens["big"].sum()) == pytest.approx(float(sens["small"].sum()), rel=0.25)
    assert float(sens["dead"].abs().max()) == 0.0 and all(torch.isfinite(t).all() for t in sens.values())


def test_the_samples_are_a_random_subset_not_the_first_rows():
    """Rows sorted by class (an image folder): the first 128 of 256 would all be one class."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    x, rng = np.zeros((256, 2), np.float32), np.random.default_rng(0)
    x[:128, 0], x[128:, 1] = rng.standard_normal(128), rng.standard_normal(128)  # each half feeds one weight
    sens = weight_sensitivity(model, Dataset(x, None, "sorted", []), samples=128)["0"][0]
    assert float(sens[0]) > 0 and float(sens[1]) > 0


@pytest.mark.parametrize("steps", [1, 2])
def test_skipped_layers_keep_their_own_reasons(steps):
    """A layer too small to cluster and one skipped by name are reported as such, whatever the steps
    (not as "skipped by the configuration", how a step leaves the other groups for later)."""
    from edgepack.prune import FinetuneConfig
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1, bias=False),
                          nn.Linear(1, 4))
    _, rec, done = cluster_and_finetune(model, None, None, None, FinetuneConfig(epochs=0), 8, skip=["2"], steps=steps,
                                        scaled=True, rate=0.05)
    assert [layer.name for layer in rec.layers] == ["0", "4"] and len(done) == min(steps, 2)
    assert rec.skipped == [{"layer": "2", "reason": "skipped by the configuration"},
                           {"layer": "5", "reason": "too small: 4 weights, fewer than 8 clusters"}]
