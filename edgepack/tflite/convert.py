"""PyTorch -> `.tflite` with litert-torch: fp32, and full-integer static int8 through PT2E.

The model is exported here with torch.export (so export errors can name the module); the
conversion then runs in a child Python process (see `_isolate`; `timeout_s` bounds that part)
and the file is published atomically: on failure no `.tflite`, complete or partial, is left.
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
from ._isolate import publish, run_in_child, tmp_path_for
from ._worker import convert_program
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
    """Convert to a float32 `.tflite` at `out`. Returns the record built by `_record`."""
    lt = require_litert_torch()
    model, example_inputs = _wrap_layout(require_torch_model(model), example_inputs, layout, lt)
    return _convert("fp32", model, example_inputs, None, Path(out), layout, timeout_s, isolate, lt)


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
    samples = _calibration_samples(calib, num_calib, example_inputs[0])
    if layout == "NHWC":
        samples = np.ascontiguousarray(samples.transpose(0, 2, 3, 1))
    model, example_inputs = _wrap_layout(model, example_inputs, layout, lt)
    rec = _convert("int8", model, example_inputs, samples, Path(out), layout, timeout_s,
                   isolate, lt)
    rec["calibration_samples"] = int(len(samples))
    rec["scheme"] = INT8_SCHEME
    if rec["float_ops"]:
        rec["notes"].append(
            f"{len(rec['float_ops'])} op(s) still compute in float inside the int8 model "
            f"({', '.join(f'{k} x{v}' for k, v in rec['float_op_counts'].items())}): each "
            "costs a dequantize/quantize round trip on the device")
    return rec


def _convert(precision, model, example_inputs, samples, out: Path, layout, timeout_s, isolate,
             lt) -> dict:
    """Export here (errors name the module), convert in a child (or here), publish atomically."""
    what = f"TFLite {precision} conversion"
    t0 = time.perf_counter()
    program, export_mode = _export(model, example_inputs, strict_first=precision == "int8")
    batch = int(example_inputs[0].shape[0]) if example_inputs[0].ndim else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    try:
        if isolate:
            result = run_in_child({"precision": precision, "batch": batch}, program,
                                  example_inputs, samples, tmp, what, timeout_s)
        else:
            result = _in_process(precision, program, example_inputs, samples, batch, tmp)
        if result["status"] != "ok":
            if result["type"] == "MemoryError":
                raise EdgepackError(f"{what} ran out of memory",
                                    "free memory or use a machine with more RAM")
            err = _explain(result["type"], result["message"], program)
            err.detail = result.get("traceback")  # the child's traceback, for --debug
            raise err
        publish(tmp, out, what)
    finally:
        tmp.unlink(missing_ok=True)
    child = dict(result["record"])
    if "child_seconds" in result:
        # What isolation costs: the child's interpreter start and imports (10-24 s measured here).
        child["process_overhead_seconds"] = max(0.0, result["child_seconds"] - sum(child.values()))
    child["export_mode"] = export_mode
    return _record(out, precision, layout, time.perf_counter() - t0, child, lt)


def _export(model, example_inputs, strict_first: bool):
    """torch.export the model; for int8 try strict (TorchDynamo) export first.

    The PT2E quantizer finds `add`/`mul` by their `source_fn_stack` metadata, which only strict
    export records: after a non-strict export every residual ADD of MobileNetV2 stayed float
    (9 float ADDs between DEQUANTIZE/QUANTIZE pairs). Strict export fails on some models, so
    non-strict remains the fallback, and the float ops left are reported either way.
    """
    if strict_first:
        try:
            return torch.export.export(model, example_inputs, strict=True), "strict"
        except Exception:
            pass
    try:
        return torch.export.export(model, example_inputs), "non-strict"
    except Exception as e:
        raise _explain(type(e).__name__, str(e), None) from e


def _in_process(precision, program, example_inputs, samples, batch, tmp) -> dict:
    try:
        return {"status": "ok", "record": convert_program(precision, program, example_inputs,
                                                          samples, batch, tmp)}
    except MemoryError:
        return {"status": "error", "type": "MemoryError", "message": "", "traceback": ""}
    except Exception as e:
        import traceback
        return {"status": "error", "type": type(e).__name__, "message": str(e),
                "traceback": traceback.format_exc()}


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
        "float_op_details": info["float_op_details"] if precision == "int8" else [],
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


def _calibration_samples(calib: Dataset, n: int, example: torch.Tensor) -> np.ndarray:
    """`n` samples, trimmed to a multiple of the export's fixed batch size."""
    if calib is None or len(calib) == 0:
        raise EdgepackError("int8 TFLite needs calibration data and none was given",
                            "pass --calib (a folder, .npz or file.py:function)")
    x = np.asarray(calib.take(n).x, dtype=np.float32)
    if tuple(x.shape[1:]) != tuple(example.shape[1:]):
        raise EdgepackError(f"calibration samples have shape {tuple(x.shape[1:])} but the model "
                            f"input is {tuple(example.shape[1:])} (from {calib.source})",
                            "give calibration data with the model's input shape, channels first")
    bs = int(example.shape[0])
    if len(x) < bs:  # fewer samples than one batch: repeat them to fill it
        return np.resize(x, (bs, *x.shape[1:]))
    return np.ascontiguousarray(x[:len(x) // bs * bs])


# --- Turning converter exceptions into messages that name the op and the module.

_LOWERING = re.compile(r"Lowering not found:\s*([\w.:]+)")
_LEGALIZE = re.compile(r"failed to legalize operation '([\w.]+)'")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)')


def _explain(kind: str, text: str, program) -> EdgepackError:
    """A converter exception (type name and text, maybe from the child) as a user message."""
    m = _LOWERING.search(text) or _LEGALIZE.search(text)
    frames = _FRAME.findall(text.split("Original traceback:", 1)[1]) if "Original traceback:" in text else []
    where = f" at {frames[-1][0]}:{frames[-1][1]} ({frames[-1][3].strip()})" if frames else ""
    if m:
        op = m.group(1)
        module = _module_of(op, program) if program is not None else None
        inside = f" in module `{module[0]}` ({module[1]})" if module else ""
        return EdgepackError(
            f"litert-torch cannot convert the op {op}{inside}{where} to TFLite",
            "replace that layer with supported ops (or move it out of the exported forward), "
            "or drop tflite from the target's formats and deploy the ONNX artifact")
    first = text.strip().splitlines()[0] if text.strip() else kind
    return EdgepackError(f"the model could not be converted to TFLite: {kind}: {first}{where}",
                         "the model must be traceable by torch.export (no data-dependent "
                         "Python control flow); or drop tflite from the target's formats")


def _module_of(op: str, program) -> tuple[str, str] | None:
    """The submodule that emitted `op`, from torch.export's nn_module_stack metadata."""
    base = op.split("aten.")[-1].split(".")[0].lstrip("_")
    graphs = [program.graph]
    try:  # the converter sees decomposed ops, which may be named differently
        graphs.append(program.run_decompositions().graph)
    except Exception:
        pass
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "call_function" or not node.meta.get("nn_module_stack"):
                continue
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0].lstrip("_")
            if name == base:
                path, cls = list(node.meta["nn_module_stack"].values())[-1]
                cls_name = cls if isinstance(cls, str) else cls.__name__
                # The NHWC wrapper adds a `wrapped.` prefix; report the user's own module path.
                path = re.sub(r"^wrapped\.", "", str(path).replace("L['self'].", ""))
                return path or "(top level)", cls_name.rsplit(".", 1)[-1]
    return None
