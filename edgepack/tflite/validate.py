"""Check a converted `.tflite` against its source: parity, int8 agreement and accuracy, latency.

Everything runs through `edgepack.runtime.open_model`, the same code path the device uses.
Datasets are NCHW (as PyTorch takes them); an NHWC artifact gets transposed inputs here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from ..data import Dataset
from ..export import torch_predict
from ..runtime import open_model, run_batched, time_runs


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" and x.ndim == 4 else x


def run_tflite(path: Path, x: np.ndarray, layout: str = "NCHW", threads: int = 1,
               runner=None) -> np.ndarray:
    """First output of the model over all of `x` (NCHW), in chunks of the model's fixed batch."""
    runner = runner or open_model(path, threads)
    return run_batched(runner, [_to_layout(np.asarray(x, dtype=np.float32), layout)])[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def parity_vs_torch(model: nn.Module, path: Path, data: Dataset, layout: str = "NCHW",
                    n: int = 64, threads: int = 1) -> dict:
    """fp32 TFLite vs PyTorch on `n` samples: max abs diff and mean per-sample cosine."""
    x = np.asarray(data.take(n).x, dtype=np.float32)
    ref = torch_predict(model, x)
    got = run_tflite(path, x, layout, threads)
    return {"max_abs_diff": float(np.max(np.abs(got - ref))), "cosine": _cosine(got, ref),
            "samples": int(len(x))}


def evaluate_int8(int8_path: Path, fp32_path: Path, data: Dataset, layout: str = "NCHW",
                  threads: int = 1, n: int | None = None) -> dict:
    """Top-1 agreement of int8 with fp32 (both TFLite), and accuracy of each if labelled.

    Percentages, like `manifest.ArtifactMetrics`. The fp32 TFLite is the reference rather than
    PyTorch so the figure isolates what quantization cost, not what conversion cost.
    """
    d = data if n is None else data.take(n)
    x = np.asarray(d.x, dtype=np.float32)
    q = run_tflite(int8_path, x, layout, threads)
    f = run_tflite(fp32_path, x, layout, threads)
    pq, pf = q.reshape(len(q), -1).argmax(1), f.reshape(len(f), -1).argmax(1)
    rec = {"agreement": float(100 * np.mean(pq == pf)), "cosine": _cosine(q, f),
           "max_abs_diff": float(np.max(np.abs(q - f))), "samples": int(len(x)),
           "accuracy": None, "accuracy_fp32": None}
    if d.y is not None:
        rec["accuracy"] = float(100 * np.mean(pq == d.y))
        rec["accuracy_fp32"] = float(100 * np.mean(pf == d.y))
    return rec


def latency(path: Path, threads: int = 1, warmup: int = 10, runs: int = 50,
            seed: int = 0) -> dict:
    """`runtime.time_runs` on random input of the model's own shape; adds threads and backend."""
    runner = open_model(path, threads)
    x = np.random.default_rng(seed).standard_normal(runner.input_shapes[0]).astype(np.float32)
    stats = time_runs(runner, [x], warmup, runs)
    stats.update(threads=int(threads), backend=f"{runner.backend} {runner.backend_version}")
    return stats
