"""Stage cache: a cold build of the embedded example vs a rebuild that changes only a budget.

Each round starts from an empty cache: a cold build (every stage runs), then the same build with
only `--budget size_mb=1` changed, which must reuse export and int8 from the cache. Rounds
interleave the two so machine load hits both alike; the ratio is per round.
Usage: .venv/bin/python bench/cache_rebuild.py [--rounds 5] [--target x86]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

EDGEPACK = Path(sys.executable).with_name("edgepack")


def build(out: Path, cache: Path, *extra: str) -> tuple[float, dict]:
    env = dict(os.environ, EDGEPACK_CACHE_DIR=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run([str(EDGEPACK), "build", "--out", str(out), "--json", *extra], env=env,
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stdout)["manifest"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target", default="x86")
    args = ap.parse_args()
    info = machine()
    cold, warm, reused = [], [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="edgepack-cache-bench-") as tmp:
            tmp = Path(tmp)
            c, _ = build(tmp / "dist", tmp / "cache", "--target", args.target)
            w, m = build(tmp / "dist", tmp / "cache", "--target", args.target, "--budget", "size_mb=1")
            cold.append(c)
            warm.append(w)
            reused.append(m["stages"]["cache"]["reused"])
            print(f"round {r + 1}: cold {c:.1f} s, rebuild {w:.1f} s (reused {', '.join(reused[-1])})", flush=True)
    ratios = [c / w for c, w in zip(cold, warm)]
    doc = {"what": "embedded example, cold build vs rebuild with only --budget size_mb=1 changed",
           "command": f"{EDGEPACK} build --target {args.target} [--budget size_mb=1]", "rounds": args.rounds,
           "cold_s": cold, "rebuild_s": warm, "reused": reused,
           "cold_median_s": float(np.median(cold)), "rebuild_median_s": float(np.median(warm)),
           "speedup_median_of_rounds": float(np.median(ratios)), "machine": info}
    print(f"cold median {doc['cold_median_s']:.1f} s, rebuild median {doc['rebuild_median_s']:.1f} s, "
          f"per-round speed-up median {doc['speedup_median_of_rounds']:.2f}x")
    print(f"wrote {save(f'cache_rebuild_{args.target}', doc)}")


if __name__ == "__main__":
    main()
