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
        for j in self.batch_indices(batch_size, shuffle, seed):
            yield self.x[j], (None if self.y is None else self.y[j])

    def batch_indices(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        idx = np.arange(len(self.x))
        if shuffle:
            np.random.default_rng(seed).shuffle(idx)
        for i in range(0, len(idx), batch_size):
            yield idx[i:i + batch_size]

    def take(self, n: int) -> "Dataset":
        return Dataset(self.x[:n], None if self.y is None else self.y[:n], self.source, self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loaders. `input_shape` is the model's input shape without the batch axis, e.g. (3, 224, 224).

from pathlib import Path  # noqa: E402

from .errors import EdgepackError  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Preprocess:
    """Image preprocessing: resize to the input's H x W, scale to [0, 1], then (x - mean) / std."""
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])


def load_dataset(spec: str | Path, input_shape: tuple[int, ...] | None, pre: Preprocess | None = None,
                 what: str = "data") -> Dataset:
    """Load a folder of images, an .npz/.npy file, or a `module:function` into a Dataset.

    With `input_shape=None` the samples' own shape is kept (used to infer the model's input)."""
    pre = pre or Preprocess()
    spec_s = str(spec)
    path = Path(spec_s)
    if path.is_dir():
        ds = _load_image_folder(path, input_shape, pre)
    elif path.suffix in (".npz", ".npy"):
        if not path.exists():
            raise EdgepackError(f"{what} file {path} does not exist", "check the path")
        ds = _load_numpy(path)
    elif ":" in spec_s and not path.exists():
        ds = _load_callable(spec_s)
    elif not path.exists():
        raise EdgepackError(f"{what} {spec_s} does not exist",
                            "pass a folder of images in class sub-folders, an .npz with x (and y), "
                            "or module:function")
    else:
        raise EdgepackError(f"{what} {spec_s}: unsupported kind of file",
                            "use a folder of images, an .npz with arrays x (and y), or module:function")
    return conform(ds, input_shape, what)


def _load_image_folder(root: Path, input_shape, pre: Preprocess) -> Dataset:
    from PIL import Image, UnidentifiedImageError
    if input_shape is None or len(input_shape) != 3:
        raise EdgepackError(f"{root} is an image folder, so the model input shape must be C x H x W "
                            f"(got {input_shape})", "pass --input-shape, e.g. --input-shape 1x3x224x224")
    c, h, w = input_shape
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        files = [(f, i) for i, cls in enumerate(classes) for f in sorted((root / cls).rglob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise EdgepackError(f"data folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                            "put images in class sub-folders (root/cat/1.jpg, root/dog/2.jpg)")
    mean = np.asarray(pre.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(-1, 1, 1)
    if mean.shape[0] not in (1, c) or std.shape[0] not in (1, c):
        raise EdgepackError(f"mean/std have {mean.shape[0]}/{std.shape[0]} values but the model has {c} channels")
    x = np.empty((len(files), c, h, w), np.float32)
    for n, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as e:
            raise EdgepackError(f"cannot read image {f}: {e}", "remove or replace the file") from e
        x[n] = (arr.reshape(h, w, -1).transpose(2, 0, 1) - mean) / std
    y = np.asarray([i for _, i in files], np.int64) if classes else None
    return Dataset(x, y, str(root), classes)


def _load_numpy(path: Path) -> Dataset:
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EdgepackError(f"cannot read {path}: {e}", "save it with numpy.savez(path, x=..., y=...)") from e
    if isinstance(arrays, np.ndarray):
        return Dataset(arrays, None, str(path))
    if "x" not in arrays.files:
        raise EdgepackError(f"{path} has no array named 'x' (it has: {', '.join(arrays.files) or 'none'})",
                            "save it with numpy.savez(path, x=inputs, y=labels)")
    return Dataset(arrays["x"], arrays["y"] if "y" in arrays.files else None, str(path))


def _load_callable(spec: str) -> Dataset:
    from .userimport import import_attr
    fn = import_attr(spec, "data function")
    try:
        result = fn()
    except Exception as e:
        raise EdgepackError(f"data function {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(result, Dataset):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], np.ndarray):
        return Dataset(result[0], result[1], spec)
    if isinstance(result, np.ndarray):
        return Dataset(result, None, spec)
    xs, ys = [], []
    for item in result:  # an iterable of batches: x, or (x, y)
        x, y = (item if isinstance(item, (tuple, list)) else (item, None))
        xs.append(np.asarray(x))
        if y is not None:
            ys.append(np.asarray(y))
    if not xs:
        raise EdgepackError(f"data function {spec} returned no batches")
    return Dataset(np.concatenate(xs), np.concatenate(ys) if ys else None, spec)


def conform(ds: Dataset, input_shape, what: str) -> Dataset:
    """Check samples against the model input shape (None: keep their own), labels against samples."""
    x = np.asarray(ds.x)
    if x.dtype.kind not in "fiu":
        raise EdgepackError(f"{what} {ds.source}: inputs must be numeric, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    want = tuple(int(s) for s in input_shape) if input_shape is not None else tuple(x.shape[1:])
    if x.ndim == len(want) and len(want) >= 2 and want[0] == 1:
        x = x[:, None]  # (N, H, W) for a single-channel model
    if len(x) == 0:
        raise EdgepackError(f"{what} {ds.source} is empty", "provide at least a few samples")
    if tuple(x.shape[1:]) != want:
        hint = "inputs must be N x " + " x ".join(map(str, want))
        if len(want) == 3 and tuple(x.shape[1:]) == (want[1], want[2], want[0]):
            hint += " (these look channels-last: transpose them to N x C x H x W)"
        raise EdgepackError(f"{what} {ds.source} has samples of shape {tuple(x.shape[1:])}, "
                            f"but the model takes {want}", hint)
    y = ds.y
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise EdgepackError(f"{what} {ds.source}: labels must be {len(x)} integers (got shape {y.shape}, {y.dtype})")
        y = y.astype(np.int64)
    return Dataset(x, y, ds.source, ds.classes)
