"""Image folders, read lazily: a folder scan keeps only relative paths; pixels are decoded when a
row is read, so memory stays bounded by the batch, not the folder.

`Preprocess` says how a file becomes a model input: resize (shorter side, or exact H x W), centre
crop, scale, (x - mean) / std, layout. The `imagenet` preset is torchvision's evaluation transform.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import EdgepackError
from .lazy import LazyArray, index_array

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PRESETS = {"imagenet": {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
LAYOUTS = ("NCHW", "NHWC")


def _size_field(name: str, value):
    """An int (resize: the shorter side; crop: a square) or [H, W], all positive."""
    if value is None:
        return None
    ok_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0  # noqa: E731
    if ok_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(ok_int(v) for v in value):
        return [int(v) for v in value]
    raise EdgepackError(f"preprocessing field {name!r} is {value!r}: it must be a positive int or [height, width]",
                        f"e.g. {name} = 224 or {name} = [224, 224]")


def _numbers_field(name: str, value, positive: bool):
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) else value
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if not values or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        need = "positive numbers" if positive else "numbers"
        raise EdgepackError(f"preprocessing field {name!r} is {value!r}: it must be one or one-per-channel {need}",
                            f"e.g. {name} = {IMAGENET_STD if positive else IMAGENET_MEAN}")
    return values


@dataclass
class Preprocess:
    """How image files become model inputs. Unset fields come from `preset`, then the defaults:
    no resize and no crop = resize to the model's H x W; mean 0, std 1; NCHW; scale 1/255.
    (mean and std come first so `Preprocess(mean, std)` keeps working.)"""
    mean: list[float] | None = None
    std: list[float] | None = None
    preset: str | None = None
    resize: int | list[int] | None = None
    crop: int | list[int] | None = None
    layout: str = "NCHW"
    scale: float = 1 / 255

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise EdgepackError(f"preprocessing field 'preset' is {self.preset!r}: unknown preset",
                                f"known presets: {', '.join(PRESETS)}")
        self.resize = _size_field("resize", self.resize)
        self.crop = _size_field("crop", self.crop)
        self.mean = _numbers_field("mean", self.mean, positive=False)
        self.std = _numbers_field("std", self.std, positive=True)
        if self.layout not in LAYOUTS:
            raise EdgepackError(f"preprocessing field 'layout' is {self.layout!r}", "use NCHW or NHWC")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale <= 0:
            raise EdgepackError(f"preprocessing field 'scale' is {self.scale!r}: it must be a positive number",
                                "e.g. scale = 0.00392156862745098 (1/255)")

    def resolved(self) -> dict:
        """The preset's values overridden by the fields that are set."""
        out = dict(PRESETS.get(self.preset, {}))
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name != "preset" and getattr(self, f.name) is not None})
        return out

    def plan(self, channels: int, hw: tuple[int | None, int | None], what: str) -> "ImagePlan":
        """The concrete steps for a model input of `channels` x H x W (None: any size)."""
        r = self.resolved()
        resize, crop = r.get("resize"), r.get("crop")
        mean = np.asarray(r.get("mean", [0.0]), np.float32)
        std = np.asarray(r.get("std", [1.0]), np.float32)
        for name, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, channels):
                raise EdgepackError(f"preprocessing field {name!r} has {len(v)} values but {what} has {channels} "
                                    f"channel{'s' if channels > 1 else ''}", f"give 1 or {channels} values")
        if isinstance(crop, int):
            crop = [crop, crop]
        if crop is None and resize is None:
            if None in hw:
                raise EdgepackError(f"{what} has no fixed height and width, so images need a size",
                                    "set the preprocessing field 'resize' (and 'crop'), or preset = 'imagenet'")
            resize = list(hw)
        elif crop is None and isinstance(resize, int):
            if None in hw:
                raise EdgepackError(f"{what} has no fixed height and width: resizing the shorter side to {resize} "
                                    "leaves images of different sizes", "set the preprocessing field 'crop'")
            crop = list(hw)  # shorter side to `resize`, then the centre at the model's size
        if crop is not None and isinstance(resize, list) and (crop[0] > resize[0] or crop[1] > resize[1]):
            raise EdgepackError(f"preprocessing field 'crop' {crop} is larger than 'resize' {resize}",
                                "crop at most the resized size")
        size = tuple(crop if crop is not None else resize)
        if any(want is not None and want != got for want, got in zip(hw, size)):
            field = "crop" if crop is not None else "resize"
            raise EdgepackError(f"preprocessing makes {size[0]}x{size[1]} images but {what} takes "
                                f"{hw[0]}x{hw[1]}", f"change the preprocessing field {field!r} to the model's size")
        return ImagePlan(channels, resize, None if crop is None else tuple(crop), size,
                         mean, std, float(r.get("scale", 1 / 255)), r.get("layout", "NCHW"))


