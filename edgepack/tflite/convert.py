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
from ._quiet import quiet_native
from ._worker import convert_program
from .inspect import inspect_tflite

INSTALL_HINT = "pip install 'edgepack[tflite]'"
LAYOUTS = ("NCHW", "NHWC")
INT8_SCHEME = ("PT2E static: per-channel symmetric int8 weights, per-tensor int8 activations "
               "(histogram calibration), int8 inputs/outputs")


def require_litert_torch():
    """Return the `litert_torch` module or raise `MissingExtra` with the install command."""
    try:
        with quiet_native():  # its import prints oneDNN, torchao and absl lines on fd 2
            import litert_torch
    except ImportError as e:
        raise MissingExtra("TFLite output needs litert-torch, which is not installed",
                           INSTALL_HINT) from e
    except Exception as e:  # installed but broken (e.g. a dependency downgraded under it)
        raise MissingExtra(f"litert-torch is installed but fails to import: "
                           f"{type(e).__name__}: {e}", f"{INSTALL_HINT} --force-reinstall") from e
    return litert_torch


class _Installed:
    """What the parent needs of litert-torch when the conversion runs in a child: its version.
    Importing it here (JAX, torchao) would add ~280 MB to the build process, which every
    forked TFLite child then shares (measured: bench/build_memory.py)."""

    def __init__(self, version: str):
        self.__version__ = version


def check_litert_torch(layout: str = "NCHW"):
    """`require_litert_torch()` for a build whose conversions run in a child: fails the same way
    when litert-torch is missing, but imports it here only if this process needs it (NHWC)."""
    return _litert_torch(True, layout)


def _litert_torch(isolate: bool, layout: str):
    """litert-torch itself, or (converting in a child, NCHW: nothing of it runs here) proof that
    it is installed, without importing it in this process."""
    if not isolate or layout != "NCHW":
        return require_litert_torch()
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version
    try:
        found = importlib.util.find_spec("litert_torch") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return require_litert_torch()  # raises MissingExtra with the install command
    try:
        return _Installed(version("litert-torch"))
    except PackageNotFoundError:
        return require_litert_torch()


def require_torch_model(model, source: str = "the model") -> nn.Module:
    """TFLite is converted from PyTorch here; an ONNX input cannot produce it."""
    if isinstance(model, nn.Module):
        return model
    raise EdgepackError(
        f"TFLite output needs the PyTorch model, but {source} is not one (ONNX input?)",
        "TFLite needs the PyTorch model: pass --model file.py:factory (a function returning "
        "the nn.Module), or drop tflite from the target's formats")


def convert_fp32(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], out: Path,
                 layout: str = "NCHW", timeout_s: float | None = None, isolate: bool = True,
                 input_names: list[str] | None = None,
                 output_names: list[str] | None = None) -> dict:
    """Convert to a float32 `.tflite` at `out`. Returns the record built by `_record`.

    `model(*example_inputs)` returns a tensor or a flat tuple of tensors (nested outputs are
    flattened in torch pytree order, as litert-torch does). `input_names`/`output_names`, when
    given, name the record's specs; otherwise they carry the TFLite tensor names.
    """
    lt = _litert_torch(isolate, layout)
    model, example_inputs = _wrap_layout(require_torch_model(model), example_inputs, layout, lt)
    return _convert("fp32", model, example_inputs, None, Path(out), layout, timeout_s, isolate,
                    lt, (input_names, output_names))


def convert_int8(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], calib: Dataset,
                 out: Path, layout: str = "NCHW", num_calib: int = 64,
                 timeout_s: float | None = None, isolate: bool = True,
                 input_names: list[str] | None = None,
                 output_names: list[str] | None = None) -> dict:
    """Full-integer static int8 `.tflite` at `out`, calibrated on `calib.take(num_calib)`.

    The calibration inputs are in PyTorch layout and argument order (`calib.arrays()`), whatever
    `layout` is asked for. Float inputs and outputs become int8 with a scale and zero point;
    integer inputs (token ids, masks) stay integer (int64 ones become int32: see the notes).
    """
    lt = _litert_torch(isolate, layout)
    model = require_torch_model(model)
    example_inputs = tuple(example_inputs)
    samples = _calibration_samples(calib, num_calib, example_inputs)
    if layout == "NHWC":
        images = _image_args(example_inputs)
        samples = [np.ascontiguousarray(s.transpose(0, 2, 3, 1)) if i in images else s
                   for i, s in enumerate(samples)]
    model, example_inputs = _wrap_layout(model, example_inputs, layout, lt)
    rec = _convert("int8", model, example_inputs, samples, Path(out), layout, timeout_s,
                   isolate, lt, (input_names, output_names))
    rec["calibration_samples"] = int(len(samples[0]))
    rec["scheme"] = INT8_SCHEME
    if rec["float_ops"]:
        rec["notes"].append(
            f"{len(rec['float_ops'])} op(s) still compute in float inside the int8 model "
            f"({', '.join(f'{k} x{v}' for k, v in rec['float_op_counts'].items())}): each "
            "costs a dequantize/quantize round trip on the device")
    return rec


