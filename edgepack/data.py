"""Calibration, evaluation and training data: one in-memory `Dataset` whatever the source.

Sources: a folder of images in class sub-folders, an `.npz` with `x` (and `y`), or a Python
`module:function` / `file.py:function` returning arrays or an iterable of batches.
Loaders are defined below `Dataset`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass
class Dataset:
    x: np.ndarray  # float32, shape (N, *input_shape_without_batch)
    y: np.ndarray | None = None  # int64 class labels, shape (N,), or None when unlabelled
    source: str = "memory"
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        idx = np.arange(len(self.x))
        if shuffle:
            np.random.default_rng(seed).shuffle(idx)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield self.x[j], (None if self.y is None else self.y[j])

    def take(self, n: int) -> "Dataset":
        return Dataset(self.x[:n], None if self.y is None else self.y[:n], self.source, self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()[:16]
