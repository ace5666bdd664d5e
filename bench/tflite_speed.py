"""TFLite fp32 vs TFLite int8 vs ONNX Runtime int8 latency, ResNet-18 and MobileNetV2 at 224.

    .venv/bin/python bench/tflite_speed.py [--models resnet18 mobilenet_v2] [--calib 32]
                                           [--rounds 5] [--runs 10] [--out bench/results/tflite_speed.json]

Random-init weights (speed does not depend on them). Batch 1, 1 and 2 threads. Variants are
interleaved round by round (the order rotates) so a load change on this shared machine hits
all of them alike; each round reports a median over `--runs` calls, and the figure is the
median of the round medians. Load averages are recorded before and after. The acceptance
figure is TFLite int8 vs TFLite fp32 speed-up on ResNet-18-224 at 1 thread (target >= 2.5x).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import zoo  # noqa: E402
from edgepack.data import Dataset  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.quantize import quantize_onnx  # noqa: E402
from edgepack.runtime import available_runtimes, open_model, time_runs  # noqa: E402
from edgepack.targets import Quantization  # noqa: E402
from edgepack.tflite import convert_fp32, convert_int8  # noqa: E402

VARIANTS = ("tflite_fp32", "tflite_int8", "ort_int8")
TARGET = 2.5


def build(name: str, workdir: Path, calib: Dataset, threads: int) -> tuple[dict, dict]:
    """Convert one model three ways; returns ({variant: path}, conversion records)."""
    torch.manual_seed(0)
    model = getattr(zoo, name)(num_classes=1000).eval()
    example = (torch.zeros(1, 3, 224, 224),)
    paths = {v: workdir / f"{name}.{v}.{'onnx' if v.startswith('ort') else 'tflite'}"
             for v in VARIANTS}
    conv = {}
    keep = ("seconds", "calibration_seconds", "convert_seconds", "process_overhead_seconds",
            "size_bytes", "num_ops", "quantize_ops", "dequantize_ops", "float_op_counts")
    print(f"[{name}] TFLite fp32 ...", flush=True)
    rec = convert_fp32(model, example, paths["tflite_fp32"])
    conv["tflite_fp32"] = {k: rec[k] for k in keep if k in rec}
    print(f"[{name}] TFLite int8 ({len(calib)} calibration samples) ...", flush=True)
    rec = convert_int8(model, example, calib, paths["tflite_int8"], num_calib=len(calib))
    conv["tflite_int8"] = {k: rec[k] for k in keep if k in rec}
    print(f"[{name}] ONNX Runtime int8 ...", flush=True)
    t0 = time.perf_counter()
    fp32_onnx = to_onnx(model, example, workdir / f"{name}.fp32.onnx")
    export_s = time.perf_counter() - t0
    q = Quantization(activation_type="QUInt8", weight_type="QInt8", per_channel=True,
                     calibration_method="MinMax", calibration_samples=len(calib))
    rec = quantize_onnx(fp32_onnx, paths["ort_int8"], calib, q, threads)
    conv["ort_int8"] = {"seconds": export_s + rec["seconds"], "export_seconds": export_s,
                        "quantize_seconds": rec["seconds"],
                        "size_bytes": paths["ort_int8"].stat().st_size,
                        "scheme": "QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax"}
    return paths, conv


def measure(paths: dict, threads: int, rounds: int, runs: int) -> dict:
    runners = {v: open_model(p, threads) for v, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    per_round = {v: [] for v in runners}
    for r in range(rounds):
        order = list(runners)[r % len(runners):] + list(runners)[:r % len(runners)]
        for v in order:
            stats = time_runs(runners[v], [x], warmup=3, runs=runs)
            per_round[v].append(stats["p50"])
    return {v: {"p50_ms": float(np.median(ms)), "round_p50s_ms": [round(m, 3) for m in ms],
                "backend": f"{runners[v].backend} {runners[v].backend_version}"}
            for v, ms in per_round.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--calib", type=int, default=32, help="calibration samples (random data)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/tflite_speed.json")
    args = ap.parse_args()

    calib = Dataset(np.random.default_rng(1).standard_normal((args.calib, 3, 224, 224))
                    .astype(np.float32), None, "random-normal")
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          **{k: v for k, v in available_runtimes().items() if k != "cpu_count"}},
              "loadavg_before": os.getloadavg(), "config": vars(args) | {"out": str(args.out)},
              "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as d:
        for name in args.models:
            paths, conv = build(name, Path(d), calib, max(args.threads))
            entry = {"input": [1, 3, 224, 224], "conversion": conv, "latency": {}, "speedup": {}}
            for t in args.threads:
                print(f"[{name}] timing at {t} thread(s), load {os.getloadavg()[0]:.2f} ...", flush=True)
                lat = measure(paths, t, args.rounds, args.runs)
                lat["loadavg"] = os.getloadavg()
                entry["latency"][str(t)] = lat
                entry["speedup"][str(t)] = {
                    "tflite_int8_vs_tflite_fp32": lat["tflite_fp32"]["p50_ms"] / lat["tflite_int8"]["p50_ms"],
                    "tflite_int8_vs_ort_int8": lat["ort_int8"]["p50_ms"] / lat["tflite_int8"]["p50_ms"],
                }
            result["models"][name] = entry
    result["loadavg_after"] = os.getloadavg()
    if "resnet18" in result["models"] and "1" in result["models"]["resnet18"]["speedup"]:
        s = result["models"]["resnet18"]["speedup"]["1"]["tflite_int8_vs_tflite_fp32"]
        result["acceptance"] = {"figure": "ResNet-18-224, 1 thread, TFLite int8 vs TFLite fp32",
                                "speedup": s, "target": TARGET, "met": s >= TARGET}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    for name, e in result["models"].items():
        for t, lat in e["latency"].items():
            cells = "  ".join(f"{v} {lat[v]['p50_ms']:.2f} ms" for v in VARIANTS)
            sp = e["speedup"][t]
            print(f"{name:13s} {t}T  {cells}  int8/fp32 x{sp['tflite_int8_vs_tflite_fp32']:.2f}"
                  f"  vs ORT int8 x{sp['tflite_int8_vs_ort_int8']:.2f}")
    if "acceptance" in result:
        a = result["acceptance"]
        print(f"acceptance: {a['figure']} = x{a['speedup']:.2f} (target >= {a['target']}): "
              f"{'met' if a['met'] else 'NOT met'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