def _convert(precision, model, example_inputs, samples, out: Path, layout, timeout_s, isolate,
             lt, names) -> dict:
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
            # The child's traceback and what it printed (its native log lines), for --debug.
            err.detail = "\n".join(p for p in (result.get("traceback"), result.get("log")) if p)
            raise err
        publish(tmp, out, what)
    finally:
        tmp.unlink(missing_ok=True)
    child = dict(result["record"])
    if "child_seconds" in result:
        # What isolation costs: the child's interpreter start and imports (10-24 s measured here).
        child["process_overhead_seconds"] = max(0.0, result["child_seconds"] - sum(child.values()))
    child["export_mode"] = export_mode
    rec = _record(out, precision, layout, child, lt, names)
    _check_outputs(model, example_inputs, rec)
    narrowed = [s["name"] for t, s in zip(example_inputs, rec["inputs"])
                if t.dtype == torch.int64 and s["dtype"] == "int32"]
    if narrowed:  # litert-torch's default (enable_x64=False); TFLite kernels index with int32
        rec["notes"].append(f"int64 input(s) {', '.join(narrowed)} are int32 in the .tflite: "
                            "feed int32 (run_tflite casts int64 data and refuses values that "
                            "do not fit)")
    rec["seconds"] = time.perf_counter() - t0
    return rec


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
    with quiet_native() as printed:
        try:
            return {"status": "ok", "record": convert_program(precision, program, example_inputs,
                                                              samples, batch, tmp)}
        except MemoryError:
            return {"status": "error", "type": "MemoryError", "message": "", "traceback": ""}
        except Exception as e:
            import traceback
            failure = {"status": "error", "type": type(e).__name__, "message": str(e),
                       "traceback": traceback.format_exc()}
    failure["log"] = printed.text  # filled in once stderr is restored
    return failure


def _record(out: Path, precision: str, layout: str, child: dict, lt, names) -> dict:
    """What the build needs for the manifest and report: file facts, specs, op statistics."""
    info = inspect_tflite(out, layout)
    inputs, outputs = info["inputs"], info["outputs"]
    return {
        "path": str(out), "format": "tflite", "precision": precision, "layout": layout,
        "seconds": None, **child,
        "size_bytes": info["size_bytes"], "sha256": sha256_file(out),
        "inputs": _named(inputs, names[0], "input"), "outputs": _named(outputs, names[1], "output"),
        # How the file's IO maps to PyTorch's: the interpreter position (get_input_details() /
        # get_output_details() order) of each PyTorch argument and flattened output.
        "input_order": info["input_order"], "output_order": info["output_order"],
        "output_order_source": info["order_source"],
        "tflite_names": {"inputs": [s["name"] for s in inputs],
                         "outputs": [s["name"] for s in outputs]},
        "ops": info["ops"], "num_ops": info["num_ops"],
        "quantize_ops": info["quantize_ops"], "dequantize_ops": info["dequantize_ops"],
        # In an fp32 model every op is a float op: listing them says nothing.
        "float_ops": info["float_ops"] if precision == "int8" else [],
        "float_op_details": info["float_op_details"] if precision == "int8" else [],
        "float_op_counts": info["float_op_counts"] if precision == "int8" else {},
        "converter": f"litert-torch {getattr(lt, '__version__', 'unknown')}",
        "notes": [],
    }


def _named(specs: list[dict], names: list[str] | None, what: str) -> list[dict]:
    if names is None:
        return specs
    if len(names) != len(specs):
        raise EdgepackError(f"{len(names)} {what} name(s) given for a TFLite model with "
                            f"{len(specs)} {what}s: {', '.join(names)}",
                            f"give one name per {what}, in PyTorch order")
    return [{**s, "name": n} for s, n in zip(specs, names)]


