"""Low-rank factorization by truncated SVD: each Linear and each dense Conv2d becomes two thinner
layers, so the exported model has fewer MACs and parameters.

Forms (whichever costs fewer MACs at the rank the budget gives):
- `linear`: Linear(in, out) -> Linear(in, r, bias=False) + Linear(r, out).
- `channel`: Conv2d(I -> O, kh x kw) -> Conv2d(I -> r, kh x kw, bias=False) + 1x1 Conv2d(r -> O);
  the SVD of W reshaped (O, I*kh*kw). The first conv keeps stride, padding and dilation.
- `spatial` (Jaderberg et al. 2014, as AIMET does it): W (O, I, kh, kw) permuted to (I, kh, O, kw)
  and reshaped (I*kh, O*kw); its SVD gives Conv2d(I -> r, kh x 1) + Conv2d(r -> O, 1 x kw). The
  height half of stride/padding/dilation goes to the first conv, the width half to the second.
  The first conv's output column j depends only on input column j, so padding the second conv's
  input in width (zeros, reflect, replicate, circular) equals padding the original input: exact.
At full rank both forms reproduce the layer (up to float rounding); depthwise and grouped convs,
other conv kinds and layers where even the budget's rank is not cheaper are left alone and
listed as skipped with the reason.

Ranks come from an energy threshold (smallest rank keeping that fraction of sum(sigma^2) per
layer) or a MACs target (fraction of the model's MACs to keep): either one global energy
threshold found by bisection, or per-layer ranks that minimise the energy lost for the MACs
removed (a Lagrangian on (1 - energy kept) + lambda * MACs, lambda bisected; the default).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import EdgepackError
from ..prune.measure import count_macs_params

Allocation = Literal["energy_per_mac", "global_energy"]
ALLOCATIONS = ("energy_per_mac", "global_energy")
FormName = Literal["auto", "channel", "spatial"]
FORMS = ("auto", "channel", "spatial")


class TargetOutOfReach(EdgepackError):
    """macs_target cannot be met at this rank multiple (a smaller multiple may meet it)."""


@dataclass
class Form:
    """One way to factorize a layer: its singular values and what each unit of rank costs."""
    name: str  # linear | channel | spatial
    sigma: np.ndarray  # singular values, descending
    macs_per_rank: int
    params_per_rank: int
    energy: np.ndarray = field(init=False)  # energy[r - 1]: fraction of sum(sigma^2) kept at rank r

    def __post_init__(self):
        sq = self.sigma.astype(np.float64) ** 2
        total = sq.sum()
        self.energy = np.cumsum(sq) / total if total > 0 else np.ones_like(sq)

    @property
    def full_rank(self) -> int:
        return len(self.sigma)


@dataclass
class Candidate:
    name: str
    module: nn.Module
    kind: str  # linear | conv
    macs: int  # of the original layer on the example inputs
    params: int
    forms: list[Form]
    choice: tuple[Form, int] | None = None  # (form, rank) once planned; None = left alone


def factorize(module: nn.Module, example_inputs, energy: float | None = None, macs_target: float | None = None,
              min_rank: int = 1, rank_multiple: int = 1, skip: list[str] | tuple[str, ...] = (),
              allocation: Allocation = "energy_per_mac", ranks: dict[str, int] | None = None,
              form: FormName = "auto", only_if_cheaper: bool = True) -> tuple[nn.Module, dict]:
    """Factorize `module`'s Linear and dense Conv2d layers. Returns (a new module, the record);
    `module` is not modified.

    energy: fraction of each layer's singular-value energy to keep, in (0, 1].
    macs_target: fraction of the model's MACs to keep, in (0, 1) (`allocation` decides how).
    ranks: explicit rank per layer name (overrides energy/macs_target for those layers).
    min_rank / rank_multiple: ranks are at least min_rank and multiples of rank_multiple (SIMD
    blocks), capped at the layer's full rank. skip: module names (and everything under them)
    left alone. form: "auto" picks per layer the form with fewer MACs; "channel" or "spatial" forces
    it on kxk convs (1x1 convs are always channel splits). only_if_cheaper=False factorizes even where that adds MACs (full-rank checks)."""
    check_options(energy, macs_target, min_rank, rank_multiple, allocation, ranks, form)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    macs_before, params_before = count_macs_params(module, inputs)
    skipped: list[dict] = []
    candidates = _candidates(module, inputs, list(skip), skipped, form)
    fixed = macs_before - sum(c.macs for c in candidates)  # MACs no factorization can touch
    by_name = {c.name: c for c in candidates}
    for name in ranks or {}:
        if name not in by_name:
            raise EdgepackError(f"low-rank: `ranks` names {name!r}, which is not a factorizable layer",
                                f"factorizable layers: {', '.join(by_name) or 'none'}")
    free = [c for c in candidates if c.name not in (ranks or {})]
    for name, rank in (ranks or {}).items():
        c = by_name[name]
        c.choice = min(((f, min(rank, f.full_rank)) for f in c.forms), key=lambda fr: fr[0].macs_per_rank * fr[1])
    if macs_target is not None:
        goal = macs_target * macs_before - fixed - sum(_cost(c) for c in candidates if c.choice)
        solution = _plan_macs(free, goal, allocation, min_rank, rank_multiple, only_if_cheaper)
        if solution is None:
            floor = fixed + sum(_cost(c) if c.choice else min(c.macs, _min_cost(c, min_rank, rank_multiple))
                                for c in candidates)
            raise TargetOutOfReach(
                f"low-rank: macs_target {macs_target} is out of reach: factorizing every layer at the lowest "
                f"rank keeps {floor / macs_before:.3f} of the MACs ({fixed / macs_before:.3f} is in layers that "
                "cannot be factorized)", "raise macs_target, lower min_rank, or prune channels first")
        threshold = solution
    elif energy is not None:
        for c in free:
            c.choice = _pick_energy(c, energy, min_rank, rank_multiple, only_if_cheaper)
        threshold = {"energy": energy}
    else:
        threshold = {}
    for c in free:
        if c.choice is None and (energy is not None or macs_target is not None):
            skipped.append({"name": c.name, "reason": _not_cheaper_reason(c, energy, min_rank, rank_multiple)})
    new = copy.deepcopy(module)
    layers = []
    for c in candidates:
        if c.choice is None:
            continue
        chosen, rank = c.choice
        _replace(new, c.name, _build(new.get_submodule(c.name), chosen.name, rank))
        layers.append({"name": c.name, "kind": c.kind, "shape": list(c.module.weight.shape), "form": chosen.name,
                       "rank": rank, "full_rank": chosen.full_rank, "macs_before": c.macs,
                       "macs_after": chosen.macs_per_rank * rank, "params_before": c.params,
                       "params_after": chosen.params_per_rank * rank + _bias(c.module),
                       "energy_kept": round(float(chosen.energy[rank - 1]), 6)})
    macs_after, params_after = count_macs_params(new, inputs)
    record = {"requested": {k: v for k, v in {"energy": energy, "macs_target": macs_target,
                                               "ranks": ranks}.items() if v is not None},
              "allocation": allocation if macs_target is not None else None, **threshold,
              "min_rank": min_rank, "rank_multiple": rank_multiple,
              "macs_before": int(macs_before), "macs_after": int(macs_after),
              "params_before": int(params_before), "params_after": int(params_after),
              "macs_reduction": round(macs_before / max(1, macs_after), 4),
              "params_reduction": round(params_before / max(1, params_after), 4),
              "layers": layers, "skipped": skipped}
    return new, record


def factorize_rounded(module: nn.Module, example_inputs, rank_multiple: int, **options) -> tuple[nn.Module, dict]:
    """factorize with ranks in multiples of `rank_multiple` (the target's SIMD width), halving the
    multiple while a macs_target is out of reach at it (small layers have few multiples of 16)."""
    tried = []
    while True:
        try:
            new, record = factorize(module, example_inputs, rank_multiple=rank_multiple, **options)
        except TargetOutOfReach:
            tried.append(rank_multiple)
            if rank_multiple == 1:
                raise
            rank_multiple = max(1, rank_multiple // 2)
            continue
        record["rank_multiples_out_of_reach"] = tried
        return new, record


def check_options(energy, macs_target, min_rank, rank_multiple, allocation, ranks, form) -> None:
    hint = "e.g. energy = 0.9 keeps 90% of each layer's singular-value energy; macs_target = 0.5 halves the MACs"
    if energy is not None and macs_target is not None:
        raise EdgepackError("low-rank: give energy or macs_target, not both", hint)
    if energy is None and macs_target is None and not ranks:
        raise EdgepackError("low-rank: no goal: give energy or macs_target", hint)
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise EdgepackError(f"low-rank: energy must be in (0, 1], got {energy!r}", hint)
    if macs_target is not None and not (isinstance(macs_target, (int, float)) and 0 < macs_target < 1):
        raise EdgepackError(f"low-rank: macs_target must be strictly between 0 and 1, got {macs_target!r}", hint)
    if not isinstance(min_rank, int) or min_rank < 1 or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise EdgepackError(f"low-rank: min_rank and rank_multiple must be integers >= 1, got {min_rank!r}, "
                            f"{rank_multiple!r}", hint)
    if allocation not in ALLOCATIONS:
        raise EdgepackError(f"low-rank: allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}", hint)
    if form not in FORMS:
        raise EdgepackError(f"low-rank: form must be one of {', '.join(FORMS)}, got {form!r}", hint)
    for name, rank in (ranks or {}).items():
        if not isinstance(rank, int) or rank < 1:
            raise EdgepackError(f"low-rank: rank of {name!r} must be an integer >= 1, got {rank!r}", hint)


def _candidates(module: nn.Module, inputs, skip: list[str], skipped: list[dict], form: str) -> list[Candidate]:
    names = {n for n, _ in module.named_modules()}
    unknown = [s for s in skip if s not in names]
    if unknown:
        layers = [n for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        raise EdgepackError(f"low-rank: skip names {', '.join(map(repr, unknown))}, which the model does not have",
                            "use module names as in model.named_modules(); its Conv/Linear layers: "
                            + (", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "") or "none"))
    shapes = _call_shapes(module, inputs)
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or not name:
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            skipped.append({"name": name, "reason": "listed in skip"})
            continue
        reason = _unsupported(m)
        if reason is None and name not in shapes:
            reason = "not run by the forward pass on the example inputs"
        if reason:
            skipped.append({"name": name, "reason": reason})
            continue
        forms, macs = _forms(m, shapes[name])
        if form != "auto" and len(forms) > 1:
            forms = [f for f in forms if f.name == form]
        out.append(Candidate(name, m, "linear" if isinstance(m, nn.Linear) else "conv", macs,
                             sum(p.numel() for p in m.parameters(recurse=False)), forms))
    return out


def _unsupported(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return None
    if not isinstance(m, nn.Conv2d) or isinstance(m, nn.modules.conv._ConvTransposeNd):
        return f"{type(m).__name__}: only Linear and Conv2d are factorized"
    if m.groups > 1:
        kind = "depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"
        return f"{kind} convolution (groups={m.groups}): already factorized along channels"
    return None


@torch.no_grad()
def _call_shapes(module: nn.Module, inputs) -> dict[str, list[tuple[tuple, tuple]]]:
    """(input shape, output shape) of every call of every Linear/Conv layer on the example inputs."""
    shapes: dict[str, list] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: shapes.setdefault(name, []).append((tuple(args[0].shape),
                                                                                       tuple(out.shape)))))
    was_training = module.training
    try:
        module.eval()(*inputs)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _forms(m: nn.Module, calls) -> tuple[list[Form], int]:
    w = m.weight.detach().to(torch.float64)
    if isinstance(m, nn.Linear):
        rows = sum(math.prod(i) // m.in_features for i, _ in calls)
        sigma = torch.linalg.svdvals(w).numpy()
        return [Form("linear", sigma, rows * (m.in_features + m.out_features),
                     m.in_features + m.out_features)], rows * m.in_features * m.out_features
    o, i, kh, kw = w.shape
    out_pixels = sum(math.prod(out) // o for _, out in calls)  # batch * Ho * Wo over calls
    macs = out_pixels * i * kh * kw
    forms = [Form("channel", torch.linalg.svdvals(w.reshape(o, -1)).numpy(), out_pixels * (i * kh * kw + o),
                  i * kh * kw + o)]
    if kh > 1 and kw > 1:
        # the first (kh x 1) conv produces every input column: batch * Ho * W_in pixels
        mid_pixels = sum(math.prod(out) // (o * out[-1]) * inp[-1] for inp, out in calls)
        forms.append(Form("spatial", torch.linalg.svdvals(_spatial_matrix(w)).numpy(),
                          mid_pixels * i * kh + out_pixels * o * kw, i * kh + o * kw))
    return forms, macs * o


def _spatial_matrix(w: torch.Tensor) -> torch.Tensor:
    o, i, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(i * kh, o * kw)


def _allowed_ranks(form: Form, min_rank: int, multiple: int) -> np.ndarray:
    """Multiples of `multiple` from min_rank up, and always the full rank."""
    ranks = [r for r in range(multiple, form.full_rank + 1, multiple) if r >= min_rank]
    if not ranks or ranks[-1] != form.full_rank:
        ranks.append(form.full_rank)
    return np.array(ranks)


def _rank_for_energy(form: Form, energy: float, min_rank: int, multiple: int) -> int:
    need = int(np.searchsorted(form.energy, energy - 1e-12)) + 1  # smallest rank with energy kept >= energy
    allowed = _allowed_ranks(form, min_rank, multiple)
    return int(allowed[np.searchsorted(allowed, min(need, form.full_rank))])


def _pick_energy(c: Candidate, energy: float, min_rank: int, multiple: int, only_if_cheaper: bool):
    best = min(((f, _rank_for_energy(f, energy, min_rank, multiple)) for f in c.forms),
               key=lambda fr: fr[0].macs_per_rank * fr[1])
    if only_if_cheaper and best[0].macs_per_rank * best[1] >= c.macs:
        return None
    return best


def _cost(c: Candidate) -> int:
    return c.macs if c.choice is None else c.choice[0].macs_per_rank * c.choice[1]


def _min_cost(c: Candidate, min_rank: int, multiple: int) -> int:
    return min(f.macs_per_rank * int(_allowed_ranks(f, min_rank, multiple)[0]) for f in c.forms)


def _plan_macs(free: list[Candidate], goal: float, allocation: str, min_rank: int, multiple: int,
               only_if_cheaper: bool) -> dict | None:
    """Set c.choice on every free candidate so their MACs total at most `goal`; None if impossible."""
    if sum(min(c.macs, _min_cost(c, min_rank, multiple)) for c in free) > goal:
        return None
    if allocation == "global_energy":
        def plan(e):
            return [_pick_energy(c, e, min_rank, multiple, only_if_cheaper) for c in free]
        lo, hi = 0.0, 1.0  # total MACs grow with the threshold: the largest threshold within the goal
        for _ in range(60):
            mid = (lo + hi) / 2
            if _total(free, plan(mid)) <= goal:
                lo = mid
            else:
                hi = mid
        for c, choice in zip(free, plan(lo)):
            c.choice = choice
        return {"energy_threshold": round(lo, 6)}
    # per layer: options (MACs, energy lost); lambda prices MACs against lost energy
    options = []
    for c in free:
        opts = [(c.macs, 0.0, None)]
        for f in c.forms:
            for r in _allowed_ranks(f, min_rank, multiple):
                cost = f.macs_per_rank * int(r)
                if not only_if_cheaper or cost < c.macs:
                    opts.append((cost, 1.0 - float(f.energy[r - 1]), (f, int(r))))
        options.append(opts)
    scale = max(1.0, sum(c.macs for c in free))

    def plan_lambda(lam):
        return [min(opts, key=lambda o: o[1] + lam * o[0] / scale)[2] for opts in options]

    lo, hi = 0.0, 1.0
    while _total(free, plan_lambda(hi)) > goal and hi < 1e12:
        hi *= 4
    for _ in range(80):  # the smallest price of MACs that reaches the goal loses the least energy
        mid = (lo + hi) / 2
        if _total(free, plan_lambda(mid)) <= goal:
            hi = mid
        else:
            lo = mid
    for c, choice in zip(free, plan_lambda(hi)):
        c.choice = choice
    return {"lambda": float(f"{hi:.6g}")}


def _total(free: list[Candidate], choices) -> int:
    return sum(c.macs if ch is None else ch[0].macs_per_rank * ch[1] for c, ch in zip(free, choices))


def _not_cheaper_reason(c: Candidate, energy, min_rank: int, multiple: int) -> str:
    lowest = _min_cost(c, min_rank, multiple)
    if lowest >= c.macs:
        return f"not cheaper at any rank: the lowest rank costs {lowest:,} MACs vs {c.macs:,} unfactorized"
    if energy is not None:
        f, r = min(((f, _rank_for_energy(f, energy, min_rank, multiple)) for f in c.forms),
                   key=lambda fr: fr[0].macs_per_rank * fr[1])
        return (f"not cheaper: energy {energy} needs rank {r} of {f.full_rank} ({f.name}), "
                f"{f.macs_per_rank * r:,} MACs vs {c.macs:,} unfactorized")
    return "not worth it for the MACs target: the energy it would lose costs more than the MACs it saves"


def _bias(m: nn.Module) -> int:
    return 0 if m.bias is None else m.bias.numel()


@torch.no_grad()
def _build(m: nn.Module, form: str, rank: int) -> nn.Sequential:
    """The two layers replacing `m` at `rank`, weights from the truncated SVD (split as sqrt(S) each side)."""
    w = m.weight.detach().to(torch.float64)
    dtype, device = m.weight.dtype, m.weight.device
    if form == "linear":
        first = nn.Linear(m.in_features, rank, bias=False)
        second = nn.Linear(rank, m.out_features, bias=m.bias is not None)
        u, v = _split(w, rank)  # w (out, in) = u @ v
        first.weight.copy_(v)
        second.weight.copy_(u)
    elif form == "channel":
        o, i, kh, kw = w.shape
        first = nn.Conv2d(i, rank, (kh, kw), m.stride, m.padding, m.dilation, bias=False,
                          padding_mode=m.padding_mode)
        second = nn.Conv2d(rank, o, 1, bias=m.bias is not None)
        u, v = _split(w.reshape(o, -1), rank)
        first.weight.copy_(v.reshape(rank, i, kh, kw))
        second.weight.copy_(u.reshape(o, rank, 1, 1))
    else:  # spatial: (I*kh, O*kw) = a @ b
        o, i, kh, kw = w.shape
        pad = m.padding if isinstance(m.padding, str) else None
        first = nn.Conv2d(i, rank, (kh, 1), (m.stride[0], 1), pad or (m.padding[0], 0), (m.dilation[0], 1),
                          bias=False, padding_mode=m.padding_mode)
        second = nn.Conv2d(rank, o, (1, kw), (1, m.stride[1]), pad or (0, m.padding[1]), (1, m.dilation[1]),
                           bias=m.bias is not None, padding_mode=m.padding_mode)
        a, b = _split(_spatial_matrix(w), rank)
        first.weight.copy_(a.reshape(i, kh, rank).permute(2, 0, 1).unsqueeze(-1))
        second.weight.copy_(b.reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2))
    if m.bias is not None:
        second.bias.copy_(m.bias.detach())
    seq = nn.Sequential(first, second).to(device=device, dtype=dtype)
    seq.train(m.training)
    return seq


def _split(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix (m, n) ~= left (m, rank) @ right (rank, n), each side carrying sqrt of the singular values."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
