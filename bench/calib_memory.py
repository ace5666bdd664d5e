"""Peak memory of int8 calibration and of the fallback's sensitivity: edgepack's bounded
calibrator vs ONNX Runtime's stock one, MinMax / Entropy / Percentile.

MobileNetV2-224 (tests/fixtures/zoo.py), 512 random-normal calibration samples (3x224x224), each
variant `quantize_onnx` in a fresh subprocess: the data is made there first (it is resident in a
real build too), then the peak is reset (/proc/self/clear_refs) and VmHWM read after the call.
A watchdog in this process kills a variant whose resident memory passes --kill-gb (stock
histogram calibration keeps every intermediate of every sample). Variants are interleaved, round
after round; the load average is recorded with each. Then the same at --fit-samples (64), where
stock calibration fits in memory, for time and agreement side by side. Then `node_sensitivity`
(bounded vs qdq_loss_debug, 32 samples) on MobileNetV2-224 and on a widened ResNet-18 (~26M
parameters), whose bounded MinMax quantization is measured first.

    .venv/bin/python bench/calib_memory.py [--rounds 1] [--samples 512] [--fit-samples 64] [--kill-gb 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402  (also puts tests/ on sys.path for the zoo)

METHODS = ("MinMax", "Entropy", "Percentile")


def status_mb(field: str, pid: str = "self") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the worker: one measured call in a fresh process -------------------------------------------

def worker(task: dict) -> dict:
    from edgepack.data import Dataset
    rng = np.random.default_rng(0)
    x = rng.standard_normal((task["samples"], *task["shape"]), dtype=np.float32)
    data = Dataset(x)
    baseline = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    t0 = time.perf_counter()
    out = {"baseline_mb": round(baseline, 1)}
    if task["kind"] == "quantize":
        from edgepack.onnx_tools.quantize import quantize_onnx
        from edgepack.targets import Quantization
        q = Quantization(calibration_method=task["method"], calibration_samples=task["samples"])
        quantize_onnx(Path(task["fp32"]), Path(task["out"]), data, q, preprocessed=Path(task["pre"]),
                      calibrator=task["calibrator"])
    elif task["calibrator"] == "bounded":
        from edgepack.onnx_tools.sensitivity import node_sensitivity
        out["top10"] = node_sensitivity(Path(task["pre"]), Path(task["int8"]), data)[:10]
    else:
        out["top10"] = qdq_loss_debug_ranking(Path(task["pre"]), Path(task["int8"]), data)[:10]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_mb"] = round(status_mb("VmHWM"), 1)
    out["growth_mb"] = round(out["peak_mb"] - baseline, 1)
    if task["kind"] == "quantize":  # after the peak is read: int8 vs fp32 on a few fresh samples
        out["cosine_vs_fp32"] = cosine_vs_fp32(task["fp32"], task["out"], rng.standard_normal((8, *task["shape"]),
                                                                                          dtype=np.float32))
    return out


def qdq_loss_debug_ranking(pre: Path, int8: Path, data) -> list[dict]:
    """What node_sensitivity did before: ORT's qdq_loss_debug on 32 samples in batches of 8."""
    import io
    from contextlib import redirect_stdout

    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from edgepack.onnx_tools.calibrate import DatasetReader
    from edgepack.onnx_tools.sensitivity import rank_nodes
    data = data.sample(32, seed=0)
    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
        aug_f, aug_q = f"{tmp}/f.onnx", f"{tmp}/q.onnx"
        modify_model_output_intermediate_tensors(str(pre), aug_f)
        modify_model_output_intermediate_tensors(str(int8), aug_q)
        acts_f = collect_activations(aug_f, DatasetReader.for_model(pre, data, 8))
        acts_q = collect_activations(aug_q, DatasetReader.for_model(pre, data, 8))
        errors = compute_activation_error(create_activation_matching(acts_q, acts_f))
    sqnr = {n: e["xmodel_err"] for n, e in errors.items() if "xmodel_err" in e}
    return rank_nodes(onnx.load(str(pre)).graph, sqnr)


def run_model(path, x) -> np.ndarray:
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def cosine_vs_fp32(fp32, int8, x) -> float:
    a, b = run_model(fp32, x).ravel(), run_model(int8, x).ravel()
    return round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 5)


# -- the parent: subprocesses under a watchdog --------------------------------------------------

