"""QAT vs PTQ: how much of the int8 loss quantization-aware training recovers.

On the noisy-digits task (tests/fixtures/tasks.py), ResNet-18 width 0.5 (the baselines reused from
/tmp/ep/ckpt/resnet18-0.5-seed<k>.pt, trained there by bench/compress_cluster.py's recipe when
missing) given function-preserving outlier channels (`plant_outliers`, --plant 64; the float model
is unchanged, checked), int8 ONNX with edgepack's quantizer in U8S8 (the x86 VNNI scheme) with
*per-tensor* weights. The baselines as trained lose too little for QAT to matter (per-tensor PTQ:
MobileNetV2-0.35 0.56, ResNet-18-0.5 0.61 points; --plant 0 --model mobilenet_v2 shows it). Then
edgepack.compress.qat.train_qat (BatchNorm folded, the same scheme simulated, distillation from the
float model, early stop on the validation split), exported and quantized by the same quantizer and
scheme. Top-1 on four distorted copies of the test digits: float, PTQ, QAT; the drops with the
paired standard error (per-sample differences), the fraction of the PTQ loss QAT recovers, the
per-channel PTQ figure, and the QAT-trained weights run in float (a control: has training itself
moved the float model?).

TFLite (`--parts tflite`): int8 `.tflite` from litert-torch's PT2E static PTQ (edgepack.tflite.convert_int8,
per-channel weights, 128 calibration samples: what the tflite stage makes) vs from litert-torch's PT2E QAT
(edgepack.compress.qat_tflite: the same quantizer in QAT form, BatchNorm folded, the same 128 samples to
initialise the ranges, distillation, early stop on the validation split), both run by ai-edge-litert on the
same test samples; and the QAT file against the trained model with int8 simulated in PyTorch.

    .venv/bin/python bench/compress_qat.py --seeds 0,1     # ~15 min on the loaded 2-core box
    .venv/bin/python bench/compress_qat.py --seeds 0,1 --parts tflite   # keeps the saved ONNX rows
Writes bench/results/compress_qat.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compress_cluster import baseline, task_for  # noqa: E402  (also puts tests/ on the path)
from common import machine  # noqa: E402

from edgepack.compress.qat import train_qat  # noqa: E402
from edgepack.compress.qat_tflite import ROUTE, convert_trained, simulated_outputs, train_qat_tflite  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.quantize import quantize_onnx  # noqa: E402
from edgepack.prune.config import FinetuneConfig  # noqa: E402
from edgepack.runtime import open_model  # noqa: E402
from edgepack.targets import Quantization  # noqa: E402
from edgepack.tflite import INT8_SCHEME, convert_int8, run_tflite  # noqa: E402

RESULTS = HERE / "results"


def correct(path: Path, data) -> np.ndarray:
    runner = open_model(path, 1)
    pred = np.concatenate([np.asarray(runner.run(xs)[0]).argmax(1) for xs, _ in data.batches(256)])
    return pred == data.y


@torch.no_grad()
def torch_correct(model, data) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(xs[0])).argmax(1).numpy() for xs, _ in data.batches(256)]) == data.y


def acc(c: np.ndarray) -> dict:
    p = float(c.mean())
    return {"top1": round(100 * p, 3), "n": int(len(c)), "se": round(100 * math.sqrt(p * (1 - p) / len(c)), 3)}


def paired_drop(ref: np.ndarray, cand: np.ndarray) -> dict:
    """ref - cand in points, with the standard error of the paired per-sample difference."""
    d = ref.astype(float) - cand.astype(float)
    return {"drop": round(100 * d.mean(), 3), "se": round(100 * d.std(ddof=1) / math.sqrt(len(d)), 3), "n": len(d)}


def quantize(model, example, q, calib, out: Path) -> Path:
    fp32 = out.with_suffix(".fp32.onnx")
    to_onnx(model, example, fp32, True, ["input"], ["logits"], True)
    quantize_onnx(fp32, out, calib, q, 1)
    return fp32


@torch.no_grad()
def plant_outliers(model, k: float):
    """Function-preserving outlier channels: in every residual block, channel 0 of conv1's output
    (BatchNorm scale and shift) times k, conv2's weights from that channel divided by k. ReLU is
    positively homogeneous, so the float model computes the same function (checked); a per-tensor
    weight scale and the per-tensor activation range at conv2's input are then set by one channel."""
    model = copy.deepcopy(model)
    for block in model.layers:
        bn, nxt = block.conv1[1], block.conv2[0]
        bn.weight[0] *= k
        bn.bias[0] *= k
        nxt.weight[:, 0] /= k
    return model


