"""How much each weight moves the model's outputs: the diagonal of the Gauss-Newton matrix J^T J,
estimated on input samples alone (no labels, any outputs).

Entropy-constrained clustering (`cluster(rate=...)`) trades a layer's squared weight error for
code bits. With one slope for every layer it treats a weight of the first convolution like one of
the last 1x1 convolution, yet on MobileNetV2 (width 0.35) the first moves the outputs ~30,000
times more per unit of (normalised) error: rate 0.11 everywhere left 25% top-1 before
fine-tuning. Weighting each layer's error by its sensitivity is Choi, El-Khamy & Lee's
Hessian-weighted entropy-constrained quantization (2017, "Towards the limit of network
quantization"), with the Gauss-Newton diagonal standing in for the Hessian's (it is positive and
needs first derivatives only).

Estimate (Hutchinson): for a batch, backpropagate sum(v * y / std(y)) over every float output y,
v ~ N(0, 1) drawn per element. The squared gradient of a weight is then, in expectation, the sum
over the batch's samples of sum_o (dy_o/dw)^2 / var(y_o): the cross terms vanish because v is
independent per element, and dividing by each output's spread makes outputs of different scales
(boxes and scores of a detector) count alike.
"""
from __future__ import annotations

import copy

import numpy as np

import torch
from torch import nn

from ..prune.finetune import input_arrays, to_tensors
from ..prune.measure import flat_tensors

SAMPLES = 128
BATCH = 8


def weight_sensitivity(module: nn.Module, data, layers: list[str] | None = None, samples: int = SAMPLES,
                       batch_size: int = BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per Conv/Linear layer (those named, else all), a tensor shaped like its weight: the mean over
    `samples` inputs of `data` (a seeded random subset: a folder of images is sorted by class) of
    the Gauss-Newton diagonal (see the module docstring). Runs on a copy in eval mode; `module` is
    left as it is. Layers the outputs do not depend on get zeros."""
    from .cluster import clusterable_layers
    if data is None or len(data) == 0:
        raise ValueError("weight_sensitivity needs input samples")
    model = copy.deepcopy(module).eval()
    found = clusterable_layers(model)
    names = list(found) if layers is None else list(layers)
    weights = {n: found[n].weight for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data), min(samples, len(data)), replace=False))
    seen = 0
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        probe = _probe(flat_tensors(model(*to_tensors(input_arrays(data, idx)))), gen)
        if probe is None:  # no float output depends on these weights
            break
        grads = torch.autograd.grad(probe, list(weights.values()), allow_unused=True)
        for name, g in zip(weights, grads):
            if g is not None:
                total[name] += g.detach() ** 2
        seen += len(idx)
    return {name: t / max(seen, 1) for name, t in total.items()}


def _probe(outputs: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor | None:
    """sum over float outputs of sum(v * y) / (std(y) * sqrt(elements per sample)), v ~ N(0, 1):
    each output counts alike, whatever its scale (the std) and its size (a detector's 10 landmark
    numbers against its 1 score, a voice model's 128 state values against its 1 probability).
    Outputs that are constant in the batch carry no scale to divide by and are left out."""
    terms = []
    for y in outputs:
        if not y.is_floating_point() or not y.requires_grad or y.numel() < 2:
            continue
        spread = float(y.detach().std())
        if not spread > 0:
            continue
        per_sample = y[0].numel() if y.dim() > 0 else 1
        v = torch.randn(y.shape, generator=gen, dtype=y.dtype)
        terms.append((v * y).sum() / (spread * per_sample ** 0.5))
    return sum(terms) if terms else None


def layer_rates(layers: dict[str, nn.Module], rate: float, sensitivity: dict | None, scaled: bool) -> dict[str, float]:
    """The entropy-constrained rate of each layer. Without `sensitivity`, `rate` for all. With it
    (weight_sensitivity's Gauss-Newton diagonals), Hessian-weighted ECSQ (Choi et al. 2017): the
    k-means trades h_l * (x - c)^2 against code bits with one slope for the whole model, h_l the
    layer's mean sensitivity to the values x the k-means clusters (scaled: w / max|w| of the
    channel inside (-1, 1), the channel maxima being fixed centroids; so h is scaled by max|w|^2).
    kmeans_1d's penalty is rate_l * var(x_l), hence rate_l = rate * G / (h_l * var(x_l)), G the
    geometric mean of h * var(x) weighted by the values clustered: a layer of typical sensitivity
    keeps `rate`. Capped at 1 (a bit then costs the layer's whole variance: it keeps only a few
    centroids); layers the outputs do not depend on get the cap. per_channel codebooks use each
    channel's variance in kmeans_1d but one rate per layer here: an approximation."""
    from ..errors import EdgepackError
    from .cluster import channel_max, out_axis
    if not rate or sensitivity is None:
        return {name: float(rate) for name in layers}
    missing = [n for n in layers if n not in sensitivity]
    if missing:
        raise EdgepackError(f"cluster: no sensitivity for layer(s) {', '.join(missing[:4])}",
                            "weight_sensitivity(model, data) gives one entry per Conv/Linear layer")
    spread: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, layer in layers.items():
        w, g2 = layer.weight.detach().double(), sensitivity[name].double()
        if scaled:
            s = channel_max(layer.weight, out_axis(layer)).double()
            u = (w / s).clamp(-1, 1)
            inner = (u > -1) & (u < 1)
            x, h = u[inner], float((g2 * s ** 2)[inner].mean()) if inner.any() else 0.0
        else:
            x, h = w.reshape(-1), float(g2.mean())
        counts[name] = int(x.numel())
        spread[name] = h * float(x.var()) if x.numel() > 1 else 0.0
    known = {n: v for n, v in spread.items() if v > 0}
    if not known:
        return {name: float(rate) for name in layers}
    log_g = sum(counts[n] * np.log(v) for n, v in known.items()) / sum(counts[n] for n in known)
    g = float(np.exp(log_g))
    return {name: min(1.0, rate * g / spread[name]) if spread[name] > 0 else 1.0 for name in layers}
