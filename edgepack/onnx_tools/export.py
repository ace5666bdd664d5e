"""Stage 2: PyTorch -> ONNX, simplified, with numeric parity checked on real inputs."""
from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import EdgepackError

log = logging.getLogger(__name__)
OPSET = 17


def to_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path,
            simplify: bool = True, input_names: list[str] | None = None,
            output_names: list[str] | None = None, dynamic_batch: bool = True) -> Path:
    """Export `model` (eval mode) to `path` (written atomically) and return it.

    The batch axis stays dynamic so calibration and evaluation can run in batches; every other
    dimension is fixed by `example_inputs`.
    """
    path = Path(path)
    model = model.eval()
    input_names = input_names or (["input"] if len(example_inputs) == 1 else [f"input{i}" for i in range(len(example_inputs))])
    with torch.no_grad():
        probe = model(*example_inputs)
    n_out = len(probe) if isinstance(probe, (tuple, list)) else 1
    output_names = output_names or (["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)])
    axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(example_inputs), str(tmp), input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise EdgepackError(f"ONNX export failed: {_first_line(e)}",
                            "the model uses an operation the ONNX exporter cannot trace; "
                            "rerun with --debug for the full trace") from e
    proto = onnx.load(str(tmp))
    if simplify:
        proto = simplify_onnx(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def simplify_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim first (constant folding, shape inference); onnxslim when onnxsim gives up."""
    try:
        import onnxsim
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            simplified, ok = onnxsim.simplify(proto)
        if ok:
            return simplified
        log.warning("onnxsim could not validate its result; trying onnxslim")
    except Exception as e:  # onnxsim is strict about some graphs; onnxslim is more tolerant
        log.warning("onnxsim failed (%s); trying onnxslim", _first_line(e))
    try:
        import onnxslim
        with redirect_stdout(io.StringIO()):
            return onnxslim.slim(proto)
    except Exception as e:
        log.warning("onnxslim failed too (%s); keeping the unsimplified graph", _first_line(e))
        return proto


def torch_predict(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """First output of a PyTorch model (eval mode, no grad) over all of `x`, in batches."""
    model = model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).numpy()
                               for i in range(0, len(x), batch_size)])


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max abs difference, cosine similarity and top-1 agreement of two (N, ...) output arrays."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    denom = np.linalg.norm(ref) * np.linalg.norm(cand)
    cosine = float((ref * cand).sum() / denom) if denom > 0 else float(np.array_equal(ref, cand))
    agree = float((ref.argmax(1) == cand.argmax(1)).mean() * 100) if ref.shape[1] > 1 else None
    return {"max_abs_diff": float(np.abs(ref - cand).max()), "cosine": cosine,
            "top1_agreement": agree, "samples": int(len(ref))}


def check_parity(torch_outputs: np.ndarray, onnx_outputs: np.ndarray, what: str = "ONNX fp32",
                 min_cosine: float = 0.9999, rtol: float = 1e-3) -> dict:
    """Fail clearly when an exported fp32 model disagrees with PyTorch on the same inputs."""
    result = compare_outputs(torch_outputs, onnx_outputs)
    scale = float(np.abs(torch_outputs).max()) or 1.0
    result["tolerance"] = rtol * max(scale, 1.0)
    result["ok"] = result["cosine"] >= min_cosine and result["max_abs_diff"] <= result["tolerance"]
    if not result["ok"]:
        raise EdgepackError(
            f"{what} disagrees with PyTorch: max abs diff {result['max_abs_diff']:.3g} "
            f"(tolerance {result['tolerance']:.3g}), cosine {result['cosine']:.6f}",
            "a layer behaves differently after export (often a data-dependent branch or a "
            "training-mode layer); make sure the model is deterministic in eval mode")
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
