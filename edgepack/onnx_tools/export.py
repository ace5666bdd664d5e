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
from ..quality import fidelity

log = logging.getLogger(__name__)
OPSET = 17


def flatten_outputs(obj, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A model's outputs (tensor, tuple/list, dict, nested) as ordered (name, tensor) pairs:
    a lone tensor is "output", a tuple "output0", "output1"..., a dict its keys, nested "key.0"."""
    if isinstance(obj, torch.Tensor):
        return [(prefix or "output", obj)]
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    elif obj is None:
        return []
    else:
        raise EdgepackError(f"the model returns a {type(obj).__name__}; edgepack handles tensors, tuples, lists "
                            "and dicts of them", "return tensors from forward()")
    out = []
    for key, value in items:
        name = (f"{prefix}.{key}" if prefix else (key if isinstance(obj, dict) else f"output{key}"))
        out += flatten_outputs(value, name)
    return out


class FlatOutputs(nn.Module):
    """The user's module with its outputs flattened to a tuple in `flatten_outputs` order, so
    ONNX, TFLite and the checks all see the same named outputs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return tuple(t for _, t in flatten_outputs(self.module(*inputs)))


def to_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path,
            simplify: bool = True, input_names: list[str] | None = None,
            output_names: list[str] | None = None, dynamic_batch: bool = True) -> Path:
    """Export `model` (eval mode) to `path` (written atomically) and return it.

    With `dynamic_batch` axis 0 of every input and output stays dynamic so calibration and
    evaluation run in batches; every other dimension is fixed by `example_inputs`.
    """
    path = Path(path)
    model = model.eval()
    input_names = input_names or (["input"] if len(example_inputs) == 1 else [f"input{i}" for i in range(len(example_inputs))])
    with torch.no_grad():
        probe = flatten_outputs(model(*example_inputs))
    output_names = output_names or [n for n, _ in probe]
    flat = FlatOutputs(model).eval()
    axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(flat, tuple(example_inputs), str(tmp), input_names=input_names,
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


def torch_predict(model: nn.Module, x, batch_size: int = 64) -> np.ndarray:
    """First output of a single-input PyTorch model over all of `x`, in batches."""
    return torch_outputs(model, ([np.ascontiguousarray(x[i:i + batch_size])] for i in range(0, len(x), batch_size)))[0]


def torch_outputs(model: nn.Module, feeds, batchable: bool = True) -> list[np.ndarray]:
    """Every flattened output of a PyTorch model over an iterable of feeds (lists of arrays),
    joined along the batch axis (stacked when each feed is one whole sample)."""
    model = model.eval()
    per_feed = []
    with torch.no_grad():
        for feed in feeds:
            outs = flatten_outputs(model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feed)))
            per_feed.append([t.float().numpy() if t.is_floating_point() else t.numpy() for _, t in outs])
    join = np.concatenate if batchable else np.stack
    return [join([f[i] for f in per_feed]) for i in range(len(per_feed[0]))] if per_feed else []


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max abs difference, cosine similarity and top-1 agreement of two (N, ...) output arrays."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    f = fidelity(ref, cand)
    agree = float((ref.argmax(1) == cand.argmax(1)).mean() * 100) if ref.shape[1] > 1 else None
    return {"max_abs_diff": f["max_abs_diff"], "cosine": f["cosine"], "sqnr_db": f["sqnr_db"],
            "top1_agreement": agree, "samples": int(len(ref))}


def check_parity(torch_outputs, onnx_outputs, what: str = "ONNX fp32", min_cosine: float = 0.9999,
                 rtol: float = 1e-3, names: list[str] | None = None) -> dict:
    """Fail clearly when an exported fp32 model disagrees with PyTorch on the same inputs.
    Takes one output array, or lists of them (every output is checked)."""
    refs = torch_outputs if isinstance(torch_outputs, list) else [torch_outputs]
    cands = onnx_outputs if isinstance(onnx_outputs, list) else [onnx_outputs]
    names = names or [f"output{i}" for i in range(len(refs))]
    if len(refs) != len(cands):
        raise EdgepackError(f"{what} has {len(cands)} outputs but PyTorch gives {len(refs)}")
    per = {}
    for name, ref, cand in zip(names, refs, cands):
        r = compare_outputs(ref, cand)
        scale = float(np.abs(ref).max()) if np.size(ref) else 1.0
        r["tolerance"] = rtol * max(scale, 1.0)
        r["ok"] = (r["cosine"] >= min_cosine or r["max_abs_diff"] <= r["tolerance"] / 10) and r["max_abs_diff"] <= r["tolerance"]
        per[name] = r
        if not r["ok"]:
            raise EdgepackError(
                f"{what} disagrees with PyTorch on output {name}: max abs diff {r['max_abs_diff']:.3g} "
                f"(tolerance {r['tolerance']:.3g}), cosine {r['cosine']:.6f}",
                "a layer behaves differently after export (often a data-dependent branch or a "
                "training-mode layer); make sure the model is deterministic in eval mode")
    worst = min(per.values(), key=lambda r: r["cosine"])
    result = {k: worst[k] for k in ("max_abs_diff", "cosine", "top1_agreement", "samples", "tolerance", "ok")}
    result["max_abs_diff"] = max(r["max_abs_diff"] for r in per.values())
    if len(per) > 1:
        result["outputs"] = {n: {k: r[k] for k in ("max_abs_diff", "cosine")} for n, r in per.items()}
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
