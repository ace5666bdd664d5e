"""Stage 1: load the user's model (PyTorch factory + weights, or an ONNX file) and its input spec."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import EdgepackError
from ..userimport import import_attr


@dataclass
class LoadedModel:
    kind: str  # "torch" | "onnx"
    name: str
    input_shape: tuple[int, ...]  # with the batch axis, e.g. (1, 3, 224, 224)
    module: nn.Module | None = None
    onnx_path: Path | None = None
    input_name: str = "input"
    source: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.input_shape[1:])

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(self.input_shape),)


def parse_shape(text: str | list | tuple | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise EdgepackError(f"input shape {text!r} is not like 1x3x224x224") from None
    if not shape or any(s <= 0 for s in shape):
        raise EdgepackError(f"input shape {text!r} must have positive sizes, like 1x3x224x224")
    return shape


def load_model(spec: str, weights: str | None = None, input_shape=None,
               trust_pickle: bool = False, data_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Load a model from `spec` and check it accepts its input shape: `input_shape` if given,
    else the shape the model declares (`model.input_shape`), else `data_shape` (from the data)."""
    shape = parse_shape(input_shape)
    path = Path(spec)
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, shape)
    if path.suffix.lower() in (".pt", ".pth", ".pkl") and ":" not in spec:
        module = _load_pickled_module(path, trust_pickle)
        name = path.stem
    else:
        factory = import_attr(spec)
        try:
            module = factory()
        except Exception as e:
            raise EdgepackError(f"model factory {spec} raised {type(e).__name__}: {e}",
                                "call it in Python to debug; it must return an nn.Module") from e
        if not isinstance(module, nn.Module):
            raise EdgepackError(f"model factory {spec} returned {type(module).__name__}, not a torch.nn.Module")
        target, _, attr = spec.rpartition(":")
        name = Path(target).stem if target.endswith(".py") else attr
    if weights:
        load_weights(module, Path(weights))
    module.eval()
    shape = shape or _declared_shape(module) or data_shape
    if shape is None:
        raise EdgepackError(f"cannot tell the input shape of {spec}",
                            "pass --input-shape, e.g. --input-shape 1x3x224x224")
    _check_forward(module, shape, spec)
    return LoadedModel("torch", name, shape, module=module, source=spec)


def _declared_shape(module: nn.Module):
    """Models may declare `input_shape = (1, 3, 224, 224)` themselves."""
    shape = getattr(module, "input_shape", None)
    return parse_shape(shape) if shape is not None else None


def _check_forward(module: nn.Module, shape, spec: str) -> None:
    try:
        with torch.no_grad():
            module(torch.zeros(shape))
    except Exception as e:
        raise EdgepackError(f"model {spec} rejects input shape {'x'.join(map(str, shape))}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                            "pass the shape the model was trained on with --input-shape") from e


def load_weights(module: nn.Module, path: Path) -> None:
    if not path.exists():
        raise EdgepackError(f"weights file {path} does not exist", "check the --weights path")
    if path.suffix == ".safetensors" and _is_pruned_file(path):
        from ..prune import load_pruned  # `edgepack prune --out`: re-apply the pruned shapes first
        load_pruned(module, path)
        return
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgepackError(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                            "it must be a .safetensors file or a state dict saved with torch.save; "
                            "a pickled module needs --trust-pickle and the file as --model") from e
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise EdgepackError(f"weights {path} hold a {type(state).__name__}, not a state dict")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"wrong shape {len(wrong)} (e.g. {'; '.join(wrong[:2])})")
        raise EdgepackError(f"weights {path} do not fit the model: " + ", ".join(parts),
                            "check that the factory builds the same architecture the weights were saved from")
    module.load_state_dict(state, strict=True)


def _is_pruned_file(path: Path) -> bool:
    from safetensors import safe_open
    from ..prune.saving import FORMAT
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False  # not readable as safetensors: the normal path reports it


def _load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    if not path.exists():
        raise EdgepackError(f"model file {path} does not exist")
    if not trust_pickle:
        raise EdgepackError(f"{path} would have to be unpickled, which can run arbitrary code",
                            "pass --model file.py:factory with --weights, or --trust-pickle if you trust this file")
    try:
        module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise EdgepackError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise EdgepackError(f"{path} holds a {type(module).__name__}, not an nn.Module",
                            "if it is a state dict, pass it as --weights with --model file.py:factory")
    return module


def _load_onnx(path: Path, shape) -> LoadedModel:
    if not path.exists():
        raise EdgepackError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:
        raise EdgepackError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            "re-export it, or check that the file was copied completely") from e
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgepackError(f"{path} has {len(inputs)} inputs; edgepack handles single-input models")
    dims = [d.dim_value if d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim]
    if shape is None:
        if any(d is None for d in dims[1:]):
            raise EdgepackError(f"{path} has a dynamic input shape {dims}", "pass --input-shape")
        shape = (1, *dims[1:])
    elif len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], shape[1:])):
        raise EdgepackError(f"input shape {'x'.join(map(str, shape))} does not match {path}'s input {dims}",
                            "pass the shape the ONNX model declares, or omit --input-shape")
    return LoadedModel("onnx", path.stem, tuple(shape), onnx_path=path, input_name=inputs[0].name,
                       source=str(path))


