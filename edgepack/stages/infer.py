"""Running an artifact over a dataset, streamed in chunks so a large evaluation set is never
materialised whole: outputs, one (N, ...) array per model output, in the model's output order."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import runtime
from ..data import Dataset
from ..tflite import quiet_native, run_tflite
from .context import BuildContext, LoadedModel, gather

CHUNK = 256  # samples materialised at a time


def predict(path: Path, model: LoadedModel, data: Dataset, threads: int = 1, layout: str = "NCHW") -> list[np.ndarray]:
    path = Path(path)
    with quiet_native():  # XNNPACK's INFO line on the first interpreter of the process
        runner = runtime.open_model(path, threads)
    if path.suffix == ".tflite":
        return _chunked(model, data, lambda arrays: run_tflite(path, arrays, layout, threads, runner=runner))
    return _chunked(model, data, lambda arrays: runtime.run_batched(runner, arrays, 32) if model.batchable
                    else runner.run(arrays))


def _chunked(model: LoadedModel, data: Dataset, run) -> list[np.ndarray]:
    """Batchable models: chunks of samples; others: one whole feed per sample."""
    if model.batchable:
        parts = [run(arrays) for arrays, _ in data.batches(CHUNK)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    return gather([run([a[0] for a in data.arrays(slice(i, i + 1))]) for i in range(len(data))], False)


def predict_onnx(ctx: BuildContext, path: Path, data: Dataset | None = None) -> list[np.ndarray]:
    return predict(path, ctx.model, data if data is not None else ctx.data.report, ctx.profile.threads)
