"""Helpers of bench/compress_tradeoff.py: the task and baselines, one function per compression
method (each through edgepack's public functions, with the build stages' defaults), the artifacts
(fp32/int8 ONNX as the x86 build makes them, int8 TFLite), top-1 with standard errors, and the
one interleaved latency loop."""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # fixtures: the zoo and the task
from fixtures.tasks import noisy_digits, train_baseline  # noqa: E402
from fixtures.zoo import mobilenet_v2, resnet18  # noqa: E402

from edgepack.compress.cluster_steps import cluster_and_finetune  # noqa: E402
from edgepack.compress.lowrank import factorize_rounded  # noqa: E402
from edgepack.compress.qat import RANGE_LR, train_qat  # noqa: E402,F401  (RANGE_LR: the CLI's default)
from edgepack.compress.sensitivity import weight_sensitivity  # noqa: E402
from edgepack.compress.size import compressed_sizes  # noqa: E402
from edgepack.compress.sparsity import magnitude_sparsify  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.qdq_tidy import tidy_qdq  # noqa: E402
from edgepack.onnx_tools.quantize import quantize_onnx  # noqa: E402
from edgepack.prune import FinetuneConfig, count_macs_params, finetune  # noqa: E402
from edgepack.prune.config import make_config  # noqa: E402
from edgepack.prune.stage import run_prune_stage  # noqa: E402
from edgepack.runtime import open_model, time_runs  # noqa: E402

CKPT = Path("/tmp/ep/ckpt")
X = (torch.zeros(1, 1, 32, 32),)
TEST_COPIES = 4
# The widths and schedules tests/test_tasks.py trains (ResNet-18 quarter width, MobileNetV2 0.35).
MODELS = {"resnet18": {"width": 0.25, "epochs": 6, "train_copies": 2,
                       "make": lambda w: resnet18(10, 1, small_input=True, width=w)},
          "mobilenet_v2": {"width": 0.35, "epochs": 10, "train_copies": 3,
                           "make": lambda w: mobilenet_v2(10, 1, width=w, small_input=True)}}
# The build stages' fine-tuning defaults (edgepack/stages/*.py FINETUNE_DEFAULTS), epochs set by the bench.
LR = {"prune": 0.01, "lowrank": 0.01, "cluster": 0.005, "sparsity": 0.005, "qat": 1e-4}
SLIMMING = {"l1": 5e-2, "epochs": 1, "on": "bn_scale"}  # what compress_sparsity.py / the README measured


def task_for(name: str):
    return noisy_digits(seed=0, train_copies=MODELS[name]["train_copies"], test_copies=TEST_COPIES)


def baseline(name: str, log=print, wait_minutes: float = 30) -> tuple[torch.nn.Module, dict]:
    """The seed-0 baseline (train_baseline, the task's recipe), shared by every method and seed;
    cached in /tmp/ep/ckpt/<model>-<width>-seed0.pt (waited for while another process trains it)."""
    spec = MODELS[name]
    path = CKPT / f"{name}-{spec['width']}-seed0.pt"
    deadline = time.monotonic() + 60 * wait_minutes
    while not path.exists() and _training_elsewhere(name) and time.monotonic() < deadline:
        time.sleep(15)
    torch.manual_seed(0)
    model = spec["make"](spec["width"])
    if path.exists():
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), {**saved.get("info", {}), "checkpoint": str(path), "reused": True}
    log(f"training the {name} baseline ({spec['epochs']} epochs)")
    t0 = time.perf_counter()
    s = train_baseline(model, task_for(name), epochs=spec["epochs"], lr=0.05, seed=0)
    info = {"model": name, "width": spec["width"], "epochs": spec["epochs"], "train_copies": spec["train_copies"],
            "lr": 0.05, "seed": 0, "val_acc": s["eval_acc_after"], "train_seconds": round(time.perf_counter() - t0, 1)}
    CKPT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    tmp.rename(path)
    return model.eval(), {**info, "checkpoint": str(path), "reused": False}


