"""Run a `.tflite` over whole arrays the way the device does (`edgepack.runtime.open_model`).

Inputs come in PyTorch layout and argument order; 4-D float (image) inputs are transposed for
an NHWC artifact, and integer inputs are cast to the file's integer type (litert-torch stores
int64 token ids as int32). Outputs come back in PyTorch's flattened output order, mapped from
the file's signature (see `inspect._signature_order`). The comparisons themselves
(`export.compare_outputs`) and timing (`runtime.measure_file`) are the ones every format uses.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import EdgepackError
from ..runtime import open_model, run_batched
from ._quiet import quiet_native
from .inspect import read_io


@lru_cache(maxsize=32)
def _io(path: str, mtime_ns: int, size: int, layout: str, output_order: tuple | None) -> dict:
    # Keyed by the file's mtime and size: callers run a file chunk by chunk (or sample by
    # sample), and reading the flatbuffer each time would cost more than running a small model.
    return read_io(Path(path), layout, None if output_order is None else list(output_order))


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    image = x.ndim == 4 and x.dtype.kind == "f"  # the converter's rule (convert._image_args)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" and image else x


def _cast(x: np.ndarray, spec: dict, where: str) -> np.ndarray:
    """Data for one input as the file takes it: float stays float (the runner quantizes it for
    an int8 input), integers are cast to the file's integer type if every value fits."""
    dtype = np.dtype(spec["dtype"])
    if "quantization" in spec or dtype.kind == "f":
        return np.asarray(x, dtype=np.float32) if x.dtype.kind != "f" else x
    if x.dtype.kind == "f":
        raise EdgepackError(f"{where} takes {dtype.name} (token ids or a mask) but was given "
                            f"{x.dtype} data", "give integer data for this input")
    if dtype.kind in "iu" and x.dtype.kind in "iu" and x.size:
        info = np.iinfo(dtype)
        lo, hi = int(x.min()), int(x.max())
        if lo < info.min or hi > info.max:
            raise EdgepackError(f"{where} takes {dtype.name}, but the data holds values "
                                f"{lo}..{hi}, outside {info.min}..{info.max}",
                                f"keep the values within {dtype.name} (token ids are small "
                                "integers) or convert with 64-bit inputs")
    return x.astype(dtype, copy=False)


def _positions(runner_names: list[str], names: list[str], fallback: list[int]) -> list[int]:
    """Where each tensor (by name, PyTorch order) sits in the runner's own order. Names, not
    positions: a runner that reorders by itself still gets each array once. A passthrough or
    repeated output shares its tensor's name and value, so the first match is right."""
    if not set(names) <= set(runner_names):
        return fallback
    return [runner_names.index(n) for n in names]


def run_tflite(path: Path, inputs, layout: str = "NCHW", threads: int = 1, runner=None,
               output_order: list[int] | None = None) -> list[np.ndarray]:
    """All outputs of the model over all of `inputs` (a list of (N, ...) arrays, PyTorch layout
    and argument order), in chunks of the model's fixed batch, in PyTorch's output order.

    A single array is taken as the only input (the result is a list all the same).
    `output_order` is a conversion record's, when it overrides the file's signature.
    """
    arrays = [inputs] if isinstance(inputs, np.ndarray) else [np.asarray(a) for a in inputs]
    try:
        st = Path(path).stat()
    except OSError as e:
        raise EdgepackError(f"cannot read {path}: {e.strerror}", "check the path") from e
    io = _io(str(Path(path).resolve()), st.st_mtime_ns, st.st_size, layout,
             None if output_order is None else tuple(output_order))  # shared: read, never written
    if len(arrays) != len(io["inputs"]):
        raise EdgepackError(f"{Path(path).name} takes {len(io['inputs'])} input(s) but "
                            f"{len(arrays)} were given",
                            "give one array per model input, in the model's argument order")
    if len({len(a) for a in arrays}) > 1:
        raise EdgepackError(f"the inputs for {Path(path).name} have different sample counts "
                            f"({', '.join(str(len(a)) for a in arrays)})",
                            "give every input the same number of samples (axis 0)")
    fed = [_cast(_to_layout(a, layout), s, f"{Path(path).name} input {i} ({s['name']})")
           for i, (a, s) in enumerate(zip(arrays, io["inputs"]))]
    if runner is None:
        with quiet_native():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            runner = open_model(path, threads)
    # Runner order <- PyTorch order for the inputs; PyTorch order <- runner order for outputs.
    arg_at = _positions([s["name"] for s in io["inputs"]], list(runner.input_names),
                        list(np.argsort(io["input_order"])))
    outs = run_batched(runner, [fed[i] for i in arg_at])
    take = _positions(list(runner.output_names), [s["name"] for s in io["outputs"]],
                      io["output_order"])
    return [outs[j] for j in take]
