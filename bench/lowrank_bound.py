"""How fast does low-rank factorization make MobileNetV2 (width 0.35, 1x1x32x32), on ONNX Runtime and LiteRT?

The issue's low-rank goal asks for a 1.5x fp32 speed-up at 2x fewer MACs. This bench bounds what
any choice of ranks can give with the factorize stage's forms: besides the model the bench
factorizes (macs_target 0.5, ranks in multiples of the x86 profile's SIMD width, as
compress_tradeoff.py does), it times the model with **every factorizable layer at rank 1**
(`energy` near 0, rank multiple 1): the most MACs low-rank can remove, so no rank choice runs
faster unless a higher rank happens to be faster than rank 1. The model is compress_tradeoff.py's
trained seed-0 baseline (tests/fixtures/tasks.train_baseline, cached in /tmp/ep/ckpt), so the
plan's ranks, which follow the singular values, are the ones the accuracy rows of that bench
fine-tuned (latency does not depend on the weight values otherwise). The plan is made with both
profiles' rank multiples (x86: 16, rpi: 8). Each model as fp32 ONNX (edgepack's exporter) and fp32
TFLite (litert-torch, NCHW as the rpi profile builds it), all timed in one interleaved run at 1 thread,
batch 1 (ONNX Runtime; LiteRT's interpreter with XNNPACK: compress_tradeoff_lib's timer). Per-node
times come from ONNX Runtime's profiler on the unfactorized model.

    .venv/bin/python bench/lowrank_bound.py      # writes bench/results/lowrank_bound.json, ~4 min
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_tradeoff_lib as L  # noqa: E402
from common import machine, save  # noqa: E402

from edgepack.compress.lowrank import factorize, factorize_rounded  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.prune import count_macs_params  # noqa: E402
from edgepack.targets import load_profile  # noqa: E402
from edgepack.tflite.convert import convert_fp32  # noqa: E402


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
    p.add_argument("--no-tflite", action="store_true", help="ONNX Runtime only (no litert-torch conversions)")
    args = p.parse_args()
    model, info = L.baseline("mobilenet_v2")
    simd = load_profile("x86").simd_width
    variants = {"unfactorized": (model, None)}
    planned, rec = factorize_rounded(model, L.X, simd, macs_target=0.5)
    variants["macs_target 0.5 (the bench's plan)"] = (planned, rec)
    variants["macs_target 0.5, rank multiple 8 (rpi)"] = factorize_rounded(model, L.X, load_profile("rpi").simd_width,
                                                                           macs_target=0.5)
    rank1, rec1 = factorize(model, L.X, energy=1e-9, rank_multiple=1)
    variants["every factorizable layer at rank 1"] = (rank1, rec1)
    rows, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (m, r)) in enumerate(variants.items()):
            paths[label, "ort"] = to_onnx(m.eval(), L.X, Path(tmp) / f"{i}.onnx")
            if not args.no_tflite:
                paths[label, "litert"] = Path(tmp) / f"{i}.fp32.tflite"
                convert_fp32(m.eval(), L.X, paths[label, "litert"], "NCHW")
            macs, params = count_macs_params(m, L.X)
            rows[label] = {"macs": int(macs), "params": int(params),
                           "layers_factorized": len(r["layers"]) if r else 0}
        lat = L.interleaved_latency({f"{k[0]} | {k[1]}": v for k, v in paths.items()}, args.rounds, args.runs)
        profile = node_times(paths["unfactorized", "ort"])
    base = rows["unfactorized"]
    for label, row in rows.items():
        row["macs_fewer"] = round(base["macs"] / row["macs"], 3)
        for rt in ("ort", "litert"):
            if (label, rt) in paths:
                row[f"{rt}_fp32_ms"] = lat[f"{label} | {rt}"]
                row[f"{rt}_fp32_speedup"] = L.speedup(lat[f"unfactorized | {rt}"], lat[f"{label} | {rt}"])
    doc = {"bench": "lowrank_bound", "command": " ".join(["bench/lowrank_bound.py", *sys.argv[1:]]),
           "model": "MobileNetV2 x0.35, 1x1x32x32 (the trained seed-0 baseline), fp32 ONNX and fp32 TFLite (NCHW), "
                    "ONNX Runtime and LiteRT (XNNPACK) at 1 thread, batch 1", "baseline": info,
           "timing": f"{args.rounds} interleaved rounds x {args.runs} runs (p50 per round, median of rounds)",
           "rows": rows, "profile_unfactorized_us": {"total": round(sum(profile.values()), 1), "nodes": len(profile),
                                                     "by_block": by_block(profile)},
           "goal": "1.5x fp32 speed-up at 2x fewer MACs",
           "plans_reaching_goal": {label: {rt: row[f"{rt}_fp32_speedup"] >= 1.5 for rt in ("ort", "litert")
                                           if f"{rt}_fp32_speedup" in row}
                                   for label, row in rows.items() if label.startswith("macs_target")},
           "machine": machine()}
    print(json.dumps({k: v for k, v in doc.items() if k != "profile_unfactorized_us"}, indent=1))
    save("lowrank_bound", doc)


if __name__ == "__main__":
    main()
