"""Clustering with fine-tuning, a group of layers at a time.

`cluster_and_finetune` with steps=1 clusters every layer, then fine-tunes the centroids (the
assignment kept). With steps=N it clusters the layers in N groups of about equal weight count,
the least sensitive first (highest per-layer rate; with one rate for all, the largest layers
first), and fine-tunes after each group: the layers not clustered yet train densely and make up
for the group just clustered, while the groups clustered before keep training their centroids.
This is incremental quantization's schedule (Zhou et al., INQ, 2017: quantize a part of the
weights, retrain the rest, repeat) applied to weight sharing.

Why: on MobileNetV2 (width 0.35, rate 0.08 weighted by sensitivity, seed 0, 1796 test images)
one step of 6 epochs ended at 84.5% fp32 top-1 whatever the learning rate (0.0007 to 0.005): the
centroids are ~850 numbers, too few to absorb the error. Two steps of 3 epochs each (the same
training) ended at 85.5% (the unclustered model: 86.4%). Splitting at 80% of the weights instead of
half ended at 84.1%.
"""
from __future__ import annotations

import glob
from typing import Callable

from torch import nn

from ..errors import EdgepackError
from ..prune import FinetuneConfig, finetune
from .cluster import (ClusterRecord, attach, check_clusters, check_rate, cluster, clusterable_layers, eligible_layers,
                      rate_weighting, strip)
from .sensitivity import layer_rates

MAX_STEPS = 8


def step_groups(layers: dict[str, nn.Module], rates: dict[str, float], steps: int) -> list[list[str]]:
    """`layers` cut into at most `steps` groups of about equal weight count, in order of decreasing
    rate (with sensitivity-weighted rates the least sensitive first; with one rate for all, and
    on ties, the larger layer first). A layer goes to the group its
    first weight falls in, so a layer holding most of the weights makes fewer groups."""
    order = sorted(layers, key=lambda n: (-rates[n], -layers[n].weight.numel()))
    total = sum(layers[n].weight.numel() for n in order)
    groups: list[list[str]] = [[] for _ in range(steps)]
    done = 0
    for name in order:
        groups[min(steps - 1, done * steps // max(total, 1))].append(name)
        done += layers[name].weight.numel()
    return [g for g in groups if g]


def cluster_and_finetune(module: nn.Module, teacher: nn.Module | None, train, eval, ft_cfg: FinetuneConfig,
                         clusters: int = 16, skip=(), steps: int = 1, sensitivity: dict | None = None,
                         progress: Callable | None = None, metric=None,
                         score: Callable[[nn.Module], float | None] | None = None,
                         **options) -> tuple[nn.Module, ClusterRecord, list[dict]]:
    """Clusters `module` in place (`cluster`'s options: per_channel, init, seed, scaled, rate, qmax)
    in `steps` groups, fine-tuning after each (see the module docstring). Returns (module, the
    record of every clustered layer, [{"layers", "weights", "clustered" (score() once the group is
    clustered, before its fine-tuning), "finetune" (the summary)}] per step). The weights are
    plain tensors afterwards, whatever happens."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise EdgepackError(f"cluster steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}",
                            "1 clusters every layer at once; 2 clusters the least sensitive half first")
    clusters, rate = check_clusters(clusters), check_rate(options.get("rate", 0.0))
    layers = clusterable_layers(module)
    chosen, skipped = eligible_layers(layers, clusters, list(skip or ()))
    rates = layer_rates(chosen, rate, sensitivity, options.get("scaled", False))
    groups = step_groups(chosen, rates, steps) if chosen else [[]]
    records, done = [], []
    try:
        for i, group in enumerate(groups):
            others = [glob.escape(n) for n in layers if n not in group]  # skip takes fnmatch patterns
            _, rec = cluster(module, clusters, list(skip or ()) + others, sensitivity=sensitivity, rates=rates,
                             **options)
            if not rec.layers:
                return module, rec, []
            attach(module, rec)
            records.append(rec)
            clustered = score(module) if score else None
            label = "cluster fine-tune" if len(groups) == 1 else f"cluster step {i + 1}/{len(groups)} fine-tune"
            summary = finetune(module, teacher, train, eval, ft_cfg, progress, label=label, metric=metric)
            done.append({"layers": [layer.name for layer in rec.layers], "weights": rec.clustered_weights,
                         "clustered": clustered, "finetune": summary})
    finally:
        strip(module)
    out = merged(records, layers, skipped)
    out.rate_by = rate_weighting(rate, sensitivity, rates)
    return module, out, done


def merged(records: list[ClusterRecord], layers: dict, skipped: list[dict]) -> ClusterRecord:
    """One record for the groups: every clustered layer in the model's order; `skipped`: the
    layers `cluster` leaves alone in one step, with its reasons (not those a group left for later)."""
    rec = records[0]
    by_name = {layer.name: layer for r in records for layer in r.layers}
    out = ClusterRecord(clusters=rec.clusters, per_channel=rec.per_channel, init=rec.init, scaled=rec.scaled,
                        rate=rec.rate, rate_by=rec.rate_by, qmax=rec.qmax)
    out.layers = [by_name[n] for n in layers if n in by_name]
    out.skipped = skipped
    for r in records:
        out.codebooks.update(r.codebooks)
    return out
