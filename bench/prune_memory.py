"""Peak memory and wall time of pruning windowed-attention transformers of about 30M parameters.

Each run is a fresh subprocess (so its peak RSS, VmHWM, is the pruning's alone) that builds the
model (seeded, random weights: pruning cost does not depend on training), prunes it at ratio 0.5
with the default checks, and reports peak resident memory, wall time, MACs and what was pruned.
Models (tests/fixtures/zoo_more.py): `swin_t`, Swin-T's configuration (28.3M parameters,
shifted windows, relative position bias, patch merging); `maxvit_t`, MaxViT-T's widths and
depths laid out as timm's maxxvit (channels last, 4-D windows; 28.6M parameters).
`--unpatched` also runs maxvit_t with torch-pruning's own reshape index guesses (what edgepack
did before): under a 4 GB limit it shows where the memory went, stopped by the guard with the
step named instead of the kernel's kill at 24 GB.

    .venv/bin/python bench/prune_memory.py                 # ~5-10 min on 2 cores
    .venv/bin/python bench/prune_memory.py --models swin_t --unpatched
Writes bench/results/prune_memory.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

LIMIT_MB = 4096  # the bound asked of pruning a ~30M-parameter model here


def worker(name: str, threads: int, unpatched: bool) -> dict:
    import torch

    from edgepack.prune import PruneConfig, UnprunableModel, prune_model
    from edgepack.prune import engine
    from edgepack.prune.guard import peak_rss_mb, rss_mb
    from fixtures import zoo_more
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(zoo_more, name)().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    start_rss = rss_mb()
    events = []
    t0 = time.monotonic()

    def progress(info: dict) -> None:
        events.append({"t": round(time.monotonic() - t0, 2), "rss_mb": info.get("rss_mb"), "step": info.get("step")})

    if unpatched:  # torch-pruning's own index mapping for every reshape
        engine.exact_reshapes = contextlib.nullcontext
    doc = {"model": name, "params": sum(p.numel() for p in model.parameters()), "threads": threads,
           "unpatched": unpatched, "rss_mb_before_pruning": round(start_rss)}
    try:
        pruned, record = prune_model(model, x, PruneConfig(ratio=0.5, max_memory_mb=LIMIT_MB), progress=progress)
        with torch.no_grad():
            out = pruned(x)
        doc.update(ok=True, macs_before=record.macs_before, macs_after=record.macs_after,
                   params_after=record.params_after, macs_reduction=round(record.macs_reduction, 3),
                   heads=record.heads, groups_checked=record.groups_checked,
                   groups_unchecked=record.groups_unchecked, protected=record.protected,
                   output_finite=bool(torch.isfinite(out).all()), prune_seconds=record.prune_seconds)
    except UnprunableModel as e:
        doc.update(ok=False, error=e.message)
    doc.update(wall_seconds=round(time.monotonic() - t0, 1), peak_rss_mb=round(peak_rss_mb()),
               progress_events=len(events), rss_trace=events[:: max(1, len(events) // 40)])
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="swin_t,maxvit_t")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--unpatched", action="store_true", help="also run maxvit_t with torch-pruning's reshape guesses")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, _, mode = args.worker.partition(":")
        print(json.dumps(worker(name, args.threads, mode == "unpatched")))
        return
    runs = [(m, "") for m in args.models.split(",") if m] + ([("maxvit_t", "unpatched")] if args.unpatched else [])
    results, info = [], machine()
    for name, mode in runs:
        load = list(os.getloadavg())
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--worker", f"{name}:{mode}", "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            doc = {"model": name, "unpatched": bool(mode), "ok": False, "returncode": proc.returncode,
                   "stderr_tail": proc.stderr[-2000:]}
        else:
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
        doc.update(process_seconds=round(time.monotonic() - t0, 1), loadavg_start=load, loadavg_end=list(os.getloadavg()))
        results.append(doc)
        print(f"{name}{' (unpatched)' if mode else ''}: ok={doc.get('ok')} peak {doc.get('peak_rss_mb')} MB, "
              f"{doc.get('wall_seconds')} s, MACs {doc.get('macs_before')} -> {doc.get('macs_after')}"
              + (f"; {doc['error']}" if doc.get("error") else ""), flush=True)
    path = save("prune_memory", {"limit_mb": LIMIT_MB, "ratio": 0.5, "runs": results, "machine": info})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