def _training_elsewhere(name: str) -> bool:
    """A process of this bench's baseline script is training this model (so wait, do not train twice)."""
    try:
        return any(f"train_base.py {name}" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                   for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        return False


# --- accuracy -------------------------------------------------------------------------------

@torch.no_grad()
def correct_torch(model, data) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(xs[0])).argmax(1).numpy() for xs, _ in data.batches(256)]) == data.y


def correct_file(path: Path, data) -> np.ndarray:
    """Per-sample correctness of an ONNX (batches of 256) or TFLite (batch 1: its fixed shape) file."""
    runner = open_model(path, 1)
    batch = 1 if Path(path).suffix == ".tflite" else 256
    pred = np.concatenate([np.asarray(runner.run(xs)[0]).reshape(len(xs[0]), -1).argmax(1)
                           for xs, _ in data.batches(batch)])
    return pred == data.y


def pack(c: np.ndarray) -> str:
    return np.packbits(c.astype(np.uint8)).tobytes().hex() + f":{len(c)}"


def unpack(s: str) -> np.ndarray:
    hexs, n = s.split(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexs), np.uint8))[:int(n)].astype(bool)


def acc(c: np.ndarray) -> dict:
    """Top-1 in points with n and the binomial standard error."""
    p = float(c.mean())
    return {"top1": round(100 * p, 3), "n": int(len(c)), "se": round(100 * math.sqrt(p * (1 - p) / len(c)), 3)}


def paired_drop(ref: np.ndarray, cand: np.ndarray) -> dict:
    """ref - cand in points, with the standard error of the paired per-sample difference."""
    d = ref.astype(float) - cand.astype(float)
    return {"drop": round(100 * d.mean(), 3), "se": round(100 * d.std(ddof=1) / math.sqrt(len(d)), 3)}


# --- artifacts ------------------------------------------------------------------------------

def export(model, stem: Path, calib, scheme, tflite: bool) -> dict:
    """fp32 ONNX, int8 ONNX (quantize_onnx with the x86 build's scheme, then qdq_tidy as the x86
    build does), and with `tflite` the int8 .tflite (litert-torch PT2E, edgepack.tflite.convert_int8)."""
    from edgepack.tflite.convert import convert_int8
    model = model.eval()
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {"fp32.onnx": to_onnx(model, X, stem.with_suffix(".fp32.onnx"))}
    int8 = stem.with_suffix(".int8.onnx")
    quantize_onnx(out["fp32.onnx"], int8, calib, scheme, 1)
    tidy_qdq(int8)
    out["int8.onnx"] = int8
    if tflite:
        out["int8.tflite"] = stem.with_suffix(".int8.tflite")
        convert_int8(model, X, calib, out["int8.tflite"], num_calib=min(len(calib), 256))
    return out


def sizes(paths: dict) -> dict:
    return {k: {f: v for f, v in compressed_sizes(p).items() if f in ("raw_bytes", "deflate_bytes", "zstd_bytes")}
            for k, p in paths.items()}


# --- methods: each returns (model to export, facts, correctness right after compressing) ----------

def ft_config(args, seed: int, kind: str, epochs: int | None = None) -> FinetuneConfig:
    return FinetuneConfig(epochs=epochs or args.ft_epochs, lr=LR[kind], seed=seed, patience=None,
                          max_minutes=args.ft_minutes, distill=True, threads=1)


