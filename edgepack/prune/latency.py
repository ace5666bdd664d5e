"""The ratio searches: against a latency budget (measured) and against a MACs target (counted).

Latency is measured, not predicted from MACs: export to ONNX, quantize as the target will,
run with ONNX Runtime at the target's thread count. A bisection over the channel ratio finds
the smallest ratio (least accuracy lost) meeting `budgets.latency_p50_ms`; another finds the
smallest ratio keeping at most a fraction of the MACs. `progress=` as in engine.py: a Progress
(a task: candidates k/N) or a callable taking event dicts.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from ..errors import EdgepackError
from ..progress import reporter_and_events
from .config import PruneConfig
from .engine import _tuple, prune_model
from .measure import count_macs_params

LATENCY_CALIBRATION_SAMPLES = 32  # int8 speed does not depend on calibration quality


def measure_latency(model: nn.Module, example_inputs, threads: int = 1, calib=None, quantization=None,
                    warmup: int = 5, runs: int = 30) -> dict:
    """ONNX Runtime latency statistics (ms) of `model`: fp32, or int8 when `calib` (a Dataset)
    and `quantization` (targets.Quantization) are given."""
    from ..onnx_tools.export import to_onnx
    from ..runtime import open_model, time_runs
    example_inputs = _tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="edgepack-lat-") as tmp:
        path = to_onnx(model.eval(), example_inputs, Path(tmp) / "fp32.onnx")
        if calib is not None and quantization is not None:
            from ..onnx_tools.quantize import quantize_onnx
            q = quantization.model_copy(update={"calibration_samples": LATENCY_CALIBRATION_SAMPLES,
                                                "calibration_method": "MinMax"})
            path = Path(tmp) / "int8.onnx"
            quantize_onnx(Path(tmp) / "fp32.onnx", path, calib, q, threads)
        runner = open_model(path, threads)
        return time_runs(runner, [t.numpy() for t in example_inputs], warmup, runs)


def search_latency_ratio(model: nn.Module, example_inputs, profile, cfg: PruneConfig, calib=None,
                         iterations: int = 5, progress=None) -> tuple[float, list[dict]]:
    """Smallest channel ratio whose pruned model meets the profile's p50 budget, and every
    measured candidate. Ratio 0.0 means the unpruned model already meets it."""
    budget = profile.budgets.latency_p50_ms
    if budget is None:
        raise EdgepackError(f"target {profile.name} has no latency_p50_ms budget to prune towards",
                            "set budgets.latency_p50_ms in the target profile, or give a pruning ratio")
    one_shot = _one_shot(cfg)
    measured: list[dict] = []
    bars, events = reporter_and_events(progress)

    def p50(ratio: float) -> float:
        candidate = model if ratio == 0 else prune_model(model, example_inputs, one_shot, ratio=ratio,
                                                         round_to=profile.simd_width)[0]
        stats = measure_latency(candidate, example_inputs, profile.threads, calib,
                                profile.quantization if calib is not None else None)
        measured.append({"ratio": round(ratio, 4), "p50_ms": round(stats["p50"], 3),
                         "int8": calib is not None})
        if events is not None:
            events({"stage": "latency search", **measured[-1], "budget_ms": budget})
        bar.update(completed=len(measured), description=f"latency search (budget {budget} ms): ratio "
                   f"{measured[-1]['ratio']} measured {measured[-1]['p50_ms']} ms")
        return stats["p50"]

    # At most: the unpruned model, the maximum ratio, then the bisection.
    with bars.task(f"latency search (budget {budget} ms)", total=iterations + 2) as bar:
        if p50(0.0) <= budget:
            return 0.0, measured
        hi = cfg.max_ratio
        if p50(hi) > budget:
            best = min(measured, key=lambda m: m["p50_ms"])
            raise EdgepackError(
                f"no pruning ratio meets the {budget} ms p50 budget of target {profile.name}: the best "
                f"measured latency was {best['p50_ms']:.2f} ms at ratio {best['ratio']}",
                "raise the budget, use a smaller architecture, or raise max_ratio (accuracy will suffer)")
        lo = 0.0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if p50(mid) <= budget else (mid, hi)
    return hi, measured


def ratio_for_macs(model: nn.Module, example_inputs, cfg: PruneConfig, keep_fraction: float,
                   round_to: int | None = None, progress=None, iterations: int = 10) -> float:
    """Smallest channel ratio whose pruned model keeps at most `keep_fraction` of the MACs
    (bisection: MACs fall monotonically with the ratio up to rounding)."""
    one_shot = _one_shot(cfg)
    macs0, _ = count_macs_params(model, _tuple(example_inputs))
    bars, events = reporter_and_events(progress)

    def kept(r: float) -> float:
        pruned, record = prune_model(model, example_inputs, one_shot, ratio=r, round_to=round_to)
        if events is not None:
            events({"stage": "MACs search", "ratio": round(r, 4), "macs_kept": round(record.macs_after / macs0, 4)})
        bar.update(completed=bar.completed + 1, description=f"MACs search (keep {keep_fraction:.0%}): ratio "
                   f"{r:.4f} keeps {record.macs_after / macs0:.1%}")
        return record.macs_after / macs0

    with bars.task(f"MACs search (keep {keep_fraction:.0%})", total=iterations + 1) as bar:
        lo, hi = 0.0, cfg.max_ratio
        at_max = kept(hi)
        if at_max > keep_fraction:
            raise EdgepackError(
                f"cannot reach {keep_fraction:.0%} of the original MACs: at the maximum ratio {hi} the "
                f"model keeps {at_max:.1%}", "raise macs_target, or allow more layers to be pruned")
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if kept(mid) <= keep_fraction else (mid, hi)
    return hi


def _one_shot(cfg: PruneConfig) -> PruneConfig:
    """The candidates of a search: pruned in one step, Taylor (which needs gradients) as L2."""
    return cfg.model_copy(update={"iterative_steps": 1, "importance":
                                  "l2" if cfg.importance in ("taylor", "entropy") else cfg.importance})
