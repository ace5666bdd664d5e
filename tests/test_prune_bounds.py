"""Bounded memory and time while pruning, with progress: the guard interrupts torch-pruning's
loops and the error names the step; progress says which step and group run."""
from __future__ import annotations

import time

import pytest
import torch
import torch_pruning as tp

from edgepack.prune import PruneConfig, UnprunableModel, make_config, prune_model
from edgepack.prune import engine
from edgepack.prune.guard import ResourceGuard, ResourceLimit, rss_mb
from fixtures.zoo_more import swin_tiny

torch.set_num_threads(1)
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small_swin():
    torch.manual_seed(0)
    return swin_tiny().eval()


def test_guard_interrupts_a_growing_python_loop_and_a_long_one():
    hog = []
    with pytest.raises(ResourceLimit):
        with ResourceGuard(int(rss_mb()) + 150, None) as guard:
            while True:
                hog.append(bytearray(1 << 20))
    grown = len(hog)
    hog.clear()
    assert "resident memory" in guard.exceeded and "over the limit" in guard.exceeded
    assert 150 <= grown < 1500  # stopped soon after the limit (polled every 50 ms)
    start = time.monotonic()
    with pytest.raises(ResourceLimit):
        with ResourceGuard(None, 0.5 / 60) as guard:
            while True:
                pass
    assert "ran for" in guard.exceeded and time.monotonic() - start < 5


def test_a_limit_crossed_before_the_block_leaves_no_watchdog_behind():
    """A limit already crossed when the guard starts (1 MB) must not be delivered inside
    __enter__: then __exit__ never ran and the watchdog went on raising in this thread for the
    rest of the process (a CI worker died of it two test files later)."""
    import threading
    for _ in range(100):
        with pytest.raises(ResourceLimit):
            with ResourceGuard(1, None):
                for _ in range(10_000):
                    pass
    assert not [t for t in threading.enumerate() if t.name == "edgepack-prune-guard"]
    time.sleep(0.7)  # longer than REDELIVER_SECONDS: nothing arrives after the blocks
    for _ in range(200_000):
        pass


def test_memory_blowup_inside_torch_pruning_is_a_clear_error(monkeypatch):
    """Stands in for torch-pruning's index-mapping explosion on windowed attention (24 GB,
    killed without a message): memory grows inside its group building."""
    original = tp.DependencyGraph.get_pruning_group

    def exploding(self, *args, **kwargs):
        hog = []
        while True:
            hog.append(bytearray(1 << 20))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", exploding)
    with pytest.raises(UnprunableModel) as e:
        prune_model(small_swin(), X, PruneConfig(ratio=0.5, max_memory_mb=int(rss_mb()) + 300))
    message = e.value.message
    assert message.startswith("pruning SwinTransformer stopped: its resident memory reached")
    assert "while tracing the channel dependency graph" in message
    assert "--prune-ignore" in e.value.hint and "--allow-unpruned" in e.value.hint
    assert "max_memory_mb" in e.value.hint


def test_tiny_limits_stop_pruning_with_the_step_named():
    with pytest.raises(UnprunableModel, match=r"over the limit of 1 MB, while "):
        prune_model(small_swin(), X, PruneConfig(ratio=0.5, max_memory_mb=1))
    with pytest.raises(UnprunableModel, match=r"ran for .* over the limit of 0.0002 min, while "):
        prune_model(small_swin(), X, PruneConfig(ratio=0.5, max_prune_minutes=0.0002))
    assert make_config(ratio=0.5, max_memory_mb=4096, max_prune_minutes=5).max_memory_mb == 4096


def test_progress_names_steps_and_groups_and_the_record_has_the_cost(monkeypatch):
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.0)
    events = []
    pruned, record = prune_model(small_swin(), X, PruneConfig(ratio=0.5, iterative_steps=2), progress=events.append)
    steps = [e["step"] for e in events]
    assert steps[:3] == ["reading the model", "tracing the channel dependency graph (torch-pruning)",
                         "finding the channel groups"]
    assert "ranking channels (step 1/2)" in steps and "ranking channels (step 2/2)" in steps
    groups = [e for e in events if "group" in e]
    assert groups and all(e["stage"] == "prune" and e["rss_mb"] > 0 and e["layer"] in e["step"] for e in groups)
    assert groups[-1]["group"] == groups[-1]["groups"]
    assert 0 < record.peak_rss_mb < 4096 and 0 < record.prune_seconds < 300
    assert "peak resident memory" in record.markdown()
