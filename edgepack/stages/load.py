"""Stage `load`: the model, the exact shapes and dtypes of its inputs, and the build's data.

Input shapes come from `--input-shape` (one unnamed shape, or NAME=SHAPE per input), else the
model's own `input_shape` attribute, else the calibration data. Nothing is ever validated or
timed at a shape the user did not give: a dynamic ONNX dimension needs a shape from one of those.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from ..data import Dataset, Preprocess, conform, load_dataset
from ..errors import EdgepackError
from ..manifest import TensorSpec
from ..quality import load_metric
from .context import BuildContext, BuildData, LoadedModel
from .model_files import forward_arg_names, onnx_inputs, torch_module

NAME = "load"
SPLIT_SEED = 0


class Config(BaseModel):
    model: str
    weights: str | None = None
    trust_pickle: bool = False
    input_shape: list[int] | dict[str, list[int]] | None = None
    input_dtype: dict[str, str] = {}
    calib: str
    eval: str | None = None
    train: str | None = None
    choose_samples: int = 256
    metric: str | None = None


def config(ctx: BuildContext) -> Config:
    c = ctx.cfg
    if not c.calib:
        raise EdgepackError("int8 calibration needs representative data: none was given",
                            "pass --calib DIR|file.npz|module:function (a few hundred samples is plenty)")
    return Config(model=c.model, weights=c.weights, trust_pickle=c.trust_pickle, input_shape=c.input_shape,
                  input_dtype=c.input_dtype, calib=c.calib, eval=c.eval, train=c.train if _fine_tunes(c) else None,
                  choose_samples=c.choose_samples, metric=c.metric)


def run(ctx: BuildContext, cfg: Config) -> dict:
    pre = Preprocess(**ctx.cfg.data.preprocess_fields())
    raw = None if Path(cfg.calib).is_dir() else load_dataset(cfg.calib, None, pre, "calibration data")
    ctx.model = load_model(cfg.model, cfg.weights, cfg.input_shape, cfg.input_dtype, cfg.trust_pickle, raw)
    ctx.metric = (cfg.metric, load_metric(cfg.metric)) if cfg.metric else None
    ctx.data = load_build_data(ctx.model, cfg, pre, raw)
    m = ctx.model
    return {"kind": m.kind, "source": m.source, "batchable": m.batchable,
            "inputs": [s.model_dump() for s in m.inputs], "outputs": m.outputs, **ctx.data.notes}


def parse_shape(text: str | list | tuple | None) -> tuple[int, ...] | None:
    """`1x3x224x224` (or a list) -> (1, 3, 224, 224)."""
    if text is None:
        return None
    parts = list(text) if isinstance(text, (list, tuple)) else text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise EdgepackError(f"input shape {text!r} is not like 1x3x224x224") from None
    if not shape or any(s <= 0 for s in shape):
        raise EdgepackError(f"input shape {text!r} must have positive sizes, like 1x3x224x224")
    return shape


def load_model(spec: str, weights: str | None = None, input_shape=None, input_dtype: dict | None = None,
               trust_pickle: bool = False, data: Dataset | None = None) -> LoadedModel:
    """The model with concrete input specs; `data` (loaded with its own shapes) fills the gaps."""
    input_dtype = input_dtype or {}
    if Path(spec).suffix.lower() == ".onnx":
        return _onnx_model(Path(spec), input_shape, input_dtype, data)
    module, name = torch_module(spec, weights, trust_pickle)
    names = forward_arg_names(module)
    declared = getattr(module, "input_shape", None)
    shapes = _named_shapes(input_shape if input_shape is not None else declared, names, data, spec)
    if isinstance(input_shape, dict) and names is not None and not set(shapes) <= set(names):
        raise EdgepackError(f"--input-shape names {', '.join(sorted(set(shapes) - set(names)))}, but {spec}'s "
                            f"forward() takes {', '.join(names)}", "name each input as forward() does")
    # forward()'s argument order when every input is one of its arguments, else the data's order
    names = [n for n in names if n in shapes] if names is not None and set(shapes) <= set(names) else list(shapes)
    specs = [TensorSpec(name=n, shape=list(shapes[n]), dtype=_dtype(n, input_dtype, data)) for n in names]
    model = LoadedModel("torch", name, specs, [], module=module, source=spec)
    model.outputs, model.batchable = _probe(module, model, spec)
    return model


def _named_shapes(given, names: list[str] | None, data: Dataset | None, spec: str) -> dict[str, tuple]:
    if isinstance(given, dict):
        return {k: tuple(int(d) for d in v) for k, v in given.items()}
    if given is not None:
        shape = tuple(int(d) for d in given)
        first = (names or (data.names if data is not None else None) or ["input"])[0]
        return {first: shape}
    if data is not None:
        return {n: (1, *a.shape[1:]) for n, a in data.inputs.items()}
    raise EdgepackError(f"cannot tell the input shape of {spec}",
                        "pass --input-shape (e.g. 1x3x224x224, or NAME=1x512 per input), "
                        "or calibration data as .npz / module:function")


def _dtype(name: str, given: dict, data: Dataset | None) -> str:
    if name in given:
        return given[name]
    if data is not None and name in data.inputs:
        kind = np.dtype(data.inputs[name].dtype)
        return {"f": "float16" if kind == np.float16 else "float32", "b": "bool"}.get(kind.kind, "int64")
    return "float32"


def _probe(module, model: LoadedModel, spec: str) -> tuple[list[str], bool]:
    """Output names, and whether a batch of 2 gives batch-2 outputs (then samples stack on axis 0)."""
    from ..onnx_tools.export import flatten_outputs
    x1 = model.example_inputs()
    try:
        with torch.no_grad():
            out1 = flatten_outputs(module(*x1))
    except Exception as e:
        shapes = ("input shape " + "x".join(map(str, model.inputs[0].shape)) if len(model.inputs) == 1 else
                  "inputs " + ", ".join(f"{s.name}={'x'.join(map(str, s.shape))} {s.dtype}" for s in model.inputs))
        raise EdgepackError(f"model {spec} rejects {shapes}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}",
                            "pass the shapes the model was trained on with --input-shape "
                            "(NAME=SHAPE per input) and integer inputs with --input-dtype NAME=int64") from e
    if not out1:
        raise EdgepackError(f"model {spec} returns no tensors")
    names = [n for n, _ in out1]
    if not all(t.ndim and t.shape[0] == 1 for _, t in out1) or not all(int(s.shape[0]) == 1 for s in model.inputs):
        return names, False
    try:
        with torch.no_grad():
            out2 = flatten_outputs(module(*(torch.cat([x, x]) for x in x1)))
        return names, all(t.ndim and t.shape[0] == 2 for _, t in out2)
    except Exception:
        return names, False


def _onnx_model(path: Path, input_shape, input_dtype: dict, data: Dataset | None) -> LoadedModel:
    declared, outputs = onnx_inputs(path)
    given = input_shape
    if given is not None and not isinstance(given, dict):
        if len(declared) != 1:
            raise EdgepackError(f"{path} has {len(declared)} inputs ({', '.join(s.name for s in declared)}); "
                                "one unnamed --input-shape is ambiguous", "pass --input-shape NAME=SHAPE for each")
        given = {declared[0].name: given}
    given = given or {}
    unknown = set(given) - {s.name for s in declared}
    if unknown:
        raise EdgepackError(f"--input-shape names {', '.join(sorted(unknown))}, but {path} has inputs "
                            f"{', '.join(s.name for s in declared)}")
    batchable = all(isinstance(s.shape[0], str) for s in declared if s.shape)
    specs = []
    for s in declared:
        shape = _onnx_shape(path, s, given.get(s.name), data, batchable)
        dtype = input_dtype.get(s.name, s.dtype)
        if dtype != s.dtype:
            raise EdgepackError(f"--input-dtype {s.name}={dtype}, but {path} declares {s.dtype}")
        # An fp16 file is turned to fp32 before int8 (onnx_tools.upgrade): its artifacts take float32.
        specs.append(TensorSpec(name=s.name, shape=list(shape), dtype="float32" if s.dtype == "float16" else s.dtype))
    return LoadedModel("onnx", path.stem, specs, outputs, onnx_path=path, source=str(path),
                       batchable=batchable, declared=declared)


def _onnx_shape(path: Path, s: TensorSpec, given, data: Dataset | None, batchable: bool) -> tuple:
    dims = s.shape
    if given is not None:
        shape = tuple(int(d) for d in given)
        if len(shape) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(dims, shape)):
            raise EdgepackError(f"--input-shape {s.name}={'x'.join(map(str, shape))} does not fit {path}'s "
                                f"input {s.name} {dims}", "give a size for each dynamic dimension and keep the fixed ones")
        return shape
    arr = None if data is None else data.inputs.get(s.name, next(iter(data.inputs.values())) if len(data.inputs) == 1 else None)
    if arr is not None:
        sample = tuple(arr.shape[1:])
        shape = sample if not batchable and len(sample) == len(dims) else (1, *sample)
        if len(shape) == len(dims) and all(not isinstance(d, int) or d == g for d, g in zip(dims, shape)):
            return shape
    if all(isinstance(d, int) for d in dims[1:]) and (isinstance(dims[0], int) or batchable):
        return (dims[0] if isinstance(dims[0], int) else 1, *dims[1:])
    raise EdgepackError(f"{path}: input {s.name} has dynamic dimensions {dims}; edgepack validates and times "
                        "only at a shape you give", f"pass --input-shape {s.name}=" +
                        "x".join(str(d if isinstance(d, int) else (1 if i == 0 else 'N')) for i, d in enumerate(dims)) +
                        " with sizes for the named dimensions, or calibration data of that shape")


def load_build_data(model: LoadedModel, cfg: Config, pre: Preprocess, raw: Dataset | None) -> BuildData:
    specs = model.sample_specs()
    calib = conform(raw, specs, "calibration data") if raw is not None else \
        load_dataset(cfg.calib, specs, pre, "calibration data")
    _finite(calib, "calibration data")
    evals = load_dataset(cfg.eval, specs, pre, "evaluation data") if cfg.eval else calib
    _finite(evals, "evaluation data")
    notes = {"calibration": calib.source, "calibration_samples": len(calib),
             "evaluation": evals.source, "eval_is_calibration": not cfg.eval, "labelled": evals.labelled}
    if cfg.choose_samples and len(evals) >= 60:  # enough to give both roles a useful share
        n = min(cfg.choose_samples, len(evals) // 3)
        choose, report = evals.split(n, seed=SPLIT_SEED)
        notes.update(choose_samples=len(choose), report_samples=len(report),
                     split=f"seeded split (seed {SPLIT_SEED}) of the evaluation data: {len(choose)} samples "
                           f"choose (fallback node count, early stop), the other {len(report)} give the figures")
    else:
        choose = report = evals
        notes.update(choose_samples=len(evals), report_samples=len(evals),
                     split=f"only {len(evals)} evaluation samples: the same samples choose and report")
    train = load_dataset(cfg.train, specs, pre, "training data") if cfg.train else None
    return BuildData(calib, choose, report, train, notes)


def _finite(ds: Dataset, what: str) -> None:
    bad = ds.nonfinite_count()
    if bad:
        raise EdgepackError(f"{what} {ds.source} has NaN/Inf values in {bad} of {len(ds)} samples",
                            "clean or drop those samples; int8 ranges computed from them would be garbage")


def _fine_tunes(c) -> bool:
    """Whether a stage of this build trains (pruning, low-rank, clustering, sparsity, QAT): only then is
    --train read."""
    return bool(c.prune) or any(k in (c.compress or {}) for k in ("lowrank", "cluster", "sparsity", "qat"))

