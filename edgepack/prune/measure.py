"""Model size facts measured by running the model: MACs (torch's FlopCounterMode), params, widths."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def flat_tensors(out) -> list[torch.Tensor]:
    """A model's outputs (tensor, tuple/list, dict, nested) as a flat list, in the order of
    edgepack.onnx_tools.export.flatten_outputs (dicts by insertion order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_tensors(o)]
    return []


def count_macs_params(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass (FLOPs / 2, convs, linears and matmuls) and params."""
    return macs_params_outputs(model, example_inputs)[:2]


@torch.no_grad()
def macs_params_outputs(model: nn.Module, example_inputs) -> tuple[int, int, list[torch.Tensor]]:
    """count_macs_params, and the flattened outputs of the forward pass it ran."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            outputs = flat_tensors(model(*example_inputs))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters()), outputs


def layer_widths(model: nn.Module) -> dict[str, dict]:
    """Input/output channels of every conv and linear layer, by module name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = {"type": type(m).__name__, "in": m.in_channels, "out": m.out_channels,
                            "groups": m.groups}
        elif isinstance(m, nn.Linear):
            widths[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features, "groups": 1}
    return widths


def attention_heads(model: nn.Module) -> dict[str, int]:
    """`num_heads` of every attention module that follows the timm convention (a `qkv` Linear)."""
    return {name: m.num_heads for name, m in model.named_modules()
            if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "qkv", None), nn.Linear)}
