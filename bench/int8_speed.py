"""int8 vs fp32 on x86, against peers: edgepack's scheme (the x86 profile's Quantization through
`quantize_onnx`, then the `qdq_tidy` graph pass), NNCF's post-training quantization (default
preset) and ONNX Runtime's `quantize_static` with its defaults, all from the same fp32 ONNX file.

- Latency: ResNet-18 and MobileNetV2 at 224x224 (tests/fixtures zoo), batch 1, 1 thread, every
  variant in one interleaved run. Two clocks: wall time (what a user sees) and the process's CPU
  time per inference (what the kernels cost: the shared machine's load preempts the wall clock,
  not the CPU clock). OpenVINO running the same QDQ files is measured beside ONNX Runtime.
- Accuracy: random weights say little about quantization error (NNCF gave 0% agreement on a
  random MobileNetV2), so the same architectures are trained on the noisy-digits task (32x32,
  cached under ~/.cache/edgepack) and every int8 variant is compared with its fp32 model on the
  test split: top-1, agreement with fp32 top-1, cosine and SQNR of the logits. The 224 models
  (random weights, BatchNorm statistics recalibrated on the calibration inputs so that outputs
  depend on the input) get agreement, cosine and SQNR on random inputs.
- Where the time goes: bench/int8_profile.py's per-op-type table for each variant.

    .venv/bin/python bench/int8_speed.py [--rounds 9] [--models resnet18,mobilenet_v2]
Writes bench/results/int8_speed.json. Needs bench/requirements-peers.txt installed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, save  # noqa: E402
from int8_profile import by_op_type, profile  # noqa: E402

from fixtures import zoo  # noqa: E402
from fixtures.tasks import noisy_digits  # noqa: E402
from edgepack.data import Dataset  # noqa: E402
from edgepack.onnx_tools.export import to_onnx  # noqa: E402
from edgepack.onnx_tools.qdq_tidy import tidy_qdq  # noqa: E402
from edgepack.onnx_tools.quantize import DatasetReader, quantize_onnx  # noqa: E402
from edgepack.prune import FinetuneConfig, evaluate, finetune  # noqa: E402
from edgepack.runtime import OnnxRunner  # noqa: E402
from edgepack.targets import load_profile  # noqa: E402

# The trained stand-ins for accuracy: test top-1 in tests/fixtures/tasks.py's docstring.
TRAINED = {"resnet18": dict(factory=lambda: zoo.resnet18(10, 1, small_input=True, width=0.25), width=0.25, epochs=6, copies=2),
           "mobilenet_v2": dict(factory=lambda: zoo.mobilenet_v2(10, 1, 0.35, small_input=True), width=0.35, epochs=10, copies=3)}


class CpuTimed:
    """A runner that also records the process CPU time of each run (ms)."""

    def __init__(self, runner):
        self.runner, self.cpu_ms = runner, []

    def run(self, inputs):
        t0 = time.process_time_ns()
        out = self.runner.run(inputs)
        self.cpu_ms.append((time.process_time_ns() - t0) / 1e6)
        return out


class OpenVinoRunner:
    """OpenVINO's CPU plugin on an ONNX file (it runs QDQ models with int8 kernels), f32 elsewhere."""

    def __init__(self, path: Path, threads: int = 1):
        import openvino as ov
        self.model = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.model.create_infer_request()

    def run(self, inputs):
        self.request.infer({i: np.ascontiguousarray(a) for i, a in enumerate(inputs)})
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.model.outputs))]


def ort_defaults(fp32: Path, out: Path, calib: Dataset) -> dict:
    """What a user gets from ONNX Runtime's quantize_static with nothing but defaults."""
    from onnxruntime.quantization import quantize_static
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        quantize_static(str(fp32), str(out), DatasetReader.for_model(fp32, calib))
    return {"seconds": round(time.perf_counter() - t0, 2)}


def nncf_default(fp32: Path, out: Path, calib: Dataset) -> dict:
    """NNCF's post-training quantization of the ONNX model, default preset and subset size."""
    import nncf
    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    samples = [calib.x[i:i + 1] for i in range(len(calib))]
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        q = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(samples, lambda x: {name: x}))
    onnx.save(q, str(out))
    return {"seconds": round(time.perf_counter() - t0, 2), "nncf": nncf.__version__, "calibration_samples": len(samples)}


