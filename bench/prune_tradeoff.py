"""Accuracy / MACs / latency trade-off of channel pruning on the noisy-digits task.

ResNet-18 (half width, 1x32x32 input) trained on edgepack.tasks.noisy_digits, pruned at several
channel ratios, then fine-tuned with the same budget (epochs and a minutes cap) with distillation
from the unpruned model and plainly on labels, plus plainly for as many epochs as fit in the
distillation run's wall-clock (the teacher's forward passes make an epoch slower), once per seed
(the seed sets the batch order), and
evaluated on four distorted copies of the test digits so that differences of a point are not
noise. Every model is exported to ONNX, quantized to int8 as the x86 target does, and timed with
ONNX Runtime at 1 thread. The same pruning goals are also applied to a full-width ResNet-18 for
latency only: dense-kernel latency depends on channel counts, not weight values, and at half
width the int8 kernels are near their fixed per-layer overhead. All variants are timed in
interleaved rounds because the machine is shared (the load average is recorded).

    .venv/bin/python bench/prune_tradeoff.py            # ~35 min on 2 cores, baseline cached
Writes bench/results/prune_tradeoff.json and bench/results/prune_tradeoff.png.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fixtures: the zoo and the task
from edgepack.onnx_tools.export import to_onnx
from edgepack.prune import FinetuneConfig, PruneConfig, count_macs_params, evaluate, finetune, prune_model
from edgepack.onnx_tools.quantize import quantize_onnx
from edgepack.runtime import open_model, time_runs
from edgepack.targets import load_profile
from fixtures.tasks import noisy_digits, train_baseline
from fixtures.zoo import resnet18

RESULTS = Path(__file__).resolve().parent / "results"


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--macs-targets", default="0.5", help="extra points pruned to keep this fraction of MACs ('' for none)")
    p.add_argument("--width", type=float, default=0.5, help="ResNet-18 width multiplier")
    p.add_argument("--round-to", type=int, default=None,
                   help="channel multiple [the x86 profile's simd_width, 16: ORT's AVX-512 conv kernels work on "
                        "blocks of 16 channels; at ~2.1x fewer MACs, multiples of 8 measured a 1.58x fp32 "
                        "speed-up and multiples of 16 1.95x]")
    p.add_argument("--baseline-epochs", type=int, default=6)
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--ft-minutes", type=float, default=3.0, help="cap per fine-tuning run (both variants)")
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per variant (seeds 0..N-1)")
    p.add_argument("--test-copies", type=int, default=4, help="distorted copies of each test digit")
    p.add_argument("--latency-width", type=float, default=1.0,
                   help="also time an (untrained) ResNet-18 of this width at every goal; 0 to skip")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads; 2 threads on a loaded 2-core machine ran 6x slower than 1")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model per round")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGEPACK_CACHE", "~/.cache/edgepack")).expanduser())
    p.add_argument("--out", type=Path, default=RESULTS / "prune_tradeoff.json")
    return p


def baseline(task, args):
    """Train (or load the cached) deterministic baseline; returns (model, info)."""
    from safetensors.torch import load_file, save_file
    key = hashlib.sha1(f"{args.width}-{args.baseline_epochs}-"
                       f"{task.train.fingerprint()}-{torch.__version__}".encode()).hexdigest()[:12]
    path = args.cache / f"prune_tradeoff_resnet18_{key}.safetensors"
    model = resnet18(10, 1, small_input=True, width=args.width)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        info = json.loads(path.with_suffix(".json").read_text())
        info["cached"] = True
    else:
        t0 = time.perf_counter()
        summary = train_baseline(model, task, epochs=args.baseline_epochs, lr=0.05, seed=0,
                                 progress=lambda d: print(f"  baseline epoch {d['epoch']}: loss {d['loss']:.3f}, "
                                                          f"val {d['eval_acc']:.3f}", flush=True))
        info = {"train_seconds": round(time.perf_counter() - t0, 1), "epochs": args.baseline_epochs,
                "val_acc": summary["eval_acc_after"], "cached": False}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
        path.with_suffix(".json").write_text(json.dumps(info))
    info["test_acc"] = evaluate(model.eval(), task.test)
    return model.eval(), info


def onnx_pair(model, name, tmp: Path, calib, quantization):
    x = (torch.zeros(1, 1, 32, 32),)
    fp32 = to_onnx(model, x, tmp / f"{name}.onnx")
    int8 = tmp / f"{name}.int8.onnx"
    quantize_onnx(fp32, int8, calib, quantization)
    return fp32, int8


def onnx_accuracy(path, data) -> float:
    runner = open_model(path, 1)
    preds = np.concatenate([runner.run(xs)[0].argmax(1) for xs, _ in data.batches(256)])
    return float((preds == data.y).mean())


def time_interleaved(paths: dict, rounds: int, runs: int) -> dict:
    """p50 and min per model: the median over rounds of each round's statistic, with all
    models timed once per round so load changes hit every variant alike."""
    runners = {k: open_model(p, 1) for k, p in paths.items()}
    x = [np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)]
    stats = {k: {"p50": [], "min": []} for k in paths}
    for _ in range(rounds):
        for k, r in runners.items():
            s = time_runs(r, x, warmup=5, runs=runs)
            stats[k]["p50"].append(s["p50"])
            stats[k]["min"].append(s["min"])
    return {k: {"p50_ms": round(float(np.median(v["p50"])), 3), "min_ms": round(float(np.min(v["min"])), 3),
                "p50_rounds": [round(t, 3) for t in v["p50"]]} for k, v in stats.items()}


def main():
    args = args_parser().parse_args()
    torch.set_num_threads(args.train_threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    task = noisy_digits(seed=0, test_copies=args.test_copies)
    x = torch.zeros(1, 1, 32, 32)
    teacher, base_info = baseline(task, args)
    print(f"baseline: test top-1 {base_info['test_acc']:.4f} ({'cached' if base_info['cached'] else 'trained'})")
    profile = load_profile("x86")
    args.round_to = args.round_to or profile.simd_width
    calib = task.train.take(256)
    ft_cfg = dict(epochs=args.ft_epochs, lr=args.ft_lr, patience=None, max_minutes=args.ft_minutes)

    rows, models = [], {"0": teacher}
    goals = [{"ratio": float(r)} for r in args.ratios.split(",") if r]
    goals += [{"macs_target": float(m)} for m in args.macs_targets.split(",") if m]
    for goal in goals:
        pruned, record = prune_model(teacher, x, PruneConfig(**goal, round_to=args.round_to))
        ratio = record.ratio
        row = {"goal": goal, "ratio": ratio, "macs": record.macs_after, "params": record.params_after,
               "macs_reduction": round(record.macs_reduction, 3), "test_acc_pruned": evaluate(pruned, task.test)}
        runs: dict[str, list[dict]] = {"distill": [], "plain": [], "plain_same_time": []}
        for seed in range(args.seeds):
            for name in runs:
                student = copy.deepcopy(pruned)
                cfg = FinetuneConfig(**ft_cfg, seed=seed, distill=name == "distill")
                if name == "plain_same_time":  # as many epochs as fit in distillation's wall-clock
                    d, p = runs["distill"][-1], runs["plain"][-1]
                    cfg.epochs = max(args.ft_epochs, round(args.ft_epochs * d["seconds"] / p["seconds"]))
                s = finetune(student, teacher, task.train, task.val, cfg)
                runs[name].append({"acc": evaluate(student, task.test), "seconds": s["seconds"],
                                   "epochs": s["epochs_run"]})
                if name == "distill" and seed == 0:
                    models[str(ratio)] = student
                print(f"ratio {ratio}: {name} seed {seed}: test top-1 {runs[name][-1]['acc']:.4f} "
                      f"in {s['seconds']:.0f} s, {s['epochs_run']} epochs", flush=True)
        for name, rs in runs.items():
            row[f"test_acc_{name}"] = float(np.mean([r["acc"] for r in rs]))
            row[f"test_acc_{name}_per_seed"] = [r["acc"] for r in rs]
            row[f"ft_seconds_{name}"] = round(float(np.mean([r["seconds"] for r in rs])), 1)
            row[f"ft_epochs_{name}"] = [r["epochs"] for r in rs]
        rows.append(row)

    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        paths, int8_acc = {}, {}
        for key, model in models.items():
            fp32, int8 = onnx_pair(model, f"r{key}", Path(tmp), calib, profile.quantization)
            paths[f"{key}/fp32"], paths[f"{key}/int8"] = fp32, int8
            int8_acc[key] = onnx_accuracy(int8, task.test)
        wide = {}
        if args.latency_width:
            torch.manual_seed(0)
            full = resnet18(10, 1, small_input=True, width=args.latency_width).eval()
            for key, goal in [("0", None), *((str(r["ratio"]), r["goal"]) for r in rows)]:
                model = full if goal is None else prune_model(full, x, PruneConfig(**goal, round_to=args.round_to))[0]
                fp32, int8 = onnx_pair(model, f"wide{key}", Path(tmp), calib, profile.quantization)
                paths[f"wide{key}/fp32"], paths[f"wide{key}/int8"] = fp32, int8
                wide[key] = {"goal": goal or {}, "macs": count_macs_params(model, (x,))[0]}
        load_timing = os.getloadavg()
        latency = time_interleaved(paths, args.rounds, args.runs)

    macs0, params0 = count_macs_params(teacher, (x,))
    table = [{"goal": {}, "ratio": 0.0, "macs": macs0, "params": params0, "macs_reduction": 1.0,
              "test_acc_pruned": base_info["test_acc"], "test_acc_distill": base_info["test_acc"],
              "test_acc_plain": base_info["test_acc"], "test_acc_plain_same_time": base_info["test_acc"]}] + rows
    for row in table:
        key = "0" if row["ratio"] == 0 else str(row["ratio"])
        row["latency_fp32"], row["latency_int8"] = latency[f"{key}/fp32"], latency[f"{key}/int8"]
        row["test_acc_int8_distill"] = int8_acc[key]
    wide_table = []
    for key, w in wide.items():
        w.update(macs_reduction=round(wide["0"]["macs"] / w["macs"], 3),
                 latency_fp32=latency[f"wide{key}/fp32"], latency_int8=latency[f"wide{key}/int8"])
        wide_table.append(w)
    result = {"table": table, "acceptance": acceptance(table, wide_table), "baseline": base_info,
              "latency_full_width": wide_table,
              "setup": {"model": f"resnet18 width {args.width}, 1x1x32x32, 10 classes", "task": "noisy_digits(seed=0)",
                        "train/val/test": [len(task.train), len(task.val), len(task.test)],
                        "test_copies": args.test_copies, "seeds": args.seeds, "latency_width": args.latency_width,
                        "round_to": args.round_to, "importance": "l2", "finetune": ft_cfg,
                        "distillation": {"temperature": 4.0, "alpha": 0.7}, "ort_threads": 1,
                        "train_threads": args.train_threads, "timing_rounds": args.rounds, "runs": args.runs},
              "environment": {"loadavg_start": load_before, "loadavg_timing": load_timing, "loadavg_end": os.getloadavg(),
                              "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
              "wall_seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(table, args.out.with_suffix(".png"))
    print(json.dumps(result["acceptance"], indent=1))


def acceptance(table: list[dict], wide: list[dict]) -> dict:
    base = table[0]
    two_x = _two_x_point(table)
    diffs = {str(r["ratio"]): [round(100 * (d - p), 2) for d, p in
                               zip(r["test_acc_distill_per_seed"], r["test_acc_plain_per_seed"])] for r in table[1:]}
    every = [d for v in diffs.values() for d in v]
    same_time = {str(r["ratio"]): [round(100 * (d - p), 2) for d, p in
                                   zip(r["test_acc_distill_per_seed"], r["test_acc_plain_same_time_per_seed"])]
                 for r in table[1:]}
    out = {
        "point_2x_macs": {"goal": two_x["goal"], "ratio": two_x["ratio"], "macs_reduction": two_x["macs_reduction"]},
        "top1_drop_points_distill": round(100 * (base["test_acc_distill"] - two_x["test_acc_distill"]), 2),
        "top1_drop_ok (<= 1.0)": 100 * (base["test_acc_distill"] - two_x["test_acc_distill"]) <= 1.0,
        "finetune_seconds_at_2x": {"distill": two_x["ft_seconds_distill"], "plain": two_x["ft_seconds_plain"]},
        # paired by seed: same pruned model, same batch order, same epochs; only the loss differs
        "distill_minus_plain_points_per_seed": diffs,
        "distill_minus_plain_mean_points": round(float(np.mean(every)), 2),
        "distill_wins": f"{sum(d > 0 for d in every)} of {len(every)} (ties {sum(d == 0 for d in every)})",
        # plain fine-tuning given as many epochs as fit in distillation's wall-clock time
        "distill_minus_plain_same_time_points_per_seed": same_time,
        "distill_minus_plain_mean_points_by_point": {k: round(float(np.mean(v)), 2) for k, v in diffs.items()},
        **_speedups(base, two_x, "half_width_trained"),
    }
    if wide:
        out.update(_speedups(wide[0], _two_x_point(wide), "full_width"))
    return out


def _two_x_point(table: list[dict]) -> dict:
    """The point closest to 2x fewer MACs without falling short of 2x, if there is one."""
    return min(table[1:], key=lambda r: (r["macs_reduction"] < 2.0, abs(r["macs_reduction"] - 2.0)))


def _speedups(base: dict, two_x: dict, label: str) -> dict:
    fp32_0 = base["latency_fp32"]["p50_ms"]
    return {label: {
        "macs_reduction": two_x["macs_reduction"],
        "fp32_speedup": round(fp32_0 / two_x["latency_fp32"]["p50_ms"], 2),
        "fp32_speedup_ok (>= 1.7)": fp32_0 / two_x["latency_fp32"]["p50_ms"] >= 1.7,
        "pruned_int8_vs_fp32_speedup": round(fp32_0 / two_x["latency_int8"]["p50_ms"], 2),
        "pruned_int8_ok (>= 5)": fp32_0 / two_x["latency_int8"]["p50_ms"] >= 5,
        "unpruned_int8_vs_fp32_speedup": round(fp32_0 / base["latency_int8"]["p50_ms"], 2),
        # per-round ratios, median: robust to load drifting between rounds on a shared machine
        "paired_median_speedups": {"fp32": _paired(base["latency_fp32"], two_x["latency_fp32"]),
                                   "int8": _paired(base["latency_fp32"], two_x["latency_int8"])},
    }}


def _paired(reference: dict, candidate: dict) -> float:
    return round(float(np.median(np.array(reference["p50_rounds"]) / np.array(candidate["p50_rounds"]))), 2)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = (("fp32", "test_acc_distill", "o-", "fp32, distillation fine-tuning (mean over seeds)"),
              ("fp32", "test_acc_plain", "x--", "fp32, plain fine-tuning, same epochs (mean over seeds)"),
              ("fp32", "test_acc_plain_same_time", "+:", "fp32, plain fine-tuning, same wall-clock (mean)"),
              ("int8", "test_acc_int8_distill", "s-", "int8 of the seed-0 distilled model"))
    for prec, key, style, label in curves:
        rows = sorted(table, key=lambda r: r[f"latency_{prec}"]["p50_ms"])
        lat = [r[f"latency_{prec}"]["p50_ms"] for r in rows]
        acc = [100 * r[key] for r in rows]
        ax.plot(lat, acc, style, label=label)
        if not key.startswith("test_acc_plain"):
            for r, xl, yl in zip(rows, lat, acc):
                ax.annotate(f"r={r['ratio']:.2f}", (xl, yl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ONNX Runtime latency p50, 1 thread (ms, log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("ResNet-18 (half width) on noisy digits: channel pruning trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
