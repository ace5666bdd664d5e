"""`Dataset`: a model's named inputs (in the model's order), optional labels, and seeded,
class-stratified sampling that never just takes "the first N"."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Iterator

import numpy as np

from .lazy import LazyArray, chunk_rows, index_array, select_rows, update_fingerprint

SINGLE_INPUT = "input"  # the name of the input of `Dataset(x_array)`


def as_input_array(a):
    """In-memory arrays and lazy numpy-like arrays are kept; tensors and lists become numpy."""
    if isinstance(a, (np.ndarray, LazyArray)):
        return a
    if hasattr(a, "__array__") or isinstance(a, (list, tuple)):
        return np.asarray(a)
    if all(hasattr(a, attr) for attr in ("shape", "dtype", "__getitem__", "__len__")):
        return a  # a user's lazy array
    raise TypeError(f"a Dataset input must be an array or a numpy-like array, got {type(a).__name__}")


class Dataset:
    """`Dataset(inputs: dict[name, array], y, source, classes)`; `Dataset(x_array, y)` is a
    single input named "input". Every input has N rows; `y` is None, (N,) class ids or (N, ...)."""

    def __init__(self, inputs=None, y=None, source: str = "memory", classes: list[str] | None = None, *, x=None):
        if x is not None:
            if inputs is not None:
                raise TypeError("pass either inputs or x, not both")
            inputs = x
        if inputs is None:
            raise TypeError("Dataset needs inputs (a dict of arrays) or one array")
        if isinstance(inputs, Mapping):
            inputs = {str(k): as_input_array(v) for k, v in inputs.items()}
        else:
            inputs = {SINGLE_INPUT: as_input_array(inputs)}
        if not inputs:
            raise ValueError("a Dataset needs at least one input")
        lengths = {name: len(a) for name, a in inputs.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"inputs have different numbers of samples: {lengths}")
        self.inputs: dict = inputs
        self.y = None if y is None else np.asarray(y)
        self.source = source
        self.classes = list(classes or [])

    # -- what it holds ---------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.inputs)

    @property
    def x(self):
        """The only input (single-input code)."""
        if len(self.inputs) != 1:
            raise ValueError(f"this dataset has {len(self.inputs)} inputs ({', '.join(self.inputs)}): "
                             "use .inputs or .arrays()")
        return next(iter(self.inputs.values()))

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def labelled(self) -> bool:
        return self.y is not None

    @property
    def class_labels(self) -> bool:
        """Labels are class ids (1-D integers), so sampling can be stratified and accuracy counted."""
        return self.y is not None and self.y.ndim == 1 and self.y.dtype.kind in "iu"

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {tuple(a.shape)} {np.dtype(a.dtype)}" for n, a in self.inputs.items())
        return f"Dataset({shapes}; y={None if self.y is None else self.y.shape}; source={self.source!r})"

    # -- reading ---------------------------------------------------------------------------

    def arrays(self, idx=None) -> list[np.ndarray]:
        """The inputs' rows `idx` (a slice or an int array; None: all), materialised, in input order."""
        if idx is None:
            return [a if isinstance(a, np.ndarray) else np.asarray(a[:]) for a in self.inputs.values()]
        return [np.asarray(a[idx]) for a in self.inputs.values()]

    def batch_indices(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for i in range(0, len(idx), batch_size):
            yield idx[i:i + batch_size]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0
                ) -> Iterator[tuple[list[np.ndarray], np.ndarray | None]]:
        """(one array per input, labels or None) per batch; only a batch's rows are read."""
        for j in self.batch_indices(batch_size, shuffle, seed):
            rows = j if shuffle else slice(int(j[0]), int(j[-1]) + 1)  # a slice: views of in-memory arrays
            yield self.arrays(rows), (None if self.y is None else self.y[rows])

    # -- subsets ---------------------------------------------------------------------------

    def subset(self, idx) -> "Dataset":
        """Rows `idx` (a slice or an int array); lazy inputs stay lazy."""
        if not isinstance(idx, slice):
            idx = index_array(idx, len(self))
        return Dataset({n: select_rows(a, idx) for n, a in self.inputs.items()},
                       None if self.y is None else self.y[idx], self.source, self.classes)

    def take(self, n: int) -> "Dataset":
        """The first n rows (kept for old code; `sample` is what calibration and evaluation want)."""
        return self.subset(slice(0, n))

    def sample(self, n: int, seed: int = 0) -> "Dataset":
        """n rows drawn with a fixed seed, stratified across classes when the labels are class ids;
        all rows (in a seeded order) when n >= len."""
        return self.subset(self.sample_indices(n, seed))

    def split(self, n: int, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Disjoint (n rows, sampled as `sample` does; the rest, in their original order)."""
        picked = self.sample_indices(n, seed)
        rest = np.setdiff1d(np.arange(len(self)), picked, assume_unique=True)
        return self.subset(picked), self.subset(rest)

    def sample_indices(self, n: int, seed: int = 0) -> np.ndarray:
        if n < 0:
            raise ValueError(f"cannot sample {n} rows")
        rng = np.random.default_rng(seed)
        total = len(self)
        if n >= total:
            return rng.permutation(total)
        if not self.class_labels:
            return rng.choice(total, n, replace=False)
        values, counts = np.unique(self.y, return_counts=True)
        members = np.split(np.argsort(self.y, kind="stable"), np.cumsum(counts)[:-1])
        take = stratified_allocation(counts, n)
        picked = [rng.choice(m, k, replace=False) for m, k in zip(members, take) if k]
        return rng.permutation(np.concatenate(picked))

    # -- content ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A hash of the content: array bytes; for lazy image folders the files' relative paths,
        sizes and mtimes plus the preprocessing. Where the data lives does not enter it."""
        h = hashlib.sha256()
        for name, a in self.inputs.items():
            h.update(f"input:{name}".encode())
            update_fingerprint(h, a)
        if self.y is not None:
            h.update(b"y")
            update_fingerprint(h, self.y)
        h.update(repr(self.classes).encode())
        return h.hexdigest()[:16]

    def nonfinite_count(self) -> int:
        """Samples with a NaN or Inf in any float input, scanned a chunk of rows at a time
        (inputs that are finite by construction, like decoded images, are not read)."""
        bad = np.zeros(len(self), bool)
        for a in self.inputs.values():
            if np.dtype(a.dtype).kind != "f" or getattr(a, "finite", False):
                continue
            step = chunk_rows(a)
            for start in range(0, len(a), step):
                rows = np.asarray(a[start:start + step])
                bad[start:start + len(rows)] |= ~np.isfinite(rows).all(axis=tuple(range(1, rows.ndim)))
        return int(bad.sum())


def stratified_allocation(counts: np.ndarray, n: int) -> np.ndarray:
    """How many to draw from each class (counts > 0, n < counts.sum()): proportional by largest
    remainder, and at least one of every class when n >= the number of classes."""
    counts = np.asarray(counts, np.int64)
    quota = counts * (n / counts.sum())
    take = np.floor(quota).astype(np.int64)
    if n >= len(counts):
        take = np.maximum(take, 1)
    while take.sum() > n:  # the one-per-class minimum overshot: take back where most over quota
        take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    while take.sum() < n:  # hand out the remainder where most under quota
        take[np.argmax(np.where(take < counts, quota - take, -np.inf))] += 1
    return take
