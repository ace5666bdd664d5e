"""`edgepack search` against its baselines on the noisy-digits task and a loopback SSH device.

Issue 13's acceptance: at equal trial counts the search finds an artifact that meets a latency
budget that `edgepack build --prune-to-latency` meets only at lower accuracy, or misses; compared
with random search at the same trial count; over 3 seeds, as a table and a plot.

Set-up (cached in --work): a ResNet-18 at half width (1x1x32x32, 10 classes) trained on
fixtures.tasks.noisy_digits; its model file, weights and the data as .npz files the CLI takes
(train: the task's train split; eval: 4 distorted copies of the validation digits, which the build
splits into choosing and reporting samples; test: 4 copies of the test digits, never seen by any
build, used only for the final figures here). A real sshd on 127.0.0.1 (as tests/sshd.py starts
it) is registered as an x86 SSH device in a devices dir of its own.

Per seed (0, 1, 2; one worker process per seed, all three at once), the methods run one after
another, their order rotated per seed so that at any moment the workers run different methods
and load drift hits all three alike:
  1. baseline: `edgepack build --prune-to-latency --budget latency_p50_ms=B --device D` (the
     bisection over a uniform channel ratio, measured on this host, then built, deployed, benched);
  2. `edgepack.search.search(...)` with sampler tpe and N trials on the device;
  3. the same with sampler random.
Every build fine-tunes 1 distilled epoch (the cap of --ft-minutes is only a safety bound: an epoch
cut short leaves a high learning rate and a broken model). For each method: the best feasible
artifact's test top-1 (its int8 ONNX run here on the test split; standard error sqrt(p(1-p)/n)),
its device latency, trials to the first feasible one, wall time; then every pick is benchmarked
again on the device in interleaved rounds (--only recheck), because one p50 on a shared machine
decides "feasible" by luck near the budget.

    .venv/bin/python bench/search_vs_baselines.py --snapshot SNAP   # 24 trials; prints the budget it chose
    .venv/bin/python bench/search_vs_baselines.py --only recheck --budget-ms B --snapshot SNAP
    .venv/bin/python bench/search_vs_baselines.py --only report --budget-ms B   # JSON + plot

The budget (--budget-rule tight) sits between the device p50 of the uniform ratio-0.5 and 0.7
builds: a budget the unpruned model nearly meets asks little of either method (the run of a6cf4f5,
--budget-rule mid, 8 trials, found every method within noise of the others).
SNAP: a copy of edgepack/, targets/ and devices/ (`git archive HEAD edgepack targets devices | tar -x
-C SNAP`), so that others' edits of the shared tree cannot change the code mid-run.
Writes bench/results/search_vs_baselines.json and .png (work files under --work, /tmp/svb).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # fixtures (the task, the zoo) and sshd.py
RESULTS = ROOT / "bench" / "results"
VENV_PYTHON = sys.executable
WIDTH = 0.5
# Evaluation samples each build ships to the device and scores there (the search's metric): more
# than the default 256 so that a trial's figure is within ~1.1 points (one standard error).
DEVICE_EVAL = 1024

MODEL_FILE = f'''"""The benchmark's model: ResNet-18 at width {WIDTH} for 1x32x32 noisy digits (tests/fixtures/zoo.py)."""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from fixtures.zoo import resnet18


def build():
    return resnet18(10, 1, small_input=True, width={WIDTH})
