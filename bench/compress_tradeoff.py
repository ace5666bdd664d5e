"""Every compression method alone and the useful pairs, on one task: MACs, size, latency, top-1.

Noisy digits (tests/fixtures/tasks.py), ResNet-18 width 0.25 and MobileNetV2 width 0.35 (the
widths tests/test_tasks.py trains), one seed-0 baseline per model shared by every method (cached
in /tmp/ep/ckpt). Methods, each through edgepack's own functions with the build stages' defaults
(bench/compress_tradeoff_lib.py): channel pruning to --macs-target of the MACs (run_prune_stage:
l2, entropy, taylor importance, network slimming = bn_scale after one epoch of L1 5e-2 sparsity
training), magnitude sparsity (80%, polynomial schedule), low-rank SVD (factorize_rounded at
--macs-target), weight clustering (16 values per layer), QAT (train_qat, the x86 build's
scheme), fp16 (ONNX to_fp16, TFLite convert_fp16), and the pairs prune + low-rank, prune +
clustering, prune + QAT (the second step on the seed's l2-pruned model). Fine-tuning is short
distillation from the baseline (--ft-epochs), 3 fine-tuning seeds. The QAT goal is measured on
the config where PTQ fails (compress_qat.py's planted outlier channels, per-tensor weights):
qat_outliers with the stage's learned weight ranges, qat_outliers_fixed with ORT's max|w| scales
(the control).

Per artifact: MACs, parameters, fp32/int8 ONNX and int8 TFLite raw and deflate-9 size
(edgepack.compress.size), test top-1 (4 distorted copies of the test digits, n = 1796, with the
binomial SE and the paired SE of drops) before and after fine-tuning, in PyTorch, ORT int8 and
LiteRT int8 (seed 0); then one interleaved latency loop over all of a model's seed-0 artifacts
(ORT 1 thread, LiteRT interpreter 1 thread, batch 1), ratios vs the baseline's fp32 / plain int8.

    .venv/bin/python bench/compress_tradeoff.py --models resnet18 --resume &   # two processes,
    .venv/bin/python bench/compress_tradeoff.py --models mobilenet_v2 --resume  # one JSON
    .venv/bin/python bench/compress_tradeoff.py --tiny          # smoke test (~5 min)
Every finished row is cached in --work/<model>/rows.json; --resume continues from there. Writes
bench/results/compress_tradeoff.json (rebuilt from all models' caches after every row) and .png.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_tradeoff_lib as L  # noqa: E402
import compress_tradeoff_report as R  # noqa: E402
from common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["prune_l2", "lowrank", "cluster", "qat", "qat_outliers", "qat_outliers_fixed", "prune_entropy", "prune_taylor", "prune_slimming",
           "sparsity", "prune_lowrank", "prune_cluster", "prune_qat", "lowrank_ft5"]
# lowrank_ft5: low-rank with the factorize stage's own fine-tuning length (FinetuneConfig's 5 epochs), beside
# the 1 epoch every other row gets; its layer shapes are lowrank's, so its latency is lowrank's.
LOWRANK_STAGE_EPOCHS = 5
PAIRS = {"prune_lowrank", "prune_cluster", "prune_qat"}


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 on the shared baseline")
    p.add_argument("--seed-list", default="", help="only these seeds, e.g. 1,2 (a process per seed: each has its own "
                   "cache file; seed 0's process also converts and times)")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--sparse-epochs", type=int, default=2, help="magnitude sparsity: epochs its schedule ramps over")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-range-lr", type=float, default=L.RANGE_LR, help="Adam lr of QAT's weight clip ratios "
                   "(default: edgepack.compress.qat.RANGE_LR, the stage's)")
    p.add_argument("--ft-minutes", type=float, default=6.0, help="cap per fine-tuning run")
    p.add_argument("--macs-target", type=float, default=0.5)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--cluster-rate", type=float, default=0.04,
                   help="clustering's entropy-constrained k-means rate (the build's default is 0: plain k-means); "
                        "0.04 is what took ResNet-18's clustered int8 file past 2x (README, Weight clustering)")
    p.add_argument("--cluster-rate-by", choices=("sensitivity", "uniform"), default="sensitivity",
                   help="each layer's rate weighted by its output sensitivity (the build's default) or one rate for all "
                        "(what every JSON before session 12 used)")
    p.add_argument("--lowrank-multiple", type=int, default=None,
                   help="low-rank ranks in multiples of this (default: the x86 profile's simd_width, 16; the rpi profile's is 8)")
    p.add_argument("--cluster-steps", type=int, default=1,
                   help="cluster the layers in this many groups, least sensitive first, fine-tuning --ft-epochs after each")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--plant", type=float, default=64.0, help="outlier factor of the QAT goal config (ResNet-18)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("/tmp/ep/compress_tradeoff"))
    p.add_argument("--out", type=Path, default=RESULTS / "compress_tradeoff.json")
    p.add_argument("--resume", action="store_true", help="keep the rows cached in --work")
    p.add_argument("--retime", action="store_true", help="run the latency loop again (with --resume)")
    p.add_argument("--merge-only", action="store_true", help="rebuild the JSON and png from the caches")
    p.add_argument("--latency-only", action="store_true", help="time the seed-0 artifacts cached so far (latency.json)")
    p.add_argument("--table", action="store_true", help="print the Markdown tables of --out")
    p.add_argument("--tiny", action="store_true", help="smoke test: 256 training rows, 1 seed, short timing, no TFLite")
    p.add_argument("--convert-worker", type=int, metavar="PID", help=argparse.SUPPRESS)  # the LiteRT converter process
    p.add_argument("--tag", default="", help="name of this process's cache file (a second process on seed 0)")
    p.add_argument("--no-tflite", action="store_true", help="skip the litert-torch conversions (minutes each when loaded)")
    return p


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def run_model(name: str, args, profile, scheme, choice) -> None:
    from compress_qat import plant_outliers
    from edgepack.targets import Quantization
    work = args.work / name
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    first = 0 in seeds and not args.tag  # the process that owns seed 0 converts, times and scores LiteRT
    tag = args.tag or f"s{'-'.join(map(str, seeds))}"
    state_path = work / ("rows.json" if first else f"rows-{tag}.json")
    if not first and args.resume and not state_path.exists() and (work / "rows.json").exists():
        state_path.write_text((work / "rows.json").read_text())  # the baseline (and seed 0's rows) as computed
    state = json.loads(state_path.read_text()) if args.resume and state_path.exists() else {}
    task = L.task_for(name)
    if args.tiny:
        task.train, task.val = task.train.sample(256, seed=0), task.val.sample(128, seed=0)
    calib = task.train.sample(256, seed=0)
    teacher, info = L.baseline(name, log)
    if first and not args.no_tflite:
        start_converter(name, args)
    state.setdefault("setup", {"model": name, "width": L.MODELS[name]["width"], "baseline": info,
                               "task": f"noisy_digits(seed=0, train_copies={L.MODELS[name]['train_copies']}, "
                                       f"test_copies={L.TEST_COPIES})",
                               "train/val/test": [len(task.train), len(task.val), len(task.test)]})
    state.setdefault("rows", {})

    def store():
        save_json(state_path, state)
        try:
            merge(args)
        except Exception as e:  # noqa: BLE001  (the cache is saved; --merge-only rebuilds the JSON)
            log(f"merge failed: {type(e).__name__}: {e}")

    if "baseline" not in state:
        state["baseline"] = baseline_row(teacher, task, calib, scheme, work / "art" / "baseline",
                                         first and not args.no_tflite)
        state["tflite_arch"] = {str((state["baseline"]["macs"], state["baseline"]["params"])): "baseline"}
        store()
    base = state["baseline"]
    ref_fp32, ref_int8 = L.unpack(base["correct"]["fp32"]), L.unpack(base["correct"]["int8.onnx"])
    log(f"{name}: baseline fp32 {base['top1']['fp32']['top1']}, int8 {base['top1']['int8.onnx']['top1']}, "
        f"{base['macs']:,} MACs")
    methods = [m for m in args.methods.split(",") if m and not (L.planted(m) and name != "resnet18")]

    def maybe_latency(wait: bool):
        if first and not args.no_tflite and not L.conversions_done(work) and not L.processes(name, converter=True):
            start_converter(name, args)  # the one found at the start has gone
        seed0 = all(f"{m}/s0" in state["rows"] for m in methods)
        if "latency" in state and not args.retime or not seed0 or not first:
            return
        while not args.no_tflite and not L.conversions_done(work):
            if not wait:
                return
            time.sleep(10)
            if not L.processes(name, converter=True):
                start_converter(name, args)
        L.adopt_tflite(state, work, task)
        state["latency"] = latency(state, args)
        args.retime = False
        store()

    for seed in seeds:
        for m in methods:
            key = f"{m}/s{seed}"
            if key in state["rows"] and "error" not in state["rows"][key]:
                continue  # cached (a failed row is tried again)
            t0 = time.perf_counter()
            try:
                row = method_row(m, seed, name, teacher, task, calib, args, profile, scheme, work, plant_outliers,
                                 Quantization, state, ref_fp32, ref_int8)
            except Exception as e:  # noqa: BLE001  (a library failure is a result: noted, the run goes on)
                import traceback
                row = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
                log(f"{name} {key}: FAILED {row['error']}")
            row.update(method=m, seed=seed, seconds=round(time.perf_counter() - t0, 1), loadavg=list(os.getloadavg()))
            state["rows"][key] = row
            if "error" not in row:
                t = row["top1"]
                log(f"{name} {key}: before {t['before_ft'] and t['before_ft']['top1']}, fp32 {t['fp32']['top1']}, "
                    f"int8 {t['int8.onnx']['top1']}, {row['macs']:,} MACs ({row['seconds']} s)")
            store()
            maybe_latency(wait=False)
        if seed == 0:
            (work / "tflite_jobs").mkdir(parents=True, exist_ok=True)
            (work / "tflite_jobs" / "STOP").touch()  # every conversion is submitted
    maybe_latency(wait=True)


def baseline_row(teacher, task, calib, scheme, stem: Path, tflite: bool) -> dict:
    from edgepack.onnx_tools.fp16 import to_fp16
    paths = L.export(teacher, stem, calib, scheme, tflite=False)
    paths["fp16.onnx"] = stem.with_suffix(".fp16.onnx")
    to_fp16(paths["fp32.onnx"], paths["fp16.onnx"])
    if tflite:
        L.submit(stem.parents[1], "baseline", teacher, stem, ["int8", "fp32", "fp16"])
    correct = {"fp32": L.correct_torch(teacher, task.test), **{k: L.correct_file(p, task.test) for k, p in paths.items()}}
    return {**L.macs_params(teacher), "paths": {k: str(p) for k, p in paths.items()}, "sizes": L.sizes(paths),
            "top1": {k: L.acc(c) for k, c in correct.items()}, "correct": {k: L.pack(c) for k, c in correct.items()}}


def method_row(m, seed, name, teacher, task, calib, args, profile, scheme, work, plant_outliers, Quantization,
               state, ref_fp32, ref_int8) -> dict:
    start, ptq, facts, before = teacher, None, {}, None
    if m in PAIRS:  # the second step starts from this seed's l2-pruned, fine-tuned model
        start = torch.load(work / "models" / f"prune_l2-s{seed}.pt", weights_only=False).eval()
        ptq = L.unpack(state["rows"][f"prune_l2/s{seed}"]["correct"]["int8.onnx"])
    if L.planted(m):
        start = plant_outliers(teacher, args.plant).eval()
        scheme = Quantization(scheme="fixed", activation_type="QUInt8", weight_type="QInt8", per_channel=False)
        ref_fp32 = L.correct_torch(start, task.test)
        ptq_paths = L.export(start, work / "art" / f"{m}-ptq-s{seed}", calib, scheme, tflite=False)
        ptq = ref_int8 = L.correct_file(ptq_paths["int8.onnx"], task.test)
        facts["planted"] = {"k": args.plant, "weights": "per-tensor", "fp32_top1": L.acc(ref_fp32)}
    if m.startswith("prune_") and m not in PAIRS:
        model, f, before = L.prune(teacher, teacher, task, args, seed, m.removeprefix("prune_"), profile)
    elif m in ("lowrank", "prune_lowrank", "lowrank_ft5"):
        model, f, before = L.lowrank(start, teacher, task, args, seed, profile,
                                     LOWRANK_STAGE_EPOCHS if m == "lowrank_ft5" else None)
    elif m in ("cluster", "prune_cluster"):
        model, f, before = L.clustered(start, teacher, task, args, seed, profile, scheme)
    elif m == "sparsity":
        model, f, before = L.sparsify(teacher, teacher, task, args, seed, profile)
    elif m in ("qat", "prune_qat", "qat_outliers", "qat_outliers_fixed"):  # _fixed: ORT's max|w| weight scales
        model, f = L.qat(start, task, args, seed, scheme, calib, learn_ranges=m != "qat_outliers_fixed")
        ptq = ref_int8 if ptq is None else ptq
    else:
        raise ValueError(f"unknown method {m}")
    facts.update(f)
    if m == "prune_l2":
        (work / "models").mkdir(parents=True, exist_ok=True)
        torch.save(model, work / "models" / f"prune_l2-s{seed}.pt")
    # LiteRT int8 (a litert-torch conversion, minutes on the loaded box) once per architecture: the
    # same layer shapes run the same dense XNNPACK kernels whatever the weight values (clustered,
    # sparse, QAT-trained); such a method's LiteRT figures are those of the file it shares shapes with.
    sig, arch = str(tuple(L.macs_params(model).values())), state.setdefault("tflite_arch", {})
    convert = seed == 0 and not L.planted(m) and sig not in arch and not args.no_tflite
    paths = L.export(model, work / "art" / f"{m}-s{seed}", calib, scheme, tflite=False)
    if convert:  # converted by the converter process meanwhile; timed and scored with the latency loop
        arch[sig] = m
        L.submit(work, m, model, work / "art" / f"{m}-s{seed}", ["int8"])
    correct = {"fp32": L.correct_torch(model, task.test), **{k: L.correct_file(p, task.test)
                                                             for k, p in paths.items() if k != "fp32.onnx"}}
    if before is not None:
        correct["before_ft"] = before
    if ptq is not None:  # QAT: "before fine-tuning" is PTQ int8 of the model QAT starts from
        correct["before_ft"] = ptq
    top1 = {k: L.acc(c) for k, c in correct.items()}
    top1.setdefault("before_ft", None)
    row = {**L.macs_params(model), "facts": facts, "paths": {k: str(p) for k, p in paths.items()},
           "sizes": L.sizes(paths), "top1": top1, "correct": {k: L.pack(c) for k, c in correct.items()},
           "drop_fp32_vs_baseline": L.paired_drop(ref_fp32, correct["fp32"]),
           "drop_int8_vs_plain_int8": L.paired_drop(ref_int8, correct["int8.onnx"]),
           "litert_as": arch.get(sig) if seed == 0 and not L.planted(m) else None}
    if L.planted(m):
        row["ptq_drop"] = L.paired_drop(ref_fp32, ptq)
        row["qat_drop"] = L.paired_drop(ref_fp32, correct["int8.onnx"])
        d0, d1 = row["ptq_drop"]["drop"], row["qat_drop"]["drop"]
        row["fraction_recovered"] = round((d0 - d1) / d0, 3) if d0 > 0 else None
    return row


def convert_worker(args) -> None:
    """The LiteRT conversions (litert-torch, minutes each on the loaded box) in their own process,
    beside the fine-tuning: job files in <work>/<model>/tflite_jobs, a .done file per job."""
    from edgepack.tflite.convert import convert_fp32, convert_int8
    from edgepack.tflite.fp16 import convert_fp16
    name = args.models.split(",")[0]
    jobs = args.work / name / "tflite_jobs"
    calib = L.task_for(name).train.sample(256, seed=0)
    while True:
        todo = sorted(j for j in jobs.glob("*.job") if not j.with_suffix(".done").exists())
        if not todo:
            if (jobs / "STOP").exists() or not L.processes(name, converter=False):
                return
            time.sleep(5)
            continue
        job = torch.load(todo[0], weights_only=False)
        stem, rec = Path(job["stem"]), {}
        try:
            for kind in job["kinds"]:
                t0 = time.perf_counter()
                if kind == "int8":
                    convert_int8(job["model"].eval(), L.X, calib, stem.with_suffix(".int8.tflite"), num_calib=256)
                elif kind == "fp32":
                    convert_fp32(job["model"].eval(), L.X, stem.with_suffix(".fp32.tflite"))
                else:
                    convert_fp16(stem.with_suffix(".fp32.tflite"), stem.with_suffix(".fp16.tflite"))
                rec[f"{kind}.tflite"] = {"path": str(stem.with_suffix(f".{kind}.tflite")),
                                         "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001  (recorded; the bench goes on without this file)
            rec["error"] = f"{type(e).__name__}: {e}"
        save_json(todo[0].with_suffix(".done"), rec)
        log(f"converted {todo[0].stem}: {rec}")


def start_converter(name: str, args):
    import subprocess
    jobs = args.work / name / "tflite_jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    (jobs / "STOP").unlink(missing_ok=True)
    if L.processes(name, converter=True):
        return None  # a converter of an earlier (resumed) run is still at work: it takes the new jobs too
    logf = open(args.work / name / "converter.log", "a")
    return subprocess.Popen([sys.executable, __file__, "--convert-worker", str(os.getpid()), "--models", name,
                             "--work", str(args.work)], stdout=logf, stderr=subprocess.STDOUT)


def latency(state: dict, args) -> dict:
    """One interleaved loop over all seed-0 artifacts of the model (the weights do not change the time)."""
    b = state["baseline"]["paths"]
    paths = {f"baseline|{k}": Path(p) for k, p in b.items()}
    for key, row in state["rows"].items():
        if key.endswith("/s0") and "paths" in row and not L.planted(row["method"]):
            paths.update({f"{row['method']}|{k}": Path(p) for k, p in row["paths"].items()})
    rounds, runs = (2, 5) if args.tiny else (args.rounds, args.runs)
    load0 = list(os.getloadavg())
    log(f"timing {len(paths)} artifacts interleaved ({rounds} rounds x {runs} runs), load {load0[0]:.1f}")
    t = L.interleaved_latency(paths, rounds, runs)
    return {"p50_ms": t, "loadavg_before": load0, "loadavg_after": list(os.getloadavg()), "rounds": rounds,
            "runs_per_round": runs, "warmup": 3, "threads": 1, "batch": 1}


def load_state(work: Path) -> dict:
    """A model's cache: seed 0's rows.json with the other seeds' rows and the separate latency run."""
    state = json.loads((work / "rows.json").read_text())
    for more in sorted(work.glob("rows-s*.json")):  # the other seeds' processes
        state["rows"].update({k: v for k, v in json.loads(more.read_text()).get("rows", {}).items()
                              if k not in state["rows"] or "error" in state["rows"][k]})
    if (work / "latency.json").exists():
        lat = json.loads((work / "latency.json").read_text())
        state["latency"] = lat["latency"]
        for key, d in lat["adopted"].items():
            entry = state["baseline"] if key == "baseline" else state["rows"].get(key)
            for field in ("paths", "sizes", "top1", "correct"):
                if entry is not None:
                    entry[field].update(d[field])
    return state


