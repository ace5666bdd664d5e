"""Unstructured magnitude sparsity with a gradual schedule (Zhu & Gupta, "To prune, or not to
prune", 2017), fine-tuned with distillation.

Each Conv/Linear layer's smallest-magnitude weights are set to zero, the fraction rising over the
fine-tuning steps along s_t = s_f + (s_i - s_f) (1 - t / T)^3 (T: 3/4 of the steps, then held),
so the network adapts while it loses weights; `one_shot` zeroes the target fraction at once and
fine-tunes with it fixed. Masks live in hooks (a forward pre-hook on the model zeroes the masked
weights before every forward, gradient hooks zero their gradients) and are removed at the end
with the zeros written into the weights, so export sees plain tensors holding zeros.

What it buys: the zeros compress (zip, OTA), and a runtime with sparse kernels may skip them; a
dense runtime runs exactly as fast as before, and the raw file size does not change.
"""
from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgepackError
from .size import deflate_len

SCHEDULES = ("polynomial", "one_shot")
MIN_WEIGHTS = 64  # smaller layers (a tiny head, a 1-channel depthwise) are left dense
END_FRACTION = 0.75  # the schedule reaches the target at 3/4 of the steps, then holds it
MASK_UPDATES = 16  # mask recomputations over the schedule (Zhu & Gupta: every few hundred steps)


def polynomial_sparsity(step: int, end_step: int, target: float, initial: float = 0.0, power: int = 3) -> float:
    """Zhu & Gupta's schedule: the sparsity at `step`, reaching `target` at `end_step`."""
    if end_step <= 0 or step >= end_step:
        return target
    return target + (initial - target) * (1 - step / end_step) ** power


def check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise EdgepackError(f"sparsity target must be a fraction of zero weights strictly between 0 and 1, got {target!r}",
                            "e.g. target = 0.8 zeroes 80% of each layer's weights")
    return float(target)


def sparsifiable_layers(model: nn.Module, skip: list[str] = ()) -> tuple[dict[str, nn.Module], list[dict]]:
    """Conv/Linear layers to sparsify (name -> module) and the ones left dense, with why. A
    `skip` pattern that matches no layer is an error (a typo would silently sparsify it)."""
    layers, skipped, seen = {}, [], set()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise EdgepackError(f"sparsity skip pattern {pattern!r} matches no Conv/Linear layer",
                                "layer names are module paths, e.g. " + ", ".join(names[:4]))
    for name in names:
        module = model.get_submodule(name)
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            skipped.append({"layer": name, "reason": "named in skip"})
        elif module.weight.numel() < MIN_WEIGHTS:
            skipped.append({"layer": name, "reason": f"too small: {module.weight.numel()} weights"})
        elif id(module.weight) in seen:
            skipped.append({"layer": name, "reason": "shares its weight with a layer sparsified already"})
        else:
            seen.add(id(module.weight))
            layers[name] = module
    return layers, skipped


@dataclass
class SparsityRecord:
    target: float
    schedule: str
    layers: list[dict] = field(default_factory=list)  # {"name", "weights", "zeros", "sparsity"}
    skipped: list[dict] = field(default_factory=list)
    steps: int = 0  # training steps the masks saw
    mask_updates: int = 0

    @property
    def weights(self) -> int:
        return sum(layer["weights"] for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer["zeros"] for layer in self.layers)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsified_weights": self.weights, "zero_weights": self.zeros,
                "sparsity": round(self.zeros / max(1, self.weights), 4)}


