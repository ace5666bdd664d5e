"""The conversion itself: exported program in, `.tflite` file out.

Runs in-process (`isolate=False`) or as `python -m edgepack.tflite._worker JOB_DIR`, where
JOB_DIR holds model.pt2, inputs.pt, calib.npz (int8: arrays input0, input1... in argument
order) and job.json; it writes result.json.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch


def _quantize_pt2e_module():
    # torchao carries PT2E now; torch.ao's copy is deprecated and gone from newer torch.
    try:
        from torchao.quantization.pt2e import quantize_pt2e
    except ImportError:
        from torch.ao.quantization import quantize_pt2e
    return quantize_pt2e


def convert_program(precision: str, program: torch.export.ExportedProgram, example_inputs: tuple,
                    samples: list[np.ndarray] | None, batch: int, out: Path) -> dict:
    """Convert an exported program to `.tflite` at `out`; returns timings in seconds.

    int8: PT2E static quantization (per-channel symmetric weights) calibrated with `samples`
    (one array per model input, same length) in batches of `batch` (the export's fixed batch
    size), then a STATIC QDQ conversion. Only float tensors get observers, so integer inputs
    (token ids, masks) stay integer in the artifact.
    """
    with _quiet_litert():
        import litert_torch
        return _convert(litert_torch, precision, program, example_inputs, samples, batch, out)


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch prints a progress tree for every stage; edgepack reports its own."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def _convert(litert_torch, precision, program, example_inputs, samples, batch, out) -> dict:
    record: dict = {}
    graph = program.module()
    # The exported graph already has eval semantics (BatchNorm folded to its statistics); the
    # flag only silences litert-torch's "converted in training mode" warning. `.eval()` itself
    # is refused on exported modules.
    for m in graph.modules():
        m.training = False
    quant_config = None
    if precision == "int8":
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize.quant_config import QuantConfig
        quantize_pt2e = _quantize_pt2e_module()
        quantizer = pq.PT2EQuantizer().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        t0 = time.perf_counter()
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for i in range(0, len(samples[0]), batch):
                prepared(*(torch.from_numpy(np.ascontiguousarray(s[i:i + batch])) for s in samples))
        graph = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        quant_config = QuantConfig(pt2e_quantizer=quantizer)
        record["calibration_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    edge = litert_torch.convert(graph, tuple(example_inputs), quant_config=quant_config)
    edge.export(str(out))
    record["convert_seconds"] = time.perf_counter() - t0
    return record


def main(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    try:
        program = torch.export.load(job_dir / "model.pt2")
        inputs = torch.load(job_dir / "inputs.pt", weights_only=True)
        calib = job_dir / "calib.npz"
        samples = None
        if calib.exists():
            with np.load(calib) as z:
                samples = [z[f"input{i}"] for i in range(len(z.files))]
        result = {"status": "ok", "record": convert_program(
            job["precision"], program, inputs, samples, job["batch"], Path(job["out"]))}
    except MemoryError:
        result = {"status": "error", "type": "MemoryError",
                  "message": "the conversion ran out of memory", "traceback": ""}
    except Exception as e:  # reported to the parent, which explains it with the model at hand
        result = {"status": "error", "type": type(e).__name__, "message": str(e),
                  "traceback": traceback.format_exc()}
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(job_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