def latency_only(args) -> None:
    """--latency-only: adopt the finished conversions and time every seed-0 artifact of each model
    now (while other processes may still be adding rows); written to <work>/<model>/latency.json."""
    for name in args.models.split(","):
        work = args.work / name
        state = load_state(work)
        L.adopt_tflite(state, work, L.task_for(name))
        adopted = {k: {f: e[f] for f in ("paths", "sizes", "top1", "correct")}
                   for k, e in [("baseline", state["baseline"])] + [(k, r) for k, r in state["rows"].items()
                                                                   if k.endswith("/s0") and "paths" in r]}
        save_json(work / "latency.json", {"latency": latency(state, args), "adopted": adopted})
    merge(args)


def merge(args) -> None:
    """Rebuild the JSON (and png) from every model's cache, under a lock (two processes write it)."""
    lock = open(args.work / ".merge.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        # A model with no cache in --work keeps its entry of the JSON as it stands (its per-sample
        # data went with its cache, so it cannot be summarized again): a run on one model never
        # drops another model's figures.
        models = {}
        if args.out.exists():
            old = json.loads(args.out.read_text())
            for k, v in old.get("models", {}).items():
                if not (args.work / k / "rows.json").exists():
                    v.setdefault("measured_by", {"command": old.get("command"), "machine": old.get("machine"),
                                                 "setup": old.get("setup")})
                    models[k] = v
        for rows in sorted(args.work.glob("*/rows.json")):
            state = load_state(rows.parent)
            if "baseline" not in state:
                continue
            rows_out = {k: {f: v for f, v in r.items() if f not in ("correct", "paths", "traceback")}
                        for k, r in state["rows"].items()}
            models[rows.parent.name] = {"setup": state["setup"], "summary": R.summarize(state),
                                        "latency": state.get("latency"), "rows": rows_out}
        from edgepack.scheme import scheme_for_build
        from edgepack.targets import load_profile
        doc = {"bench": "compress_tradeoff", "goals": R.goals({k: m["summary"] for k, m in models.items()}), "command": " ".join(sys.argv),
               "setup": {"seeds": args.seeds, "ft_epochs": args.ft_epochs, "sparse_epochs": args.sparse_epochs,
                         "qat_epochs": args.qat_epochs, "qat_range_lr": args.qat_range_lr, "macs_target": args.macs_target, "clusters": args.clusters, "cluster_rate": args.cluster_rate, "cluster_rate_by": args.cluster_rate_by, "cluster_steps": args.cluster_steps, "lowrank_multiple": args.lowrank_multiple,
                         "sparsity": args.sparsity, "lr": L.LR, "slimming": L.SLIMMING, "plant": args.plant,
                         "int8_scheme": scheme_for_build(load_profile("x86"))[1], "test": "noisy digits test split x4",
                         "distill": "from the unpruned baseline (QAT: from the model it starts from)",
                         "size": "edgepack.compress.size: deflate level 9 (zip entry)",
                         "se": "drops: paired per-sample SE (test) combined with the SE over seeds; within_noise: |drop| < 2 SE"},
               "machine": machine(), "loadavg_now": list(os.getloadavg()), "models": models}
        save_json(args.out, doc)
        try:
            R.plot(doc, args.out.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001  (a plot failure must not lose the JSON)
            log(f"plot failed: {e}")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def main(argv=None):
    args = args_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.tiny:
        args.seeds, args.work, args.no_tflite = 1, args.work.with_name(args.work.name + "-tiny"), True
        args.out = args.work / "compress_tradeoff.json"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.table:
        return print(R.table(json.loads(args.out.read_text())))
    if args.merge_only:
        return merge(args)
    if args.latency_only:
        return latency_only(args)
    if args.convert_worker:
        return convert_worker(args)
    from edgepack.scheme import scheme_for_build
    from edgepack.targets import load_profile
    profile = load_profile("x86")
    scheme, choice = scheme_for_build(profile)
    for name in args.models.split(","):
        run_model(name, args, profile, scheme, choice)
    merge(args)
    print(json.dumps(json.loads(args.out.read_text())["goals"], indent=1))


if __name__ == "__main__":
    main()