def _check_outputs(model, example_inputs, rec: dict) -> None:
    """Run the artifact on the example inputs and pin down which output is which.

    The signature's output_0, output_1... order is expected to be PyTorch's; this checks it
    against PyTorch's own answers (shape, then a symmetric relative error in [0, 1] against
    every same-shaped candidate) and, where another output matches clearly better, records the
    order that matches. A right slot scores about 1e-7 (fp32) or a few hundredths (int8); the
    0.05 of slack keeps int8 noise, and outputs that are zero on the example, from reordering.
    """
    from torch.utils._pytree import tree_leaves
    from .validate import run_tflite
    with torch.no_grad():
        expected = [t.detach().double().numpy() for t in tree_leaves(model(*example_inputs))
                    if isinstance(t, torch.Tensor)]
    got = run_tflite(rec["path"], [t.numpy() for t in example_inputs], "NCHW",
                     output_order=rec["output_order"])  # example inputs are in the file's layout
    if len(got) != len(expected):
        raise EdgepackError(f"the TFLite model has {len(got)} outputs but PyTorch returns "
                            f"{len(expected)}", "report it with the model (converter bug)")

    def err(k: int, j: int) -> float:
        if got[j].shape != expected[k].shape:
            return float("inf")
        g, e = got[j].astype(np.float64), expected[k]
        return float(np.linalg.norm(g - e) / (np.linalg.norm(g) + np.linalg.norm(e) + 1e-12))

    errors = np.array([[err(k, j) for j in range(len(got))] for k in range(len(expected))])
    if all(np.isfinite(errors[k, k]) and errors[k, k] <= 2 * errors[k].min() + 0.05
           for k in range(len(expected))):
        return
    slots, free = [], set(range(len(got)))
    for k in range(len(expected)):
        j = min(free, key=lambda j: errors[k, j])
        if not np.isfinite(errors[k, j]):
            raise EdgepackError(f"PyTorch output {k} has shape {list(expected[k].shape)} and no "
                                f"TFLite output has it", "report it with the model")
        slots.append(j)
        free.discard(j)
    order = [rec["output_order"][j] for j in slots]
    specs = {n: s for n, s in zip(rec["output_order"], rec["outputs"])}
    names = {n: s for n, s in zip(rec["output_order"], rec["tflite_names"]["outputs"])}
    rec["outputs"] = [specs[j] for j in order]
    rec["tflite_names"]["outputs"] = [names[j] for j in order]
    rec["output_order"], rec["output_order_source"] = order, "matched on the example input"


def _wrap_layout(model: nn.Module, example_inputs, layout: str, lt):
    """NHWC: wrap so the artifact takes channel-last images; the wrapper transposes back."""
    if layout not in LAYOUTS:
        raise EdgepackError(f"unknown layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    model = model.eval()
    example_inputs = tuple(example_inputs)
    if layout == "NCHW":
        return model, example_inputs
    image_args = _image_args(example_inputs)
    if not image_args:
        raise EdgepackError("layout NHWC needs a 4-D float (N, C, H, W) image input; this model "
                            "has none", "use layout NCHW for this model")
    wrapped = lt.to_channel_last_io(model, args=image_args).eval()
    nhwc = tuple(t.permute(0, 2, 3, 1).contiguous() if i in image_args else t
                 for i, t in enumerate(example_inputs))
    return wrapped, nhwc


def _image_args(example_inputs) -> list[int]:
    """The arguments NHWC applies to: 4-D float tensors (not 4-D token ids or masks)."""
    return [i for i, t in enumerate(example_inputs) if t.ndim == 4 and t.is_floating_point()]


def _calibration_samples(calib: Dataset, n: int, example_inputs: tuple) -> list[np.ndarray]:
    """`n` samples of every input (argument order, each cast to its example's dtype), trimmed
    to a multiple of the export's fixed batch size."""
    if calib is None or len(calib) == 0:
        raise EdgepackError("int8 TFLite needs calibration data and none was given",
                            "pass --calib (a folder, .npz or file.py:function)")
    part = calib.take(n)
    # Dataset.arrays() is the multi-input API; a Dataset without it has one input, `x`.
    arrays = part.arrays() if hasattr(part, "arrays") else [part.x]
    names = list(getattr(part, "names", None) or [f"input {i}" for i in range(len(arrays))])
    if len(arrays) != len(example_inputs):
        raise EdgepackError(f"calibration data ({calib.source}) has {len(arrays)} input(s) "
                            f"({', '.join(names)}) but the model takes {len(example_inputs)}",
                            "give one array per model input, in the model's argument order")
    samples = []
    for name, a, ex in zip(names, arrays, example_inputs):
        a = np.asarray(a)
        what = "calibration samples" if len(arrays) == 1 else f"calibration input {name!r}"
        if tuple(a.shape[1:]) != tuple(ex.shape[1:]):
            raise EdgepackError(f"{what} have shape {tuple(a.shape[1:])} but the model input is "
                                f"{tuple(ex.shape[1:])} (from {calib.source})",
                                "give calibration data with the model's input shape, in PyTorch "
                                "layout (channels first)")
        want = torch.empty(0, dtype=ex.dtype).numpy().dtype
        if not ex.is_floating_point() and a.dtype.kind == "f":
            raise EdgepackError(f"{what} are {a.dtype} but the model input is {want} (token ids "
                                f"or a mask); float data cannot feed it (from {calib.source})",
                                "give integer data for this input")
        samples.append(a.astype(want, copy=False))
    bs = int(example_inputs[0].shape[0]) if example_inputs[0].ndim else 1
    if len(samples[0]) < bs:  # fewer samples than one batch: repeat them to fill it
        return [np.resize(a, (bs, *a.shape[1:])) for a in samples]
    return [np.ascontiguousarray(a[:len(a) // bs * bs]) for a in samples]


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
