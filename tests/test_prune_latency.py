"""Latency-driven pruning: measured ORT latency and the ratio bisection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.prune import PruneConfig, count_macs_params, measure_latency, run_prune_stage
from edgepack.prune import latency as latency_mod
from edgepack.targets import load_profile
from fixtures.zoo import convnet

torch.set_num_threads(1)
X = torch.zeros(1, 3, 32, 32)


def test_measure_latency_fp32_and_int8():
    model = convnet(10, 3, 0.5).eval()
    calib = Dataset(np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    fp32 = measure_latency(model, X, threads=1, runs=5)
    int8 = measure_latency(model, X, 1, calib, load_profile("x86").quantization, runs=5)
    assert fp32["runs"] == int8["runs"] == 5 and 0 < fp32["p50"] < 1000 and 0 < int8["p50"] < 1000


@pytest.fixture
def macs_latency(monkeypatch):
    """Latency proportional to MACs (1 ms per 10M): the bisection logic without timing noise."""
    calls = []

    def fake(model, example_inputs, threads=1, calib=None, quantization=None, **_):
        calls.append(quantization is not None)
        return {"p50": count_macs_params(model, (X,))[0] / 1e7}
    monkeypatch.setattr(latency_mod, "measure_latency", fake)
    return calls


def profile_with_budget(ms):
    p = load_profile("x86")
    return p.model_copy(update={"budgets": p.budgets.model_copy(update={"latency_p50_ms": ms})})


def test_latency_search_finds_the_smallest_sufficient_ratio(macs_latency):
    model = convnet(10, 3, 1.0).eval()
    full_ms = count_macs_params(model, (X,))[0] / 1e7
    budget = full_ms / 2
    calib = Dataset(np.zeros((4, 3, 32, 32), np.float32))
    cfg = PruneConfig(to_latency=True, round_to=1)
    pruned, record = run_prune_stage(model, X, cfg, profile_with_budget(budget), calib, None)
    after_ms = count_macs_params(pruned, (X,))[0] / 1e7
    assert after_ms <= budget and record.requested == {"latency_p50_ms": budget}
    meeting = [c["ratio"] for c in record.latency_search if c["p50_ms"] <= budget]
    failing = [c["ratio"] for c in record.latency_search if c["p50_ms"] > budget]
    assert record.ratio == min(meeting) and max(failing) < record.ratio < max(failing) + 0.05
    assert all(macs_latency)  # measured as int8 when calibration data is available


def test_latency_search_reports_best_when_unreachable_and_skips_when_met(macs_latency):
    model = convnet(10, 3, 1.0).eval()
    with pytest.raises(EdgepackError, match=r"best measured latency was [\d.]+ ms at ratio 0.9"):
        run_prune_stage(model, X, PruneConfig(to_latency=True), profile_with_budget(1e-4))
    same, record = run_prune_stage(model, X, PruneConfig(to_latency=True), profile_with_budget(1e6))
    assert same is model and record.ratio == 0.0 and "already meets" in record.warnings[0]
    with pytest.raises(EdgepackError, match="no latency_p50_ms budget"):
        run_prune_stage(model, X, PruneConfig(to_latency=True), load_profile("x86").model_copy(
            update={"budgets": load_profile("x86").budgets.model_copy(update={"latency_p50_ms": None})}))
