"""Weight clustering (weight sharing): each Conv/Linear layer's weights take at most k values.

`cluster` runs a 1-D k-means over a layer's weight values (per layer, or per output channel)
and replaces every weight by its centroid. `clusters_kept` then makes the centroids the trainable
parameters for fine-tuning: the weight is gathered from them on every forward (a
torch.nn.utils.parametrize parametrization), so the assignment cannot drift and each layer
still holds at most k values afterwards; leaving the context strips the parametrization, so
export sees plain weights.

Choices, and why:
- Initialisation is linear by default (k centroids evenly spaced between the layer's smallest and
  largest weight; TFMOT's LINEAR option). Han et al. (Deep Compression, 2016) found it the most
  accurate of random, density-based and linear: the rare large weights keep centroids of their
  own. It also pins the extremes, so per-channel int8 scales (max |w| / 127) land on the same
  codebook in most channels and the int8 file compresses better. It is deterministic;
  `init="kmeans++"` (seeded) is the alternative.
- Per layer by default: one codebook per layer is what makes the int8 bytes repeat (a channel's
  int8 values are its centroids over its largest one); `per_channel=True` gives each output
  channel its own k centroids (closer weights, a file that compresses less).
- The centroid gradient is the mean of its members' gradients, not their sum: the sum (the
  exact gradient of a shared parameter) is thousands of times a weight's gradient for a big
  cluster, so the learning rate fine-tuning uses for weights would throw centroids about. The
  mean moves a centroid like one weight; it is a positive rescaling of the true gradient.
- `scaled` (the build stage's default) is what makes the int8 file small: per-channel int8 codes of
  a plain per-layer codebook are round(127 c / max_c |w|), a different set in each channel (up to
  16 x C byte values per tensor); scaled centroids are snapped to the int8 grid (multiples of
  1/qmax, straight-through while fine-tuning), so the file holds exactly the fine-tuned weights and
  each tensor at most k codes (`int8_distinct_per_tensor`). `qmax` is the int8 scheme's: 127, or
  64 where it quantizes weights with `reduce_range` (7 bits: x86 without VNNI). Snapped to 1/127
  and quantized at 1/64, every centroid is rounded a second time and the file no longer holds the
  fine-tuned weights.
- `rate` makes the k-means entropy-constrained: plain 16-means codes of a trained ResNet-18 (width
  0.5) have 3.71 bits of order-0 entropy a weight, and zip -9 adds ~15% to that; rate 0.04 took them
  to 2.85 bits (worst layer's relative error 0.098 -> 0.165), which fine-tuning recovers
  (bench/results/compress_cluster.json).
- int8: ONNX Runtime's per-channel weight quantization maps each value of a channel through one
  function (round(w / scale)), so k float values give at most k int8 values per channel (values
  can merge, never split); BatchNorm folding at export scales a channel by one factor, which keeps
  that. `int8_distinct_per_channel` checks the artifact.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import EdgepackError
from .cluster_int8 import (INT8_MAX, distinct_per_channel, int8_codes, int8_distinct_per_channel,  # noqa: F401
                          int8_distinct_per_tensor)
from .sensitivity import layer_rates

MAX_CLUSTERS = 256  # int8 holds 256 values: more clusters could not share anything
INITS = ("linear", "kmeans++")
KMEANS_ITERS = 50


@dataclass
class LayerClusters:
    name: str
    weights: int
    clusters: int  # centroids in use (<= k: empty clusters are dropped)
    distinct: int  # distinct weight values after clustering: per layer (per channel when scaled)
    rel_error: float  # ||w - centroid(w)|| / ||w||
    rate: float = 0.0  # the entropy-constrained k-means rate this layer got (`layer_rates`)


@dataclass
class ClusterRecord:
    clusters: int
    per_channel: bool
    init: str
    scaled: bool = False
    rate: float = 0.0
    rate_by: str = "uniform"  # or "sensitivity": each layer's rate weighted by how much it moves the outputs
    qmax: int = INT8_MAX  # the int8 grid scaled centroids sit on (multiples of 1/qmax of a channel's max)
    layers: list[LayerClusters] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"layer", "reason"}
    # name -> (centroids, index, scale or None): what `attach` trains; not part of the JSON
    codebooks: dict = field(default_factory=dict, repr=False)

    @property
    def clustered_weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    def to_dict(self) -> dict:
        return {"clusters": self.clusters, "per_channel": self.per_channel, "scaled": self.scaled, "rate": self.rate,
                "rate_by": self.rate_by, "init": self.init, "qmax": self.qmax,
                "clustered_layers": len(self.layers), "clustered_weights": self.clustered_weights,
                "layers": [asdict(layer) for layer in self.layers], "skipped": self.skipped}


def clusterable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Conv (any dimension, transposed too) and Linear layers with a weight, by qualified name."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(getattr(m, "weight", None), torch.Tensor)}


def out_axis(layer: nn.Module) -> int:
    """The output-channel axis of a layer's weight (ConvTranspose stores (in, out/groups, ...))."""
    return 1 if getattr(layer, "transposed", False) else 0


