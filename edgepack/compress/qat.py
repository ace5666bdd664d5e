"""Quantization-aware training (QAT) for the ONNX int8 route: fake quantization that simulates
the target's ONNX Runtime scheme, trained with distillation from the float model.

The route, and why it is this one:
- BatchNorm is folded into the convolutions first (torch.fx's `fuse`, eval statistics), because
  the ONNX export folds it and ONNX Runtime quantizes the *folded* weights: simulating int8 on
  unfolded weights would train the wrong numbers. A model FX cannot trace keeps its BatchNorm
  (frozen in eval mode while training) and the record says the simulation is approximate.
- Weights: a parametrization fake-quantizes every Conv/Linear weight on each forward exactly as
  ORT's quantizer will (`WeightSymmetric`: scale = 2 max|w| / (qmax - qmin) with ORT's ranges,
  per output channel when the scheme is per-channel, else per tensor; 7-bit with reduce_range),
  with the straight-through estimator. The scale is multiplied by a learned clip ratio (LSQ's
  gradient; starts at 1, i.e. ORT's scale), so an outlier that sets a per-tensor scale can be
  clipped for resolution elsewhere. The float weights underneath are what is trained; on exit
  they are clipped to ratio * max|w|, so ORT's max-based scale is the learned one and its
  quantizer maps them through the same function: the weight codes the network was trained with
  are the artifact's.
- Activations: per-tensor affine fake quantization (the scheme's activation type) at the input of
  every Conv/Linear, ranges initialised by MinMax over the calibration samples and followed by an
  EMA during training (torch's observers' averaging constant, 0.01). The artifact's activation
  ranges are then recalibrated by edgepack's own calibrator on the trained model, so the file is
  made by the same quantizer, format (QDQ) and scheme as the PTQ one; residual Add inputs and
  layer outputs are quantized by ORT but not simulated here.
- torch.ao's FX/PT2E QAT was not used for the ONNX file: its observers and fused ConvBn modules
  follow fbgemm/XNNPACK conventions (e.g. int8 weights in [-128, 127]), not ORT's ranges, and the
  artifact would need a second quantizer to match the PTQ file's format.

Imports nothing of the build: the stage (edgepack/stages/qat.py) wires it in.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..targets import Quantization
from .cluster import out_axis

EMA = 0.01  # torch.ao's MovingAverageMinMaxObserver default averaging constant
MIN_RATIO = 0.01  # the smallest learned weight clip ratio (WeightFakeQuant)
RANGE_LR = 0.05  # Adam lr of the clip ratios: 5e-3 barely moved them in 2 epochs (bench: compress_tradeoff_qat_k*.json)
_RANGES = {"QInt8": (-128, 127), "QUInt8": (0, 255)}
_SYMMETRIC = {"QInt8": (-127, 127)}  # ORT's ONNX_INT_TYPE_SYMMETRIC_RANGE
_REDUCED = {"QInt8": (-64, 64), "QUInt8": (0, 127)}  # ORT's ONNX_INT_TYPE_REDUCED_RANGE


def weight_range(q: Quantization) -> tuple[int, int]:
    """(qmin, qmax) ORT's quantizer uses for symmetric weights of this scheme."""
    if q.reduce_range:
        return _REDUCED[q.weight_type]
    return _SYMMETRIC.get(q.weight_type, _RANGES[q.weight_type])


def scheme_qmax(q: Quantization) -> int:
    """The grid the scheme quantizes weights on, in steps of a channel's max |w| (weight clustering
    snaps to it): the symmetric bound, 64 with reduce_range, else 127; unsigned weights have no
    symmetric integer grid, so 127 (their codes then merely stay at most k per channel)."""
    lo, hi = weight_range(q)
    return int(hi) if lo == -hi else _SYMMETRIC["QInt8"][1]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(getattr(m, "weight", None), torch.Tensor)}


