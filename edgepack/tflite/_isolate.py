"""Run one conversion in a child Python process, bounded in time, and publish its file atomically.

Why a child: litert-torch conversion (and PT2E calibration before it) runs for minutes and can
allocate gigabytes. In a child, a time limit is a kill, an out-of-memory kill takes down the
child rather than the build, and the parent always gets to clean up.

Why a fresh interpreter and not `fork`: a forked child deadlocked in libgomp as soon as the
parent had run any multi-threaded torch op (GNU OpenMP is not fork-safe). The model crosses
the process boundary as a `torch.export` program (`.pt2`), which needs no user classes to
unpickle. Measured cost: the child starting and importing torch and litert-torch, 10-14 s
per conversion on this 2-core machine, up to 24 s when it is heavily loaded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgepackError
from ..lifetime import popen_tied
from ._quiet import MAX_KEPT, child_env


def tmp_path_for(out: Path) -> Path:
    # Same directory as the destination so the final rename is atomic (same filesystem).
    return out.with_name(f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}")


def publish(tmp: Path, out: Path, what: str) -> None:
    if not tmp.exists() or tmp.stat().st_size == 0:
        raise EdgepackError(f"{what}: the converter finished but wrote no model",
                            "rerun with --debug and report it as an edgepack bug")
    tmp.replace(out)


def run_in_child(job: dict, program: torch.export.ExportedProgram, example_inputs: tuple,
                 samples: list[np.ndarray] | None, tmp_out: Path, what: str,
                 timeout_s: float | None) -> dict:
    """Run `_worker.main` on `job` in a new interpreter; return its result dict.

    The result is {"status": "ok", "record": {...}} or {"status": "error", "type", "message",
    "traceback"} for an exception the parent should explain (it has the program to look in).
    Time-outs, kills and crashes are raised here as `EdgepackError`.
    """
    with tempfile.TemporaryDirectory(prefix="edgepack-tflite-") as d:
        d = Path(d)
        torch.export.save(program, d / "model.pt2")
        torch.save(tuple(example_inputs), d / "inputs.pt")
        if samples is not None:  # one array per model input, in argument order
            np.savez(d / "calib.npz", **{f"input{i}": a for i, a in enumerate(samples)})
        (d / "job.json").write_text(json.dumps({**job, "out": str(tmp_out)}))
        # Native INFO/WARNING lines (absl, XNNPACK, oneDNN) go to the child's log, not the
        # terminal; the log's tail is attached to errors (see _quiet).
        env = child_env(os.environ)
        # litert-torch prints a progress tree for every stage; edgepack reports its own.
        env.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        root = str(Path(__file__).resolve().parents[2])  # makes `edgepack` importable as-is
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        with open(d / "log.txt", "wb") as log:
            # Tied to this process: a build killed with SIGKILL leaves no converter running.
            proc = popen_tied([sys.executable, "-m", "edgepack.tflite._worker", str(d)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                code = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise EdgepackError(
                    f"{what} exceeded its time limit of {timeout_s:g} s and was stopped",
                    "raise the time limit, use a smaller input size, or drop the TFLite format "
                    "for this target") from None
            finally:
                if proc.poll() is None:  # interrupted (Ctrl-C): do not leave it running
                    proc.kill()
                    proc.wait()
        elapsed = time.perf_counter() - t0
        result_file = d / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            result["child_seconds"] = elapsed
            if result.get("status") != "ok":
                result["log"] = (d / "log.txt").read_text(errors="replace")[-MAX_KEPT:]
            return result
        if code == -signal.SIGKILL:
            raise EdgepackError(
                f"{what} was killed after {elapsed:.0f} s (SIGKILL), most likely by the "
                "kernel's out-of-memory killer",
                "free memory or use a machine with more RAM; converting a large model can "
                "need several GB")
        tail = (d / "log.txt").read_text(errors="replace").strip().splitlines()[-15:]
        raise EdgepackError(f"{what} crashed (exit code {code}):\n    " + "\n    ".join(tail),
                            "if it persists, report it with the model")
