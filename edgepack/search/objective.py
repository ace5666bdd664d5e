"""One trial: sample the space, build (the stage cache makes repeated parts free), benchmark on
the worker's device when it has one, and hand Optuna the objectives and the budget constraints.

Objectives: the quality figure (the user metric, else top-1, else agreement; on the device when
benchmarked there) maximised; p50 latency (the device's, else this host's) and the judged
artifact's size minimised. Every budget is a constraint: its excess over the limit, relative to
the limit (<= 0 is met). A budget that was not judged (latency measured off-target) constrains
nothing and is listed as not judged; it is never reported as met.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import BuildConfig
from ..devices import DeviceError
from ..errors import EdgepackError
from ..pipeline import build
from ..targets import TargetProfile
from . import space as sp
from .study import Surplus, TrialFailed, is_surplus, worker_id

QUALITY_KEYS = (("metric", "metric"), ("accuracy", "top-1 %"), ("agreement", "agreement %"), ("sqnr_db", "SQNR dB"))


@dataclass
class TrialRunner:
    cfg: BuildConfig
    profile: TargetProfile
    space: dict[str, Any]
    trials: int
    search_dir: Path
    trial_minutes: float
    device: str | None = None
    say: Callable[[str], None] = lambda msg: None
    device_failures: int = 0  # in a row: the worker gives up its device after a few
    finished: list[int] = field(default_factory=list)

    def __call__(self, trial) -> tuple[float, float, float]:
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("device", self.device or "host")
        for stale in ("reason", "result", "surplus"):  # a retry inherits the dead trial's attributes
            if stale in trial.user_attrs:
                trial.set_user_attr(stale, None)
        if is_surplus(trial.study, trial.number, self.trials):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("reason", f"surplus: the study already had its {self.trials} trials")
            raise Surplus()
        values = sp.suggest(trial, self.space)
        retry = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items() if k in sp.searched(self.space))
        self.say(f"trial {trial.number}{f' (retry of {retry})' if retry is not None else ''} on "
                 f"{self.device or 'this host'}: {shown}")
        trial_dir = self.search_dir / "trials" / f"{trial.number:04d}"
        try:
            tcfg = sp.apply(self.cfg, self.profile, values, trial_dir, self.trial_minutes, self.device)
            result = build(tcfg, progress=lambda msg: self.say(f"  [trial {trial.number}] {msg}"))
        except DeviceError as e:
            self.device_failures += 1
            self._fail(trial, f"device {self.device}: {e.message}")
        except EdgepackError as e:
            self._fail(trial, e.message)
        except Exception as e:  # an internal error fails this trial, the search goes on
            self._fail(trial, f"internal error: {type(e).__name__}: {e}")
        self.device_failures = 0
        figures = figures_of(result, self.profile)
        trial.set_user_attr("result", figures)
        for budget, excess in figures.pop("constraints").items():
            trial.set_constraint(budget, excess)
        if figures["metric"] is None or figures["latency_ms"] is None or figures["size_mb"] is None:
            self._fail(trial, "the build has no quality figure, latency or size to optimise")
        verdict = "meets every judged budget" if figures["feasible"] else \
            "misses " + ", ".join(figures["violations"])
        self.say(f"trial {trial.number}: {figures['metric_name']} {figures['metric']:.2f}, "
                 f"p50 {figures['latency_ms']:.3f} ms on {figures['latency_where']}, {figures['size_mb']:.3f} MB: "
                 f"{verdict}")
        self.finished.append(trial.number)
        return figures["metric"], figures["latency_ms"], figures["size_mb"]

    def _fail(self, trial, reason: str):
        trial.set_user_attr("reason", reason)
        self.say(f"trial {trial.number} failed: {reason}")
        raise TrialFailed(reason)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def figures_of(result, profile: TargetProfile) -> dict:
    """What a trial is judged by, from its build (and its device result)."""
    m = result.manifest
    prim = m.artifact(m.primary)
    metric_name, metric = _quality(prim.metrics.model_dump())
    lat = prim.metrics.latency_ms
    latency, where = (lat.p50 if lat else None), "host"
    sources = [("host", v.model_dump()) for v in m.verdicts]
    if result.device_results:
        r = result.device_results[0]
        latency = (r.get("latency_ms") or {}).get("p50", latency)
        where = r["device"]
        timed = next((e for e in r.get("eval") or [] if e.get("timed")), None)
        if timed:
            name, value = _quality(timed["device"])
            if value is not None:
                metric_name, metric = f"{name} on the device", value
        device_verdicts = [(r["device"], v) for v in r.get("verdicts") or []]
        # A budget the device judged is the device's: this host's figure for it (its own latency,
        # its own memory) must not veto a trial the device passed.
        on_device = {v["budget"] for _, v in device_verdicts if v.get("ok") is not None}
        sources = [(src, v) for src, v in sources if v["budget"] not in on_device] + device_verdicts
    violations, constraints, judged, limited = {}, {}, set(), set()
    for src, v in sources:
        if v.get("limit") is None:
            continue
        name = v["budget"]
        limited.add(name)
        if v.get("ok") is None:
            continue
        judged.add(name)
        excess = _excess(name, v["limit"], v.get("value"))
        constraints[name] = max(constraints.get(name, excess), excess)
        if v["ok"] is False:
            violations[name] = {"limit": v["limit"], "value": v.get("value"), "where": src}
    for name in limited - judged:
        constraints[name] = 0.0
    return {"metric": metric, "metric_name": metric_name, "latency_ms": latency, "latency_where": where,
            "size_mb": prim.metrics.size_mb, "artifact": m.primary, "feasible": not violations,
            "violations": violations, "not_judged": sorted(limited - judged), "constraints": constraints,
            "build_dir": str(result.path), "passed": result.passed}


def _quality(figures: dict) -> tuple[str, float | None]:
    for key, label in QUALITY_KEYS:
        if figures.get(key) is not None:
            return label, float(figures[key])
    return "-", None


def _excess(budget: str, limit: float, value: float | None) -> float:
    """How far past the limit, relative to it: > 0 violated, <= 0 met (min_* budgets reversed)."""
    if value is None:
        return 1.0  # a quality budget the build could not measure fails closed
    scale = max(abs(limit), 1e-9)
    return round((limit - value) / scale if budget.startswith("min_") else (value - limit) / scale, 6)
