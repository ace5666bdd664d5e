"""The noisy-digits benchmark task: deterministic, disjoint splits, not trivially separable."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.tasks import noisy_digits, train_baseline
from fixtures.zoo import mobilenet_v2, resnet18


@pytest.fixture(scope="module")
def task():
    return noisy_digits(seed=0, train_copies=1)


def test_task_is_deterministic_and_shaped(task):
    again = noisy_digits(seed=0, train_copies=1)
    assert np.array_equal(task.train.x, again.train.x) and np.array_equal(task.test.y, again.test.y)
    assert not np.array_equal(noisy_digits(seed=1, train_copies=1).train.x, task.train.x)
    for split in (task.train, task.val, task.test):
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (1, 32, 32) and split.labelled
        assert abs(float(split.x.mean())) < 0.5 and 0.5 < float(split.x.std()) < 2
        assert np.bincount(split.y, minlength=10).min() > 0.05 * len(split) # every class present
    assert len(task.train) + len(task.val) + len(task.test) == 1797  # each source digit used once
    assert len(noisy_digits(seed=0, train_copies=3).train) == 3 * len(task.train)
    more = noisy_digits(seed=0, train_copies=1, test_copies=3)
    assert np.array_equal(more.train.x, task.train.x) and np.array_equal(more.val.x, task.val.x)
    assert len(more.test) == 3 * len(task.test) and np.array_equal(more.test.y[:len(task.test)], task.test.y)
    assert not np.array_equal(more.test.x[:len(task.test)], more.test.x[len(task.test):])  # new distortions


def test_task_is_not_solved_by_a_linear_model(task):
    """Heavy noise and distortion: logistic regression on pixels stays far from saturation."""
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=300).fit(task.train.x.reshape(len(task.train), -1), task.train.y)
    acc = clf.score(task.test.x.reshape(len(task.test), -1), task.test.y)
    assert 0.15 < acc < 0.75


@pytest.mark.slow
# MobileNetV2-0.35 (10 epochs on 3 distorted copies: 82.0% at seed 0) is not trained here: it took
# 380 s of a CI worker, a fifth of `make test`. The bench scripts that train it record its test
# top-1 in their JSON (bench/results/compress_tradeoff.json: 87.08% on 1796 test images).
@pytest.mark.parametrize("build, epochs, copies", [
    (lambda: resnet18(10, 1, small_input=True, width=0.25), 6, 2),  # seed 0: 84.2% test, ~1.5 min
], ids=["resnet18"])
def test_baselines_land_between_80_and_95_percent(build, epochs, copies):
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine ran 6x slower
    torch.manual_seed(0)  # initial weights must not depend on what earlier tests drew from the RNG
    summary = train_baseline(build(), noisy_digits(seed=0, train_copies=copies), epochs=epochs)
    assert 0.80 <= summary["test_acc"] <= 0.95
