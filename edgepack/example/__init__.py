"""The embedded default: a small CNN for the handwritten digits that ship with scikit-learn.

`edgepack build` with no --model uses `digits_cnn` + the weights shipped next to this file,
calibrates on `calibration_data` and evaluates on `eval_data`. No download, ever.
Regenerate the weights (deterministic, ~20 s on 2 cores): `python -m edgepack.example`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import Dataset

WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
SIZE = 32  # the 8x8 digits are upscaled so the network has real convolutions to run
MODEL_SPEC = "edgepack.example:digits_cnn"
CALIB_SPEC = "edgepack.example:calibration_data"
EVAL_SPEC = "edgepack.example:eval_data"
TRAIN_SPEC = "edgepack.example:train_data"


class DigitsCNN(nn.Module):
    input_shape = (1, 1, SIZE, SIZE)

    def __init__(self, width: int = 40, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))
        w = width
        self.features = nn.Sequential(block(1, w), block(w, w), nn.MaxPool2d(2),
                                      block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_cnn() -> DigitsCNN:
    return DigitsCNN()


def _splits() -> dict[str, Dataset]:
    """Deterministic 60/10/30 train/calibration/eval split of sklearn's 1797 digits."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).numpy()
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    n_train, n_cal = int(0.6 * len(x)), int(0.1 * len(x))
    parts = {"train": idx[:n_train], "calib": idx[n_train:n_train + n_cal], "eval": idx[n_train + n_cal:]}
    return {k: Dataset(x[v], y[v], f"sklearn digits ({k} split)") for k, v in parts.items()}


def train_data() -> Dataset:
    return _splits()["train"]


def calibration_data() -> Dataset:
    # Calibration draws on training images plus the held-out calibration split, never eval images.
    s = _splits()
    return Dataset(np.concatenate([s["calib"].x, s["train"].x[:128]]),
                   np.concatenate([s["calib"].y, s["train"].y[:128]]), "sklearn digits (calibration)")


def eval_data() -> Dataset:
    return _splits()["eval"]


def train(epochs: int = 12, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    data = train_data()
    model = digits_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(data) + 63) // 64))
    for epoch in range(epochs):
        model.train()
        for (xb,), yb in data.batches(64, shuffle=True, seed=seed + epoch):
            loss = nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(np.asarray(data.x))).argmax(1).numpy()
    return float((pred == data.y).mean() * 100)

