"""Reading the user's model files: a PyTorch factory (+ weights), a pickled module (only with
--trust-pickle), or an ONNX file. What the model's inputs are is decided in `stages/load.py`."""
from __future__ import annotations

import inspect
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import EdgepackError
from ..manifest import TensorSpec
from ..prune import load_pruned
from ..prune.saving import FORMAT
from ..userimport import import_attr


def torch_module(spec: str, weights: str | None, trust_pickle: bool) -> tuple[nn.Module, str]:
    """The user's nn.Module in eval mode, with its weights, and a name for the build."""
    path = Path(spec)
    if path.suffix.lower() in (".pt", ".pth", ".pkl") and ":" not in spec:
        module, name = _load_pickled_module(path, trust_pickle), path.stem
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
    return module.eval(), name


def forward_arg_names(module: nn.Module) -> list[str] | None:
    """Names of forward()'s positional parameters; None when it takes *args."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


def onnx_inputs(path: Path) -> tuple[list[TensorSpec], list[str]]:
    """The ONNX file's graph inputs (dims as ints, symbolic names, or "?") and output names."""
    if not path.exists():
        raise EdgepackError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EdgepackError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            "re-export it, or check that the file was copied completely") from e
    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for v in proto.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in t.shape.dim]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except Exception:
            raise EdgepackError(f"{path}: input {v.name!r} has an unsupported element type {t.elem_type}") from None
        specs.append(TensorSpec(name=v.name, shape=dims, dtype=dtype))
    if not specs:
        raise EdgepackError(f"{path} has no inputs")
    return specs, [o.name for o in proto.graph.output]


def load_weights(module: nn.Module, path: Path) -> None:
    if not path.exists():
        raise EdgepackError(f"weights file {path} does not exist", "check the --weights path")
    if path.suffix == ".safetensors" and _is_pruned_file(path):
        load_pruned(module, path)  # `edgepack prune --out`: re-apply the pruned shapes first
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
