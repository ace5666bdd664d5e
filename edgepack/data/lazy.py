"""Numpy-like arrays whose rows are produced on demand, so a dataset larger than memory can be
sampled, split and iterated in batches.

The contract every input of a `Dataset` honours: `len()`, `.shape`, `.dtype`, and `a[key]` for an
int, a slice or an integer index array returning an `np.ndarray`. `LazyArray` adds `select(idx)`
(a lazy subset, no rows read) and a content fingerprint.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

CHUNK_BYTES = 1 << 24  # rows materialised at a time when hashing or scanning a whole array


class LazyArray:
    """Base class: subclasses set `shape` and `dtype` and implement `_rows`, `select`, `_fingerprint`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    finite = False  # True: values are finite by construction (decoded images), no scan needed

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (a 1-D int64 array of valid non-negative indices) as one array."""
        raise NotImplementedError

    def select(self, idx) -> "LazyArray":
        raise NotImplementedError

    def _fingerprint(self, h) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key:
                return self._rows(np.arange(len(self)))
            head, rest = key[0], key[1:]
            if head is Ellipsis:
                return self._rows(np.arange(len(self)))[key]
            rows = self[head]
            return rows[rest] if _is_int(head) else rows[(slice(None), *rest)]
        if _is_int(key):
            return self._rows(np.asarray([row_index(key, len(self))]))[0]
        return self._rows(index_array(key, len(self)))

    def __array__(self, dtype=None, copy=None):
        # Old single-input code does np.asarray(ds.x): it gets every row, as it used to.
        a = self._rows(np.arange(len(self)))
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} shape={self.shape} dtype={self.dtype}>"


def _is_int(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_))


def row_index(i, n: int) -> int:
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for {n} rows")
    return i + n if i < 0 else i


def index_array(key, n: int) -> np.ndarray:
    """A slice, an integer index array or a boolean mask -> 1-D int64 indices in [0, n)."""
    if isinstance(key, slice):
        return np.arange(n)[key]
    idx = np.asarray(key)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise IndexError(f"rows are indexed by an int, a slice or a 1-D integer array (got {idx.dtype} {idx.shape})")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of bounds for {n} rows")
    return np.where(idx < 0, idx + n, idx)


class IndexedView(LazyArray):
    """Rows `index` of any array-like (a memory-mapped .npy, a user's lazy array) without reading them."""

    def __init__(self, base, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, np.int64)
        self.shape = (len(self.index), *tuple(base.shape[1:]))
        self.dtype = np.dtype(base.dtype)
        self.finite = getattr(base, "finite", False)

    def _rows(self, idx):
        return np.asarray(self.base[self.index[idx]])

    def select(self, idx):
        return IndexedView(self.base, self.index[index_array(idx, len(self))])

    def _fingerprint(self, h):
        hash_rows(h, self)


class MappedArray(LazyArray):
    """`fn` applied to each batch of rows read from `base` (a dtype cast, an added channel axis).
    `tag` names the transform in the fingerprint."""

    def __init__(self, base, fn: Callable[[np.ndarray], np.ndarray], sample_shape, dtype, tag: str):
        self.base, self.fn, self.tag = base, fn, tag
        self.shape = (len(base), *tuple(sample_shape))
        self.dtype = np.dtype(dtype)
        self.finite = getattr(base, "finite", False)

    def _rows(self, idx):
        return self.fn(np.asarray(self.base[idx]))

    def select(self, idx):
        return MappedArray(select_rows(self.base, idx), self.fn, self.shape[1:], self.dtype, self.tag)

    def _fingerprint(self, h):
        h.update(f"map:{self.tag}".encode())
        update_fingerprint(h, self.base)


def select_rows(a, idx):
    """Rows `idx` (a slice or an int array) of an input, lazily unless it is an in-memory array."""
    if isinstance(a, LazyArray):
        return a.select(idx)
    if isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
        return a[idx]
    if isinstance(a, np.memmap) and isinstance(idx, slice):
        return a[idx]  # still a memory map
    return IndexedView(a, index_array(idx, len(a)))


def chunk_rows(a) -> int:
    row_bytes = int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


def hash_rows(h, a) -> None:
    """Content of any array-like, a chunk of rows at a time."""
    step = chunk_rows(a)
    for start in range(0, len(a), step):
        h.update(np.ascontiguousarray(np.asarray(a[start:start + step])).data)


def update_fingerprint(h, a: Any) -> None:
    h.update(f"{np.dtype(a.dtype).str}{tuple(a.shape)}".encode())
    if isinstance(a, LazyArray):
        a._fingerprint(h)
    else:
        hash_rows(h, a)
