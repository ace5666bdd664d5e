"""Entropy importance: channels ranked by the entropy of their activations on calibration data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.prune import PruneConfig, prune_model
from edgepack.prune.importance import EntropyImportance, channel_entropy

torch.set_num_threads(1)
X = torch.zeros(1, 1, 8, 8)
DEAD = 5


def data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64), "noise")


def cnn_with_dead_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():  # channel DEAD of the first conv outputs its bias whatever the input
        model[0].weight[DEAD] = 0
        model[0].bias[DEAD] = 0.5
        model[0].weight[DEAD + 1] *= 0.01  # tiny but alive: entropy ignores scale, l2 would not
    return model.eval()


def test_channel_entropy_is_zero_for_constant_and_highest_for_spread_values():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(np.stack([np.full(256, 3.0), rng.uniform(0, 1, 256), rng.normal(0, 1, 256),
                                        np.r_[np.zeros(250), np.ones(6)]], 1).astype(np.float32))
    ent = channel_entropy(values, bins=16)
    assert ent[0] == 0
    assert ent[1] == pytest.approx(4.0, abs=0.1)  # uniform over 16 bins: log2(16) bits
    assert ent[1] > ent[2] > ent[3] > ent[0]


def test_entropy_ranks_the_dead_channel_lowest_and_prunes_it():
    model = cnn_with_dead_channel()
    imp = EntropyImportance()
    imp.record(model, [[data().x[:64]], [data().x[64:]]])
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=X)
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(16)))
    scores = imp(group)
    assert scores.shape == (16,)
    assert int(scores.argmin()) == DEAD
    assert scores[DEAD + 1] > scores[DEAD]  # scaled down, not dead
    pruned, rec = prune_model(model, X, PruneConfig(ratio=0.25, importance="entropy", round_to=1), train=data())
    removed = {name: idx for name, _, idx in rec.history}
    assert DEAD in removed["0"]
    assert pruned[0].out_channels == 12
    with torch.no_grad():
        assert pruned(torch.from_numpy(data().x[:8])).shape == (8, 4)


def test_entropy_without_data_is_a_clear_error():
    with pytest.raises(EdgepackError, match="entropy.*calibration inputs"):
        prune_model(cnn_with_dead_channel(), X, PruneConfig(ratio=0.5, importance="entropy"))


def test_entropy_with_a_macs_target_through_the_stage():
    from edgepack.prune.stage import prune_and_finetune
    model = cnn_with_dead_channel()
    cfg = PruneConfig(macs_target=0.5, importance="entropy", round_to=1, finetune={"epochs": 0})
    pruned, rec = prune_and_finetune(model, X, cfg, model, data(), data(64, 1))
    assert rec.requested == {"macs_target": 0.5}
    assert rec.importance == "entropy"
    assert rec.macs_after <= 0.5 * rec.macs_before
