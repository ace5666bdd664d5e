"""Helpers shared by the benchmarks: interleaved timing and the machine's state."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import sys

import numpy as np

# The model zoo and the benchmark task are test fixtures (tests/fixtures), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from edgepack.cpuinfo import read_cpuinfo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = read_cpuinfo()
    return {"cpu": cpu["model"] or "unknown", "int8_flags": cpu["int8_flags"], "cores": os.cpu_count(),
            "machine": platform.machine(), "loadavg_start": list(os.getloadavg())}


def interleaved(variants: dict, inputs, rounds: int = 7, runs_per_round: int = 15, warmup: int = 5) -> dict:
    """Time every variant in turn, round after round, so drifting machine load hits all alike.

    `variants` maps a label to a runner with .run(inputs). Returns per-label median/p90 in ms."""
    for r in variants.values():
        for _ in range(warmup):
            r.run(inputs)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for label, r in variants.items():
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                r.run(inputs)
                times[label].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50": float(np.median(v)), "p90": float(np.percentile(v, 90)), "runs": len(v)}
            for k, v in times.items()}


def save(name: str, doc: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    doc.setdefault("machine", machine())["loadavg_end"] = list(os.getloadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def make_onnx_build(build: Path, model, input_shape: tuple, name: str) -> Path:
    """A minimal build directory (fp32 ONNX + manifest) for device benchmarks, without the pipeline."""
    from datetime import datetime, timezone

    import torch

    from edgepack.manifest import Artifact, Manifest, TensorSpec, sha256_file, write_json_atomic
    from edgepack.targets import load_profile
    build.mkdir(parents=True)
    model = model.eval()
    onnx = build / "model.fp32.onnx"
    x = torch.randn(*input_shape)
    torch.onnx.export(model, x, str(onnx), input_names=["input"], output_names=["logits"],
                      dynamo=False, opset_version=17)
    with torch.no_grad():
        n_out = model(x).shape[1]
    spec = TensorSpec(name="input", shape=list(input_shape), dtype="float32", layout="NCHW")
    write_json_atomic(build / "manifest.json", Manifest(
        edgepack_version="0.1.0", name=name, created=datetime.now(timezone.utc).isoformat(),
        target=load_profile("x86").model_dump(), inputs=[spec],
        outputs=[TensorSpec(name="logits", shape=[input_shape[0], n_out])],
        artifacts=[Artifact(path=onnx.name, format="onnx", precision="fp32", sha256=sha256_file(onnx),
                            size_bytes=onnx.stat().st_size, inputs=[spec])],
        primary=onnx.name))
    return build