def prune(model, teacher, task, args, seed: int, importance: str, profile):
    """run_prune_stage, what `edgepack build --prune-macs 0.5` runs (MACs target, channels rounded
    to the profile's simd_width; slimming: its sparsity-training phase first), with its fine-tuning
    (distillation from the unpruned model) run here after it, so the pruned model is also measured
    before fine-tuning; prune_and_finetune does the same two steps."""
    ft = ft_config(args, seed, "prune")
    options = {"macs_target": args.macs_target, "importance": "bn_scale" if importance == "slimming" else importance,
               "finetune": ft.model_copy(update={"epochs": 0}).model_dump()}
    if importance == "slimming":
        options["slimming"] = SLIMMING
    pruned, rec = run_prune_stage(model, X, make_config(**options), profile, task.train, task.val)
    before = correct_torch(pruned, task.test)
    s = finetune(pruned, teacher, task.train, task.val, ft)
    facts = {"config": {k: v for k, v in options.items() if k != "finetune"}, "round_to": profile.simd_width,
             "ratio": rec.ratio, "finetune": _ft(s)}
    if importance == "slimming":
        sp = rec.finetune[0]
        facts["sparsity_training"] = {k: sp.get(k) for k in ("epochs_run", "seconds", "bn_scales_before", "bn_scales_after")}
    return pruned, facts, before


def lowrank(model, teacher, task, args, seed: int, profile, epochs: int | None = None):
    student, rec = factorize_rounded(model, X, args.lowrank_multiple or profile.simd_width,
                                     macs_target=args.macs_target)
    before = correct_torch(student, task.test)
    s = finetune(student, teacher, task.train, task.val, ft_config(args, seed, "lowrank", epochs))
    return student, {"rank_multiple": rec["rank_multiple"], "layers_factorized": len(rec["layers"]),
                     "macs_reduction_of_step": rec["macs_reduction"], "finetune": _ft(s)}, before


def clustered(model, teacher, task, args, seed: int, profile, scheme):
    """The cluster stage's route (cluster_and_finetune) with the stage's defaults for what the bench
    does not set; the sensitivity on the training inputs, as the stage measures it with --train."""
    from edgepack.stages.cluster import Config, resolve  # the build's [compress.cluster] defaults, whatever they are now
    cfg = resolve(Config(clusters=args.clusters, rate=args.cluster_rate, steps=args.cluster_steps,
                         rate_by=args.cluster_rate_by), scheme)
    options = {k: getattr(cfg, k) for k in ("per_channel", "init", "seed", "scaled", "rate", "qmax")}
    sensitivity = weight_sensitivity(model, task.train, seed=cfg.seed) if cfg.rate and cfg.rate_by == "sensitivity" \
        else None
    before = {}

    def score(m):  # the test top-1 once every layer is clustered, before the last fine-tuning
        before["c"] = correct_torch(m, task.test)
    student, rec, steps = cluster_and_finetune(copy.deepcopy(model), teacher, task.train, task.val,
                                               ft_config(args, seed, "cluster"), cfg.clusters, cfg.skip, cfg.steps,
                                               sensitivity, score=score, **options)
    return student, {"options": {**options, "clusters": cfg.clusters, "skip": cfg.skip, "rate_by": cfg.rate_by,
                                 "steps": cfg.steps},
                     "clustered_layers": len(rec.layers), "skipped": rec.skipped,
                     "step_weights": [st["weights"] for st in steps], "finetune": _ft(steps[-1]["finetune"])}, before["c"]


def sparsify(model, teacher, task, args, seed: int, profile):
    student, rec, s = magnitude_sparsify(copy.deepcopy(model), teacher, task.train, args.sparsity,
                                         finetune_cfg=ft_config(args, seed, "sparsity", args.sparse_epochs))
    return student, {"target": args.sparsity, "schedule": rec.schedule, "finetune": _ft(s)}, None


def planted(method: str) -> bool:
    """The QAT goal's rows (qat_outliers, and qat_outliers_fixed, its control): planted outliers,
    per-tensor weights, ResNet-18 only, no LiteRT file, judged against their own PTQ."""
    return method.startswith("qat_outliers")