'''


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/svb"), help="cache and scratch directory")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--samplers", default="tpe,random")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="latency_p50_ms budget on the device [default: from the measured range, see --budget-rule]")
    p.add_argument("--budget-rule", choices=["tight", "mid"], default="tight",
                   help="tight: the geometric mean of the ratio-0.5 and ratio-0.7 builds' device p50, where "
                        "uniform pruning must go past half the channels, on the steep part of the accuracy curve; "
                        "mid: of the unpruned and ratio-0.7 builds (the run of a6cf4f5)")
    p.add_argument("--ratio-range", default="0,0.8,0.05",
                   help="the search's prune.ratio range LOW,HIGH,STEP (the default space's is 0,0.6,0.1: too "
                        "coarse and too short for a budget that needs more than half the channels gone)")
    p.add_argument("--threads", type=int, default=1,
                   help="inference threads of every build and bench (the x86 profile says 2; 1 is steadier "
                        "on a shared 2-core machine)")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-minutes", type=float, default=5.0,
                   help="fine-tuning wall-clock cap per build (a safety bound: one epoch must finish, a cut one leaves a high learning rate)")
    p.add_argument("--baseline-epochs", type=int, default=6)
    p.add_argument("--snapshot", type=Path, default=None,
                   help="a copy of edgepack/, targets/, devices/ to import instead of the work tree's")
    p.add_argument("--parallel", type=int, default=1,
                   help="seed workers at once; 1 (default): a device benchmark never shares this machine "
                        "with another seed's build (the loopback device is this machine)")
    p.add_argument("--recheck-rounds", type=int, default=3, help="interleaved device re-benchmarks of every pick")
    p.add_argument("--part", type=Path, default=None, help=argparse.SUPPRESS)  # a seed worker's output
    p.add_argument("--only", choices=["prepare", "baseline", "search", "report", "recheck"], default=None,
                   help="report: rewrite the JSON and plot from the seed workers' part files")
    p.add_argument("--out", type=Path, default=RESULTS / "search_vs_baselines.json")
    return p


# ---------------------------------------------------------------- data, model, device

def eval_split(copies: int = 4, seed: int = 0):
    """`copies` fresh distortions of the task's validation digits (the same source digits as
    noisy_digits(seed).val, disjoint from train and test), with a generator of their own."""
    from sklearn.datasets import load_digits

    from edgepack.data import Dataset
    from fixtures.tasks import CLASSES, _distort
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))  # as noisy_digits draws it
    n_test, n_val = int(len(order) * 0.25), int(len(order) * 0.2)
    idx = np.tile(order[n_test:n_test + n_val], copies)
    x = _distort(digits.images[idx], np.random.default_rng(1000 + seed), 0.3)
    return Dataset(x, digits.target[idx].astype(np.int64), "noisy_digits:val-copies", CLASSES)


def prepare(work: Path, baseline_epochs: int) -> dict:
    """Train (or load the cached) model; write model.py, weights and the data files."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgepack.prune import evaluate
    from fixtures.tasks import noisy_digits, train_baseline
    from fixtures.zoo import resnet18
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    task = noisy_digits(seed=0, test_copies=4)
    val = eval_split()
    data = {"train": task.train, "calib": task.train.sample(256, seed=0), "eval": val, "test": task.test}
    for name, ds in data.items():
        path = work / f"{name}.npz"
        if not path.exists():
            np.savez(path, x=ds.x, y=ds.y)
    (work / "model.py").write_text(MODEL_FILE)
    key = hashlib.sha1(f"{WIDTH}-{baseline_epochs}-{task.train.fingerprint()}-{torch.__version__}"
                       .encode()).hexdigest()[:12]
    weights = work / f"resnet18_w{WIDTH}_{key}.safetensors"
    info_path = weights.with_suffix(".json")
    if not weights.exists():
        model = resnet18(10, 1, small_input=True, width=WIDTH)
        t0 = time.perf_counter()
        summary = train_baseline(model, task, epochs=baseline_epochs, lr=0.05, seed=0,
                                 progress=lambda d: print(f"  baseline epoch {d['epoch']}: loss {d['loss']:.3f}, "
                                                          f"val {d['eval_acc']:.3f}", flush=True))
        info = {"train_seconds": round(time.perf_counter() - t0, 1), "epochs": baseline_epochs,
                "val_acc": summary["eval_acc_after"], "test_acc_torch": summary["test_acc"]}
        save_file(model.state_dict(), str(weights))
        info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())
    if "eval_acc_torch" not in info:
        model = resnet18(10, 1, small_input=True, width=WIDTH)
        model.load_state_dict(load_file(str(weights)))
        info["eval_acc_torch"] = evaluate(model.eval(), val)
        info_path.write_text(json.dumps(info))
    info.update(weights=str(weights), sizes={k: len(v) for k, v in data.items()})
    return info


class LoopbackDevice:
    """A real sshd on 127.0.0.1 as an x86 SSH device, in a devices dir of its own."""

    NAME = "svb-ssh"

    def __init__(self, work: Path, threads: int):
        import sshd as sshd_mod
        import tomli_w
        self.root = work / "device"
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.root / "id_ed25519"
        if not key.exists():
            sshd_mod.keygen(key)
        self.server = sshd_mod.Sshd(self.root / "sshd", Path(f"{key}.pub")).start()
        known = self.root / "known_hosts"
        known.write_text(self.server.known_hosts_line())
        self.devices_dir = self.root / "devices"
        self.devices_dir.mkdir(exist_ok=True)
        (self.devices_dir / f"{self.NAME}.toml").write_text(tomli_w.dumps({
            "name": self.NAME, "target": "x86", "transport": "ssh", "workdir": str(self.root / "workdir"),
            "python": VENV_PYTHON, "ssh": {"host": "127.0.0.1", "port": self.server.port, "user": "root",
                                           "key_file": str(key), "known_hosts": str(known),
                                           "connect_timeout_s": 10}}))
        os.environ["EDGEPACK_DEVICES_DIR"] = str(self.devices_dir)

    def stop(self) -> None:
        self.server.stop()


def build_argv(work: Path, out: Path, name: str, threads: int, *extra: str) -> list[str]:
    """`edgepack build` of the benchmark model on the loopback device (x86 target)."""
    weights = next(work.glob(f"resnet18_w{WIDTH}_*.safetensors"))
    return [str(Path(VENV_PYTHON).parent / "edgepack"), "build", "--target", "x86",
            "--model", f"{work / 'model.py'}:build", "--weights", str(weights), "--input-shape", "1x1x32x32",
            "--calib", str(work / "calib.npz"), "--eval", str(work / "eval.npz"), "--train", str(work / "train.npz"),
            "--out", str(out), "--name", name, "--threads", str(threads), "--device", LoopbackDevice.NAME,
            "--devices-dir", str(work / "device" / "devices"), "--json", "-q", *extra]


def run_build(argv: list[str], log: Path) -> tuple[int, dict | None, float]:
    """Run one CLI build; (exit code, the --json document or None, wall seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(argv)}\n# exit {r.returncode}, {wall:.1f} s\n--- stderr\n{r.stderr}\n"
                   f"--- stdout\n{r.stdout[-20000:]}\n")
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        doc = None
    return r.returncode, doc, wall


def device_p50(manifest: dict) -> float | None:
    """The last device benchmark's p50 (ms) in a build's manifest."""
    runs = [b for b in manifest.get("bench", []) if b.get("device") == LoopbackDevice.NAME]
    return runs[-1]["p50_ms"] if runs else None


def test_top1(build_dir: Path, test) -> dict:
    """Top-1 of the build's judged int8 ONNX artifact on the test split, with its standard error."""
    from edgepack.runtime import open_model
    runner = open_model(Path(build_dir) / "model.int8.onnx", 1)
    preds = np.concatenate([runner.run([xs[0]])[0].argmax(1) for xs, _ in test.batches(256)])
    p, n = float((preds == test.y).mean()), len(test.y)
    return {"top1": round(100 * p, 2), "se": round(100 * math.sqrt(p * (1 - p) / n), 2), "n": n}


def int8_metrics(manifest: dict) -> dict:
    return next(a["metrics"] for a in manifest["artifacts"] if a["path"] == "model.int8.onnx")


def latency_range(work: Path, threads: int) -> dict:
    """Device p50 of the unpruned int8 build and of a heavily pruned one (ratio 0.7, no
    fine-tuning: latency does not depend on the weights' values): the budget goes between."""
    path = work / "latency_range.json"
    rng = json.loads(path.read_text()) if path.exists() else {}
    out = work / "range"
    for label, extra in (("unpruned", []), ("ratio_0.5", ["--prune", "0.5", "--finetune-epochs", "0"]),
                         ("ratio_0.7", ["--prune", "0.7", "--finetune-epochs", "0"])):
        if label in rng:  # measured by an earlier run in this --work
            continue
        code, doc, wall = run_build(build_argv(work, out, f"range-{label.replace('.', '')}", threads, *extra),
                                    work / f"range-{label}.log")
        if doc is None:
            raise SystemExit(f"range build {label} failed (exit {code}): see {work}/range-{label}.log")
        m = doc["manifest"]
        rng[label] = {"device_p50_ms": device_p50(m), "host_latency_ms": int8_metrics(m).get("latency_ms"),
                      "wall_s": round(wall, 1), "exit": code}
    path.write_text(json.dumps(rng, indent=1))
    return rng


def budget_from_range(rng: dict, rule: str) -> float:
    """The latency budget from the range builds' device p50 (see --budget-rule)."""
    low = rng["ratio_0.5"]["device_p50_ms"] if rule == "tight" else rng["unpruned"]["device_p50_ms"]
    return round(math.sqrt(low * rng["ratio_0.7"]["device_p50_ms"]), 3)


def search_space(args) -> dict:
    """The [search] table of every search: the defaults, with prune.ratio's range from --ratio-range."""
    low, high, step = (float(v) for v in args.ratio_range.split(","))
    return {"prune.ratio": {"low": low, "high": high, "step": step}}


def finetune_config(path: Path, seed: int, epochs: int, minutes: float) -> Path:
    """The [prune.finetune] schedule every method shares (one torch thread: on a busy 2-core
    machine it measured 6x faster than two)."""
    path.write_text(f"device_eval_samples = {DEVICE_EVAL}\n\n[prune.finetune]\nepochs = {epochs}\nmax_minutes = {minutes}\nseed = {seed}\n"
                    f"threads = 1\npatience = 1\n")
    return path


def run_baseline(work: Path, seed: int, budget: float, args, test) -> dict:
    """`edgepack build --prune-to-latency` with the budget, deployed and benched on the device."""
    out = work / "runs" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = finetune_config(out / "baseline.toml", seed, args.ft_epochs, args.ft_minutes)
    argv = build_argv(work, out, f"baseline-s{seed}", args.threads, "--prune-to-latency", "--budget",
                      f"latency_p50_ms={budget}", "--config", str(cfg))
    code, doc, wall = run_build(argv, out / "baseline.log")
    row = {"method": "prune_to_latency", "seed": seed, "exit": code, "wall_s": round(wall, 1),
           "command": " ".join(argv), "trials": 1}
    if doc is None:  # no build: the bisection found no ratio, or the build failed
        row.update(feasible=False, reason=(out / "baseline.log").read_text()[-1500:])
        return row
    m = doc["manifest"]
    p50 = device_p50(m)
    prune = m["stages"].get("prune", {})
    row.update(build_dir=doc["path"], device_p50_ms=p50, ratio=prune.get("ratio"),
               macs_reduction=prune.get("macs_reduction"), latency_search=prune.get("latency_search"),
               host_p50_ms=(int8_metrics(m).get("latency_ms") or {}).get("p50"),
               eval_accuracy=int8_metrics(m).get("accuracy"),
               verdicts=[{k: v.get(k) for k in ("budget", "limit", "value", "ok", "note")} for v in m["verdicts"]],
               bench_verdicts=[{k: v[k] for k in ("budget", "limit", "value", "ok")} for v in m["bench"][-1]["verdicts"]]
               if m.get("bench") else [],
               latency_met=p50 is not None and p50 <= budget, passed=m["passed"])
    missed = [v["budget"] for v in row["verdicts"] + row["bench_verdicts"] if v["ok"] is False]
    row["missed"] = missed
    row["feasible"] = bool(row["latency_met"]) and not missed  # as a search trial's: every judged budget
    row["first_feasible_trial"] = 1 if row["feasible"] else None
    row["test"] = test_top1(Path(doc["path"]), test)
    return row


def search_build_config(work: Path, out: Path, seed: int, sampler: str, budget: float, args):
    """The BuildConfig every trial starts from: the baseline's model, data, threads, budget,
    device and fine-tuning schedule; the search varies what its space names."""
    from edgepack.config import BuildConfig
    weights = next(work.glob(f"resnet18_w{WIDTH}_*.safetensors"))
    return BuildConfig(target="x86", model=f"{work / 'model.py'}:build", weights=str(weights),
                       input_shape=[1, 1, 32, 32], calib=str(work / "calib.npz"), eval=str(work / "eval.npz"),
                       train=str(work / "train.npz"), out=str(out), name=f"{sampler}-s{seed}", threads=args.threads,
                       budgets={"latency_p50_ms": budget}, device=LoopbackDevice.NAME, device_eval_samples=DEVICE_EVAL,
                       devices_dir=[str(work / "device" / "devices")],
                       prune={"max_minutes": args.ft_minutes,
                              "finetune": {"epochs": args.ft_epochs, "seed": seed, "threads": 1, "patience": 1}})


def run_search(work: Path, seed: int, sampler: str, budget: float, args, test) -> dict:
    from edgepack.search import SearchConfig, search
    out = work / "runs" / f"seed{seed}" / sampler
    cfg = search_build_config(work, out, seed, sampler, budget, args)
    scfg = SearchConfig(trials=args.trials, study=f"svb-{sampler}-s{seed}", sampler=sampler, seed=seed,
                        space=search_space(args),
                        devices=[LoopbackDevice.NAME], out=str(out), trial_minutes=max(5.0, 2 * args.ft_minutes))
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{sampler}.progress.log", "a")
    t0 = time.perf_counter()
    try:
        result = search(cfg, scfg, progress=lambda e: print(e, file=log, flush=True))
        error = None
    except Exception as e:  # a failed search is a result too: recorded, never reported as met
        result, error = None, f"{type(e).__name__}: {getattr(e, 'message', e)}"
    wall = time.perf_counter() - t0
    log.close()
    row = {"method": f"search_{sampler}", "seed": seed, "wall_s": round(wall, 1), "trials": args.trials,
           "search_config": scfg.model_dump(mode="json")}
    if result is None:
        row.update(feasible=False, error=error)
        return row
    trials = []
    for t in result.trials:
        t = dict(t)
        if t.get("build_dir") and (Path(t["build_dir"]) / "model.int8.onnx").exists():
            t["test"] = test_top1(Path(t["build_dir"]), test)
        trials.append(t)
    feasible = [t for t in trials if t.get("feasible")]
    first = min((t["number"] for t in feasible), default=None)
    row.update(trials_run=len(trials), n_feasible=len(feasible),
               first_feasible_trial=None if first is None else first + 1,
               table_path=str(result.table_path), plot_path=str(result.plot_path), trial_rows=trials)
    best = result.best
    if best is not None and best.get("feasible"):
        row.update(feasible=True, best_number=best["number"], params=best["params"],
                   eval_accuracy=best["metric"], device_p50_ms=best["latency_ms"],
                   latency_where=best.get("latency_where"), build_dir=str(best.get("build_dir")),
                   best_path=str(result.best_path))
        row["test"] = test_top1(Path(result.best_path), test) if result.best_path else \
            next(t for t in trials if t["number"] == best["number"]).get("test")
        row["latency_met"] = best["latency_ms"] is not None and best["latency_ms"] <= budget
    else:
        row.update(feasible=False)
    return row


def recheck(work: Path, rows: list[dict], budget: float, threads: int, rounds: int) -> dict:
    """Every method's pick benchmarked again on the device, in interleaved rounds (each pick once
    per round, the same load for all): is "meets the budget" a property of the artifact or of one
    lucky measurement?"""
    from edgepack.devices import bench
    picks = {f"{r['method']}/seed{r['seed']}": r.get("best_path") or r.get("build_dir") for r in rows}
    picks = {k: v for k, v in picks.items() if v and Path(v, "manifest.json").exists()}
    p50s: dict[str, list[float]] = {k: [] for k in picks}
    for _ in range(rounds):
        for key, build_dir in picks.items():
            r = bench(build_dir, LoopbackDevice.NAME, threads=threads, runs=200, evaluate=False,
                      dirs=[str(work / "device" / "devices")])
            p50s[key].append(round(r["latency_ms"]["p50"], 4))
            print(f"recheck {key}: p50 {p50s[key][-1]} ms", flush=True)
    return {k: {"p50_rounds_ms": v, "median_p50_ms": round(float(np.median(v)), 4),
                "rounds_within_budget": f"{sum(x <= budget for x in v)} of {len(v)}",
                "median_within_budget": bool(np.median(v) <= budget)} for k, v in p50s.items()}


def use_snapshot(snapshot: Path | None) -> None:
    """Import edgepack (here and in every CLI build) from a copy of the package: the shared work
    tree is edited by others while a run of an hour is under way."""
    if snapshot is None:
        return
    sys.path.insert(0, str(snapshot))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(snapshot), *filter(None, [os.environ.get("PYTHONPATH")])])


def run_seed(work: Path, seed: int, budget: float, args, test, part: Path) -> list[dict]:
    """The methods one after another for one seed; the part file is rewritten after each."""
    rows = []
    methods = [("baseline", None)] * (args.only in (None, "baseline")) + \
              [("search", s) for s in args.samplers.split(",") if s] * (args.only in (None, "search"))
    k = seed % len(methods)  # rotated per seed: at any moment the seed workers run different methods
    for kind, sampler in methods[k:] + methods[:k]:
        load = os.getloadavg()
        row = run_baseline(work, seed, budget, args, test) if kind == "baseline" else \
            run_search(work, seed, sampler, budget, args, test)
        row["loadavg_before"], row["loadavg_after"] = list(load), list(os.getloadavg())
        rows.append(row)
        part.write_text(json.dumps(rows, indent=1, default=str))
        print(f"seed {seed}: {row['method']}: feasible {row.get('feasible')}, test {row.get('test')}, "
              f"device p50 {row.get('device_p50_ms')}, {row['wall_s']} s", flush=True)
    return rows


def summarize(rows: list[dict], budget: float) -> dict:
    """Per method: per-seed rows and means (a method that found nothing feasible in a seed has no
    accuracy there; the mean is over the seeds where it did, and says how many)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        per_seed = [{"seed": r["seed"], "feasible": bool(r.get("feasible")),
                     "test_top1": (r.get("test") or {}).get("top1") if r.get("feasible") else None,
                     "test_se": (r.get("test") or {}).get("se") if r.get("feasible") else None,
                     "test_top1_even_if_infeasible": (r.get("test") or {}).get("top1"),
                     "device_p50_ms": r.get("device_p50_ms"), "eval_accuracy": r.get("eval_accuracy"),
                     "first_feasible_trial": r.get("first_feasible_trial"), "trials": r.get("trials"),
                     "trials_run": r.get("trials_run", 1 if method == "prune_to_latency" else None),
                     "n_feasible": r.get("n_feasible"), "wall_s": r["wall_s"],
                     "vetoed_by_host_latency": _host_vetoes(r, budget),
                     "params": r.get("params") or ({"prune.ratio": r.get("ratio")} if "ratio" in r else None),
                     "confirm": _confirm_of_pick(r)}
                    for r in rs]
        ok = [p for p in per_seed if p["feasible"]]
        out[method] = {"per_seed": per_seed, "feasible_seeds": f"{len(ok)} of {len(per_seed)}", "mean": {
            "test_top1": _mean([p["test_top1"] for p in ok]), "test_se_of_mean": _se_mean(ok),
            "device_p50_ms": _mean([p["device_p50_ms"] for p in ok], 3),
            "first_feasible_trial": _mean([p["first_feasible_trial"] for p in ok], 1),
            "wall_s": _mean([p["wall_s"] for p in per_seed], 0)}}
    return out


def _confirm_of_pick(row: dict) -> dict | None:
    """The search's own re-measurement of its pick (edgepack.search.confirm), and how many
    candidates it re-measured to get there."""
    number = row.get("best_number")
    trials = row.get("trial_rows") or []
    pick = next((t for t in trials if t["number"] == number), None)
    rejected = [t["number"] for t in trials if t.get("confirm") and not t["confirm"]["confirmed"]]
    if not pick or not pick.get("confirm"):
        # no pick: every candidate it re-measured missed (or there was none to re-measure)
        return {"median_p50_ms": None, "p50_rounds_ms": None, "rejected_candidates": rejected} if rejected else None
    return {"median_p50_ms": pick["confirm"]["median_p50_ms"], "p50_rounds_ms": pick["confirm"]["p50_rounds_ms"],
            "rejected_candidates": rejected}


def _host_vetoes(row: dict, budget: float) -> int | None:
    """Trials the device ran within the latency budget that were infeasible only because this
    host's validate p50 (the same machine, another process) missed it."""
    trials = row.get("trial_rows")
    if trials is None:
        return None
    return sum(1 for t in trials if t.get("latency_ms") is not None and t["latency_ms"] <= budget
               and set(t.get("violations") or {}) == {"latency_p50_ms"}
               and t["violations"]["latency_p50_ms"].get("where") == "host")


def _mean(values, digits: int = 2):
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), digits) if values else None


def _se_mean(rows: list[dict]):
    """Standard error of the mean of per-seed test top-1 from the test sampling alone."""
    ses = [p["test_se"] for p in rows if p["test_se"] is not None]
    return round(math.sqrt(sum(s * s for s in ses)) / len(ses), 2) if ses else None


def markdown_table(summary: dict, budget: float) -> str:
    lines = [f"| method | seed | feasible (device p50 <= {budget} ms, every budget) | test top-1 % (± s.e.) | device p50 ms | "
             "trials to first feasible | wall s | search's own re-measurement of its pick: median p50 ms "
             "(candidates rejected) | re-benchmarked p50 ms (median; rounds within budget) |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for method, s in summary.items():
        for p in s["per_seed"]:
            acc = f"{p['test_top1']:.2f} ± {p['test_se']:.2f}" if p["test_top1"] is not None else \
                ("-" if p["test_top1_even_if_infeasible"] is None else f"({p['test_top1_even_if_infeasible']:.2f}, infeasible)")
            lines.append(f"| {method} | {p['seed']} | {'yes' if p['feasible'] else 'no'} | {acc} | "
                         f"{_f(p['device_p50_ms'], 3)} | {_f(p['first_feasible_trial'], 0)} | {_f(p['wall_s'], 0)} | "
                         + (("no pick" if p["confirm"]["median_p50_ms"] is None else f"{p['confirm']['median_p50_ms']:.3f}")
                            + f" ({len(p['confirm']['rejected_candidates'])})" if p.get("confirm") else "-") + " | "
                         + (f"{p['recheck_median_p50_ms']:.3f} ({p['recheck_rounds_within_budget']})"
                            if p.get("recheck_median_p50_ms") is not None else "-") + " |")
        m = s["mean"]
        acc = f"{m['test_top1']:.2f} ± {m['test_se_of_mean']:.2f}" if m["test_top1"] is not None else "-"
        lines.append(f"| **{method}** | mean | {s['feasible_seeds']} | **{acc}** | {_f(m['device_p50_ms'], 3)} | "
                     f"{_f(m['first_feasible_trial'], 1)} | {_f(m['wall_s'], 0)} | | |")
    return "\n".join(lines)


def _f(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def plot(rows: list[dict], budget: float, path: Path, base_acc: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"prune_to_latency": "tab:red", "search_tpe": "tab:blue", "search_nsga2": "tab:purple",
               "search_random": "tab:green"}
    markers = {0: "o", 1: "s", 2: "^"}
    for method in dict.fromkeys(r["method"] for r in rows):
        c = colours.get(method, "tab:gray")
        for r in (r for r in rows if r["method"] == method):
            for t in r.get("trial_rows") or []:  # every trial, faint: feasible filled, infeasible hollow
                if t.get("test") and t.get("latency_ms") is not None:
                    ax.scatter(t["latency_ms"], t["test"]["top1"], s=14, alpha=0.35, color=c,
                               facecolors=c if t.get("feasible") else "none")
            if r.get("test") and r.get("device_p50_ms") is not None:
                ax.errorbar(r["device_p50_ms"], r["test"]["top1"], yerr=r["test"]["se"], fmt=markers.get(r["seed"], "o"),
                            color=c, ms=9, mfc=c if r.get("feasible") else "white", capsize=3,
                            label=f"{method} seed {r['seed']}" + ("" if r.get("feasible") else " (misses a budget)"))
    ax.axvline(budget, color="k", ls="--", lw=1, label=f"budget p50 {budget} ms")
    if base_acc is not None:
        ax.axhline(base_acc, color="gray", ls=":", lw=1, label=f"unpruned int8 {base_acc:.1f}%")
    ax.set_xlabel("p50 latency on the loopback SSH device, int8 ONNX Runtime, 1 thread (ms)")
    ax.set_ylabel("test top-1 (%), 1796 held-out images")
    ax.set_title("ResNet-18/2 on noisy digits: search vs --prune-to-latency (big: each method's pick; faint: trials)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = args_parser().parse_args()
    use_snapshot(args.snapshot)
    started = time.perf_counter()
    load_start = os.getloadavg()
    work = args.work
    info = prepare(work, args.baseline_epochs)
    if args.only == "prepare":
        print(json.dumps(info, indent=1))
        return
    from edgepack.data import load_dataset
    test = load_dataset(str(work / "test.npz"))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.only == "recheck":
        rows = [r for seed in seeds for r in json.loads((work / f"part-seed{seed}.json").read_text())]
        device = LoopbackDevice(work, args.threads)
        try:
            out = {"loadavg_start": list(os.getloadavg()),
                   "picks": recheck(work, rows, args.budget_ms, args.threads, args.recheck_rounds)}
        finally:
            device.stop()
        out["loadavg_end"] = list(os.getloadavg())
        (work / "recheck.json").write_text(json.dumps(out, indent=1))
        return
    if args.only == "report":
        rng = json.loads((work / "latency_range.json").read_text())
        write_report(args, work, seeds, args.budget_ms, rng, test_top1(work / "range" / "range-unpruned-x86", test),
                     info, os.getloadavg(), None)
        return
    if args.part is not None:  # one seed's worker, started by the parent below
        budget = args.budget_ms
        run_seed(work, seeds[0], budget, args, test, args.part)
        return
    device = LoopbackDevice(work, args.threads)
    try:
        rng = latency_range(work, args.threads)
        budget = args.budget_ms or budget_from_range(rng, args.budget_rule)
        print("device p50: " + ", ".join(f"{k} {v['device_p50_ms']} ms" for k, v in rng.items()) +
              f"; budget {budget} ms", flush=True)
        unpruned_test = test_top1(work / "range" / "range-unpruned-x86", test)
        # One worker process per seed, `--parallel` at a time; each seed's methods run in turn.
        procs = []
        for seed in seeds:
            while sum(p.poll() is None for _, p in procs) >= max(1, args.parallel):
                time.sleep(2)
            part = work / f"part-seed{seed}.json"
            argv = [VENV_PYTHON, __file__, "--work", str(work), "--seeds", str(seed), "--budget-ms", str(budget),
                    "--part", str(part), "--trials", str(args.trials), "--samplers", args.samplers,
                    "--threads", str(args.threads), "--ft-epochs", str(args.ft_epochs), "--ratio-range", args.ratio_range,
                    "--ft-minutes", str(args.ft_minutes)] + (["--only", args.only] if args.only else []) + \
                   (["--snapshot", str(args.snapshot)] if args.snapshot else [])
            procs.append((part, subprocess.Popen(argv, stdout=open(work / f"seed{seed}.log", "w"),
                                                 stderr=subprocess.STDOUT)))
        for _, p in procs:
            p.wait()
    finally:
        device.stop()
    write_report(args, work, seeds, budget, rng, unpruned_test, info, load_start, started)


def write_report(args, work: Path, seeds: list[int], budget: float, rng: dict, unpruned_test: dict, info: dict,
                 load_start, started: float) -> None:
    rows = [r for seed in seeds if (work / f"part-seed{seed}.json").exists()
            for r in json.loads((work / f"part-seed{seed}.json").read_text())]
    summary = summarize(rows, budget)
    recheck_path = work / "recheck.json"
    rechecked = json.loads(recheck_path.read_text()) if recheck_path.exists() else None
    for method, s in summary.items():
        for p in s["per_seed"]:
            again = (rechecked or {}).get("picks", {}).get(f"{method}/seed{p['seed']}")
            p["recheck_median_p50_ms"] = again and again["median_p50_ms"]
            p["recheck_rounds_within_budget"] = again and again["rounds_within_budget"]
    table = markdown_table(summary, budget)
    doc = {"recheck": rechecked, "budget_ms": budget, "latency_range": {k: {"device_p50_ms": v["device_p50_ms"]} for k, v in rng.items()},
           "unpruned_int8_test": unpruned_test, "baseline_model": info, "summary": summary, "table_md": table,
           "rows": rows,
           "setup": {"model": f"resnet18 width {WIDTH}, 1x1x32x32, 10 classes", "task": "noisy_digits(seed=0)",
                     "data": info["sizes"], "device": "sshd on 127.0.0.1 (x86 SSH device, the venv's python)",
                     "threads": args.threads, "trials_per_search": args.trials, "samplers": args.samplers,
                     "seeds": seeds, "seed_workers_at_once": args.parallel, "finetune": {"epochs": args.ft_epochs, "max_minutes": args.ft_minutes,
                                                  "distill": True, "threads": 1},
                     "device_eval_samples": DEVICE_EVAL, "search_space": {"over_the_defaults": search_space(args),
                                      "defaults": "edgepack.search.space.default_space (see rows' params)"},
                     "budget_rule": f"{args.budget_rule} (unless --budget-ms was given to the first run)",
                     "feasible": "every judged budget met (the build's and the device's verdicts), latency "
                                 "p50 on the device included",
                     "snapshot": str(args.snapshot) if args.snapshot else None},
           "environment": {"loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                           "cpu_count": os.cpu_count(), "python": platform.python_version()},
           "wall_seconds": round(time.perf_counter() - started, 1) if started else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    plot(rows, budget, args.out.with_suffix(".png"), unpruned_test["top1"])
    print(table)


if __name__ == "__main__":
    main()
