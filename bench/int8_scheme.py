"""The x86 int8 schemes side by side: U8S8, U8S8 with reduce_range (7-bit weights), U8U8, S8S8.

ResNet-18 and MobileNetV2 at 224x224 (tests/fixtures/zoo.py, random weights with BatchNorm
statistics recalibrated on random inputs: with the initial statistics every layer's output
collapsed and the scores were the same for every input), and a ResNet-18 (quarter width, 32x32)
trained for a few minutes on tests/fixtures/tasks.py's noisy digits (cached), each quantized by
edgepack's `quantize_onnx` with each scheme (MinMax, per-channel), then:
- latency, 1 thread, batch 1, interleaved rounds (bench/common.py) on this host;
- agreement with fp32 (top-1 of the scores) and SQNR of the scores on `--samples` random inputs
  (224 models) or on the labelled test split (trained model: also its top-1 accuracy), with this
  host's kernels (on a VNNI host: no saturation; on an AVX2-only host U8S8 saturates natively);
- the same agreement with the kernels of an x86 CPU *without* VNNI: every int8 model is run again
  under `qemu-x86_64-static -cpu Haswell` (AVX2, no AVX-512, no VNNI), where ONNX Runtime picks its
  AVX2 kernels (vpmaddubsw), on the first `--emulated-samples` inputs of the 224 models (ResNet-18
  takes ~15 s a sample there) and the whole test split of the trained one; the host's figures on
  the same samples are stored beside them. A probe (MatMulInteger, 255 x 127 pairs) shows the
  kernels saturate there and not here. Emulated *outputs* are the real kernels' outputs; emulated
  timings mean nothing and are not reported;
- how many convolutions ORT's optimizer turned into integer kernels (QLinearConv), here and under
  the emulated CPU.
Latency is timed for the 224 models only. About 45 min on the shared 2-core machine (load 6-12),
most of it emulation; without qemu-user-static (or with --no-emulate) a few minutes.
Writes bench/results/int8_scheme.json.
    python bench/int8_scheme.py [--rounds 7] [--models resnet18,mobilenet_v2] [--samples 64]
                                [--emulated-samples 16] [--no-emulate] [--no-trained]
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, save  # noqa: E402

from fixtures import zoo  # noqa: E402
from edgepack.data import Dataset  # noqa: E402
from edgepack.onnx_tools import quantize as quantize_module  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.quality import fidelity  # noqa: E402
from edgepack.runtime import OnnxRunner  # noqa: E402
from edgepack.scheme import scheme_name  # noqa: E402
from edgepack.targets import load_profile  # noqa: E402

SCHEMES = {  # label -> (activation_type, weight_type, reduce_range)
    "U8S8": ("QUInt8", "QInt8", False),
    "U8S8_reduce_range": ("QUInt8", "QInt8", True),
    "U8U8": ("QUInt8", "QUInt8", False),
    "S8S8": ("QInt8", "QInt8", False),
}
EMULATED_CPU = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI (QEMU 7.2's TCG has AVX2, not AVX-512)

# Run on the device side (host or emulated CPU): each model on the samples, the optimized graph's
# integer convolutions, and the saturation probe. Standard library + numpy + onnxruntime only.
_RUNNER = r'''
import json, sys
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
job = json.loads(sys.argv[1])
def session(path, optimized=None):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
    if optimized: so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
def probe():
    k = 64  # u8 255 x s8 127: exact sum 255*127*64; a saturating int16 pair sum gives 32767*32
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
        [numpy_helper.from_array(np.full((k, 4), 127, np.int8), "b"),
         numpy_helper.from_array(np.array(0, np.uint8), "za"), numpy_helper.from_array(np.array(0, np.int8), "zb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": np.full((1, k), 255, np.uint8)})[0]
    return {"exact": 255 * 127 * k, "got": int(y[0, 0]), "saturated": int(y[0, 0]) != 255 * 127 * k}
x = np.load(job["inputs"])
out = {"probe": probe(), "ops": {}}
for label, path in job["models"].items():
    opt = path + ".opt.onnx"
    s = session(path, opt)
    ops = [n.op_type for n in onnx.load(opt).graph.node]
    out["ops"][label] = {op: ops.count(op) for op in sorted(set(ops)) if "Conv" in op or op == "MatMulInteger"}
    name = s.get_inputs()[0].name
    np.save(job["outputs"][label], np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]))
print(json.dumps(out))
'''


@contextmanager
def reduce_range_through_quantize_onnx(on: bool):
    """quantize_onnx does not (yet) pass Quantization.reduce_range to ORT's quantize_static; until it
    does, hand it over by wrapping the quantize_static that quantize_onnx calls, so everything else
    (pre-pass, data reader, extra options) stays exactly edgepack's."""
    passes_it = "reduce_range" in inspect.getsource(quantize_module.quantize_onnx)
    if not on or passes_it:
        yield passes_it
        return
    original = quantize_module.quantize_static
    quantize_module.quantize_static = functools.partial(original, reduce_range=True)
    try:
        yield False
    finally:
        quantize_module.quantize_static = original