class WeightFakeQuant(nn.Module):
    """Parametrization: w -> dequantize(quantize(w)) with ORT's symmetric weight scheme (STE).

    The scale is ORT's (2 max|w| / (qmax - qmin), per tensor or per output channel) times a
    learned clip ratio in [MIN_RATIO, 1] (one per scale; 1 at the start, so the untrained
    simulation is exactly ORT's). The ratio is trained by LSQ's gradient (Esser et al. 2020;
    AIMET's range learning and NNCF's trainable scales do the same), because one outlier channel
    that sets a per-tensor scale leaves every other channel a handful of codes, and clipping it
    trades a little error there for resolution everywhere else. `clip_()` writes the learned range
    into the weights (|w| <= ratio * max|w|), after which ORT's max-based scale is the learned one."""

    def __init__(self, q: Quantization, axis: int, channels: int | None = None, learn_range: bool = True,
                 device: torch.device | None = None):
        super().__init__()
        self.qmin, self.qmax = weight_range(q)
        self.per_channel, self.axis = q.per_channel, axis
        shape = (channels,) if (q.per_channel and channels) else ()
        self.ratio = nn.Parameter(torch.ones(shape, device=device), requires_grad=learn_range)

    def _absmax(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.per_channel:
                dims = [d for d in range(w.dim()) if d != self.axis]
                return w.abs().amax(dim=dims) if dims else w.abs()
            return w.abs().max()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = self._absmax(w)
        # clamped here too (fit also projects the parameter): a loop that does not project must
        # still simulate exactly what clip_ exports
        ratio = self.ratio.clamp(MIN_RATIO, 1.0)
        ratio = ratio.expand_as(absmax) if self.per_channel else ratio.reshape(())
        scale = (2 * ratio * absmax / (self.qmax - self.qmin)).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.full_like(absmax, float(round((self.qmax + self.qmin) / 2)))
        if self.ratio.requires_grad and torch.is_grad_enabled():
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(w, scale.float(), zero, self.axis,
                                                                         self.qmin, self.qmax)
            return torch._fake_quantize_learnable_per_tensor_affine(w, scale.float().reshape(1), zero.reshape(1),
                                                                    self.qmin, self.qmax)
        scale, zero = scale.detach().float(), zero.to(torch.int32)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, scale, zero, self.axis, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(w, scale, zero, self.qmin, self.qmax)

    @torch.no_grad()
    def project_(self):
        """Keep the ratio in [MIN_RATIO, 1] after an optimizer step (a ratio above 1 would only
        waste codes; below MIN_RATIO the scale would clip nearly everything)."""
        self.ratio.clamp_(MIN_RATIO, 1.0)

    @torch.no_grad()
    def clip_(self, w: torch.Tensor):
        """Clamp `w` in place to the learned range, so max|w| (ORT's scale) is ratio * max|w|."""
        bound = self._absmax(w) * self.ratio.clamp(MIN_RATIO, 1.0)
        if self.per_channel:
            shape = [1] * w.dim()
            shape[self.axis] = -1
            bound = bound.reshape(shape)
        w.copy_(torch.maximum(torch.minimum(w, bound), -bound))


class ActFakeQuant(nn.Module):
    """Per-tensor affine fake quantization with ORT's MinMax range rule (0 always in range)."""

    def __init__(self, activation_type: str):
        super().__init__()
        self.qmin, self.qmax = _RANGES[activation_type]
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        if self.calibrating or self.training:
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                if not bool(self.seen):
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                elif self.calibrating:  # MinMax over the calibration samples
                    self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
                else:
                    self.lo.add_(EMA * (lo - self.lo)), self.hi.add_(EMA * (hi - self.hi))
        if self.calibrating or not bool(self.seen):
            return x
        lo, hi = torch.clamp(self.lo, max=0.0), torch.clamp(self.hi, min=0.0)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-12)
        zero = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.float().reshape(()), zero.reshape(()),
                                                     self.qmin, self.qmax)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode copy with BatchNorm folded into the preceding convolutions (what the ONNX
    export does), and whether that worked; False: an unfolded copy (FX could not trace it)."""
    from torch.fx.experimental.optimization import fuse
    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = fuse(model, inplace=False)
    except Exception:  # noqa: BLE001  (not FX-traceable: keep BatchNorm, frozen)
        return model, False
    return folded, not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


class _FrozenBatchNorm:
    """Keeps BatchNorm in eval mode whatever `.train()` the fine-tuning loop calls."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.handles = [m.register_forward_pre_hook(lambda mod, args: mod.eval() and None) for m in self.norms]

    def remove(self):
        for h in self.handles:
            h.remove()


