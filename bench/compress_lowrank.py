"""Low-rank factorization on the noisy-digits task: 2x fewer MACs, distillation, measured speed.

ResNet-18 (half width) and MobileNetV2 (width 0.35), 1x1x32x32 inputs, trained with
tests/fixtures/tasks.train_baseline (cached in /tmp/ep/ckpt/<model>-<width>-seed0.pt), are
factorized with edgepack.compress.lowrank to keep half of their MACs, then fine-tuned with
distillation from the unfactorized model (3 seeds: the seed sets the batch order). Variants: the
rank allocation (per-layer energy per MAC, or one global energy threshold) and the rank multiple
(1, 8, 16: ORT's AVX-512 conv kernels work on blocks of 16 channels); the main variant (the
build's default: energy per MAC, ranks in multiples of the x86 profile's simd_width) gets every
seed, the others seed 0. Every model is exported to ONNX (fp32) and int8 as the x86 build does
(scheme for this CPU, QDQ, qdq_tidy), sized raw and zip-deflated, and timed with ONNX Runtime at
1 thread, batch 1, in interleaved rounds (latency does not depend on the weight values, so the
seed-0 models stand for all seeds). Test top-1 on four distorted copies of the test digits.

    .venv/bin/python bench/compress_lowrank.py      # ~40 min on a loaded 2-core machine
Writes bench/results/compress_lowrank.json and bench/results/compress_lowrank.png.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fixtures: the zoo and the task
from edgepack.compress.lowrank import factorize, factorize_rounded  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.qdq_tidy import tidy_qdq  # noqa: E402
from edgepack.onnx_tools.quantize import quantize_onnx  # noqa: E402
from edgepack.prune import FinetuneConfig, count_macs_params, evaluate, finetune  # noqa: E402
from edgepack.runtime import open_model, time_runs  # noqa: E402
from edgepack.scheme import scheme_for_build  # noqa: E402
from edgepack.targets import load_profile  # noqa: E402
from fixtures.tasks import noisy_digits, train_baseline  # noqa: E402
from fixtures.zoo import mobilenet_v2, resnet18  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CKPT = Path("/tmp/ep/ckpt")
# model -> (factory, width, baseline epochs, train copies): the widths and schedules tasks.py documents
MODELS = {"resnet18": (lambda w: resnet18(10, 1, small_input=True, width=w), 0.5, 6, 2),
          "mobilenet_v2": (lambda w: mobilenet_v2(10, 1, width=w, small_input=True), 0.35, 10, 3)}


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--macs-target", type=float, default=0.5, help="fraction of the MACs kept")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds of the main variant")
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--ft-minutes", type=float, default=6.0, help="cap per fine-tuning run")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model per round")
    p.add_argument("--variants", default="energy_per_mac-r1,global_energy-r8",
                   help="extra variants (seed 0 only) beside the main one, ALLOCATION-rMULTIPLE, comma-separated")
    p.add_argument("--out", type=Path, default=RESULTS / "compress_lowrank.json")
    p.add_argument("--merge", nargs="+", type=Path, help="combine per-model JSON files (run in parallel) into --out")
    p.add_argument("--retime", type=Path, help="latency only, more rounds: the main variant (untuned: latency does "
                   "not depend on weight values) vs the baseline, fp32 and int8, written to this JSON")
    return p


def baseline(name: str, task) -> tuple[torch.nn.Module, dict]:
    factory, width, epochs, copies = MODELS[name]
    model = factory(width)
    path = CKPT / f"{name}-{width}-seed0.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        info = dict(saved["info"], cached=str(path))
    else:
        t0 = time.perf_counter()
        s = train_baseline(model, task, epochs=epochs, lr=0.05, seed=0)
        info = {"model": name, "width": width, "epochs": epochs, "train_copies": copies, "lr": 0.05, "seed": 0,
                "val_acc": s["eval_acc_after"], "train_seconds": round(time.perf_counter() - t0, 1), "cached": None}
        CKPT.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "info": info}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return model.eval(), info


def zipped_size(path: Path) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, path.name)
    return len(buf.getvalue())


def onnx_accuracy(path: Path, data) -> float:
    runner = open_model(path, 1)
    preds = np.concatenate([runner.run(xs)[0].argmax(1) for xs, _ in data.batches(256)])
    return float((preds == data.y).mean())


def export_pair(model, label: str, tmp: Path, calib, scheme) -> dict:
    x = (torch.zeros(1, 1, 32, 32),)
    fp32 = to_onnx(model, x, tmp / f"{label}.onnx")
    int8 = tmp / f"{label}.int8.onnx"
    quantize_onnx(fp32, int8, calib, scheme)
    tidy_qdq(int8)
    return {"fp32": fp32, "int8": int8}


def time_interleaved(paths: dict, rounds: int, runs: int) -> dict:
    """Every model once per round (warm-up 5, `runs` timed), p50 per round; median of the rounds."""
    runners = {k: open_model(p, 1) for k, p in paths.items()}
    x = [np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)]
    p50 = {k: [] for k in paths}
    for _ in range(rounds):
        for k, r in runners.items():
            p50[k].append(time_runs(r, x, warmup=5, runs=runs)["p50"])
    return {k: {"p50_ms": round(float(np.median(v)), 3), "p50_rounds": [round(t, 3) for t in v]} for k, v in p50.items()}


def paired(ref: dict, cand: dict) -> float:
    """Median over rounds of the per-round speed-up: robust to load drifting between rounds."""
    return round(float(np.median(np.array(ref["p50_rounds"]) / np.array(cand["p50_rounds"]))), 3)


def run_model(name: str, args, scheme, simd: int, tmp: Path, log) -> dict:
    copies = MODELS[name][3]
    task = noisy_digits(seed=0, train_copies=copies, test_copies=4)
    x = (torch.zeros(1, 1, 32, 32),)
    teacher, info = baseline(name, task)
    macs0, params0 = count_macs_params(teacher, x)
    base = {"macs": macs0, "params": params0, "test_acc": evaluate(teacher, task.test), "training": info}
    log(f"{name}: baseline top-1 {base['test_acc']:.4f}, {macs0:,} MACs")
    calib = task.train.take(256)
    ft = dict(epochs=args.ft_epochs, lr=args.ft_lr, patience=None, max_minutes=args.ft_minutes)
    main = ("energy_per_mac", 0)  # 0: what the build does, simd_width halved while the target is out of reach
    extra = [(v.rpartition("-r")[0], int(v.rpartition("-r")[2])) for v in args.variants.split(",") if v]
    specs = [main] + [v for v in extra if v != main]
    variants, models = [], {"baseline": teacher}
    for allocation, multiple in specs:
        label = f"{allocation}-r{multiple or 'auto'}"
        try:
            if multiple:
                student, rec = factorize(teacher, x, macs_target=args.macs_target, allocation=allocation,
                                         rank_multiple=multiple)
            else:
                student, rec = factorize_rounded(teacher, x, simd, macs_target=args.macs_target, allocation=allocation)
        except Exception as e:  # an unreachable target at this multiple is a result, not a crash
            variants.append({"label": label, "allocation": allocation, "rank_multiple": multiple, "error": str(e),
                             "main": (allocation, multiple) == main})
            log(f"{name} {label}: {e}")
            continue
        v = {"label": label, "allocation": allocation, "rank_multiple": rec["rank_multiple"],
             "main": (allocation, multiple) == main,
             "macs": rec["macs_after"], "params": rec["params_after"], "macs_reduction": rec["macs_reduction"],
             "params_reduction": rec["params_reduction"], "layers_factorized": len(rec["layers"]),
             "layers_skipped": len(rec["skipped"]), "forms": _count(l["form"] for l in rec["layers"]),
             "test_acc_factorized": evaluate(student, task.test), "runs": []}
        for seed in range(args.seeds if v["main"] else 1):
            tuned = copy.deepcopy(student)
            s = finetune(tuned, teacher, task.train, task.val, FinetuneConfig(**ft, seed=seed, distill=True))
            v["runs"].append({"seed": seed, "test_acc": evaluate(tuned, task.test), "seconds": s["seconds"],
                              "epochs": s["epochs_run"], "best_epoch": s["best_epoch"]})
            if seed == 0:
                models[label] = tuned
            log(f"{name} {label}: {rec['macs_reduction']:.2f}x fewer MACs, top-1 factorized "
                f"{v['test_acc_factorized']:.4f}, seed {seed} distilled {v['runs'][-1]['test_acc']:.4f} "
                f"({s['seconds']:.0f} s)")
        accs = [r["test_acc"] for r in v["runs"]]
        v.update(test_acc_distilled_mean=float(np.mean(accs)), test_acc_distilled_per_seed=accs,
                 top1_drop_points=round(100 * (base["test_acc"] - float(np.mean(accs))), 2),
                 layers=rec["layers"], skipped=rec["skipped"])
        variants.append(v)
    paths = {}
    for label, model in models.items():
        pair = export_pair(model, f"{name}-{label}", tmp, calib, scheme)
        entry = base if label == "baseline" else next(v for v in variants if v["label"] == label)
        entry["size_bytes"] = {p: f.stat().st_size for p, f in pair.items()}
        entry["zip_bytes"] = {p: zipped_size(f) for p, f in pair.items()}
        entry["test_acc_int8_onnx"] = onnx_accuracy(pair["int8"], task.test)
        paths.update({f"{label}/{p}": f for p, f in pair.items()})
    log(f"{name}: timing {len(paths)} ONNX files interleaved, load {os.getloadavg()[0]:.1f}")
    load = os.getloadavg()
    latency = time_interleaved(paths, args.rounds, args.runs)
    base["latency"] = {p: latency[f"baseline/{p}"] for p in ("fp32", "int8")}
    for v in variants:
        if "error" in v:
            continue
        v["latency"] = {p: latency[f"{v['label']}/{p}"] for p in ("fp32", "int8")}
        v["fp32_speedup"] = paired(base["latency"]["fp32"], v["latency"]["fp32"])
        v["int8_speedup_vs_baseline_int8"] = paired(base["latency"]["int8"], v["latency"]["int8"])
        v["int8_speedup_vs_baseline_fp32"] = paired(base["latency"]["fp32"], v["latency"]["int8"])
    return {"baseline": base, "variants": variants, "loadavg_timing": load,
            "task": f"noisy_digits(seed=0, train_copies={copies}, test_copies=4)",
            "train/val/test": [len(task.train), len(task.val), len(task.test)],
            "acceptance": acceptance(base, variants, args.seeds)}


def acceptance(base: dict, variants: list[dict], seeds_asked: int) -> dict:
    main = next((v for v in variants if v.get("main")), None)
    if main is None or "error" in main:
        return {"measured": False, "reason": main["error"] if main else "no main variant"}
    return {"variant": main["label"], "macs_reduction": main["macs_reduction"],
            "macs_2x (>= 1.95)": main["macs_reduction"] >= 1.95,
            "seeds": len(main["runs"]), "seeds_asked": seeds_asked,
            "top1_drop_points_after_distillation": main["top1_drop_points"],
            "top1_drop_ok (<= 1.0)": main["top1_drop_points"] <= 1.0,
            "fp32_speedup_paired": main["fp32_speedup"], "fp32_speedup_ok (>= 1.5)": main["fp32_speedup"] >= 1.5,
            "met": main["top1_drop_points"] <= 1.0 and main["fp32_speedup"] >= 1.5 and main["macs_reduction"] >= 1.95,
            "best_fp32_speedup_any_variant": max(v["fp32_speedup"] for v in variants if "fp32_speedup" in v)}


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(doc["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models):
        m = doc["models"][name]
        b = m["baseline"]
        for prec, marker in (("fp32", "o"), ("int8", "s")):
            ax.plot(b["latency"][prec]["p50_ms"], 100 * b["test_acc"], marker, color="black", ms=9,
                    label=f"baseline {prec}")
            for v in m["variants"]:
                if "latency" not in v:
                    continue
                acc = 100 * v["test_acc_distilled_mean"]
                ax.plot(v["latency"][prec]["p50_ms"], acc, marker, color="tab:red" if v["main"] else "tab:blue",
                        alpha=0.9 if v["main"] else 0.5)
                ax.annotate(f"{v['label']} {prec}", (v["latency"][prec]["p50_ms"], acc), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("ORT latency p50, 1 thread, batch 1 (ms, log)")
        ax.set_ylabel("test top-1 after distillation (%)")
        ax.set_title(f"{name}: low-rank at {doc['setup']['macs_target']} of the MACs (red: main)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(args) -> None:
    docs = [json.loads(p.read_text()) for p in args.merge]
    doc = dict(docs[0], models={k: m for d in docs for k, m in d["models"].items()},
               environment=[d["environment"] for d in docs], wall_seconds=[d["wall_seconds"] for d in docs],
               merged_from=[str(p) for p in args.merge])
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    plot(doc, args.out.with_suffix(".png"))
    print(json.dumps({k: m["acceptance"] for k, m in doc["models"].items()}, indent=1))


def retime(args) -> None:
    """The same files as the main run (baseline and main variant), timed alone with more rounds:
    on a machine at load ~17 one round's p50 of the baseline ranged 1.8-6.4 ms."""
    torch.set_num_threads(1)
    profile = load_profile("x86")
    scheme, _ = scheme_for_build(profile)
    x = (torch.zeros(1, 1, 32, 32),)
    out = {"rounds": args.rounds, "runs_per_round": args.runs, "loadavg_start": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgepack-lowrank-") as tmp:
        paths = {}
        for name in args.models.split(","):
            task = noisy_digits(seed=0, train_copies=MODELS[name][3], test_copies=1)
            teacher, _ = baseline(name, task)
            student, rec = factorize_rounded(teacher, x, profile.simd_width, macs_target=args.macs_target)
            for label, model in (("baseline", teacher), ("lowrank", student)):
                for prec, f in export_pair(model, f"{name}-{label}", Path(tmp), task.train.take(256), scheme).items():
                    paths[f"{name}/{label}/{prec}"] = f
            out["models"][name] = {"macs_reduction": rec["macs_reduction"], "rank_multiple": rec["rank_multiple"]}
        latency = time_interleaved(paths, args.rounds, args.runs)
    for name, m in out["models"].items():
        for prec in ("fp32", "int8"):
            base, low = latency[f"{name}/baseline/{prec}"], latency[f"{name}/lowrank/{prec}"]
            m[prec] = {"baseline_p50_ms": base["p50_ms"], "lowrank_p50_ms": low["p50_ms"],
                       "speedup_paired_median": paired(base, low),
                       "speedup_of_fastest_rounds": round(min(base["p50_rounds"]) / min(low["p50_rounds"]), 3),
                       "baseline_rounds": base["p50_rounds"], "lowrank_rounds": low["p50_rounds"]}
    out["loadavg_end"] = os.getloadavg()
    args.retime.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: {p: {q: v[p][q] for q in ("baseline_p50_ms", "lowrank_p50_ms", "speedup_paired_median",
                                                   "speedup_of_fastest_rounds")} for p in ("fp32", "int8")}
                      for k, v in out["models"].items()}, indent=1))