class MagnitudeMasks:
    """Masks for `layers`, recomputed from the weights' magnitudes along the schedule as the
    model trains (one training forward = one step)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], target: float, total_steps: int,
                 schedule: str = "polynomial"):
        self.model, self.layers, self.target, self.schedule = model, layers, target, schedule
        self.end_step = max(1, int(END_FRACTION * total_steps))
        self.every = max(1, math.ceil(self.end_step / MASK_UPDATES))
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        self.step, self.updates, self.current = 0, 0, 0.0
        self._handles = []
        if schedule == "one_shot":
            self.update(target)

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        for name, module in self.layers.items():
            w = module.weight.detach().abs().flatten()
            k = int(round(sparsity * w.numel()))
            mask = torch.ones(w.numel(), dtype=torch.bool)
            if k:
                mask[torch.argsort(w, stable=True)[:k]] = False
            self.masks[name] = mask.view_as(module.weight)
        self.current, self.updates = sparsity, self.updates + 1
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, module in self.layers.items():
            module.weight.mul_(self.masks[name])

    def _pre_forward(self, _module, _inputs) -> None:
        if self.model.training and self.schedule == "polynomial":
            if self.step % self.every == 0 or self.step == self.end_step:
                want = polynomial_sparsity(self.step, self.end_step, self.target)
                if want > self.current:
                    self.update(want)
            self.step += 1
        elif self.model.training:
            self.step += 1
        self.apply()

    def __enter__(self) -> "MagnitudeMasks":
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward))
        for name, module in self.layers.items():
            self._handles.append(module.weight.register_hook(lambda g, n=name: g * self.masks[n]))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.current < self.target:  # stopped early (time limit): the target all the same
            self.update(self.target)
        self.apply()


@contextmanager
def magnitude_masks(model: nn.Module, target: float, total_steps: int, schedule: str = "polynomial",
                    skip: list[str] = ()):
    """`with magnitude_masks(model, 0.8, steps) as masks: finetune(model, ...)`; on leaving, the
    masked weights are zeros in plain tensors and `masks.record` says how many per layer."""
    target = check_target(target)
    if schedule not in SCHEDULES:
        raise EdgepackError(f"unknown sparsity schedule {schedule!r}", f"use one of: {', '.join(SCHEDULES)}")
    layers, skipped = sparsifiable_layers(model, list(skip))
    if not layers:
        raise EdgepackError("no layer can be sparsified: " + "; ".join(f"{s['layer']}: {s['reason']}" for s in skipped),
                            "skip fewer layers")
    masks = MagnitudeMasks(model, layers, target, total_steps, schedule)
    with masks:
        yield masks
    masks.record = SparsityRecord(target, schedule, layer_sparsity(model, list(layers)), skipped, masks.step,
                                  masks.updates)


def layer_sparsity(model: nn.Module, names: list[str]) -> list[dict]:
    out = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        zeros = int((w == 0).sum())
        out.append({"name": name, "weights": int(w.numel()), "zeros": zeros, "sparsity": round(zeros / w.numel(), 4)})
    return out


def magnitude_sparsify(model: nn.Module, teacher: nn.Module | None, train, target: float = 0.8,
                       schedule: str = "polynomial", skip: list[str] = (), finetune_cfg=None,
                       progress=None) -> tuple[nn.Module, SparsityRecord, dict]:
    """Sparsify `model` in place to `target` zeros per layer while fine-tuning it (distillation
    from `teacher`); without training data (or with 0 epochs) the target is applied one-shot.
    Returns (model, record, fine-tuning summary). The last epoch is kept: the best eval epoch
    would be the least sparse."""
    from ..prune import FinetuneConfig, finetune
    cfg = finetune_cfg or FinetuneConfig()
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size) if train is not None and len(train) else 0
    with magnitude_masks(model, target, steps, schedule if steps else "one_shot", skip) as masks:
        summary = finetune(model, teacher, train, None, cfg.model_copy(update={"patience": None}), progress,
                           label="sparsity fine-tune")
    return model.eval(), masks.record, summary


def weight_bytes(model: nn.Module, names: list[str]) -> dict:
    """The layers' fp32 weights raw and deflated (level 9): the size figure known before export."""
    raw = b"".join(model.get_submodule(n).weight.detach().numpy().astype(np.float32).tobytes() for n in names)
    return {"raw_bytes": len(raw), "deflate_bytes": deflate_len(raw)}


def onnx_zero_fraction(path: Path | str, min_size: int = MIN_WEIGHTS) -> dict:
    """Zeros in an ONNX file's float initializers of at least 2 dimensions and `min_size`
    elements (the weights, not biases or shapes): {"weights", "zeros", "sparsity", "tensors"}."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    weights = zeros = tensors = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype.kind == "f" and a.ndim >= 2 and a.size >= min_size:
            weights, zeros, tensors = weights + a.size, zeros + int((a == 0).sum()), tensors + 1
    return {"weights": weights, "zeros": zeros, "sparsity": round(zeros / max(1, weights), 4), "tensors": tensors}
