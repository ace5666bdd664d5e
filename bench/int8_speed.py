"""int8 vs fp32 latency on x86: edgepack's scheme against plain `quantize_static` defaults, and
against edgepack's scheme with signed activations (the one change, to back the profile's choice).

ResNet-18 and MobileNetV2 at 224x224 (edgepack.zoo, own definitions), batch 1, 1 and 2 threads,
interleaved in one run. Writes bench/results/int8_speed.json.
    python bench/int8_speed.py [--rounds 7] [--models resnet18,mobilenet_v2]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, save  # noqa: E402

from fixtures import zoo  # noqa: E402
from edgepack.data import Dataset  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.quantize import DatasetReader, quantize_onnx  # noqa: E402
from edgepack.runtime import OnnxRunner  # noqa: E402
from edgepack.targets import load_profile  # noqa: E402


def plain_default(fp32: Path, out: Path, calib: Dataset) -> None:
    """What a user gets from ONNX Runtime's quantize_static with nothing but defaults."""
    from onnxruntime.quantization import quantize_static
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        quantize_static(str(fp32), str(out), DatasetReader.for_model(fp32, calib))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--calib-samples", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    q = load_profile("x86").quantization
    doc = {"benchmark": "int8_speed", "scheme": q.model_dump(), "machine": machine(), "models": {}}
    for name in args.models.split(","):
        model = getattr(zoo, name)().eval()
        calib = Dataset(np.random.default_rng(0).standard_normal((args.calib_samples, 3, 224, 224)).astype(np.float32))
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            fp32 = to_onnx(model, (torch.zeros(1, 3, 224, 224),), d / "fp32.onnx")
            quantize_onnx(fp32, d / "edgepack.onnx", calib, q)
            quantize_onnx(fp32, d / "signed_act.onnx", calib, q.model_copy(update={"activation_type": "QInt8"}))
            plain_default(fp32, d / "plain.onnx", calib)
            variants = ("fp32", "edgepack", "signed_act", "plain")
            sizes = {k: (d / f"{k}.onnx").stat().st_size for k in variants}
            x = [calib.x[:1]]
            result = {"size_bytes": sizes}
            for threads in (1, 2):
                runners = {k: OnnxRunner(d / f"{k}.onnx", threads) for k in variants}
                t = interleaved(runners, x, rounds=args.rounds)
                result[f"threads_{threads}"] = {
                    "latency_ms": t,
                    "speedup_edgepack_int8": t["fp32"]["p50"] / t["edgepack"]["p50"],
                    "speedup_plain_default_int8": t["fp32"]["p50"] / t["plain"]["p50"],
                    "speedup_edgepack_signed_activations": t["fp32"]["p50"] / t["signed_act"]["p50"],
                }
                print(f"{name} {threads}t: fp32 {t['fp32']['p50']:.2f} ms, edgepack int8 "
                      f"{t['edgepack']['p50']:.2f} ms ({result[f'threads_{threads}']['speedup_edgepack_int8']:.2f}x), "
                      f"same with signed activations {t['signed_act']['p50']:.2f} ms "
                      f"({result[f'threads_{threads}']['speedup_edgepack_signed_activations']:.2f}x), "
                      f"plain quantize_static {t['plain']['p50']:.2f} ms "
                      f"({result[f'threads_{threads}']['speedup_plain_default_int8']:.2f}x)", flush=True)
        doc["models"][f"{name}_224"] = result
    print(f"wrote {save('int8_speed', doc)}")


if __name__ == "__main__":
    main()
