"""Helpers shared by the benchmarks: interleaved timing and the machine's state."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(),
            "loadavg_start": list(os.getloadavg())}


def interleaved(variants: dict, inputs, rounds: int = 7, runs_per_round: int = 15, warmup: int = 5) -> dict:
    """Time every variant in turn, round after round, so drifting machine load hits all alike.

    `variants` maps a label to a runner with .run(inputs). Returns per-label median/p90 in ms."""
    for r in variants.values():
        for _ in range(warmup):
            r.run(inputs)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for label, r in variants.items():
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                r.run(inputs)
                times[label].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50": float(np.median(v)), "p90": float(np.percentile(v, 90)), "runs": len(v)}
            for k, v in times.items()}


def save(name: str, doc: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    doc.setdefault("machine", machine())["loadavg_end"] = list(os.getloadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
