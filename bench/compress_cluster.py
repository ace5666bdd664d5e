"""Weight clustering (16 clusters per layer) + int8 vs plain int8: compressed artifact size and top-1.

On the noisy-digits task (tests/fixtures/tasks.py), for ResNet-18 (width 0.5) and MobileNetV2
(width 0.35), per baseline seed: the trained baseline (reused from /tmp/ep/ckpt/<model>-<width>-
seed<k>.pt when present, else trained with train_baseline and saved there), plain int8 ONNX
(edgepack's quantizer, the x86 profile's scheme), and the same model clustered (edgepack.compress.
cluster, k per layer), fine-tuned with distillation from the baseline with the assignment kept,
exported and quantized the same way. Each artifact's raw size and compressed size
(edgepack.compress.size: deflate level 9, zstd when installed), top-1 on four distorted copies of
the test digits (n and the binomial standard error), and the distinct int8 values per channel.

    .venv/bin/python bench/compress_cluster.py                      # all (~40 min on a loaded 2-core box)
    .venv/bin/python bench/compress_cluster.py --baselines-only     # only train the missing baselines
    .venv/bin/python bench/compress_cluster.py --plot-only          # the png from the JSON
Writes bench/results/compress_cluster.json and .png.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fixtures: the zoo and the task
from fixtures.tasks import noisy_digits, train_baseline  # noqa: E402
from fixtures.zoo import mobilenet_v2, resnet18  # noqa: E402
from common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CKPT = Path("/tmp/ep/ckpt")
# The recipes the task's docstring measured (and the other benches' checkpoints use).
MODELS = {
    "resnet18": {"width": 0.5, "epochs": 6, "train_copies": 2,
                 "make": lambda w: resnet18(10, 1, small_input=True, width=w)},
    "mobilenet_v2": {"width": 0.35, "epochs": 10, "train_copies": 3,
                     "make": lambda w: mobilenet_v2(10, 1, width=w, small_input=True)},
}
TEST_COPIES = 4


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--seeds", type=int, default=3, help="baseline seeds 0..N-1 (each clustered and fine-tuned once)")
    p.add_argument("--ft-seeds-on-seed0", action="store_true",
                   help="instead: N fine-tuning seeds on the seed-0 baseline (when baselines are too slow to train)")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--variants", default="scaled,scaled:0.04",
                   help="layer: k values per layer; scaled: one codebook times each channel's max |w|; "
                        "<kind>:<rate>: entropy-constrained k-means at that rate (edgepack.compress.cluster.kmeans_1d)")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=0.005)
    p.add_argument("--ft-minutes", type=float, default=8.0, help="cap per fine-tuning run")
    p.add_argument("--scale-bits", type=int, default=4,
                   help="also measure every int8 file with its per-channel weight scales rounded to this many mantissa bits (0: no)")
    p.add_argument("--seed-list", default="", help="explicit baseline seeds, e.g. 1,2")
    p.add_argument("--merge", default="", help="comma-separated JSONs of parallel runs: merge them into --out")
    p.add_argument("--baselines-only", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw the png from the JSON (e.g. of a cut-short run)")
    p.add_argument("--wait-minutes", type=float, default=40, help="wait this long for a baseline another process trains")
    p.add_argument("--out", type=Path, default=RESULTS / "compress_cluster.json")
    return p


def task_for(name: str):
    return noisy_digits(seed=0, train_copies=MODELS[name]["train_copies"], test_copies=TEST_COPIES)


def baseline(name: str, seed: int, log=print, wait_minutes: float = 0):
    """The trained baseline (cached in /tmp/ep/ckpt); returns (model, info). With `wait_minutes`
    a missing checkpoint is waited for first (another process may be training it)."""
    spec = MODELS[name]
    path = CKPT / f"{name}-{spec['width']}-seed{seed}.pt"
    model = spec["make"](spec["width"])
    deadline = time.monotonic() + 60 * wait_minutes
    if not path.exists() and wait_minutes:
        log(f"waiting up to {wait_minutes} min for {path}")
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(20)
    if path.exists():
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # info["torch"] of others' files
            saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), {**saved.get("info", {}), "checkpoint": str(path), "reused": True}
    task = task_for(name)
    t0 = time.perf_counter()
    s = train_baseline(model, task, epochs=spec["epochs"], lr=0.05, seed=seed,
                       progress=lambda d: log(f"  {name} seed {seed} epoch {d['epoch']}: loss {d['loss']:.3f} val {d['eval_acc']:.3f}"))
    info = {"model": name, "width": spec["width"], "epochs": spec["epochs"], "train_copies": spec["train_copies"],
            "lr": 0.05, "seed": seed, "val_acc": s["eval_acc_after"], "test_acc_4copies": s["test_acc"],
            "train_seconds": round(time.perf_counter() - t0, 1), "torch": str(torch.__version__),
            "task": f"noisy_digits(seed=0, train_copies={spec['train_copies']}, test_copies={TEST_COPIES})"}
    CKPT.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # another bench may have finished the same one meanwhile
        tmp = path.with_suffix(f".tmp{seed}")
        torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
        tmp.rename(path)
    return model.eval(), {**info, "checkpoint": str(path), "reused": False}


def top1(pred: np.ndarray, y: np.ndarray) -> dict:
    """Top-1 with n and the binomial standard error, in points."""
    p = float((pred == y).mean())
    return {"top1": round(100 * p, 3), "n": int(len(y)), "se": round(100 * math.sqrt(p * (1 - p) / len(y)), 3)}


@torch.no_grad()
def torch_top1(model, data) -> dict:
    model.eval()
    preds = np.concatenate([model(torch.from_numpy(xs[0])).argmax(1).numpy() for xs, _ in data.batches(256)])
    return top1(preds, data.y)


def onnx_top1(path, data) -> dict:
    from edgepack.runtime import open_model
    runner = open_model(path, 1)
    preds = np.concatenate([np.asarray(runner.run(xs)[0]).argmax(1) for xs, _ in data.batches(256)])
    return top1(preds, data.y)


def int8_artifact(model, path: Path, calib, scheme) -> dict:
    """fp32 ONNX and int8 ONNX (edgepack's exporter and quantizer, no qdq_tidy) with their sizes."""
    from edgepack.compress.cluster import int8_distinct_per_channel
    from edgepack.compress.size import compressed_sizes
    from edgepack.onnx_tools.export import to_onnx
    from edgepack.onnx_tools.quantize import quantize_onnx
    fp32 = to_onnx(model.eval(), (torch.zeros(1, 1, 32, 32),), path.with_suffix(".fp32.onnx"))
    int8 = path.with_suffix(".int8.onnx")
    quantize_onnx(fp32, int8, calib, scheme)
    from cluster_bytes import bytes_by_kind
    distinct = int8_distinct_per_channel(int8)
    return {"fp32": fp32, "int8": int8, "fp32_size": compressed_sizes(fp32), "int8_size": compressed_sizes(int8),
            "int8_max_distinct_per_channel": max(distinct.values()), "int8_weight_tensors": len(distinct),
            "int8_max_distinct_per_tensor": max(int8_distinct_per_tensor(int8).values()),
            "bytes_by_kind": bytes_by_kind(int8)}


def rounded_scales(art: dict, data, bits: int, max_codes: int | None) -> dict:
    """The int8 file with its per-channel weight scales rounded to `bits` mantissa bits
    (edgepack.compress.int8_scales), its sizes, top-1 and its outputs against the unrounded file."""
    from edgepack.compress.int8_scales import max_logit_change, round_weight_scales
    from edgepack.compress.size import compressed_sizes
    dst = art["int8"].with_suffix(f".scales{bits}.onnx")
    rec = round_weight_scales(art["int8"], dst, bits, max_codes)
    return {**onnx_top1(dst, data), "size": compressed_sizes(dst), "rounding": rec,
            "outputs_vs_unrounded": max_logit_change(art["int8"], dst, data.x[:512])}


def int8_distinct_per_tensor(path) -> dict:
    from edgepack.compress.cluster import int8_distinct_per_tensor as per_tensor
    return per_tensor(path)


def ratios(plain: dict, mine: dict) -> dict:
    """plain int8 / clustered int8 for every compressor measured (the same one on both sides)."""
    keys = ("deflate_bytes", "deflate_filtered_bytes", "deflate_huffman_bytes", "xz_bytes", "zstd_bytes")
    return {k: round(plain[k] / mine[k], 3) for k in keys if plain.get(k) and mine.get(k)}


def one_run(name: str, seed: int, ft_seed: int, args, scheme, tmp: Path, log) -> dict:
    from edgepack.compress.cluster import cluster, clusters_kept
    from edgepack.prune import FinetuneConfig, finetune
    task = task_for(name)
    calib = task.train.take(256)
    teacher, info = baseline(name, seed, log, args.wait_minutes)
    row = {"model": name, "width": MODELS[name]["width"], "baseline_seed": seed, "finetune_seed": ft_seed,
           "baseline": {k: info.get(k) for k in ("checkpoint", "reused", "epochs", "val_acc", "train_seconds")},
           "fp32": torch_top1(teacher, task.test)}
    plain = int8_artifact(teacher, tmp / f"{name}-s{seed}-plain", calib, scheme)
    row["plain_int8"] = {**onnx_top1(plain["int8"], task.test), "size": plain["int8_size"],
                         "fp32_size": plain["fp32_size"], "max_distinct_per_channel": plain["int8_max_distinct_per_channel"],
                         "max_distinct_per_tensor": plain["int8_max_distinct_per_tensor"], "bytes_by_kind": plain["bytes_by_kind"]}
    if args.scale_bits:
        row["plain_int8_scales_rounded"] = rounded_scales(plain, task.test, args.scale_bits, None)
    log(f"{name} seed {seed}: fp32 {row['fp32']['top1']}, plain int8 {row['plain_int8']['top1']}, "
        f"int8 {plain['int8_size']['raw_bytes']:,} B -> deflate {plain['int8_size']['deflate_bytes']:,} B")
    row["variants"] = {}
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        kind, _, rate = variant.partition(":")
        student, rec = cluster(copy.deepcopy(teacher), args.clusters, scaled=(kind == "scaled"), rate=float(rate or 0))
        clustered = torch_top1(student, task.test)
        cfg = FinetuneConfig(epochs=args.ft_epochs, lr=args.ft_lr, seed=ft_seed, patience=None,
                             max_minutes=args.ft_minutes, distill=True)
        with clusters_kept(student, rec):
            summary = finetune(student, teacher, task.train, task.val, cfg)
        tuned = torch_top1(student, task.test)
        art = int8_artifact(student, tmp / f"{name}-s{seed}-{variant}", calib, scheme)
        q = onnx_top1(art["int8"], task.test)
        v = {"clustered_fp32": clustered, "finetuned_fp32": tuned, "int8": {**q, "size": art["int8_size"]},
             "fp32_size": art["fp32_size"], "int8_max_distinct_per_channel": art["int8_max_distinct_per_channel"],
             "int8_max_distinct_per_tensor": art["int8_max_distinct_per_tensor"], "bytes_by_kind": art["bytes_by_kind"],
             "clusters_used_max": max(layer.clusters for layer in rec.layers),
             "rel_error_max": max(layer.rel_error for layer in rec.layers),
             "ratio_vs_plain_int8_by_compressor": ratios(plain["int8_size"], art["int8_size"]),
             "clustered_layers": len(rec.layers), "skipped": rec.skipped,
             "finetune": {k: summary[k] for k in ("epochs_run", "seconds", "eval_acc_before", "eval_acc_after", "best_epoch")},
             "compressed_ratio_vs_plain_int8": round(plain["int8_size"]["deflate_bytes"] / art["int8_size"]["deflate_bytes"], 3),
             "drop_vs_plain_int8": round(row["plain_int8"]["top1"] - q["top1"], 3),
             "drop_vs_fp32": round(row["fp32"]["top1"] - q["top1"], 3), "seconds": round(time.perf_counter() - t0, 1)}
        if args.scale_bits:
            r = rounded_scales(art, task.test, args.scale_bits, args.clusters)
            pr = row["plain_int8_scales_rounded"]
            v["scales_rounded"] = {**r, "ratio_vs_plain_int8": round(plain["int8_size"]["deflate_bytes"] / r["size"]["deflate_bytes"], 3),
                                   "ratio_vs_plain_int8_scales_rounded": round(pr["size"]["deflate_bytes"] / r["size"]["deflate_bytes"], 3),
                                   "drop_vs_plain_int8": round(row["plain_int8"]["top1"] - r["top1"], 3)}
            log(f"  {variant} + scales rounded to {args.scale_bits} bits: int8 {r['top1']}, deflate {r['size']['deflate_bytes']:,} B = "
                f"{v['scales_rounded']['ratio_vs_plain_int8']}x vs plain int8, "
                f"{v['scales_rounded']['ratio_vs_plain_int8_scales_rounded']}x vs plain int8 with its scales rounded too")
        row["variants"][variant] = v
        log(f"  {variant}: clustered {clustered['top1']}, fine-tuned {tuned['top1']}, int8 {q['top1']} "
            f"(drop vs plain int8 {v['drop_vs_plain_int8']}), int8 deflate {art['int8_size']['deflate_bytes']:,} B "
            f"= {v['compressed_ratio_vs_plain_int8']}x smaller than plain ({v['ratio_vs_plain_int8_by_compressor']}), "
            f"max distinct/channel {art['int8_max_distinct_per_channel']}, /tensor {art['int8_max_distinct_per_tensor']} "
            f"({v['seconds']} s)")
    return row


def summarize(rows: list[dict], clusters: int) -> dict:
    out = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        for variant in mine[0]["variants"]:
            vs = [r["variants"][variant] for r in mine if variant in r["variants"]]
            ratio = [v["compressed_ratio_vs_plain_int8"] for v in vs]
            drop = [v["drop_vs_plain_int8"] for v in vs]

            def mean_se(xs):
                return {"mean": round(float(np.mean(xs)), 3),
                        "se": round(float(np.std(xs, ddof=1) / math.sqrt(len(xs))), 3) if len(xs) > 1 else None,
                        "runs": len(xs)}
            by = {c: mean_se([v["ratio_vs_plain_int8_by_compressor"][c] for v in vs])
                  for c in vs[0].get("ratio_vs_plain_int8_by_compressor", {})}
            out[f"{name}/{variant}"] = {
                "compressed_ratio_vs_plain_int8": mean_se(ratio), "drop_vs_plain_int8": mean_se(drop),
                "ratio_vs_plain_int8_by_compressor": by,
                "drop_vs_fp32": mean_se([v["drop_vs_fp32"] for v in vs]),
                "goal": f"ratio >= 2 and drop <= 1.0 point ({clusters} clusters)",
                "met": bool(np.mean(ratio) >= 2.0 and np.mean(drop) <= 1.0) if vs else False}
            rs = [v["scales_rounded"] for v in vs if "scales_rounded" in v]
            if rs:
                out[f"{name}/{variant}"]["scales_rounded"] = {
                    k: mean_se([r[k] for r in rs])
                    for k in ("ratio_vs_plain_int8", "ratio_vs_plain_int8_scales_rounded", "drop_vs_plain_int8")}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"resnet18": "tab:blue", "mobilenet_v2": "tab:orange"}
    markers = {"plain": "o", "layer": "s", "scaled": "^"}
    for r in rows:
        c = colors.get(r["model"], "k")
        ax.scatter(r["plain_int8"]["size"]["deflate_bytes"] / 1e3, r["plain_int8"]["top1"], color=c, marker="o")
        for variant, v in r["variants"].items():
            ax.scatter(v["int8"]["size"]["deflate_bytes"] / 1e3, v["int8"]["top1"], color=c, marker=markers.get(variant.partition(":")[0], "x"))
    for name, c in colors.items():
        ax.scatter([], [], color=c, label=name)
    for variant, m in markers.items():
        ax.scatter([], [], color="gray", marker=m, label=f"int8 {variant}" if variant == "plain" else f"clustered ({variant}) int8")
    ax.set_xscale("log")
    ax.set_xlabel("int8 ONNX, deflate level 9 (kB, log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Weight clustering (16 values) vs plain int8, noisy digits test x4")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_all(args, names: list[str], seeds: list[int]) -> None:
    from edgepack.scheme import scheme_for_build
    from edgepack.targets import load_profile
    scheme, choice = scheme_for_build(load_profile("x86"))
    runs = [(s, s) for s in seeds] if not args.ft_seeds_on_seed0 else [(0, k) for k in range(args.seeds)]
    doc = {"bench": "compress_cluster", "command": " ".join(sys.argv), "machine": machine(),
           "clusters": args.clusters, "variants": args.variants.split(","),
           "finetune": {"epochs": args.ft_epochs, "lr": args.ft_lr, "max_minutes": args.ft_minutes, "distill": True,
                        "teacher": "the unclustered baseline", "early_stop_on": "task.val"},
           "int8": {"quantizer": "edgepack.onnx_tools.quantize.quantize_onnx (no qdq_tidy)",
                    "scheme": scheme.model_dump(), "calibration": "task.train.take(256)"},
           "size_measure": "edgepack.compress.size.compressed_bytes: deflate level 9 (zip entry size)",
           "test": f"noisy_digits test split x{TEST_COPIES} distorted copies", "rows": []}
    out = args.out

    def log(msg):
        print(msg, flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ep-cluster-") as tmp:
        order = [(name, s, k) for s, k in runs for name in names]  # every model's first seed first
        for name, s, k in order:
            doc["rows"].append(one_run(name, s, k, args, scheme, Path(tmp), log))
            doc["summary"] = summarize(doc["rows"], args.clusters)
            doc["seconds"] = round(time.perf_counter() - t_start, 1)
            save(doc, out)
    plot(doc["rows"], out.with_suffix(".png"))
    log(json.dumps(doc["summary"], indent=1))


def save(doc: dict, out: Path) -> None:
    import os
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(doc["machine"], dict):
        doc["machine"]["loadavg_end"] = list(os.getloadavg())
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)


