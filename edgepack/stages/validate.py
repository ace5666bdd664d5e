"""Stage 4: accuracy (or agreement), size and local latency/memory, judged against budgets."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from .. import runtime
from ..data import Dataset
from ..errors import EdgepackError
from ..onnx_tools.export import compare_outputs
from ..manifest import LatencyMs, Verdict
from ..targets import Budgets


def predict(runner: runtime.Runner, data: Dataset, batch_size: int = 64) -> np.ndarray:
    """First output of the model over the whole dataset (fixed-batch models are padded)."""
    return runtime.run_batched(runner, [data.x], batch_size)[0]


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.reshape(len(outputs), -1).argmax(1) == labels).mean() * 100)


def quality(outputs: np.ndarray, data: Dataset, reference: np.ndarray | None) -> dict:
    """accuracy on labels (if any) and agreement/max-abs-diff/cosine with the float reference."""
    result: dict = {"accuracy": top1(outputs, data.y) if data.labelled else None}
    if reference is not None:
        cmp = compare_outputs(reference, outputs)
        result.update(agreement=cmp["top1_agreement"], max_abs_diff=cmp["max_abs_diff"], cosine=cmp["cosine"])
    return result


def measure_in_subprocess(path: Path, threads: int, runs: int = 50, warmup: int = 10,
                          timeout_s: float = 600) -> dict:
    """Latency and peak memory of one artifact, in a fresh process (as a device would run it)."""
    cmd = [sys.executable, str(Path(runtime.__file__)), str(path), str(threads), str(warmup), str(runs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise EdgepackError(f"measuring {path.name} took longer than {timeout_s:.0f}s") from e
    if proc.returncode != 0:
        raise EdgepackError(f"{path.name} failed to run in {Path(cmd[1]).name}: {proc.stderr.strip()[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["machine"] = platform.machine()
    return result


def latency_record(measured: dict) -> LatencyMs:
    lat = measured["latency_ms"]
    return LatencyMs(p50=round(lat["p50"], 4), p90=round(lat["p90"], 4), p99=round(lat["p99"], 4),
                     mean=round(lat["mean"], 4), runs=lat["runs"], threads=measured["threads"],
                     measured_on=measured.get("machine"))


def judge(budgets: Budgets, target_arch: str, artifact: str, size_mb: float,
          latency: LatencyMs | None, peak_mb: float | None, accuracy_drop: float | None,
          emulated: bool = False, judged_elsewhere: str | None = None) -> list[Verdict]:
    """One verdict per budget. Speed and memory are judged only when measured on the target's
    architecture (and not under emulation); size and accuracy are judged everywhere.
    `judged_elsewhere`: what the note says instead of "judge on the device with --device"."""
    on_target = latency is not None and latency.measured_on == target_arch and not emulated
    why_not = ("emulated device: latency not judged" if emulated else
               f"measured on {latency.measured_on if latency else '?'}, target is {target_arch}: "
               f"{judged_elsewhere or 'judge on the device with --device'}")

    def verdict(name, limit, value, judged=True):
        if limit is None:
            return Verdict(budget=name, limit=None, value=value, ok=None, artifact=artifact, note="no budget")
        if value is None:
            return Verdict(budget=name, limit=limit, value=None, ok=None, artifact=artifact, note="not measured")
        if not judged:
            return Verdict(budget=name, limit=limit, value=round(value, 3), ok=None, artifact=artifact, note=why_not)
        return Verdict(budget=name, limit=limit, value=round(value, 3), ok=value <= limit, artifact=artifact)

    return [
        verdict("latency_p50_ms", budgets.latency_p50_ms, latency.p50 if latency else None, on_target),
        verdict("latency_p90_ms", budgets.latency_p90_ms, latency.p90 if latency else None, on_target),
        verdict("peak_memory_mb", budgets.peak_memory_mb, peak_mb, on_target),
        verdict("size_mb", budgets.size_mb, size_mb),
        verdict("max_accuracy_drop", budgets.max_accuracy_drop, accuracy_drop),
    ]