@contextmanager
def fake_quantized(model: nn.Module, q: Quantization, learn_ranges: bool = True):
    """Within the context `model` simulates `q`'s int8 (weights and Conv/Linear inputs); on exit
    the fake quantization is stripped and the trained float weights stay, clipped to their learned
    ranges (`learn_ranges`: WeightFakeQuant's clip ratios are trainable). Yields the layer names."""
    layers = quantizable_layers(model)
    acts = nn.ModuleDict({n.replace(".", "__") or "root": ActFakeQuant(q.activation_type) for n in layers})
    model.add_module("_qat_inputs", acts)
    hooks = []
    for name, layer in layers.items():
        axis = out_axis(layer)
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(q, axis, layer.weight.shape[axis],
                                                                              learn_ranges, layer.weight.device))
        fq = acts[name.replace(".", "__") or "root"]
        hooks.append(layer.register_forward_pre_hook(lambda mod, args, fq=fq: (fq(args[0]), *args[1:])))
    frozen = _FrozenBatchNorm(model)
    try:
        yield list(layers)
    finally:
        frozen.remove()
        for h in hooks:
            h.remove()
        for layer in layers.values():
            if parametrize.is_parametrized(layer, "weight"):
                layer.parametrizations.weight[0].clip_(layer.parametrizations.weight.original)
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        del model._qat_inputs


@torch.no_grad()
def calibrate(model: nn.Module, data, samples: int = 256, batch_size: int = 64) -> int:
    """Initialise the activation ranges by MinMax over up to `samples` seeded rows of `data`."""
    acts = [m for m in model.modules() if isinstance(m, ActFakeQuant)]
    for a in acts:
        a.calibrating = True
    model.eval()
    rows = data.sample_indices(min(samples, len(data)), seed=0)
    try:
        for i in range(0, len(rows), batch_size):
            idx = np.asarray(rows[i:i + batch_size])
            model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in data.arrays(idx)))
    finally:
        for a in acts:
            a.calibrating = False
    return len(rows)


def train_qat(model: nn.Module, q: Quantization, train, choose, calib, ft_cfg, progress=None,
              metric=None, learn_ranges: bool = True, range_lr: float = RANGE_LR) -> tuple[nn.Module, dict]:
    """A BatchNorm-folded copy of `model` trained with `q`'s int8 simulated, distilled from `model`
    (when ft_cfg.distill); returns the trained float model (no fake quantization left; weights
    clipped to their learned ranges when `learn_ranges`) and a record: the training summary, the
    simulated top-1 (or `metric`, the build's UserMetric) on `choose` before and after."""
    from ..prune.finetune import evaluate, score_name
    teacher = model.eval()
    student, folded = fold_batchnorm(model)
    with fake_quantized(student, q, learn_ranges) as layers:
        n_cal = calibrate(student, calib, q.calibration_samples)
        before = evaluate(student, choose, ft_cfg.batch_size, metric=metric)
        summary = fit(student, teacher if ft_cfg.distill else None, train, choose, ft_cfg, progress, metric,
                      range_lr)
        after = evaluate(student, choose, ft_cfg.batch_size, metric=metric)
        ranges = clip_ratios(student) if learn_ranges else None
        if ranges is not None and not folded:  # clipped before the export folds BatchNorm
            ranges["note"] = "BatchNorm not folded: ORT's scales of the folded weights are not exactly the learned ones"
    record = {"layers": len(layers), "batchnorm_folded": folded, "calibration_samples": n_cal,
              "weight_ranges": ranges,
              "simulated_metric": score_name(choose, metric, "top-1"),
              "simulated_top1_before": before, "simulated_top1_after": after, "finetune": summary,
              "weights": f"symmetric {q.weight_type} {weight_range(q)}, "
                         f"{'per output channel' if q.per_channel else 'per tensor'}",
              "activations": f"per-tensor affine {q.activation_type} at Conv/Linear inputs (MinMax init, EMA {EMA})"}
    return student.eval(), record


def clip_ratios(model: nn.Module) -> dict | None:
    """How far the learned weight ranges moved: the clip ratios' min, median and how many of
    them (one per scale) went below 0.99; None without a quantized layer."""
    found = [m.ratio.detach().reshape(-1) for m in model.modules() if isinstance(m, WeightFakeQuant)]
    if not found:
        return None
    r = torch.cat(found).clamp(MIN_RATIO, 1.0)
    return {"rule": f"learned clip ratio (LSQ gradient, Adam), in [{MIN_RATIO}, 1] of ORT's max|w| scale",
            "ratios": int(r.numel()), "min": round(float(r.min()), 4), "median": round(float(r.median()), 4),
            "below_0.99": int((r < 0.99).sum())}


