"""Fit a Dataset to a model's inputs: pick each input by name, check its shape, cast its dtype.

Rules: the batch axis is not compared; a str dim ("?", "seq") or a non-positive one accepts any
size; float -> float (float16 too), int/bool -> float and int -> a wider or range-fitting int are
casts; float -> int is an error; int -> bool needs 0/1 values. Lazy inputs are cast a batch at a time.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgepackError
from ..manifest import TensorSpec
from .dataset import SINGLE_INPUT, Dataset
from .lazy import MappedArray

_LONE_NAMES = ("x", SINGLE_INPUT, "input0")  # what an unnamed single array is called by its source


def positional_names(n: int) -> list[str]:
    """Names given to inputs that came as a list (no names of their own)."""
    return [f"input{i}" for i in range(n)]


def as_specs(specs, ds: Dataset | None = None) -> list[TensorSpec] | None:
    """TensorSpecs, or (for old callers) one input shape without the batch axis, e.g. (3, 224, 224),
    which is a single float32 input."""
    if specs is None:
        return None
    specs = list(specs)
    if specs and all(isinstance(s, (int, np.integer)) for s in specs):
        name = ds.names[0] if ds is not None and len(ds.names) == 1 else SINGLE_INPUT
        return [TensorSpec(name=name, shape=["N", *(int(s) for s in specs)], dtype="float32")]
    return [s if isinstance(s, TensorSpec) else TensorSpec.model_validate(s) for s in specs]


def conform(ds: Dataset, specs, what: str = "data") -> Dataset:
    """`ds` with the model's inputs in the model's order, shapes checked and dtypes cast; with
    `specs=None` its own inputs (checked numeric). Labels are checked against the sample count."""
    if len(ds) == 0:
        raise EdgepackError(f"{what} {ds.source} is empty", "provide at least a few samples")
    specs = as_specs(specs, ds)
    if specs is None:
        for name, a in ds.inputs.items():
            _check_numeric(a, name, ds, what)
        inputs = dict(ds.inputs)
    else:
        picked = _pick_inputs(ds, specs, what)
        inputs = {s.name: _conform_input(picked[s.name], s, ds, what) for s in specs}
    return Dataset(inputs, _conform_labels(ds, what), ds.source, ds.classes)


def _pick_inputs(ds: Dataset, specs: list[TensorSpec], what: str) -> dict:
    names = ds.names
    if all(s.name in ds.inputs for s in specs):
        return {s.name: ds.inputs[s.name] for s in specs}
    if len(specs) == 1 and "x" in ds.inputs:
        return {specs[0].name: ds.inputs["x"]}
    unnamed = (len(names) == 1 and names[0] in _LONE_NAMES) or names == positional_names(len(names))
    if unnamed and len(names) == len(specs):
        return {s.name: ds.inputs[n] for s, n in zip(specs, names)}
    missing = [s.name for s in specs if s.name not in ds.inputs]
    has = ", ".join(names)
    wanted = ", ".join(f"{s.name}=..." for s in specs)
    if len(specs) == 1:
        raise EdgepackError(f"{what} {ds.source} has no array named 'x' or {missing[0]!r} (it has: {has})",
                            "save it with numpy.savez(path, x=inputs, y=labels)")
    raise EdgepackError(f"{what} {ds.source} has no input named {missing[0]!r} (the model takes "
                        f"{', '.join(s.name for s in specs)}; the data has: {has})",
                        f"name one array per model input, e.g. numpy.savez(path, {wanted}, y=labels)")


def _check_numeric(a, name: str, ds: Dataset, what: str) -> None:
    if np.dtype(a.dtype).kind not in "fiub":
        raise EdgepackError(f"{what} {ds.source}: input {name!r} must be numeric, got {np.dtype(a.dtype)}")


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def _conform_input(a, spec: TensorSpec, ds: Dataset, what: str):
    _check_numeric(a, spec.name, ds, what)
    want = list(spec.shape[1:])
    have = tuple(a.shape[1:])
    if len(have) == len(want) - 1 and len(want) >= 2 and want[0] == 1:
        a = _add_channel_axis(a)  # (N, H, W) for a single-channel model
        have = tuple(a.shape[1:])
    fixed = lambda d: isinstance(d, int) and d > 0  # noqa: E731
    if len(have) != len(want) or any(fixed(w) and w != h for w, h in zip(want, have)):
        hint = "inputs must be N x " + " x ".join(map(str, want))
        if len(want) == 3 and have == (want[1], want[2], want[0]):
            hint += " (these look channels-last: transpose them to N x C x H x W)"
        raise EdgepackError(f"{what} {ds.source} has samples of shape {_fmt(have)} for input {spec.name!r}, "
                            f"but the model takes {_fmt(want)}", hint)
    return cast_input(a, spec.dtype, spec.name, f"{what} {ds.source}")


def _add_channel_axis(a):
    if isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
        return a[:, None]
    return MappedArray(a, lambda rows: rows[:, None], (1, *a.shape[1:]), a.dtype, "channel-axis")


def cast_input(a, dtype: str, name: str, where: str):
    """`a` as `dtype` by the rules above; lazy arrays stay lazy (values checked as batches are read)."""
    try:
        target = np.dtype(dtype)
    except TypeError as e:
        raise EdgepackError(f"the model input {name!r} has dtype {dtype!r}, which numpy does not know") from e
    src = np.dtype(a.dtype)
    if src == target:
        return a
    if target.kind in "iub" and src.kind == "f":
        raise EdgepackError(f"{where}: input {name!r} is {src} but the model takes {target}; "
                            "float values are not cast to integers",
                            f"give {name!r} as integers (token ids, masks) in the data")
    if target.kind not in "fiub":
        raise EdgepackError(f"the model input {name!r} has dtype {target}, which edgepack cannot feed")
    check = lambda rows: _cast_rows(rows, target, name, where)  # noqa: E731
    if isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
        return check(a)
    return MappedArray(a, check, a.shape[1:], target, f"cast:{target.str}")


def _cast_rows(rows: np.ndarray, target: np.dtype, name: str, where: str) -> np.ndarray:
    src = rows.dtype
    if target.kind == "b" and src.kind in "iu":
        if rows.size and not np.isin(rows, (0, 1)).all():
            raise EdgepackError(f"{where}: input {name!r} is {src} with values other than 0 and 1, "
                                f"but the model takes {target}", f"give {name!r} as a 0/1 mask")
    elif target.kind in "iu" and src.kind in "iu" and not np.can_cast(src, target) and rows.size:
        lo, hi = np.iinfo(target).min, np.iinfo(target).max
        if rows.min() < lo or rows.max() > hi:
            raise EdgepackError(f"{where}: input {name!r} has values in [{rows.min()}, {rows.max()}] that "
                                f"do not fit the model's {target}", f"check the values of {name!r}")
    return rows.astype(target)


def _conform_labels(ds: Dataset, what: str):
    y = ds.y
    if y is None:
        return None
    if y.ndim == 0 or len(y) != len(ds):
        raise EdgepackError(f"{what} {ds.source}: labels must have one entry per sample ({len(ds)}), "
                            f"got shape {y.shape}", "save labels as y with one entry per sample")
    if y.dtype.kind not in "fiub":
        raise EdgepackError(f"{what} {ds.source}: labels must be numbers (class ids), got {y.dtype}",
                            "map class names to integer ids")
    return y.astype(np.int64) if y.ndim == 1 and y.dtype.kind in "iu" else y