def main(argv=None):
    args = args_parser().parse_args(argv)
    torch.set_num_threads(1)  # 2 cores shared by several agents: two threads ran 6x slower
    names = args.models.split(",")
    if args.merge:  # runs made in parallel (one per model), one JSON and png
        docs = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        doc = {**docs[0], "command": [d["command"] for d in docs], "machine": [d["machine"] for d in docs],
               "finetune": [d["finetune"] for d in docs], "rows": [r for d in docs for r in d["rows"]],
               "seconds": [d.get("seconds") for d in docs], "merged_from": args.merge.split(",")}
        doc["summary"] = summarize(doc["rows"], doc["clusters"])
        save(doc, args.out)
        plot(doc["rows"], args.out.with_suffix(".png"))
        print(json.dumps(doc["summary"], indent=1))
        return
    if args.plot_only:
        plot(json.loads(args.out.read_text())["rows"], args.out.with_suffix(".png"))
        return
    seeds = [0] if args.ft_seeds_on_seed0 else list(range(args.seeds))
    if args.seed_list:
        seeds = [int(s) for s in args.seed_list.split(",")]
    if args.baselines_only:
        for seed in seeds:
            for name in names:
                t0 = time.perf_counter()
                _, info = baseline(name, seed)
                print(f"{name} seed {seed}: {info.get('test_acc_4copies')} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return
    run_all(args, names, seeds)


if __name__ == "__main__":
    main()