def planted_baseline(name: str, seed: int, args, log):
    model, info = baseline(name, seed, log, wait_minutes=args.wait_minutes)
    if args.plant:
        planted = plant_outliers(model, args.plant)
        x = torch.from_numpy(task_for(name).val.x[:64])
        with torch.no_grad():
            diff = float((planted(x) - model(x)).abs().max())
        assert diff < 1e-3, f"planting changed the function: max abs diff {diff}"
        model, info = planted.eval(), {**info, "planted_outliers": {"k": args.plant, "max_abs_diff": diff}}
    return model, info


def tflite_seed(name: str, seed: int, args, log) -> dict:
    """int8 TFLite from PT2E PTQ vs from PT2E QAT (litert-torch both), on the same test samples."""
    model, _ = planted_baseline(name, seed, args, log)
    task = task_for(name)
    calib = task.train.sample(256, seed=0).take(128)  # the tflite stage's cap (MAX_CALIB)
    example = (torch.zeros(1, 1, 32, 32),)
    c_fp32 = torch_correct(model, task.test)
    ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, patience=2, max_minutes=args.minutes, threads=1, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-qat-tflite-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        convert_int8(model, example, calib, tmp / "ptq.tflite", num_calib=len(calib))
        ptq_seconds = time.perf_counter() - t0
        c_ptq = run_tflite(tmp / "ptq.tflite", [task.test.x])[0].argmax(1) == task.test.y
        log(f"seed {seed} TFLite: fp32 {acc(c_fp32)['top1']}, PT2E PTQ {acc(c_ptq)['top1']} ({ptq_seconds:.0f} s)")
        t0 = time.perf_counter()
        student, quant, ex, rec = train_qat_tflite(
            model, example, task.train, task.val, calib, ft, num_calib=len(calib),
            progress=lambda d: log(f"  PT2E QAT epoch {d['epoch']}: loss {d['loss']:.4f}, "
                                   f"val (simulated int8) {d['eval_acc']:.4f}, {d['seconds']:.0f} s"))
        train_seconds = time.perf_counter() - t0
        art, converted = convert_trained(student, quant, ex, tmp / "qat.tflite")
        out_qat = run_tflite(tmp / "qat.tflite", [task.test.x])[0]
        sim = simulated_outputs(converted, [task.test.x])[0]
    c_qat = out_qat.argmax(1) == task.test.y
    ptq_drop, qat_drop = paired_drop(c_fp32, c_ptq), paired_drop(c_fp32, c_qat)
    recovered = (ptq_drop["drop"] - qat_drop["drop"]) / ptq_drop["drop"] if ptq_drop["drop"] > 0 else None
    fin = rec.pop("finetune")
    row = {"route": ROUTE, "ptq_scheme": INT8_SCHEME + f", {len(calib)} calibration samples",
           "qat_scheme": rec["scheme"], "fp32_torch": acc(c_fp32), "ptq": acc(c_ptq), "qat": acc(c_qat),
           "ptq_drop": ptq_drop, "qat_drop": qat_drop, "qat_vs_ptq": paired_drop(c_qat, c_ptq),
           "fraction_recovered": None if recovered is None else round(recovered, 3),
           "tflite_vs_simulated": {"top1_agreement": round(float((out_qat.argmax(1) == sim.argmax(1)).mean()), 4),
                                   "max_abs_diff": float(np.abs(out_qat - sim).max()),
                                   "simulated_max_abs": float(np.abs(sim).max()), "n": int(len(sim))},
           "ptq_seconds": round(ptq_seconds, 1), "qat_train_seconds": round(train_seconds, 1),
           "qat_convert_seconds": round(art["seconds"], 1), "qat_float_ops": art["float_op_counts"],
           "record": rec, "epochs_run": fin["epochs_run"], "best_epoch": fin["best_epoch"],
           "val_simulated": fin["eval_acc"], "stopped": fin["stopped"]}
    log(f"seed {seed} TFLite: PTQ drop {ptq_drop['drop']} +- {ptq_drop['se']}, QAT drop {qat_drop['drop']} +- "
        f"{qat_drop['se']}, TFLite vs simulated agreement {row['tflite_vs_simulated']['top1_agreement']}")
    return row


