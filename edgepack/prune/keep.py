"""Which layers keep their width: user-named ones, those whose output is a model output, and
attention output projections (which carry the residual stream)."""
from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import EdgepackError
from .graph import CONV_LINEAR
from .measure import attention_heads, flat_tensors
from .sync import int_attributes_read


def resolve_layers(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Module objects for user-given names; an unknown name is an error listing close matches."""
    modules = dict(model.named_modules())
    found = []
    for name in names:
        if name not in modules:
            scored = sorted((-difflib.SequenceMatcher(None, name, k).ratio(), k) for k in modules if k)
            close = [k for score, k in scored[:5] if -score >= 0.4]  # best first, ties alphabetical
            raise EdgepackError(
                f"ignore_layers: the model has no layer named {name!r}"
                + (f"; close matches: {', '.join(close)}" if close else ""),
                "names are module paths as in model.named_modules(), e.g. 'layers.0.conv1.0'")
        found.append(modules[name])
    return found


@torch.no_grad()
def output_layers(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[list[str], list, dict]:
    """Conv/linear layers whose output is a model output (the classifier head; layers whose
    channels reach an output through other operations are found on the graph, ChannelPruner),
    the outputs, and the integer attributes the forward pass read (sync.py)."""
    executed: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: executed.append((n, out)))
             for n, m in model.named_modules() if isinstance(m, CONV_LINEAR)]
    try:
        with int_attributes_read(model) as reads:
            outputs = flat_tensors(model(*example_inputs))
    finally:
        for h in hooks:
            h.remove()
    direct = [n for n, t in executed if any(t is o for o in outputs)]
    return direct or ([executed[-1][0]] if executed else []), outputs, reads


def attention_projections(model: nn.Module) -> list[str]:
    """Output projections of attention modules, and whole nn.MultiheadAttention modules (which
    torch-pruning prunes as one unit with the residual width): keeping them unpruned keeps the
    residual stream (embedding width, position embeddings, LayerNorms) intact, so only heads
    and MLP widths shrink."""
    names = []
    for name in attention_heads(model):
        for attr in ("proj", "out_proj", "o_proj"):
            if isinstance(getattr(model.get_submodule(name), attr, None), nn.Linear):
                names.append(f"{name}.{attr}")
    return names + [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