def main():
    args = args_parser().parse_args()
    if args.merge:
        return merge(args)
    if args.retime:
        return retime(args)
    torch.set_num_threads(1)
    started, load0 = time.perf_counter(), os.getloadavg()
    profile = load_profile("x86")
    scheme, choice = scheme_for_build(profile)

    def log(msg):
        print(f"[{time.perf_counter() - started:7.0f} s] {msg}", flush=True)

    doc = {"models": {}, "setup": {"macs_target": args.macs_target, "seeds_main": args.seeds, "seeds_other": 1,
                                   "finetune": {"epochs": args.ft_epochs, "lr": args.ft_lr, "max_minutes": args.ft_minutes,
                                                "distill": True, "temperature": 4.0, "alpha": 0.7, "patience": None},
                                   "int8_scheme": choice, "ort_threads": 1, "batch": 1, "input": [1, 1, 32, 32],
                                   "timing": {"rounds": args.rounds, "runs_per_round": args.runs, "warmup": 5},
                                   "zip": "zipfile deflate level 9", "train_threads": 1}}
    with tempfile.TemporaryDirectory(prefix="edgepack-lowrank-") as tmp:
        for name in args.models.split(","):
            doc["models"][name] = run_model(name, args, scheme, profile.simd_width, Path(tmp), log)
            write(doc, args, started, load0)  # partial results survive a later failure
    write(doc, args, started, load0)
    plot(doc, args.out.with_suffix(".png"))
    print(json.dumps({k: m["acceptance"] for k, m in doc["models"].items()}, indent=1))


def write(doc: dict, args, started: float, load0) -> None:
    doc["environment"] = {"loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()}
    doc["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