def measure(task: dict, kill_mb: float) -> dict:
    """Run `task` in a fresh interpreter; kill it once its resident memory passes kill_mb."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(task)]
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, killed = [0.0], [False]

    def watch():
        while proc.poll() is None:
            try:
                rss = status_mb("VmRSS", str(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            seen[0] = max(seen[0], rss)
            if rss > kill_mb:
                killed[0] = True
                proc.kill()
                return
            time.sleep(0.05)

    t0 = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    rec = {"loadavg_1min": round(load, 2), "wall_seconds": round(time.perf_counter() - t0, 1),
           "watchdog_max_rss_mb": round(seen[0], 1)}
    if killed[0]:
        rec["killed"] = f"killed at > {kill_mb / 1024:g} GB after {rec['wall_seconds']} s"
    elif proc.returncode != 0:
        rec["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    else:
        rec.update(json.loads(stdout.strip().splitlines()[-1]))
    return rec


def export(work: Path, name: str, model, shape) -> tuple[Path, Path]:
    import torch

    from edgepack.onnx_tools.export import to_onnx
    from edgepack.onnx_tools.quantize import preprocess
    fp32 = to_onnx(model.eval(), (torch.zeros(1, *shape),), work / f"{name}.onnx")
    return fp32, preprocess(fp32, work / f"{name}.pre.onnx")


def agreement(a: Path, b: Path, shape) -> dict:
    """Bounded vs stock int8 files: same scales/zero points, same outputs?"""
    import onnx
    from onnx import numpy_helper
    init = lambda p: {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}  # noqa: E731
    ia, ib = init(a), init(b)
    same = ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    x = np.random.default_rng(5).standard_normal((8, *shape), dtype=np.float32)
    return {"identical_initializers": bool(same),
            "max_abs_output_diff": float(np.max(np.abs(run_model(a, x) - run_model(b, x))))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--fit-samples", type=int, default=64, help="a sample count stock calibration fits in")
    ap.add_argument("--kill-gb", type=float, default=8.0)
    ap.add_argument("--skip-big", action="store_true", help="no widened ResNet-18")
    ap.add_argument("--out", default="calib_memory")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import onnxruntime
    import torch
    from fixtures.zoo import mobilenet_v2, resnet18
    torch.manual_seed(0)
    kill_mb, shape = args.kill_gb * 1024, [3, 224, 224]
    doc = {"machine": machine(), "onnxruntime": onnxruntime.__version__, "samples": args.samples,
           "input_shape": shape, "kill_at_gb": args.kill_gb, "quantize": [], "quantize_where_stock_fits": [], "sensitivity": []}
    with tempfile.TemporaryDirectory(prefix="calib-mem-") as tmp:
        work = Path(tmp)
        fp32, pre = export(work, "mobilenet_v2", mobilenet_v2(), shape)
        for r in range(args.rounds):
            for method in METHODS:
                for calibrator in ("bounded", "onnxruntime"):
                    out = work / f"mnv2.{method}.{calibrator}.int8.onnx"
                    task = {"kind": "quantize", "method": method, "calibrator": calibrator, "fp32": str(fp32),
                            "pre": str(pre), "out": str(out), "samples": args.samples, "shape": shape}
                    rec = {"model": "mobilenet_v2", "round": r, "method": method, "calibrator": calibrator,
                           **measure(task, kill_mb)}
                    print(json.dumps(rec), flush=True)
                    doc["quantize"].append(rec)
                    save(args.out, doc)
        # where stock fits in memory too: time and agreement side by side
        for r in range(args.rounds):
            for method in METHODS:
                for calibrator in ("bounded", "onnxruntime"):
                    out = work / f"mnv2.{method}.{calibrator}.fits.int8.onnx"
                    task = {"kind": "quantize", "method": method, "calibrator": calibrator, "fp32": str(fp32),
                            "pre": str(pre), "out": str(out), "samples": args.fit_samples, "shape": shape}
                    rec = {"model": "mobilenet_v2", "round": r, "method": method, "calibrator": calibrator,
                           **measure(task, kill_mb)}
                    print(json.dumps(rec), flush=True)
                    doc["quantize_where_stock_fits"].append(rec)
                    save(args.out, doc)
        doc["bounded_vs_stock"] = {}
        for tag, n in (("", args.samples), (".fits", args.fit_samples)):
            for m in METHODS:
                a, b = work / f"mnv2.{m}.bounded{tag}.int8.onnx", work / f"mnv2.{m}.onnxruntime{tag}.int8.onnx"
                if a.exists() and b.exists():
                    doc["bounded_vs_stock"][f"{m}, {n} samples"] = agreement(a, b, shape)
        models = [("mobilenet_v2", fp32, pre)]
        if not args.skip_big:
            big = resnet18(width=1.5)
            doc["resnet18_w1.5_params"] = sum(p.numel() for p in big.parameters())
            models.append(("resnet18_w1.5", *export(work, "resnet18_w1.5", big, shape)))
        for name, f, p in models:
            int8 = work / f"{name}.sens.int8.onnx"
            if name != "mobilenet_v2":  # its int8 model, bounded MinMax, is made (and measured) first
                rec = {"model": name, "method": "MinMax", "calibrator": "bounded", **measure(
                    {"kind": "quantize", "method": "MinMax", "calibrator": "bounded", "fp32": str(f), "pre": str(p),
                     "out": str(int8), "samples": args.samples, "shape": shape}, kill_mb)}
                print(json.dumps(rec), flush=True)
                doc["quantize"].append(rec)
            else:
                int8 = work / "mnv2.MinMax.bounded.int8.onnx"
            for r in range(args.rounds):
                for impl in ("bounded", "qdq_loss_debug"):
                    task = {"kind": "sensitivity", "calibrator": impl, "pre": str(p), "int8": str(int8),
                            "samples": args.samples, "shape": shape}
                    rec = {"model": name, "round": r, "implementation": impl, **measure(task, kill_mb)}
                    print(json.dumps({k: v for k, v in rec.items() if k != "top10"}), flush=True)
                    doc["sensitivity"].append(rec)
                    save(args.out, doc)
            tops = [[t["node"] for t in s["top10"]] for s in doc["sensitivity"] if s["model"] == name and "top10" in s]
            doc.setdefault("sensitivity_same_top10", {})[name] = len(tops) >= 2 and all(t == tops[0] for t in tops)
    print(save(args.out, doc))


if __name__ == "__main__":
    main()
