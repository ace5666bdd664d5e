"""Sparsity training (network slimming), entropy importance, and magnitude sparsity on the benchmark task.

Noisy digits (tests/fixtures/tasks.py), MobileNetV2 width 0.35 by default, the trained baseline
reused from /tmp/ep/ckpt/<model>-<width>-seed<k>.pt (bench/compress_cluster.py's, trained there
when missing). Two parts:

1. Structured pruning at macs_target=0.5 (2x fewer MACs) with the same fine-tuning epochs
   (distillation from the baseline): importance l2, taylor, entropy, and network slimming
   (importance bn_scale after a sparsity-training phase with an L1 penalty on BatchNorm scales;
   that phase is extra epochs, said in the row). Test top-1 with n and the binomial SE, MACs.
2. Unstructured magnitude sparsity (edgepack.compress.sparsity, polynomial schedule, distillation
   fine-tuning) at each --targets: top-1, the fp32 ONNX and fp32 TFLite raw and zip size against
   the dense model, zeros surviving in the ONNX initializers, and LiteRT (XNNPACK) fp32 latency of
   the dense vs the sparse .tflite, 1 thread, interleaved rounds.

    .venv/bin/python bench/compress_sparsity.py                  # ~30 min on the loaded 2-core box
    .venv/bin/python bench/compress_sparsity.py --parts sparsity --targets 0.8
Writes bench/results/compress_sparsity.json (after every row).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_cluster import MODELS, baseline, task_for, torch_top1  # noqa: E402
from common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
X = (torch.zeros(1, 1, 32, 32),)


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v2", choices=sorted(MODELS))
    p.add_argument("--seed", type=int, default=0, help="baseline seed (one seed: the SE is the test-set's only)")
    p.add_argument("--parts", default="prune,sparsity")
    p.add_argument("--importances", default="l2,slimming,entropy,taylor")
    p.add_argument("--ft-epochs", type=int, default=1, help="fine-tuning epochs after pruning (every importance)")
    p.add_argument("--slim-l1", type=float, default=5e-2)
    p.add_argument("--slim-epochs", type=int, default=1)
    p.add_argument("--targets", default="0.8,0.5")
    p.add_argument("--sparse-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    p.add_argument("--out", type=Path, default=RESULTS / "compress_sparsity.json")
    return p


def prune_row(name: str, importance: str, teacher, task, args) -> dict:
    from edgepack.prune.config import make_config
    from edgepack.prune.stage import prune_and_finetune
    options = {"macs_target": 0.5, "importance": "bn_scale" if importance == "slimming" else importance,
               "round_to": 8, "finetune": {"epochs": args.ft_epochs, "patience": None, "seed": 0, "threads": 1}}
    if importance == "slimming":
        options["slimming"] = {"l1": args.slim_l1, "epochs": args.slim_epochs, "on": "bn_scale"}
    cfg = make_config(**options)
    t0 = time.perf_counter()
    pruned, rec = prune_and_finetune(teacher, X, cfg, teacher, task.train, task.val, round_to=8)
    row = {"importance": importance, "config": options, "macs_before": rec.macs_before, "macs_after": rec.macs_after,
           "macs_reduction": round(rec.macs_reduction, 3), "ratio": rec.ratio, "test": torch_top1(pruned, task.test),
           "val_pruned": rec.accuracy.get("pruned"), "val_finetuned": rec.accuracy.get("finetuned"),
           "finetune_epochs": [f["epochs_run"] for f in rec.finetune],
           "seconds": round(time.perf_counter() - t0, 1)}
    if importance == "slimming":
        s = rec.finetune[0]
        row["sparsity_training"] = {k: s.get(k) for k in ("epochs_run", "seconds", "bn_scales_before", "bn_scales_after")}
    return row


def tflite_latency(paths: dict[str, Path], rounds: int, runs: int = 40) -> dict:
    """Median of per-round medians, 1 thread, the files interleaved round by round."""
    from edgepack.runtime import open_model
    runners = {k: open_model(p, 1) for k, p in paths.items()}
    x = [np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)]
    for r in runners.values():
        for _ in range(10):
            r.run(x)
    per = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                r.run(x)
                times.append(1e3 * (time.perf_counter() - t))
            per[k].append(statistics.median(times))
    return {k: {"p50_ms": round(statistics.median(v), 4), "rounds_ms": [round(t, 4) for t in v]} for k, v in per.items()}


def artifacts(model, stem: Path) -> dict:
    from edgepack.compress.size import compressed_sizes
    from edgepack.compress.sparsity import onnx_zero_fraction
    from edgepack.onnx_tools.export import to_onnx
    from edgepack.tflite.convert import convert_fp32
    onnx_path = to_onnx(model.eval(), X, stem.with_suffix(".onnx"))
    tfl = stem.with_suffix(".tflite")
    convert_fp32(model.eval(), X, tfl)
    return {"onnx": onnx_path, "tflite": tfl, "onnx_size": compressed_sizes(onnx_path),
            "tflite_size": compressed_sizes(tfl), "onnx_zeros": onnx_zero_fraction(onnx_path)}


def sparsity_rows(name, teacher, task, args, doc, out, log) -> None:
    from edgepack.compress.sparsity import magnitude_sparsify
    from edgepack.prune import FinetuneConfig
    with tempfile.TemporaryDirectory(prefix="ep-sparsity-") as tmp:
        dense = artifacts(teacher, Path(tmp) / "dense")
        doc["dense"] = {"test": torch_top1(teacher, task.test), "onnx_size": dense["onnx_size"],
                        "tflite_size": dense["tflite_size"], "onnx_zeros": dense["onnx_zeros"]}
        save(doc, out)
        for target in [float(t) for t in args.targets.split(",")]:
            t0 = time.perf_counter()
            cfg = FinetuneConfig(epochs=args.sparse_epochs, lr=0.005, seed=0, threads=1)
            student, rec, summary = magnitude_sparsify(copy.deepcopy(teacher), teacher, task.train, target,
                                                       finetune_cfg=cfg)
            art = artifacts(student, Path(tmp) / f"sparse{target}")
            lat = tflite_latency({"dense": dense["tflite"], "sparse": art["tflite"]}, args.rounds)
            row = {"target": target, "schedule": rec.schedule, "torch_sparsity": rec.to_dict()["sparsity"],
                   "onnx_zeros": art["onnx_zeros"], "test": torch_top1(student, task.test),
                   "onnx_size": art["onnx_size"], "tflite_size": art["tflite_size"],
                   "onnx_zip_vs_dense": round(dense["onnx_size"]["deflate_bytes"] / art["onnx_size"]["deflate_bytes"], 3),
                   "tflite_zip_vs_dense": round(dense["tflite_size"]["deflate_bytes"] / art["tflite_size"]["deflate_bytes"], 3),
                   "tflite_fp32_latency": lat,
                   "sparse_vs_dense_latency": round(lat["dense"]["p50_ms"] / lat["sparse"]["p50_ms"], 3),
                   "finetune": {k: summary[k] for k in ("epochs_run", "seconds")}, "steps": rec.steps,
                   "loadavg": list(os.getloadavg()), "seconds": round(time.perf_counter() - t0, 1)}
            doc["sparsity_rows"].append(row)
            save(doc, out)
            log(f"sparsity {target}: top-1 {row['test']['top1']}, onnx zeros {art['onnx_zeros']['sparsity']}, "
                f"onnx zip {art['onnx_size']['deflate_bytes']:,} B ({row['onnx_zip_vs_dense']}x smaller), "
                f"tflite dense {lat['dense']['p50_ms']} ms vs sparse {lat['sparse']['p50_ms']} ms")


def save(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(out)


def main(argv=None):
    args = args_parser().parse_args(argv)
    torch.set_num_threads(1)

    def log(msg):
        print(msg, flush=True)
    name = args.model
    task = task_for(name)
    teacher, info = baseline(name, args.seed, log)
    doc = {"bench": "compress_sparsity", "command": " ".join(sys.argv), "machine": machine(), "model": name,
           "width": MODELS[name]["width"], "baseline_seed": args.seed, "baseline": {k: info.get(k) for k in ("checkpoint", "reused")},
           "baseline_test": torch_top1(teacher, task.test), "seeds": 1,
           "test": "noisy_digits test split x4 distorted copies", "prune_rows": [], "sparsity_rows": [],
           "xnnpack_sparse_inference": (
               "TFLite's XNNPACK delegate sets XNN_FLAG_HINT_SPARSE_INFERENCE itself, and only when the model "
               "holds sparse-encoded weights (a DENSIFY op, as the TF converter's EXPERIMENTAL_SPARSITY writes); "
               "ai-edge-litert's Interpreter exposes no flag, and CompiledModel's CpuOptions.xnnpack_flags are the "
               "delegate's TFLITE_XNNPACK_DELEGATE_FLAG_* bits. litert-torch writes dense weights, so the sparse "
               "file runs the dense kernels: this measures that.")}
    t0 = time.perf_counter()
    if "prune" in args.parts:
        for importance in args.importances.split(","):
            row = prune_row(name, importance, teacher, task, args)
            doc["prune_rows"].append(row)
            doc["seconds"] = round(time.perf_counter() - t0, 1)
            save(doc, args.out)
            log(f"{importance}: MACs {row['macs_reduction']}x fewer, test top-1 {row['test']['top1']} "
                f"(SE {row['test']['se']}, n {row['test']['n']}), {row['seconds']} s")
    if "sparsity" in args.parts:
        sparsity_rows(name, teacher, task, args, doc, args.out, log)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    save(doc, args.out)


if __name__ == "__main__":
    main()
