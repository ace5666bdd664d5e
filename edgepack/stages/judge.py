"""Stage `judge`: one verdict per budget for the artifact the target runs.

Fail closed: a quality budget the build could not measure is a failure whose note says what to
pass. Speed and memory are judged only when measured on the target's architecture (and not
under emulation); off-target they are reported as "not judged", never as met.
"""
from __future__ import annotations

from pydantic import BaseModel

from ..manifest import Artifact, LatencyMs, Verdict
from ..quality import drop, figure, metric_path_hint
from ..targets import Budgets
from .context import BuildContext

NAME = "judge"


class Config(BaseModel):
    budgets: Budgets
    arch: str
    primary_format: str


def config(ctx: BuildContext) -> Config:
    return Config(budgets=ctx.profile.budgets, arch=ctx.profile.arch, primary_format=ctx.profile.primary_format)


def run(ctx: BuildContext, cfg: Config) -> dict:
    primary = primary_artifact(ctx.artifacts, cfg.primary_format)
    fp32 = next(a for a in ctx.artifacts if a.format == primary.format and a.precision == "fp32")
    value, unit = drop(_figures(fp32), _figures(primary))
    unit += _noise(primary, unit)
    ctx.verdicts = judge(cfg.budgets, cfg.arch, primary.path, primary.metrics.size_mb, primary.metrics.latency_ms,
                         ctx.peak_mb.get(primary.path), value, judged_elsewhere=ctx.judged_elsewhere,
                         sqnr_db=primary.metrics.sqnr_db, drop_unit=unit, quality=figure(_figures(primary)))
    ctx.primary = primary.path
    why = (f"the target's runtime is {ctx.profile.runtime}" if primary.format == cfg.primary_format else
           f"the target prefers {cfg.primary_format}, but {ctx.records.get('tflite', {}).get('skipped', 'it was not built')}")
    return {"primary": primary.path, "why": why, "drop": value, "drop_unit": unit,
            "passed": all(v.ok is not False for v in ctx.verdicts)}


def _noise(a: Artifact, unit: str) -> str:
    """Sample size, and for a top-1 figure its standard error: a drop within it is noise."""
    n = a.metrics.samples
    if not n:
        return ""
    p = (a.metrics.accuracy if unit.startswith("top-1") else a.metrics.agreement) if "points" in unit else None
    if p is None:
        return f" on {n} samples"
    se = 100 * (max(p, 1e-9) / 100 * (1 - p / 100) / n) ** 0.5
    return f" on {n} samples (one standard error of top-1: {max(se, 100 / n):.2f} points)"


def _figures(a: Artifact) -> dict:
    return {k: v for k, v in a.metrics.model_dump().items() if v is not None}


def primary_artifact(artifacts: list[Artifact], fmt: str) -> Artifact:
    for a in artifacts:
        if a.format == fmt and a.precision == "int8":
            return a
    return next(a for a in artifacts if a.precision == "int8")


def judge(budgets: Budgets, target_arch: str, artifact: str, size_mb: float, latency: LatencyMs | None,
          peak_mb: float | None, accuracy_drop: float | None, emulated: bool = False,
          judged_elsewhere: str | None = None, sqnr_db: float | None = None,
          drop_unit: str = "points", quality: tuple[float | None, str] = (None, "not measurable")) -> list[Verdict]:
    """One verdict per budget. `judged_elsewhere`: what the off-target note says instead of
    "judge on the device with --device"."""
    on_target = latency is not None and latency.measured_on == target_arch and not emulated
    why_not = ("emulated device: latency not judged" if emulated else
               f"measured on {latency.measured_on if latency else '?'}, target is {target_arch}: "
               f"{judged_elsewhere or 'judge on the device with --device'}")

    def verdict(name, limit, value, judged=True, unmeasured_fails=False, at_least=False, note=None):
        if limit is None:
            return Verdict(budget=name, limit=None, value=value, ok=None, artifact=artifact, note="no budget")
        if value is None:
            if unmeasured_fails:
                return Verdict(budget=name, limit=limit, value=None, ok=False, artifact=artifact,
                               note=f"not measured, so not met: {metric_path_hint()}")
            return Verdict(budget=name, limit=limit, value=None, ok=None, artifact=artifact, note="not measured")
        if not judged:
            return Verdict(budget=name, limit=limit, value=round(value, 3), ok=None, artifact=artifact, note=why_not)
        ok = value >= limit if at_least else value <= limit
        return Verdict(budget=name, limit=limit, value=round(value, 3), ok=ok, artifact=artifact, note=note)

    return [
        verdict("latency_p50_ms", budgets.latency_p50_ms, latency.p50 if latency else None, on_target),
        verdict("latency_p90_ms", budgets.latency_p90_ms, latency.p90 if latency else None, on_target),
        verdict("peak_memory_mb", budgets.peak_memory_mb, peak_mb, on_target),
        verdict("size_mb", budgets.size_mb, size_mb),
        verdict("max_accuracy_drop", budgets.max_accuracy_drop, accuracy_drop, unmeasured_fails=True,
                note=None if accuracy_drop is None else f"drop in {drop_unit}"),
        verdict("min_sqnr_db", budgets.min_sqnr_db, sqnr_db, unmeasured_fails=True, at_least=True,
                note="lowest SQNR of any output vs the float model"),
        verdict("min_accuracy", budgets.min_accuracy, quality[0], unmeasured_fails=True, at_least=True,
                note=f"{quality[1]} of the judged artifact itself"),
    ]
