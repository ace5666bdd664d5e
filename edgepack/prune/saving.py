"""Save and load pruned models without pickle.

A pruned model's architecture differs from its factory's, so weights alone cannot rebuild it.
The file is safetensors: the state dict, plus metadata holding torch-pruning's history (which
channel indices were removed from which layer, in order), attention head counts, the per-head
parameter slices and width attributes kept in step (sync.py), and the input shapes and dtypes.
`load_pruned` builds the factory's model, replays the history on it (same dependency graph, so
the same shapes), redoes the slices and attributes, then loads the weights strictly.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch_pruning as tp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import EdgepackError
from .graph import exact_reshapes
from .measure import attention_heads
from .record import PruneRecord
from .sync import head_parameters, redo

FORMAT = "edgepack.pruned/1"


def save_pruned(model: nn.Module, path: Path, record: PruneRecord) -> Path:
    """Write `model`'s weights and `record`'s pruning history to `path` (atomic)."""
    path = Path(path)
    meta = {"format": FORMAT, "history": json.dumps(record.history),
            "heads": json.dumps({n: after for n, (_, after) in record.heads.items()}),
            "input_shapes": json.dumps(record.input_shapes), "input_dtypes": json.dumps(record.input_dtypes),
            "sliced": json.dumps(record.sliced), "attributes": json.dumps(record.attributes),
            "record": json.dumps(record.to_dict() | {"history": None})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise EdgepackError(f"pruned model file {path} does not exist", "check the path")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise EdgepackError(f"{path} is not a safetensors file: {e}",
                            "pruned models are written by `edgepack prune --out FILE`") from e
    if meta.get("format") != FORMAT:
        raise EdgepackError(f"{path} is a safetensors file but not an edgepack pruned model",
                            "plain weights load with --weights; pruned models need load_pruned")
    return meta


def load_pruned(model: nn.Module, path: Path) -> nn.Module:
    """Prune the freshly built factory `model` to the saved shapes and load the saved weights
    into it (in place; returned in eval mode)."""
    from safetensors.torch import load_file
    meta = read_metadata(path)
    history = json.loads(meta["history"])
    shapes = json.loads(meta["input_shapes"])
    dtypes = json.loads(meta.get("input_dtypes", "[]")) or ["float32"] * len(shapes)
    inputs = tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes))
    model.eval()
    head_params = [getattr(model.get_submodule(n), p) for n, h in attention_heads(model).items()
                   for p, _ in head_parameters(model.get_submodule(n), h)]
    try:
        with warnings.catch_warnings(), exact_reshapes():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, inputs, ignored_params=head_params, verbose=False)
            dg.load_pruning_history([(n, out, idx) for n, out, idx in history])
        redo(model, json.loads(meta.get("sliced", "[]")), json.loads(meta.get("attributes", "{}")))
    except Exception as e:
        raise EdgepackError(f"cannot re-apply the pruning recorded in {path} to "
                            f"{type(model).__name__}: {type(e).__name__}: {e}",
                            "load it with the same model factory (and settings) it was pruned from") from e
    for name, heads in json.loads(meta["heads"]).items():
        model.get_submodule(name).num_heads = heads
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise EdgepackError(f"the weights in {path} do not fit {type(model).__name__} after re-pruning: "
                            f"{str(e).splitlines()[0]}",
                            "load it with the same model factory it was pruned from") from e
    return model.eval()