def qat(model, task, args, seed: int, scheme, calib, learn_ranges: bool = True):
    """train_qat (the qat stage's route: BatchNorm folded, the scheme simulated, distillation from
    `model`, Adam, learned weight ranges unless not `learn_ranges`); the artifact is the trained
    float model through the same quantizer."""
    cfg = FinetuneConfig(epochs=args.qat_epochs, lr=LR["qat"], seed=seed, patience=2, max_minutes=args.ft_minutes,
                         distill=True, threads=1)
    trained, rec = train_qat(model, scheme, task.train, task.val, calib, cfg, learn_ranges=learn_ranges,
                             range_lr=args.qat_range_lr)
    s = rec.pop("finetune")
    return trained, {"scheme": scheme.model_dump(), "batchnorm_folded": rec["batchnorm_folded"],
                     "weight_ranges": rec["weight_ranges"],
                     "simulated_val_before": rec["simulated_top1_before"], "simulated_val_after": rec["simulated_top1_after"],
                     "finetune": {"epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"], "seconds": s["seconds"]}}


def _ft(s: dict) -> dict:
    return {k: s.get(k) for k in ("epochs_run", "seconds", "best_epoch", "stopped")}


def macs_params(model) -> dict:
    macs, params = count_macs_params(model.eval(), X)
    return {"macs": int(macs), "params": int(params)}


# --- latency --------------------------------------------------------------------------------

def interleaved_latency(paths: dict[str, Path], rounds: int, runs: int) -> dict:
    """Every artifact once per round (1 thread: ORT intra-op 1, LiteRT interpreter num_threads=1),
    warm-up 3 + `runs` timed calls; the order rotates each round. p50 per round; median of rounds."""
    runners = {k: open_model(p, 1) for k, p in paths.items()}
    x = [np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)]
    per = {k: [] for k in runners}
    keys = list(runners)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            per[k].append(time_runs(runners[k], x, warmup=3, runs=runs)["p50"])
    return {k: {"p50_ms": round(float(np.median(v)), 4), "rounds_ms": [round(t, 4) for t in v]} for k, v in per.items()}


def speedup(ref: dict, cand: dict) -> float:
    """Median over rounds of ref/cand per round (robust to load drifting between rounds)."""
    return round(float(np.median(np.array(ref["rounds_ms"]) / np.array(cand["rounds_ms"]))), 3)


def mean_se(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "se_seeds": None, "seeds": 0}
    return {"mean": round(float(np.mean(xs)), 3),
            "se_seeds": round(float(np.std(xs, ddof=1) / math.sqrt(len(xs))), 3) if len(xs) > 1 else None,
            "seeds": len(xs), "per_seed": [round(x, 3) for x in xs]}


# --- the LiteRT conversions' jobs (bench/compress_tradeoff.py's converter process) ---------------

def submit(work: Path, label: str, model, stem: Path, kinds: list[str]) -> None:
    jobs = work / "tflite_jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "stem": str(stem), "kinds": kinds}, jobs / f"{label}.tmp")
    (jobs / f"{label}.tmp").replace(jobs / f"{label}.job")


def processes(name: str, converter: bool) -> list[int]:
    """This bench's processes for `name` (main runs or converters), this one excluded."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = [c.decode(errors="replace") for c in cmd]
        if int(pid) != os.getpid() and any(c.endswith("compress_tradeoff.py") for c in cmd) and name in cmd \
                and ("--convert-worker" in cmd) == converter:
            found.append(int(pid))
    return found


def conversions_done(work: Path) -> bool:
    jobs = work / "tflite_jobs"
    return all(j.with_suffix(".done").exists() for j in jobs.glob("*.job"))


def adopt_tflite(state: dict, work: Path, task) -> None:
    """The converted files into the baseline's / rows' paths, sizes and (LiteRT int8) top-1."""
    for done in sorted((work / "tflite_jobs").glob("*.done")):
        rec = json.loads(done.read_text())
        entry = state["baseline"] if done.stem == "baseline" else state["rows"].get(f"{done.stem}/s0")
        if entry is None:
            continue
        entry.setdefault("facts", {})["litert_conversion"] = rec
        for k, v in rec.items():
            if k == "error" or k in entry["paths"]:
                continue
            entry["paths"][k] = v["path"]
            entry["sizes"].update(sizes({k: Path(v["path"])}))
            c = correct_file(Path(v["path"]), task.test)
            entry["top1"][k], entry["correct"][k] = acc(c), pack(c)