@dataclass(frozen=True, eq=False)
class ImagePlan:
    channels: int
    resize: int | list[int] | None  # int: the shorter side; [H, W]: exact
    crop: tuple[int, int] | None
    size: tuple[int, int]  # H, W of the result
    mean: np.ndarray
    std: np.ndarray
    scale: float
    layout: str

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def describe(self) -> str:
        return (f"c={self.channels} resize={self.resize} crop={self.crop} mean={self.mean.tolist()} "
                f"std={self.std.tolist()} scale={self.scale!r} layout={self.layout}")

    def decode(self, path: Path) -> np.ndarray:
        """One image file as uint8 H x W x C (resized and cropped, not yet normalised)."""
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                im = self._resized(im)
                if self.crop is not None:
                    im = self._cropped(im, path)
                return np.asarray(im).reshape(*self.size, self.channels)
        except EdgepackError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise EdgepackError(f"cannot read image {path}: {e}", "remove or replace the file") from e

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> float32 (x * scale - mean) / std in the plan's layout, for a whole batch."""
        if self.layout == "NCHW":  # one float copy, already channels-first
            out = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
            mean, std = self.mean.reshape(-1, 1, 1), self.std.reshape(-1, 1, 1)
        else:
            out, mean, std = pixels.astype(np.float32), self.mean, self.std
        out *= np.float32(self.scale)
        out -= mean
        out /= std
        return out

    def _resized(self, im):
        from PIL import Image
        if isinstance(self.resize, list):
            return im.resize((self.resize[1], self.resize[0]), Image.BILINEAR)
        if isinstance(self.resize, int):
            w, h = im.size
            # torchvision's Resize(int): the shorter side to `resize`, the longer in proportion
            size = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
            return im if size == im.size else im.resize(size, Image.BILINEAR)
        return im

    def _cropped(self, im, path: Path):
        ch, cw = self.crop
        w, h = im.size
        if ch > h or cw > w:
            raise EdgepackError(f"image {path} is {w}x{h} (after resizing), smaller than the {cw}x{ch} crop",
                                "set the preprocessing field 'resize' so images are at least the crop, "
                                "or a smaller 'crop'")
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return im.crop((left, top, left + cw, top + ch))


def scan_image_folder(root: Path) -> tuple[list[str], np.ndarray | None, list[str]]:
    """Relative paths of the images (sorted within each class), their class ids, the classes.
    Class sub-folders -> labelled; images directly in `root` -> unlabelled. Hidden entries skipped."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        files = sorted(e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name))
        return files, None, []
    files, labels = [], []
    for i, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, root)
            found += [os.path.join(rel, f) for f in filenames if _is_image(f)]
        found.sort()
        files += found
        labels.append(np.full(len(found), i, np.int64))
    return files, np.concatenate(labels), classes


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


class ImageFolderArray(LazyArray):
    """Rows `index` of the images `files` under `root`, decoded by `plan` only when read."""

    finite = True  # decoded pixels, scaled and normalised by a positive std

    def __init__(self, root: Path, files: list[str], plan: ImagePlan, index: np.ndarray | None = None):
        self.root, self.files, self.plan = Path(root), files, plan
        self.index = np.arange(len(files)) if index is None else np.asarray(index, np.int64)
        self.shape = (len(self.index), *plan.sample_shape)
        self.dtype = np.dtype(np.float32)

    def path(self, i: int) -> Path:
        return self.root / self.files[self.index[i]]

    def _rows(self, idx):
        pixels = np.empty((len(idx), *self.plan.size, self.plan.channels), np.uint8)
        for k, i in enumerate(idx):
            pixels[k] = self.plan.decode(self.root / self.files[self.index[i]])
        return self.plan.normalise(pixels)

    def select(self, idx):
        return ImageFolderArray(self.root, self.files, self.plan, self.index[index_array(idx, len(self))])

    def _fingerprint(self, h):
        h.update(self.plan.describe().encode())
        for i in self.index:
            rel = self.files[i]
            try:
                st = os.stat(self.root / rel)
            except OSError as e:
                raise EdgepackError(f"cannot read image {self.root / rel}: {e}", "the folder changed while in use") from e
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