def fit(student: nn.Module, teacher: nn.Module | None, train, choose, cfg, progress=None, metric=None,
        range_lr: float = RANGE_LR) -> dict:
    """Train the fake-quantized `student` in place; the best epoch on `choose` (simulated int8
    top-1, or `metric`, the build's UserMetric; epoch 0 = untrained included) is kept. Adam, not prune.finetune's SGD: an outlier
    channel (the case PTQ fails on) makes one weight's gradient thousands of times another's in
    the same tensor, and SGD at any learning rate that moves the others diverged (loss 1e3-1e5 on
    a planted-outlier CNN); Adam's per-element step does not care. Gradients are clipped at norm
    1 for the same reason. The loss is prune.finetune's Objective (distillation + CE)."""
    from ..prune.finetune import Objective, _teacher_outputs, evaluate, has_class_ids, input_arrays, to_tensors
    from ..prune.measure import flat_tensors
    from ..progress import reporter_and_events
    bars, events = reporter_and_events(progress)
    start = time.monotonic()
    deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ranges = [m for m in student.modules() if isinstance(m, WeightFakeQuant) and m.ratio.requires_grad]
    ratio_ids = {id(m.ratio) for m in ranges}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in ratio_ids]
    groups = [{"params": params}] + ([{"params": [m.ratio for m in ranges], "lr": range_lr}] if ranges else [])
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    cached = _teacher_outputs(teacher, train, cfg.batch_size) if teacher is not None else None
    with torch.no_grad():
        objective = Objective(flat_tensors(student.eval()(*to_tensors(input_arrays(train, slice(0, 2))))), train)
    best = evaluate(student, choose, cfg.batch_size, metric=metric)
    summary = {"distill": teacher is not None, "optimizer": "Adam", "epochs_run": 0, "train_loss": [], "eval_acc": [],
               "eval_acc_before": best, "best_epoch": 0, "stopped": None, "warnings": []}
    best_state = copy.deepcopy(student.state_dict())
    stale = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            student.train()
            losses = []
            with bars.task(f"QAT epoch {epoch}/{cfg.epochs}", total=math.ceil(len(train) / cfg.batch_size)) as bar:
                for j in train.batch_indices(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
                    bar.advance()
                    if len(j) < 2:
                        continue
                    xs = to_tensors(input_arrays(train, j))
                    labels = torch.from_numpy(train.y[j]) if has_class_ids(train) else None
                    if cached is not None:
                        soft = [t[torch.from_numpy(j)] for t in cached]
                    elif teacher is not None:
                        with torch.no_grad():
                            soft = flat_tensors(teacher(*xs))
                    else:
                        soft = None
                    loss = objective.loss(flat_tensors(student(*xs)), soft, labels, cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    for m in ranges:
                        m.project_()
                    sched.step()
                    losses.append(loss.item())
                    if time.monotonic() > deadline:
                        summary["stopped"] = "time limit"
                        break
            acc = evaluate(student, choose, cfg.batch_size, metric=metric)
            summary["epochs_run"] = epoch
            summary["train_loss"].append(float(np.mean(losses)) if losses else None)
            summary["eval_acc"].append(acc)
            if events is not None:
                events({"epoch": epoch, "epochs": cfg.epochs, "loss": summary["train_loss"][-1], "eval_acc": acc,
                        "seconds": time.monotonic() - start})
            if acc is not None and (best is None or acc > best):
                best, best_state, summary["best_epoch"], stale = acc, copy.deepcopy(student.state_dict()), epoch, 0
            else:
                stale += 1
            if summary["stopped"]:
                break
            if cfg.patience is not None and stale >= cfg.patience:
                summary["stopped"] = f"no improvement on the choosing samples for {stale} epoch(s)"
                break
    finally:
        torch.set_num_threads(threads)
    student.load_state_dict(best_state)
    student.eval()
    summary.update(eval_acc_after=best, seconds=round(time.monotonic() - start, 2))
    return summary
