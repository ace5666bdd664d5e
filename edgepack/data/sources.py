"""`load_dataset`: a folder of images, an .npz / .npy file, or a Python function -> a Dataset
fitted to the model's inputs (`conform`)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import EdgepackError
from .conform import as_specs, conform, positional_names
from .dataset import SINGLE_INPUT, Dataset, as_input_array
from .images import IMAGE_SUFFIXES, ImageFolderArray, Preprocess, scan_image_folder
from .lazy import LazyArray

KINDS = "a folder of images in class sub-folders, an .npz with one array per input (and y), or module:function"


def load_dataset(spec: str | Path, specs=None, pre: Preprocess | None = None, what: str = "data") -> Dataset:
    """Load `spec` and fit it to `specs` (the model's inputs, a list of TensorSpec). `specs=None`
    keeps the data's own names, shapes and dtypes (used to infer the model's input shape)."""
    pre = pre or Preprocess()
    spec_s = str(spec)
    path = Path(spec_s)
    if path.is_dir():
        ds = _load_image_folder(path, as_specs(specs), pre, what)
    elif path.suffix in (".npz", ".npy"):
        if not path.exists():
            raise EdgepackError(f"{what} file {path} does not exist", "check the path")
        ds = _load_numpy(path, what)
    elif ":" in spec_s and not path.exists():
        ds = _load_callable(spec_s, what)
    elif not path.exists():
        raise EdgepackError(f"{what} {spec_s} does not exist", f"pass {KINDS}")
    else:
        raise EdgepackError(f"{what} {spec_s}: unsupported kind of file", f"use {KINDS}")
    return conform(ds, specs, what)


def _load_image_folder(root: Path, specs, pre: Preprocess, what: str) -> Dataset:
    files, y, classes = scan_image_folder(root)
    if not files:
        raise EdgepackError(f"data folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                            "put images in class sub-folders (root/cat/1.jpg, root/dog/2.jpg)")
    if specs is None:
        r = pre.resolved()
        if r.get("crop") is None and not isinstance(r.get("resize"), list):
            raise EdgepackError(f"{root} is an image folder, so the model input shape must be C x H x W "
                                "(it is not known yet)", "pass --input-shape, e.g. --input-shape 1x3x224x224")
        name, channels, hw = SINGLE_INPUT, 3, (None, None)
    else:
        name, channels, hw = _image_input(root, specs, pre.layout)
    plan = pre.plan(channels, hw, f"the model input {name!r}")
    return Dataset({name: ImageFolderArray(root, files, plan)}, y, str(root), classes)


def _image_input(root: Path, specs, layout: str) -> tuple[str, int, tuple]:
    if len(specs) != 1:
        raise EdgepackError(f"{root} is an image folder, which feeds one input, but the model takes "
                            f"{len(specs)} ({', '.join(s.name for s in specs)})",
                            "give the data as an .npz with one array per input, or as module:function")
    spec = specs[0]
    dims = list(spec.shape[1:])
    if len(dims) != 3:
        raise EdgepackError(f"{root} is an image folder, so the model input shape must be C x H x W "
                            f"(got {'x'.join(map(str, dims)) or 'none'} for input {spec.name!r})",
                            "pass --input-shape, e.g. --input-shape 1x3x224x224")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    c, h, w = fixed if layout == "NCHW" else (fixed[2], fixed[0], fixed[1])
    c = 3 if c is None else c  # a dynamic channel count: colour images
    if c not in (1, 3):
        other = fixed[2] if layout == "NCHW" else fixed[0]
        hint = (f"the model looks {'channels-last' if layout == 'NCHW' else 'channels-first'}: set the "
                f"preprocessing field 'layout' to {'NHWC' if layout == 'NCHW' else 'NCHW'}"
                if other in (1, 3) else "image inputs have 1 (grayscale) or 3 (RGB) channels")
        raise EdgepackError(f"the model input {spec.name!r} has {c} channels ({layout} {_dims(dims)}), so it "
                            f"cannot be fed from the image folder {root}", hint)
    return spec.name, c, (h, w)


def _dims(dims) -> str:
    return "x".join(map(str, dims))


def _load_numpy(path: Path, what: str) -> Dataset:
    hint = "save it with numpy.savez(path, x=inputs, y=labels), one array per model input"
    try:
        # A .npy is memory-mapped (copy-on-write, so arrays are writable for torch.from_numpy and
        # the file is never changed): rows are read from disk as batches ask for them.
        arrays = np.load(path, allow_pickle=False, mmap_mode="c" if path.suffix == ".npy" else None)
        if isinstance(arrays, np.ndarray):
            return Dataset(arrays, None, str(path))
        with arrays:
            data = {k: arrays[k] for k in arrays.files}
    except Exception as e:
        raise EdgepackError(f"cannot read {what} {path}: {e}", hint) from e
    y = data.pop("y", None)
    if not data:
        raise EdgepackError(f"{what} {path} has no input arrays (it has: {', '.join(arrays.files) or 'none'})", hint)
    return _dataset(data, y, str(path))


def _load_callable(spec: str, what: str) -> Dataset:
    from ..userimport import import_attr
    fn = import_attr(spec, "data function")
    try:
        result = fn()
    except EdgepackError:
        raise
    except Exception as e:
        raise EdgepackError(f"data function {spec} raised {type(e).__name__}: {e}") from e
    return from_result(result, spec)


def from_result(result, source: str) -> Dataset:
    """What a data function returned -> a Dataset: a Dataset, an array, (x, y) with x an array,
    dict or list, a dict of arrays (with optional "y"), or an iterable of batches of those."""
    if isinstance(result, Dataset):
        return result if result.source != "memory" else Dataset(result.inputs, result.y, source, result.classes)
    if isinstance(result, Mapping):
        return _dataset(*_split_dict(result), source)
    if _is_array(result):
        return _dataset({SINGLE_INPUT: as_input_array(result)}, None, source)
    if isinstance(result, tuple) and len(result) == 2:
        return _dataset(_inputs_of(result[0], source), result[1], source)
    try:
        batches = iter(result)
    except TypeError:
        raise EdgepackError(f"data function {source} returned a {type(result).__name__}",
                            "return an array, (x, y), a dict of arrays, a Dataset, or an iterable of batches") from None
    return _concat_batches(batches, source)


def _is_array(obj) -> bool:
    if isinstance(obj, (np.ndarray, LazyArray)):
        return True
    if isinstance(obj, (list, tuple, Mapping)):
        return False
    return hasattr(obj, "__array__") or all(hasattr(obj, a) for a in ("shape", "dtype", "__getitem__", "__len__"))


def _split_dict(d: Mapping):
    inputs = {str(k): v for k, v in d.items() if k != "y"}
    return inputs, d.get("y")


def _inputs_of(x, source: str) -> dict:
    """x of (x, y): an array (one input), a dict {name: array}, or a list (inputs in model order)."""
    if isinstance(x, Mapping):
        return {str(k): v for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return dict(zip(positional_names(len(x)), x))
    if _is_array(x):
        return {SINGLE_INPUT: x}
    raise EdgepackError(f"data from {source}: inputs are a {type(x).__name__}",
                        "give inputs as an array, a dict of arrays (one per model input), or a list of arrays")


def _batch_xy(item, source: str, k: int) -> tuple[dict, object]:
    if isinstance(item, Mapping):
        return _split_dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return _inputs_of(item[0], source), item[1]
    if _is_array(item):
        return {SINGLE_INPUT: item}, None
    raise EdgepackError(f"batch {k} from {source} is a {type(item).__name__}"
                        f"{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}",
                        "each batch is an array, a dict of arrays (optional 'y'), or (x, y) with x an array, "
                        "a dict or a list of arrays")


def _concat_batches(batches, source: str) -> Dataset:
    parts: dict[str, list] | None = None
    ys: list = []
    for k, item in enumerate(batches):
        inputs, y = _batch_xy(item, source, k)
        if parts is None:
            parts, labelled = {n: [] for n in inputs}, y is not None
        if list(inputs) != list(parts):
            raise EdgepackError(f"batch {k} from {source} has inputs {list(inputs)}, batch 0 had {list(parts)}",
                                "every batch names the same inputs")
        if (y is not None) != labelled:
            raise EdgepackError(f"batch {k} from {source} {'has' if y is not None else 'has no'} labels, "
                                f"batch 0 {'had' if labelled else 'had none'}", "label every batch or none")
        for n, a in inputs.items():
            parts[n].append(np.asarray(a))
        if y is not None:
            ys.append(np.asarray(y))
    if parts is None:
        raise EdgepackError(f"data function {source} returned no batches")
    joined = {}
    for n, arrays in parts.items():
        try:
            joined[n] = np.concatenate(arrays)
        except ValueError as e:
            raise EdgepackError(f"batches of input {n!r} from {source} do not stack: {e}",
                                "every batch has samples of one shape") from e
    return _dataset(joined, np.concatenate(ys) if ys else None, source)


def _dataset(inputs: dict, y, source: str) -> Dataset:
    try:
        return Dataset(inputs, None if y is None else np.asarray(y), source)
    except (TypeError, ValueError) as e:
        raise EdgepackError(f"data from {source}: {e}", "every input needs one row per sample") from e