def weight_range(path: Path) -> list[int]:
    """Lowest and highest stored integer weight (conv/gemm initializers of 8-bit type)."""
    m = onnx.load(str(path))
    lo, hi = 255, -128
    for t in m.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2:
            a = onnx.numpy_helper.to_array(t).astype(np.int32)
            lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    return [lo, hi]


def agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    return {"top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
            "sqnr_db": fidelity(ref, out)["sqnr_db"]}


def run_side(files: dict, x_path: Path, work: Path, emulate: bool) -> dict:
    """_RUNNER on this host's CPU, or on the emulated non-VNNI CPU; outputs come back as .npy files."""
    job = {"inputs": str(x_path), "models": {k: str(p) for k, p in files.items()},
           "outputs": {k: str(work / f"{k}.{'emu' if emulate else 'host'}.npy") for k in files}}
    cmd = [sys.executable, "-c", _RUNNER, json.dumps(job)]
    if emulate:
        cmd = [shutil.which("qemu-x86_64-static"), "-cpu", EMULATED_CPU] + cmd
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{'emulated' if emulate else 'host'} run failed: {r.stderr[-2000:]}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc["outputs"] = {k: np.load(p) for k, p in job["outputs"].items()}
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    return doc


def recalibrate_batchnorm(model: torch.nn.Module, shape: tuple, batches: int = 4) -> torch.nn.Module:
    """BatchNorm statistics of random inputs (a cumulative average), so that each layer's output is
    normalised and still depends on the input, as in a trained network."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, *shape[1:], generator=g))
    return model.eval()


def trained_digits(cache: Path, epochs: int = 6) -> tuple[torch.nn.Module, object, dict]:
    """ResNet-18, quarter width, 1x32x32, trained on noisy digits (SGD, cosine, 1 thread); cached."""
    from safetensors.torch import load_file, save_file
    from fixtures.tasks import noisy_digits
    task = noisy_digits(seed=0)
    model = zoo.resnet18(10, 1, small_input=True, width=0.25)
    path = cache / f"int8_scheme_digits_resnet18q_{epochs}ep_{task.train.fingerprint()[:12]}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), task, {"epochs": epochs, "cached": True, "weights": str(path)}
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(task.train) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for (xb,), yb in task.train.batches(64, shuffle=True, seed=epoch):
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  digits epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model.eval(), task, {"epochs": epochs, "cached": False, "train_seconds": round(time.perf_counter() - t0, 1)}


def compare(model: torch.nn.Module, shape: tuple, calib: Dataset, x: np.ndarray, labels: np.ndarray | None,
            base, emulate: int, rounds: int | None) -> dict:
    """Quantize `model` with every scheme; quality on this host and on the emulated non-VNNI CPU
    (the first `emulate` samples; 0: not emulated); latency on this host when `rounds`."""
    def quality(ref, out):
        doc = agreement(ref[:len(out)], out)
        if labels is not None:
            doc["top1_accuracy"] = float((out.argmax(1) == labels[:len(out)]).mean())
        return doc

    with tempfile.TemporaryDirectory(prefix="int8-scheme-") as d:
        d = Path(d)
        files = {"fp32": to_onnx(model, (torch.zeros(1, *shape[1:]),), d / "fp32.onnx")}
        result = {"schemes": {}, "samples": len(x)}
        for label, (act, wt, rr) in SCHEMES.items():
            q = base.model_copy(update={"activation_type": act, "weight_type": wt, "reduce_range": rr})
            files[label] = d / f"{label}.onnx"
            with reduce_range_through_quantize_onnx(rr) as native:
                rec = quantize_module.quantize_onnx(files["fp32"], files[label], calib, q)
            s = result["schemes"][label] = {"scheme": scheme_name(q), "quantize_seconds": rec["seconds"],
                                            "weight_int_range": weight_range(files[label]),
                                            "size_bytes": files[label].stat().st_size}
            if rr:
                s["reduce_range_via"] = "quantize_onnx" if native else "quantize_static(reduce_range=True) wrapped"
        np.save(d / "x.npy", x)
        host = run_side(files, d / "x.npy", d, emulate=False)
        ref = host["outputs"]["fp32"]
        if labels is not None:
            result["fp32_top1_accuracy"] = float((ref.argmax(1) == labels).mean())
        result["saturation_probe_host"] = host["probe"]
        for label in SCHEMES:
            result["schemes"][label]["host"] = quality(ref, host["outputs"][label]) | {
                "integer_conv_ops": host["ops"][label]}
        if rounds:
            t = interleaved({k: OnnxRunner(p, 1) for k, p in files.items()}, [x[:1]], rounds=rounds)
            result["latency_ms_1_thread"] = t
            for label in SCHEMES:
                h = result["schemes"][label]["host"]
                h["p50_ms"], h["speedup_vs_fp32"] = t[label]["p50"], t["fp32"]["p50"] / t[label]["p50"]
        if emulate:
            np.save(d / "x_emulated.npy", x[:emulate])
            emu = run_side({k: p for k, p in files.items() if k != "fp32"}, d / "x_emulated.npy", d, emulate=True)
            result["saturation_probe_emulated"], result["emulated_seconds"] = emu["probe"], emu["seconds"]
            result["emulated_samples"] = min(emulate, len(x))
            # The same samples on this host, so both CPUs are compared on equal footing.
            for label in SCHEMES:
                result["schemes"][label]["host_on_emulated_samples"] = quality(ref, host["outputs"][label][:emulate])
            for label in SCHEMES:
                result["schemes"][label]["emulated_no_vnni"] = quality(ref, emu["outputs"][label]) | {
                    "integer_conv_ops": emu["ops"][label]}
    return result


def show(name: str, result: dict) -> None:
    t = result.get("latency_ms_1_thread")
    acc = result.get("fp32_top1_accuracy")
    print(f"{name}: " + (f"fp32 {t['fp32']['p50']:.2f} ms (1 thread)" if t else "")
          + (f" fp32 top-1 {acc:.3f}" if acc is not None else ""), flush=True)

    def q(doc):
        extra = f", top-1 {doc['top1_accuracy']:.3f}" if "top1_accuracy" in doc else ""
        return f"agree {doc['top1_agreement']:.3f}, SQNR {doc['sqnr_db']:.1f} dB{extra}"
    n, m = result["samples"], result.get("emulated_samples")
    for s in result["schemes"].values():
        h, e = s["host"], s.get("emulated_no_vnni")
        speed = f"{h['p50_ms']:6.2f} ms ({h['speedup_vs_fp32']:.2f}x) | " if "p50_ms" in h else ""
        print(f"  {s['scheme']:18s} {speed}{HOST}, {n} samples: {q(h)}"
              + (f" | {m} samples, {HOST}: {q(s['host_on_emulated_samples'])}, AVX2 no VNNI (emulated): {q(e)}"
                 if e else ""), flush=True)


# What the host's kernels are: the figures above were first taken on a VNNI Xeon, and the same
# script has since run on an AVX2-only AMD EPYC, where U8S8 saturates natively.
_flags = machine()["int8_flags"]
HOST = "VNNI host" if any("vnni" in f for f in _flags) else f"host without VNNI ({', '.join(_flags) or 'no int8 flags'})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64, help="random inputs for agreement with fp32 (224 models)")
    ap.add_argument("--no-emulate", action="store_true", help="skip the emulated non-VNNI CPU")
    ap.add_argument("--emulated-samples", type=int, default=16,
                    help="samples of the 224 models run under emulation (ResNet-18 takes ~15 s each there)")
    ap.add_argument("--no-trained", action="store_true", help="skip the trained noisy-digits model")
    ap.add_argument("--out", default="int8_scheme",
                    help="result name in bench/results/ (e.g. int8_scheme_avx2 on a host without VNNI)")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/edgepack").expanduser())
    args = ap.parse_args()
    torch.set_num_threads(1)
    emulate = not args.no_emulate and shutil.which("qemu-x86_64-static") is not None
    base = load_profile("x86").quantization.model_copy(update={"scheme": "fixed"})
    doc = {"benchmark": "int8_scheme", "calibration": base.calibration_method, "per_channel": base.per_channel,
           "calibration_samples": args.calib_samples, "samples": args.samples, "threads": 1,
           "machine": machine(), "emulated_cpu": f"qemu-x86_64-static -cpu {EMULATED_CPU}" if emulate else None,
           "models": {}}
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        shape = (1, 3, 224, 224)
        model = recalibrate_batchnorm(getattr(zoo, name)(), shape)
        rng = np.random.default_rng(0)
        calib = Dataset(rng.standard_normal((args.calib_samples, *shape[1:])).astype(np.float32))
        x = rng.standard_normal((args.samples, *shape[1:])).astype(np.float32)  # disjoint from calib
        doc["models"][f"{name}_224"] = result = compare(model, shape, calib, x, None, base,
                                                        emulate and args.emulated_samples, args.rounds)
        result["weights"] = "random, BatchNorm statistics recalibrated on random inputs"
        show(f"{name}-224", result)
    if not args.no_trained:
        model, task, info = trained_digits(args.cache)
        calib = task.train.sample(args.calib_samples * 2, seed=0)
        x, labels = task.test.x, task.test.y
        result = compare(model, task.input_shape, calib, np.asarray(x, np.float32), labels, base,
                         emulate and len(labels), None)
        doc["models"]["resnet18_quarter_digits_32"] = result | {"weights": "trained on noisy digits", "training": info,
                                                                "test_samples": len(labels)}
        show("resnet18-quarter-digits-32 (trained)", result)
    print(f"wrote {save(args.out, doc)}")


if __name__ == "__main__":
    main()
