"""A benchmark task that is not saturated, built deterministically from data shipped with
scikit-learn (no download): "noisy digits".

scikit-learn's 1797 8x8 handwritten digits are upscaled to 32x32 and put through a random
affine distortion (rotation, scale, shear, shift), random stroke contrast, a random background
gradient and heavy Gaussian noise, so that small CNNs trained for a few CPU minutes land between
80% and 95% top-1 instead of ~99%. Train, validation and test use disjoint source digits.

Measured with `train_baseline` on one core of the shared 2-core machine (test top-1):
ResNet-18 half width 84.9% (6 epochs, 13 min), quarter width 84.0% (6 epochs, ~5 min);
MobileNetV2 width 0.35 82.0% (10 epochs with train_copies=3, ~5 min; 80.6% after 14 epochs
with the default 2 copies). Use torch.set_num_threads(1) on a loaded
machine: two threads ran 6x slower there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .data import Dataset

SIZE = 32
CLASSES = [str(i) for i in range(10)]


@dataclass
class Task:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]  # with batch axis: (1, 1, 32, 32)
    num_classes: int


def _distort(images: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """(N, 8, 8) digits in [0, 16] -> (N, 1, 32, 32) distorted, noisy float32 images."""
    n = len(images)
    x = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    angle = rng.uniform(-25, 25, n) * math.pi / 180
    scale = rng.uniform(0.75, 1.2, n)
    shear = rng.uniform(-0.3, 0.3, n)
    shift = rng.uniform(-0.2, 0.2, (n, 2))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, -sin + shear, shift[:, 0]], 1),
                      np.stack([sin, cos, shift[:, 1]], 1)], 1).astype(np.float32)
    grid = F.affine_grid(torch.from_numpy(theta), (n, 1, SIZE, SIZE), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).numpy()
    contrast = rng.uniform(0.4, 1.0, (n, 1, 1, 1))
    ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)
    gx, gy = rng.uniform(-0.3, 0.3, (2, n, 1, 1, 1))
    background = gx * ramp[None, None, None, :] + gy * ramp[None, None, :, None]
    x = contrast * x + background + rng.normal(0, noise, x.shape)
    return ((x - 0.25) / 0.5).astype(np.float32)  # roughly zero-mean, unit-scale inputs


def noisy_digits(seed: int = 0, train_copies: int = 2, noise: float = 0.3,
                 val_fraction: float = 0.2, test_fraction: float = 0.25, test_copies: int = 1) -> Task:
    """The task's splits; the same seed gives bit-identical arrays. Each copy is a fresh
    distortion of the split's source digits. `test_copies` > 1 makes accuracy differences less
    noisy and leaves train and val unchanged (the test split is drawn last)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_test = int(len(order) * test_fraction)
    n_val = int(len(order) * val_fraction)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    images, labels = digits.images, digits.target.astype(np.int64)

    def split(idx, copies, name):
        idx = np.tile(idx, copies)
        return Dataset(_distort(images[idx], rng, noise), labels[idx].copy(), f"noisy_digits:{name}", CLASSES)

    return Task("noisy_digits", split(train_idx, train_copies, "train"), split(val_idx, 1, "val"),
                split(test_idx, test_copies, "test"), (1, 1, SIZE, SIZE), 10)


def train_baseline(model: torch.nn.Module, task: Task, epochs: int = 15, lr: float = 0.05,
                   batch_size: int = 64, seed: int = 0, max_minutes: float | None = None,
                   progress=None) -> dict:
    """Train `model` in place with SGD + cosine schedule on task.train, keeping the best epoch on
    task.val; deterministic for a given seed and thread count. Returns the training summary with
    `test_acc`."""
    from .prune.config import FinetuneConfig
    from .prune.finetune import evaluate, finetune
    torch.manual_seed(seed)
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=None,
                         max_minutes=max_minutes, distill=False)
    summary = finetune(model, None, task.train, task.val, cfg, progress)
    summary["test_acc"] = evaluate(model, task.test)
    return summary
