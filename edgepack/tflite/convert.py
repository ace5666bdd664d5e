"""PyTorch -> `.tflite` with litert-torch: fp32, and full-integer static int8 through PT2E.

Both conversions run in a forked child (see `_isolate`) and publish the file atomically.
The int8 scheme: per-channel symmetric int8 weights, per-tensor int8 activations calibrated by
litert-torch's PT2E quantizer (histogram observer), int8 model inputs and outputs. That is
the scheme XNNPACK runs fastest; dynamic-range int8 was slower than fp32 (FACTS.md).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import EdgepackError, MissingExtra
from ..manifest import sha256_file
from ._isolate import run_isolated
from .inspect import inspect_tflite

INSTALL_HINT = "pip install 'edgepack[tflite]'"
LAYOUTS = ("NCHW", "NHWC")
INT8_SCHEME = ("PT2E static: per-channel symmetric int8 weights, per-tensor int8 activations "
               "(histogram calibration), int8 inputs/outputs")


def require_litert_torch():
    """Return the `litert_torch` module or raise `MissingExtra` with the install command."""
    try:
        import litert_torch
    except ImportError as e:
        raise MissingExtra("TFLite output needs litert-torch, which is not installed",
                           INSTALL_HINT) from e
    except Exception as e:  # installed but broken (e.g. a dependency downgraded under it)
        raise MissingExtra(f"litert-torch is installed but fails to import: "
                           f"{type(e).__name__}: {e}", f"{INSTALL_HINT} --force-reinstall") from e
    return litert_torch


def require_torch_model(model, source: str = "the model") -> nn.Module:
    """TFLite is converted from PyTorch here; an ONNX input cannot produce it."""
    if isinstance(model, nn.Module):
        return model
    raise EdgepackError(
        f"TFLite output needs the PyTorch model, but {source} is not one (ONNX input?)",
        "TFLite needs the PyTorch model: pass --model file.py:factory (a function returning "
        "the nn.Module), or drop tflite from the target's formats")


def convert_fp32(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], out: Path,
                 layout: str = "NCHW", timeout_s: float | None = None,
                 isolate: bool = True) -> dict:
    """Convert to a float32 `.tflite` at `out`. Returns the record described in `_record`."""
    lt = require_litert_torch()
    model, example_inputs = _wrap_layout(require_torch_model(model), example_inputs, layout, lt)

    def work(tmp: Path) -> dict:
        t0 = time.perf_counter()
        edge = _convert(lt, model, example_inputs)
        edge.export(str(tmp))
        return {"convert_seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    child = run_isolated(work, Path(out), "TFLite fp32 conversion", timeout_s, isolate)
    return _record(Path(out), "fp32", layout, time.perf_counter() - t0, child, lt)


def convert_int8(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], calib: Dataset,
                 out: Path, layout: str = "NCHW", num_calib: int = 64,
                 timeout_s: float | None = None, isolate: bool = True) -> dict:
    """Full-integer static int8 `.tflite` at `out`, calibrated on `calib.take(num_calib)`.

    `calib.x` is NCHW like the PyTorch model's input, whatever `layout` is asked for.
    """
    lt = require_litert_torch()
    model = require_torch_model(model)
    if len(example_inputs) != 1:
        raise EdgepackError(f"int8 calibration supports single-input models; this one takes "
                            f"{len(example_inputs)} inputs", "use fp32 TFLite for this model")
    samples = _calibration_batches(calib, num_calib, example_inputs[0])
    if layout == "NHWC":
        samples = [s.permute(0, 2, 3, 1).contiguous() for s in samples]
    model, example_inputs = _wrap_layout(model, example_inputs, layout, lt)

    def work(tmp: Path) -> dict:
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize.quant_config import QuantConfig
        quantize_pt2e = _quantize_pt2e_module()
        quantizer = pq.PT2EQuantizer().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        t0 = time.perf_counter()
        try:
            graph = torch.export.export(model, example_inputs).module()
        except Exception as e:
            raise _explain(e, model, example_inputs) from e
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for x in samples:
                prepared(x)
        quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        t1 = time.perf_counter()
        edge = _convert(lt, quantized, example_inputs,
                        quant_config=QuantConfig(pt2e_quantizer=quantizer), explain_with=model)
        edge.export(str(tmp))
        return {"calibration_seconds": t1 - t0, "convert_seconds": time.perf_counter() - t1}

    t0 = time.perf_counter()
    child = run_isolated(work, Path(out), "TFLite int8 conversion", timeout_s, isolate)
    rec = _record(Path(out), "int8", layout, time.perf_counter() - t0, child, lt)
    rec["calibration_samples"] = sum(len(s) for s in samples)
    rec["scheme"] = INT8_SCHEME
    if rec["float_ops"]:
        rec["notes"].append(
            f"{len(rec['float_ops'])} op(s) still compute in float inside the int8 model "
            f"({', '.join(f'{k} x{v}' for k, v in rec['float_op_counts'].items())}): each "
            "costs a dequantize/quantize round trip on the device")
    return rec


def _record(out: Path, precision: str, layout: str, seconds: float, child: dict, lt) -> dict:
    """What the build needs for the manifest and report: file facts, specs, op statistics."""
    info = inspect_tflite(out, layout)
    return {
        "path": str(out), "format": "tflite", "precision": precision, "layout": layout,
        "seconds": seconds, **child,
        "size_bytes": info["size_bytes"], "sha256": sha256_file(out),
        "inputs": info["inputs"], "outputs": info["outputs"],
        "ops": info["ops"], "num_ops": info["num_ops"],
        "quantize_ops": info["quantize_ops"], "dequantize_ops": info["dequantize_ops"],
        # In an fp32 model every op is a float op: listing them says nothing.
        "float_ops": info["float_ops"] if precision == "int8" else [],
        "float_op_counts": info["float_op_counts"] if precision == "int8" else {},
        "converter": f"litert-torch {getattr(lt, '__version__', 'unknown')}",
        "notes": [],
    }


def _wrap_layout(model: nn.Module, example_inputs, layout: str, lt):
    """NHWC: wrap so the artifact takes channel-last images; the wrapper transposes back."""
    if layout not in LAYOUTS:
        raise EdgepackError(f"unknown layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    model = model.eval()
    example_inputs = tuple(example_inputs)
    if layout == "NCHW":
        return model, example_inputs
    image_args = [i for i, t in enumerate(example_inputs) if t.ndim == 4]
    if not image_args:
        raise EdgepackError("layout NHWC needs a 4-D (N, C, H, W) image input; this model has "
                            "none", "use layout NCHW for this model")
    wrapped = lt.to_channel_last_io(model, args=image_args).eval()
    nhwc = tuple(t.permute(0, 2, 3, 1).contiguous() if i in image_args else t
                 for i, t in enumerate(example_inputs))
    return wrapped, nhwc


def _calibration_batches(calib: Dataset, n: int, example: torch.Tensor) -> list[torch.Tensor]:
    """Calibration samples in batches of the example's batch size (the export's fixed shape)."""
    if calib is None or len(calib) == 0:
        raise EdgepackError("int8 TFLite needs calibration data and none was given",
                            "pass --calib (a folder, .npz or file.py:function)")
    x = np.asarray(calib.take(n).x, dtype=np.float32)
    if tuple(x.shape[1:]) != tuple(example.shape[1:]):
        raise EdgepackError(f"calibration samples have shape {tuple(x.shape[1:])} but the model "
                            f"input is {tuple(example.shape[1:])} (from {calib.source})",
                            "give calibration data with the model's input shape, channels first")
    bs = int(example.shape[0])
    # The exported graph has a fixed batch; drop a ragged tail rather than pad it with copies.
    usable = max(bs, len(x) // bs * bs)
    x = np.resize(x, (usable, *x.shape[1:])) if len(x) < bs else x[:usable]
    return [torch.from_numpy(np.ascontiguousarray(x[i:i + bs])) for i in range(0, usable, bs)]


def _quantize_pt2e_module():
    # torchao carries PT2E now; torch.ao's copy is deprecated and absent from newer torch.
    try:
        from torchao.quantization.pt2e import quantize_pt2e
    except ImportError:
        from torch.ao.quantization import quantize_pt2e
    return quantize_pt2e


def _convert(lt, model, example_inputs, quant_config=None, explain_with=None):
    try:
        return lt.convert(model, example_inputs, quant_config=quant_config)
    except MemoryError:
        raise
    except Exception as e:
        raise _explain(e, explain_with if explain_with is not None else model,
                       example_inputs) from e


# --- Turning converter exceptions into messages that name the op and the module.

_LOWERING = re.compile(r"Lowering not found:\s*([\w.:]+)")
_LEGALIZE = re.compile(r"failed to legalize operation '([\w.]+)'")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)')


def _explain(e: Exception, model: nn.Module, example_inputs) -> EdgepackError:
    text = str(e)
    m = _LOWERING.search(text) or _LEGALIZE.search(text)
    frames = _FRAME.findall(text.split("Original traceback:", 1)[1]) if "Original traceback:" in text else []
    where = f" at {frames[-1][0]}:{frames[-1][1]} ({frames[-1][3].strip()})" if frames else ""
    if m:
        op = m.group(1)
        module = _module_of(op, model, example_inputs)
        inside = f" in module `{module[0]}` ({module[1]})" if module else ""
        return EdgepackError(
            f"litert-torch cannot convert the op {op}{inside}{where} to TFLite",
            "replace that layer with supported ops (or move it out of the exported forward), "
            "or drop tflite from the target's formats and deploy the ONNX artifact")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return EdgepackError(f"the model could not be converted to TFLite: {type(e).__name__}: "
                         f"{first}{where}",
                         "the model must be traceable by torch.export (no data-dependent "
                         "Python control flow); or drop tflite from the target's formats")


def _module_of(op: str, model: nn.Module, example_inputs) -> tuple[str, str] | None:
    """Find the submodule that emitted `op` from torch.export's nn_module_stack metadata."""
    base = op.split("aten.")[-1].split(".")[0].lstrip("_")
    try:
        ep = torch.export.export(model, tuple(example_inputs))
        graphs = [ep.graph, ep.run_decompositions().graph]
    except Exception:
        return None
    for graph in graphs:
        for node in graph.nodes:
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0].lstrip("_")
            stack = node.meta.get("nn_module_stack")
            if node.op == "call_function" and name == base and stack:
                path, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else cls.__name__
                # Wrappers (NHWC, export) add a prefix; keep the user's own module path.
                path = re.sub(r"^(wrapped\.)", "", str(path).replace("L['self'].", ""))
                return path or "(top level)", cls_name.rsplit(".", 1)[-1]
    return None