def check_clusters(clusters) -> int:
    if isinstance(clusters, bool) or not isinstance(clusters, (int, np.integer)) or not 2 <= clusters <= MAX_CLUSTERS:
        raise EdgepackError(f"clusters must be a whole number from 2 to {MAX_CLUSTERS}, not {clusters!r}",
                            "16 is the usual choice (4 bits of information per weight); int8 cannot hold more than 256")
    return int(clusters)


def kmeans_1d(values: torch.Tensor, k: int, init: str = "linear", seed: int = 0,
              iters: int = KMEANS_ITERS, rate: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: (centroids (m,), assignment like `values`), m <= k centroids in
    use, ascending. Values with at most k distinct entries get exactly those as centroids.
    `rate` > 0: entropy-constrained (Chou, Lookabaugh & Gray 1989): a value goes to the centroid
    minimising (x - c)^2 + rate * var(x) * -log2 p(c), so the assignment costs fewer bits to code
    (bigger clusters grow, some may empty) for a larger squared error."""
    x = values.detach().reshape(-1).double()
    unique, inverse = torch.unique(x, return_inverse=True)
    if len(unique) <= k:
        return unique.to(values.dtype), inverse.reshape(values.shape)
    c = _init(x, k, init, seed)
    # On sorted values a cluster is a contiguous run: each step is k binary searches and prefix sums.
    xs = x.sort().values
    prefix = torch.cat([torch.zeros(1, dtype=x.dtype), xs.cumsum(0)])
    n = torch.tensor([len(xs)])
    penalty = torch.zeros_like(c)  # rate * var * code length of each centroid, bits
    lam = float(rate) * float(x.var()) if rate else 0.0
    for _ in range(iters):
        bounds = _bounds(c, penalty)
        ends = torch.cat([torch.searchsorted(xs, bounds, right=True), n])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
        counts = ends - starts
        if lam:  # empty cells are dropped: their code length is infinite
            keep = counts > 0
            c = ((prefix[ends] - prefix[starts]) / counts.clamp(min=1))[keep]
            penalty = -lam * torch.log2(counts[keep].double() / len(xs))
            if len(c) == 1:
                break
            continue
        new = torch.where(counts > 0, (prefix[ends] - prefix[starts]) / counts.clamp(min=1), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    a = torch.bucketize(x, _bounds(c, penalty))
    used = torch.unique(a)  # drop empty clusters; renumber densely
    remap = torch.full((k,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    centroids = torch.zeros(len(used), dtype=x.dtype).index_add_(0, remap[a], x) / torch.bincount(remap[a])
    return centroids.to(values.dtype), remap[a].reshape(values.shape)


def _bounds(c: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Cell boundaries of ascending centroids: where (x - c_j)^2 + pen_j = (x - c_j+1)^2 + pen_j+1
    (the midpoints when the penalties are equal); made non-decreasing (a crossed cell is empty)."""
    mid = (c[1:] + c[:-1]) / 2 + (penalty[1:] - penalty[:-1]) / (2 * (c[1:] - c[:-1]).clamp(min=1e-30))
    return torch.cummax(mid, 0).values if len(mid) else mid


def _init(x: torch.Tensor, k: int, init: str, seed: int) -> torch.Tensor:
    if init == "linear":
        return torch.linspace(float(x.min()), float(x.max()), k, dtype=x.dtype)
    rng = np.random.default_rng(seed)  # k-means++ (Arthur & Vassilvitskii) on at most 20k values
    sample = x.numpy() if len(x) <= 20_000 else x.numpy()[rng.choice(len(x), 20_000, replace=False)]
    centers = [sample[rng.integers(len(sample))]]
    d2 = (sample - centers[0]) ** 2
    for _ in range(k - 1):
        total = d2.sum()
        nxt = sample[rng.choice(len(sample), p=d2 / total)] if total > 0 else sample[rng.integers(len(sample))]
        centers.append(nxt)
        d2 = np.minimum(d2, (sample - nxt) ** 2)
    return torch.from_numpy(np.sort(np.asarray(centers, dtype=np.float64)))


def _layer_codebook(weight: torch.Tensor, k: int, per_channel: bool, axis: int, init: str,
                    seed: int, rate: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k_total,), flat index into them shaped like weight)."""
    if not per_channel:
        return kmeans_1d(weight, k, init, seed, rate=rate)
    w = weight.detach().movedim(axis, 0)
    books, index, offset = [], torch.empty(w.shape, dtype=torch.long), 0
    for ch in range(w.shape[0]):
        c, a = kmeans_1d(w[ch], k, init, seed + ch, rate=rate)
        books.append(c)
        index[ch] = a + offset
        offset += len(c)
    return torch.cat(books), index.movedim(0, axis).contiguous()


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise EdgepackError(f"cluster rate must be a number from 0 to 1, not {rate!r}",
                            "0 is plain k-means; 0.03 trades ~0.4 bit per weight for more error")
    return float(rate)


def check_qmax(qmax) -> int:
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= INT8_MAX:
        raise EdgepackError(f"cluster qmax must be an integer from 1 to {INT8_MAX}, not {qmax!r}",
                            "127 for 8-bit weights, 64 for reduce_range (7-bit) weights")
    return qmax


def snap(c: torch.Tensor, qmax: int = INT8_MAX) -> torch.Tensor:
    """Values in [-1, 1] rounded to the symmetric int8 grid (multiples of 1/qmax)."""
    return torch.round(c * qmax) / qmax


def channel_max(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """max |w| per output channel, shaped to broadcast against the weight (all-zero channels: 1)."""
    m = weight.detach().abs().movedim(axis, 0).reshape(weight.shape[axis], -1).amax(1)
    shape = [1] * weight.dim()
    shape[axis] = -1
    return torch.where(m > 0, m, torch.ones_like(m)).reshape(shape)


def _scaled_codebook(weight: torch.Tensor, k: int, axis: int, init: str, seed: int, rate: float = 0.0,
                     qmax: int = INT8_MAX):
    """One codebook in [-1, 1] for w / max|w| of its channel, with -1 and +1 kept as centroids:
    every channel's largest |value| is then exactly its scale, so per-channel int8 codes are
    round(qmax * c) in every channel, one shared set of at most k codes per layer."""
    scale = channel_max(weight, axis)
    u = (weight.detach() / scale).clamp(-1, 1)
    is_inner = (u > -1) & (u < 1)
    c, a = kmeans_1d(u[is_inner], k - 2, init, seed, rate=rate) if is_inner.any() else (u.new_zeros(0), None)
    centroids = snap(torch.cat([u.new_tensor([-1.0]), c, u.new_tensor([1.0])]), qmax)
    index = torch.where(u > 0, len(c) + 1, 0)  # the channel maxima: -1 and +1
    if a is not None:
        index[is_inner] = a + 1
    return centroids, index, scale


def rate_weighting(rate: float, sensitivity: dict | None, rates: dict[str, float]) -> str:
    """What the record says of the rates: "sensitivity" when they were weighted and came out
    different (all sensitivities zero gives one rate for all: "uniform")."""
    return "sensitivity" if rate and sensitivity is not None and len(set(rates.values())) > 1 else "uniform"


def eligible_layers(layers: dict[str, nn.Module], k: int, skip) -> tuple[dict[str, nn.Module], list[dict]]:
    """(the layers `cluster` clusters, [{"layer", "reason"}] of those it leaves alone)."""
    seen: dict[int, str] = {}
    chosen, skipped = {}, []
    for name, layer in layers.items():
        weight = layer.weight
        reason = None
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            reason = "skipped by the configuration"
        elif id(weight) in seen:
            reason = f"shares its weight with {seen[id(weight)]} (clustered there)"
        elif weight.numel() < k:
            reason = f"too small: {weight.numel()} weights, fewer than {k} clusters"
        elif parametrize.is_parametrized(layer, "weight"):
            reason = "its weight is already parametrized"
        seen.setdefault(id(weight), name)
        if reason:
            skipped.append({"layer": name, "reason": reason})
        else:
            chosen[name] = layer
    return chosen, skipped


def cluster(module: nn.Module, clusters: int = 16, skip=(), per_channel: bool = False, init: str = "linear",
            seed: int = 0, scaled: bool = False, rate: float = 0.0,
            qmax: int = INT8_MAX, sensitivity: dict | None = None,
            rates: dict[str, float] | None = None) -> tuple[nn.Module, ClusterRecord]:
    """Cluster every Conv/Linear weight of `module` in place (see the module docstring); returns
    (module, record). `skip` holds layer names or fnmatch patterns left as they are. Layers with
    fewer weights than `clusters` are skipped, with the reason in the record. `scaled`: one
    codebook per layer times each output channel's max |w| (at most k values per channel, and
    the same k int8 codes in every channel: the int8 file compresses best), snapped to multiples of
    1/`qmax` (the int8 scheme's largest weight code: 64 with reduce_range). `sensitivity`
    (edgepack.compress.sensitivity.weight_sensitivity, by layer name) weights each layer's
    `rate` by how much its weights move the outputs (`layer_rates`); `rates` gives each layer's rate
    as it is (layer_rates of the whole model, when clustering it a group of layers at a time)."""
    k = check_clusters(clusters)
    if scaled and per_channel:
        raise EdgepackError("cluster: `scaled` and `per_channel` exclude each other",
                            "scaled shares one codebook across channels; per_channel gives each its own")
    if init not in INITS:
        raise EdgepackError(f"cluster init must be one of {', '.join(INITS)}, not {init!r}")
    layers = clusterable_layers(module)
    if not layers:
        raise EdgepackError("the model has no Conv or Linear layer to cluster",
                            "weight clustering shares the weights of nn.Conv*d and nn.Linear layers only")
    skip = list(skip or ())
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
    if unmatched:
        raise EdgepackError(f"cluster skip {', '.join(map(repr, unmatched))} names no Conv/Linear layer of the model",
                            f"layer names look like {', '.join(list(layers)[:4])}")
    check_rate(rate)
    qmax = check_qmax(qmax)
    record = ClusterRecord(clusters=k, per_channel=per_channel, init=init, scaled=scaled, rate=float(rate), qmax=qmax)
    chosen, record.skipped = eligible_layers(layers, k, skip)
    if rates is None or not rate:
        rates = layer_rates(chosen, rate, sensitivity, scaled)
    missing = [n for n in chosen if n not in rates]
    if missing:
        raise EdgepackError(f"cluster: no rate for layer(s) {', '.join(missing[:4])}",
                            "`rates` comes from layer_rates over every layer to be clustered")
    record.rate_by = rate_weighting(rate, sensitivity, rates)
    for name, layer in chosen.items():
        weight, r = layer.weight, rates[name]
        if scaled:
            centroids, index, scale = _scaled_codebook(weight, k, out_axis(layer), init, seed, r, qmax)
            new = (centroids[index] * scale).to(weight.dtype)
        else:
            centroids, index = _layer_codebook(weight, k, per_channel, out_axis(layer), init, seed, r)
            new, scale = centroids[index].to(weight.dtype), None
        record.codebooks[name] = (centroids.to(weight.dtype), index, scale)
        err = float((weight.detach() - new).norm() / weight.detach().norm().clamp(min=1e-30))
        with torch.no_grad():
            weight.copy_(new)
        distinct = distinct_per_channel(new.movedim(out_axis(layer), 0).reshape(new.shape[out_axis(layer)], -1).numpy()) \
            if scaled else int(torch.unique(new).numel())
        record.layers.append(LayerClusters(name, weight.numel(), len(centroids), distinct, round(err, 5), float(f"{r:.4g}")))
    return module, record


class _GatherMeanGrad(torch.autograd.Function):
    """centroids[index] forward; backward gives each centroid the mean gradient of its members."""

    @staticmethod
    def forward(ctx, centroids, index, counts):
        ctx.save_for_backward(index, counts)
        return centroids[index]

    @staticmethod
    def backward(ctx, grad):
        index, counts = ctx.saved_tensors
        total = torch.zeros(counts.shape, dtype=grad.dtype).index_add_(0, index.reshape(-1), grad.reshape(-1))
        return total / counts, None, None


class ClusteredWeight(nn.Module):
    """Parametrization: the weight is centroids[index] (times the channel's scale when scaled);
    the centroids are what trains. Scaled: -1 and +1 stay fixed and the others stay inside them,
    so each channel's max |w| remains its scale (and its int8 codes the shared ones)."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None,
                 qmax: int = INT8_MAX):
        super().__init__()
        self.scaled, self.qmax = scale is not None, qmax
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("index", index.clone())
        self.register_buffer("scale", scale.clone() if self.scaled else torch.ones((), dtype=centroids.dtype))
        counts = torch.bincount(index.reshape(-1), minlength=len(centroids)).clamp(min=1)  # unused ones: no 0/0
        self.register_buffer("counts", counts.to(centroids.dtype))
        ends = torch.zeros(len(centroids), dtype=torch.bool)
        if self.scaled:
            ends[[0, -1]] = True
        self.register_buffer("fixed", ends)

    def forward(self, original: torch.Tensor) -> torch.Tensor:  # `original` is ignored: it no longer trains
        c = self.centroids
        if self.scaled:  # on the int8 grid (straight-through): what the int8 file will hold, exactly
            c = torch.where(self.fixed, c.detach(), c.clamp(-1, 1))
            c = c + (snap(c, self.qmax) - c).detach()
        return _GatherMeanGrad.apply(c, self.index, self.counts) * self.scale


def attach(module: nn.Module, record: ClusterRecord) -> list[str]:
    """Parametrize every clustered layer of `record` with its codebook (`record.codebooks`; for a
    record read back from JSON, the layer's current distinct values)."""
    layers = clusterable_layers(module)
    names = []
    for entry in record.layers:
        layer = layers[entry.name]
        book = record.codebooks.get(entry.name)
        if book is None:
            if record.scaled:
                raise EdgepackError(f"cluster: no codebook for the scaled layer {entry.name}")
            book = (*torch.unique(layer.weight.detach(), return_inverse=True), None)
        parametrize.register_parametrization(layer, "weight", ClusteredWeight(*book, qmax=record.qmax), unsafe=True)
        layer.parametrizations.weight.original.requires_grad_(False)
        names.append(entry.name)
    return names


def strip(module: nn.Module) -> None:
    """Remove the clustering parametrizations, leaving plain weights (the gathered values)."""
    for _, layer in module.named_modules():
        if parametrize.is_parametrized(layer, "weight") and any(
                isinstance(p, ClusteredWeight) for p in layer.parametrizations.weight):
            with torch.no_grad():
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            layer.weight.requires_grad_(True)


@contextmanager
def clusters_kept(module: nn.Module, record: ClusterRecord):
    """`with clusters_kept(model, record): finetune(model, ...)`: the assignment holds while
    fine-tuning; on exit the weights are plain tensors again."""
    attach(module, record)
    try:
        yield module
    finally:
        strip(module)


def distinct_values(module: nn.Module, names=None) -> dict[str, int]:
    """Distinct weight values per layer (all clusterable layers, or those named)."""
    layers = clusterable_layers(module)
    return {n: int(torch.unique(layers[n].weight.detach()).numel()) for n in (names or layers)}
