"""fp16 vs fp32 on this x86 machine: size, latency (1 thread, interleaved) and SQNR of the outputs,
for ONNX Runtime (model.fp16.onnx from edgepack.onnx_tools.fp16) and LiteRT (model.fp16.tflite,
fp16 weights from edgepack.tflite.fp16), on ResNet-18 and MobileNetV2 at 224x224.

What this machine can say: the size, the error, and what fp16 costs or saves on a CPU without
fp16 arithmetic. Whether fp16 is faster needs an ARM core with ARMv8.2-FP16 (Pi 5, phones),
which this machine is not; the emulated Pi's timings mean nothing.

    .venv/bin/python bench/fp16_speed.py [--rounds 7] [--models resnet18,mobilenet_v2]
Writes bench/results/fp16_speed.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, save  # noqa: E402

from fixtures import zoo  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.fp16 import to_fp16  # noqa: E402
from edgepack.runtime import open_model  # noqa: E402

MODELS = {"resnet18": lambda: zoo.resnet18(1000, 3), "mobilenet_v2": lambda: zoo.mobilenet_v2(1000, 3)}


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref ** 2)) / noise)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--no-tflite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    doc = {"machine": machine(), "threads": 1, "rounds": args.rounds, "models": {}}
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        x = torch.from_numpy(rng.standard_normal((1, 3, 224, 224), dtype=np.float32))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = {"onnx fp32": to_onnx(model, (x,), tmp / "m.onnx")}
            to_fp16(files["onnx fp32"], tmp / "m16.onnx")
            files["onnx fp16"] = tmp / "m16.onnx"
            if not args.no_tflite:
                from edgepack.tflite import convert_fp32
                from edgepack.tflite.fp16 import convert_fp16
                convert_fp32(model, (x,), tmp / "m.tflite")
                convert_fp16(tmp / "m.tflite", tmp / "m16.tflite")
                files["tflite fp32"], files["tflite fp16"] = tmp / "m.tflite", tmp / "m16.tflite"
            runners = {k: open_model(p, threads=1) for k, p in files.items()}
            outs = {k: r.run([x.numpy()])[0] for k, r in runners.items()}
            timing = interleaved(runners, [x.numpy()], rounds=args.rounds, runs_per_round=5, warmup=3)
            entry = {}
            for k, p in files.items():
                fmt = k.split()[0]
                entry[k] = {"size_mb": p.stat().st_size / 1e6, **timing[k],
                            "sqnr_db_vs_fp32": sqnr_db(outs[f"{fmt} fp32"], outs[k])}
            for fmt in ("onnx", "tflite"):
                if f"{fmt} fp16" in entry:
                    entry[f"{fmt} fp16"]["speed_vs_fp32"] = entry[f"{fmt} fp32"]["p50"] / entry[f"{fmt} fp16"]["p50"]
                    entry[f"{fmt} fp16"]["size_vs_fp32"] = entry[f"{fmt} fp16"]["size_mb"] / entry[f"{fmt} fp32"]["size_mb"]
            doc["models"][name] = entry
            print(name, {k: {kk: round(vv, 3) for kk, vv in v.items() if kk != "runs"} for k, v in entry.items()},
                  flush=True)
    doc["note"] = ("x86 has no fp16 arithmetic: ONNX Runtime runs fp16 ops through Casts or its few fp16 kernels, "
                   "LiteRT dequantizes fp16 weights at load. Speed on ARMv8.2-FP16 cores is not measured here.")
    print("->", save("fp16_speed", doc))


if __name__ == "__main__":
    main()