def edgepack_scheme(fp32: Path, out: Path, calib: Dataset, tidy: bool = True) -> dict:
    q = load_profile("x86").quantization
    record = quantize_onnx(fp32, out, calib, q)
    if tidy:
        t0 = time.perf_counter()
        record["tidy"] = tidy_qdq(out)
        record["tidy"]["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def quantize_all(fp32: Path, d: Path, calib: Dataset) -> tuple[dict, dict]:
    """label -> path of every int8 variant, and label -> how it was made."""
    paths, records = {"fp32": fp32}, {}
    for label, make in (("edgepack", lambda o: edgepack_scheme(fp32, o, calib, tidy=True)),
                        ("edgepack_untidied", lambda o: edgepack_scheme(fp32, o, calib, tidy=False)),
                        ("nncf", lambda o: nncf_default(fp32, o, calib)),
                        ("ort_defaults", lambda o: ort_defaults(fp32, o, calib))):
        paths[label] = d / f"{label}.onnx"
        records[label] = make(paths[label])
    return paths, records


def recalibrate_batchnorm(model: torch.nn.Module, x: np.ndarray) -> torch.nn.Module:
    """Random weights with the initial BatchNorm statistics collapse every layer's output (the
    scores come out the same for every input); statistics measured on the inputs fix that."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 8):
            model(torch.from_numpy(x[i:i + 8]))
    return model.eval()


def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict:
    ref, out = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)
    noise = np.sum((ref - out) ** 2)
    r = {"agreement": float(np.mean(ref.argmax(1) == out.argmax(1))), "cosine_mean": float(cos.mean()),
         "cosine_min": float(cos.min()), "sqnr_db": float(10 * np.log10(np.sum(ref ** 2) / noise)) if noise > 0 else None}
    if labels is not None:
        r["top1"] = float(np.mean(out.argmax(1) == labels))
    return r


def outputs(runner, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.run([x[i:i + batch]])[0] for i in range(0, len(x), batch)])


def accuracy(paths: dict, x: np.ndarray, labels: np.ndarray | None, openvino: bool, batch: int = 32) -> dict:
    ref = outputs(OnnxRunner(paths["fp32"], 2), x, batch)
    res = {"samples": len(x), "fp32_distinct_top1": int(len(np.unique(ref.argmax(1))))}
    if labels is not None:
        res["fp32_top1"] = float(np.mean(ref.argmax(1) == labels))
    for label, p in paths.items():
        if label != "fp32":
            res[label] = compare(ref, outputs(OnnxRunner(p, 2), x, batch), labels)
    if openvino:
        for label in ("fp32", "edgepack", "nncf"):
            res[f"openvino_{label}"] = compare(ref, np.concatenate([OpenVinoRunner(paths[label], 2).run([x[i:i + 1]])[0]
                                                                    for i in range(len(x))]), labels)
    return res


def latency(paths: dict, x: np.ndarray, rounds: int, openvino: bool, warmup: int = 5) -> dict:
    runners = {k: CpuTimed(OnnxRunner(p, 1)) for k, p in paths.items()}
    if openvino:
        runners.update({f"openvino_{k}": CpuTimed(OpenVinoRunner(paths[k], 1)) for k in ("fp32", "edgepack", "edgepack_untidied", "nncf")})
    t = interleaved(runners, [x], rounds=rounds, warmup=warmup)
    for k, r in runners.items():
        cpu = r.cpu_ms[warmup:]
        t[k].update(cpu_p50=float(np.median(cpu)), cpu_p90=float(np.percentile(cpu, 90)))
    base_wall, base_cpu = t["fp32"]["p50"], t["fp32"]["cpu_p50"]
    ratios = {k: {"wall": round(base_wall / v["p50"], 3), "cpu": round(base_cpu / v["cpu_p50"], 3)} for k, v in t.items()}
    return {"ms": t, "speedup_vs_ort_fp32": ratios}


def trained(name: str, cache: Path):
    """The noisy-digits model `name`, trained once (deterministic for a seed) and cached."""
    from safetensors.torch import load_file, save_file
    spec = TRAINED[name]
    task = noisy_digits(seed=0, train_copies=spec["copies"])
    key = hashlib.sha1(f"{name}-{spec['width']}-{spec['epochs']}-{task.train.fingerprint()}-{torch.__version__}".encode()).hexdigest()[:12]
    path = cache / f"int8_speed_{name}_{key}.safetensors"
    model = spec["factory"]()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), task, {**json.loads(path.with_suffix(".json").read_text()), "cached": True}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    finetune(model, None, task.train, task.val, FinetuneConfig(epochs=spec["epochs"], lr=0.05, seed=0, patience=None,
                                                               distill=False, threads=1),
             lambda d: print(f"  {name} epoch {d.get('epoch')}: val {d.get('eval_acc')}", flush=True))
    info = {"epochs": spec["epochs"], "train_seconds": round(time.perf_counter() - t0, 1),
            "test_acc": evaluate(model.eval(), task.test)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps(info))
    return model.eval(), task, {**info, "cached": False}


def trained_accuracy(name: str, cache: Path, calib_samples: int, openvino: bool) -> dict:
    model, task, info = trained(name, cache)
    calib = task.train.sample(calib_samples, seed=0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp32 = to_onnx(model, (torch.zeros(task.input_shape),), d / "fp32.onnx")
        paths, records = quantize_all(fp32, d, calib)
        res = accuracy(paths, np.asarray(task.test.x), task.test.y, openvino)
    return {"model": f"{name} trained on noisy_digits 32x32", "training": info, "quantize": records, **res}


def print_row(name: str, lat: dict, acc: dict | None):
    for k, r in lat["speedup_vs_ort_fp32"].items():
        a = (acc or {}).get(k) or {}
        extra = f"agreement {a['agreement']:.3f} top-1 {a.get('top1', float('nan')):.3f} cos {a['cosine_mean']:.4f}" if a else ""
        print(f"  {name:14s} {k:22s} wall {lat['ms'][k]['p50']:7.2f} ms ({r['wall']:.2f}x)  cpu "
              f"{lat['ms'][k]['cpu_p50']:7.2f} ms ({r['cpu']:.2f}x)  {extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--calib-samples", type=int, default=32, help="random-input calibration of the 224 models")
    ap.add_argument("--accuracy-calib-samples", type=int, default=256)
    ap.add_argument("--profile-runs", type=int, default=40)
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGEPACK_CACHE", "~/.cache/edgepack")).expanduser())
    args = ap.parse_args()
    openvino = not args.no_openvino
    torch.manual_seed(0)
    torch.set_num_threads(1)
    doc = {"benchmark": "int8_speed", "scheme": load_profile("x86").quantization.model_dump(), "machine": machine(),
           "threads": 1, "clocks": "wall p50 and process CPU p50 per inference, interleaved rounds", "models": {}}
    for name in args.models.split(","):
        calib = Dataset(np.random.default_rng(0).standard_normal((args.calib_samples, 3, 224, 224)).astype(np.float32))
        x = np.random.default_rng(1).standard_normal((32, 3, 224, 224)).astype(np.float32)
        model = recalibrate_batchnorm(getattr(zoo, name)(), np.asarray(calib.x))
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            fp32 = to_onnx(model, (torch.zeros(1, 3, 224, 224),), d / "fp32.onnx")
            paths, records = quantize_all(fp32, d, calib)
            result = {"quantize": records, "size_bytes": {k: p.stat().st_size for k, p in paths.items()},
                      "random_weights_output_error": accuracy(paths, x, None, openvino=False, batch=8)}
            load = os.getloadavg()
            result["latency"] = latency(paths, x[:1], args.rounds, openvino)
            result["latency"]["loadavg_before_after"] = [list(load), list(os.getloadavg())]
            prof = profile(paths, {"input": x[:1]}, runs=args.profile_runs)
            result["profile_by_op_type"] = {k: {"total_node_ms": round(v["total_ms"], 3), "ops": by_op_type(v["nodes"])}
                                            for k, v in prof.items()}
        if not args.no_accuracy:
            result["trained_accuracy"] = trained_accuracy(name, args.cache, args.accuracy_calib_samples, openvino)
        doc["models"][f"{name}_224"] = result
        print(f"{name} (load {load[0]:.1f}):")
        print_row(name, result["latency"], result.get("trained_accuracy"))
    print(f"wrote {save('int8_speed', doc)}")


if __name__ == "__main__":
    main()