def run_seed(name: str, seed: int, args, log) -> dict:
    model, info = planted_baseline(name, seed, args, log)
    task = task_for(name)
    calib = task.train.sample(256, seed=0)
    example = (torch.zeros(1, 1, 32, 32),)
    per_tensor = Quantization(scheme="fixed", activation_type="QUInt8", weight_type="QInt8", per_channel=False)
    per_channel = per_tensor.model_copy(update={"per_channel": True})
    row = {"seed": seed, "baseline": info, "scheme": "U8S8, per-tensor weights, MinMax, 256 calibration samples"}
    with tempfile.TemporaryDirectory(prefix="bench-qat-") as tmp:
        tmp = Path(tmp)
        ptq = tmp / "ptq.int8.onnx"
        fp32 = quantize(model, example, per_tensor, calib, ptq)
        quantize_onnx(fp32, tmp / "pc.int8.onnx", calib, per_channel, 1)
        c_fp32, c_ptq, c_pc = correct(fp32, task.test), correct(ptq, task.test), correct(tmp / "pc.int8.onnx", task.test)
        log(f"seed {seed}: fp32 {acc(c_fp32)['top1']}, PTQ per-tensor {acc(c_ptq)['top1']}, per-channel {acc(c_pc)['top1']}")
        ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, patience=2, max_minutes=args.minutes, threads=1, seed=0)
        t0 = time.perf_counter()
        trained, rec = train_qat(model, per_tensor, task.train, task.val, calib, ft,
                                 progress=lambda d: log(f"  QAT epoch {d['epoch']}: loss {d['loss']:.4f}, "
                                                        f"val (simulated int8) {d['eval_acc']:.4f}, {d['seconds']:.0f} s"))
        qat_seconds = time.perf_counter() - t0
        qat = tmp / "qat.int8.onnx"
        c_qat_float = correct(quantize(trained, example, per_tensor, calib, qat), task.test)
        c_qat = correct(qat, task.test)
    ptq_drop, qat_drop = paired_drop(c_fp32, c_ptq), paired_drop(c_fp32, c_qat)
    recovered = (ptq_drop["drop"] - qat_drop["drop"]) / ptq_drop["drop"] if ptq_drop["drop"] > 0 else None
    row.update(fp32=acc(c_fp32), ptq=acc(c_ptq), ptq_per_channel=acc(c_pc),
               ptq_drop=ptq_drop, ptq_per_channel_drop=paired_drop(c_fp32, c_pc), qat_drop=qat_drop,
               qat_vs_ptq=paired_drop(c_qat, c_ptq),
               # the QAT-trained weights run in float: did training itself move the float model?
               qat_weights_in_float=acc(c_qat_float), qat_float_drop=paired_drop(c_fp32, c_qat_float),  # negative drop = QAT better
               fraction_recovered=None if recovered is None else round(recovered, 3),
               qat_seconds=round(qat_seconds, 1),
               qat=acc(c_qat) | {"record": {k: v for k, v in rec.items() if k != "finetune"},
                                 "epochs_run": rec["finetune"]["epochs_run"], "best_epoch": rec["finetune"]["best_epoch"],
                                 "val_simulated": rec["finetune"]["eval_acc"], "stopped": rec["finetune"]["stopped"]})
    log(f"seed {seed}: PTQ drop {ptq_drop['drop']} +- {ptq_drop['se']}, QAT drop {qat_drop['drop']} +- "
        f"{qat_drop['se']}, recovered {row['fraction_recovered']}")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--plant", type=float, default=64.0, help="outlier factor (resnet18 only); 0: the baseline as trained")
    p.add_argument("--seeds", default="0", help="baseline seeds, e.g. 0,1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--minutes", type=float, default=12.0, help="cap per QAT run")
    p.add_argument("--parts", default="onnx,tflite", help="onnx, tflite or both; one part alone keeps the other's saved rows")
    p.add_argument("--wait-minutes", type=float, default=0, help="wait this long for a baseline another run is training")
    p.add_argument("--out", type=Path, default=RESULTS / "compress_qat.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    parts = set(args.parts.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    onnx_rows = {s: run_seed(args.model, s, args, log) for s in seeds} if "onnx" in parts else {}
    tflite_rows = {s: tflite_seed(args.model, s, args, log) for s in seeds} if "tflite" in parts else {}
    load = {"before": load_before, "after": os.getloadavg()}
    # The part not run now is carried over from the saved file (read at the end: a run of the other
    # part may have finished meanwhile), by seed.
    saved = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    old = {r["seed"]: r for r in saved["rows"]}
    commands, loads = dict(saved.get("commands") or {"onnx": saved.get("command")}), dict(saved.get("load_averages") or {})
    rows = []
    for s in seeds:
        row = onnx_rows.get(s) or {k: v for k, v in old.get(s, {}).items() if k != "tflite"}
        if not row:
            raise SystemExit(f"no ONNX row for seed {s}: run --parts onnx first")
        t = tflite_rows.get(s) or old.get(s, {}).get("tflite")
        if t:
            # the same trained baseline on both sides? (the checkpoints are retrained when missing)
            t["same_baseline_as_onnx_row"] = t["fp32_torch"]["top1"] == row["fp32"]["top1"]
            row["tflite"] = t
        rows.append(row)
    # rows of other seeds in the saved file are kept (seeds can run in separate processes)
    rows = sorted(rows + [r for r in saved["rows"] if r["seed"] not in seeds], key=lambda r: r["seed"])
    if not loads and "tflite" in (saved.get("load_average") or {}):
        loads = dict(saved["load_average"])
    for part in parts:
        commands[f"{part} seeds {args.seeds}"], loads[f"{part} seeds {args.seeds}"] = " ".join(sys.argv), load
    fr = [r["fraction_recovered"] for r in rows if r["fraction_recovered"] is not None]
    summary = {"model": args.model, "planted_outliers": args.plant, "seeds": len(rows), "qat_epochs": args.epochs, "qat_lr": args.lr,
               "mean_ptq_drop": round(float(np.mean([r["ptq_drop"]["drop"] for r in rows])), 3),
               "mean_qat_drop": round(float(np.mean([r["qat_drop"]["drop"] for r in rows])), 3),
               "mean_fraction_recovered": round(float(np.mean(fr)), 3) if fr else None,
               "goal": "PTQ loses >= 2 points and QAT recovers >= half of it",
               "goal_met": bool(rows) and all(r["ptq_drop"]["drop"] >= 2 and (r["fraction_recovered"] or 0) >= 0.5
                                             for r in rows)}
    tfl = [r["tflite"] for r in rows if r.get("tflite")]
    if tfl:
        summary["tflite"] = {
            "mean_ptq_drop": round(float(np.mean([t["ptq_drop"]["drop"] for t in tfl])), 3),
            "mean_qat_drop": round(float(np.mean([t["qat_drop"]["drop"] for t in tfl])), 3),
            "n_per_seed": tfl[0]["qat"]["n"], "route": tfl[0]["route"],
            "ptq": "litert-torch PT2E static PTQ of the un-QAT'd model (what model.int8.tflite is without QAT)"}
    out = {"summary": summary, "rows": rows, "machine": machine(), "load_average": load, "load_averages": loads,
           "command": " ".join(sys.argv), "commands": commands}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    log(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
