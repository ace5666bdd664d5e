"""How fast can low-rank factorization make MobileNetV2 (width 0.35, 1x1x32x32) on ONNX Runtime?

The issue's low-rank goal asks for a 1.5x fp32 speed-up at 2x fewer MACs. This bench bounds what
any choice of ranks can give with the factorize stage's forms: besides the model the bench
factorizes (macs_target 0.5, ranks in multiples of the x86 profile's SIMD width, as
compress_tradeoff.py does), it times the model with **every factorizable layer at rank 1**
(`energy` near 0, rank multiple 1): the most MACs low-rank can remove, so no rank choice runs
faster unless a higher rank happens to be faster than rank 1. Latency does not depend on the weight
values, so the weights are the seeded initialisation (no training). fp32 ONNX via edgepack's
exporter, ONNX Runtime at 1 thread, batch 1, interleaved rounds (compress_tradeoff_lib's timer).
Per-node times come from ONNX Runtime's profiler on the unfactorized model.

    .venv/bin/python bench/lowrank_bound.py      # writes bench/results/lowrank_bound.json, ~2 min
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_tradeoff_lib as L  # noqa: E402
from common import machine, save  # noqa: E402

from edgepack.compress.lowrank import factorize, factorize_rounded  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.prune import count_macs_params  # noqa: E402
from edgepack.targets import load_profile  # noqa: E402


def node_times(path: Path, runs: int = 300) -> dict[str, float]:
    """Median kernel time per node (microseconds) from ONNX Runtime's profiler, 1 thread."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.enable_profiling = 1, 1, True
    so.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    for _ in range(runs):
        sess.run(None, {sess.get_inputs()[0].name: x})
    per = collections.defaultdict(list)
    for e in json.loads(Path(sess.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["name"][:-len("_kernel_time")]].append(e["dur"])
    return {k: float(np.median(v)) for k, v in per.items()}


def by_block(times: dict[str, float]) -> dict[str, float]:
    """Node times summed per MobileNetV2 block (features.N), the rest under its own name."""
    out: dict[str, float] = collections.defaultdict(float)
    for name, t in times.items():
        parts = name.split("/")
        out[parts[3] if len(parts) > 3 and parts[2] == "features" else name] += t
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    model = L.MODELS["mobilenet_v2"]["make"](L.MODELS["mobilenet_v2"]["width"]).eval()
    simd = load_profile("x86").simd_width
    variants = {"unfactorized": (model, None)}
    planned, rec = factorize_rounded(model, L.X, simd, macs_target=0.5)
    variants["macs_target 0.5 (the bench's plan)"] = (planned, rec)
    rank1, rec1 = factorize(model, L.X, energy=1e-9, rank_multiple=1)
    variants["every factorizable layer at rank 1"] = (rank1, rec1)
    rows, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (m, r) in variants.items():
            paths[label] = to_onnx(m.eval(), L.X, Path(tmp) / f"{len(paths)}.onnx")
            macs, params = count_macs_params(m, L.X)
            rows[label] = {"macs": int(macs), "params": int(params),
                           "layers_factorized": len(r["layers"]) if r else 0}
        lat = L.interleaved_latency(paths, args.rounds, args.runs)
        profile = node_times(paths["unfactorized"])
    base = rows["unfactorized"]
    for label, row in rows.items():
        row["latency_ms"] = lat[label]
        row["macs_fewer"] = round(base["macs"] / row["macs"], 3)
        row["speedup"] = L.speedup(lat["unfactorized"], lat[label])
    doc = {"bench": "lowrank_bound", "command": " ".join(["bench/lowrank_bound.py", *sys.argv[1:]]),
           "model": "MobileNetV2 x0.35, 1x1x32x32, fp32 ONNX, ONNX Runtime 1 thread, batch 1",
           "timing": f"{args.rounds} interleaved rounds x {args.runs} runs (p50 per round, median of rounds)",
           "rows": rows, "profile_unfactorized_us": {"total": round(sum(profile.values()), 1), "nodes": len(profile),
                                                     "by_block": by_block(profile)},
           "goal": "1.5x fp32 speed-up at 2x fewer MACs",
           "reachable": max(r["speedup"] for r in rows.values()) >= 1.5, "machine": machine()}
    print(json.dumps({k: v for k, v in doc.items() if k != "profile_unfactorized_us"}, indent=1))
    save("lowrank_bound", doc)


if __name__ == "__main__":
    main()
