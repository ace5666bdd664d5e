"""Run a `.tflite` over a dataset the way the device does (`edgepack.runtime.open_model`).

Datasets are NCHW (as PyTorch takes them); an NHWC artifact gets transposed inputs here. The
comparisons themselves (`export.compare_outputs`) and timing (`runtime.measure_file`) are the
ones every format uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import open_model, run_batched


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" and x.ndim == 4 else x


def run_tflite(path: Path, x: np.ndarray, layout: str = "NCHW", threads: int = 1,
               runner=None) -> np.ndarray:
    """First output of the model over all of `x` (NCHW), in chunks of the model's fixed batch."""
    runner = runner or open_model(path, threads)
    return run_batched(runner, [_to_layout(np.asarray(x, dtype=np.float32), layout)])[0]
