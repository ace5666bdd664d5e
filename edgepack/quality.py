"""How good an artifact's outputs are: fidelity to the float model per output, top-1 for
classifiers, and a user metric for everything else.

Outputs are lists of arrays, one per model output, each (N, ...) over the same samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgepackError
from .userimport import import_attr

Metric = Callable[[dict, object], float]


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """SQNR (dB), cosine and max abs difference of one output against its float reference."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        raise EdgepackError(f"output shapes differ: reference {tuple(reference.shape)}, artifact {tuple(candidate.shape)}")
    noise = float(((ref - cand) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        sqnr = float("inf")
    elif signal == 0:
        sqnr = float("-inf")
    else:
        sqnr = 10 * np.log10(signal / noise)
    denom = np.linalg.norm(ref) * np.linalg.norm(cand)
    cosine = float((ref * cand).sum() / denom) if denom > 0 else float(np.array_equal(ref, cand))
    return {"sqnr_db": round(float(sqnr), 2) if np.isfinite(sqnr) else sqnr, "cosine": cosine,
            "max_abs_diff": float(np.abs(ref - cand).max()) if ref.size else 0.0}


def class_scores_index(outputs: list[np.ndarray], labels) -> int | None:
    """Which output holds class scores for these labels: the first whose per-sample size is the
    number of classes (> 1), when the labels are 1-D class ids. None: not a classifier."""
    if labels is None:
        return None
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        return None
    for i, o in enumerate(outputs):
        per_sample = o.reshape(len(o), -1).shape[1] if len(o) else 0
        squeezed = [d for d in o.shape[1:] if d != 1]
        if per_sample > 1 and len(squeezed) == 1 and y.max(initial=0) < per_sample:
            return i
    return None


def scores_index(outputs: list[np.ndarray]) -> int | None:
    """For unlabelled data: the first output that looks like class scores (one vector per sample)."""
    for i, o in enumerate(outputs):
        squeezed = [d for d in o.shape[1:] if d != 1]
        if len(squeezed) == 1 and squeezed[0] > 1:
            return i
    return None


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.reshape(len(scores), -1).argmax(1) == labels).mean() * 100)


def load_metric(spec: str) -> Metric:
    """`file.py:function` or `package.module:function`: f(outputs: dict name -> array, labels) -> float."""
    fn = import_attr(spec, "metric function")
    if not callable(fn):
        raise EdgepackError(f"metric {spec} is not a function", "it must be f(outputs, labels) -> float")
    return fn


def call_metric(fn: Metric, spec: str, names: list[str], outputs: list[np.ndarray], labels) -> float:
    try:
        value = fn(dict(zip(names, outputs)), labels)
        value = float(value)
    except Exception as e:
        raise EdgepackError(f"metric {spec} failed: {type(e).__name__}: {e}",
                            "it receives a dict of output name -> array (N, ...) and the labels, "
                            "and returns one number, higher is better") from e
    if not np.isfinite(value):
        raise EdgepackError(f"metric {spec} returned {value}", "it must return a finite number")
    return value


def measure(outputs: list[np.ndarray], names: list[str], labels, reference: list[np.ndarray] | None,
            metric: tuple[str, Metric] | None = None) -> dict:
    """Everything known about one artifact's outputs on one evaluation set."""
    result: dict = {"samples": int(len(outputs[0])) if outputs else 0}
    cls = class_scores_index(outputs, labels)
    if cls is not None:
        result["accuracy"] = top1(outputs[cls], np.asarray(labels))
        result["scores_output"] = names[cls]
    if metric is not None:
        result["metric"] = call_metric(metric[1], metric[0], names, outputs, labels)
    if reference is not None:
        per = {n: fidelity(r, o) for n, r, o in zip(names, reference, outputs)}
        result["outputs"] = per
        result["sqnr_db"] = min(p["sqnr_db"] for p in per.values())
        result["cosine"] = min(p["cosine"] for p in per.values())
        result["max_abs_diff"] = max(p["max_abs_diff"] for p in per.values())
        sc = cls if cls is not None else scores_index(reference)
        if sc is not None:
            agree = reference[sc].reshape(len(reference[sc]), -1).argmax(1) == \
                outputs[sc].reshape(len(outputs[sc]), -1).argmax(1)
            result["agreement"] = float(agree.mean() * 100)
    return result


def drop(ref: dict, cand: dict) -> tuple[float | None, str]:
    """The quality drop that `max_accuracy_drop` judges, and what it is measured in: the user
    metric when given, else top-1 on labels, else top-1 agreement with the float model."""
    if "metric" in ref and "metric" in cand:
        return ref["metric"] - cand["metric"], "metric"
    if "accuracy" in ref and "accuracy" in cand:
        return ref["accuracy"] - cand["accuracy"], "top-1 points"
    if cand.get("agreement") is not None:
        return 100 - cand["agreement"], "agreement points"
    return None, "not measurable"


def figure(q: dict) -> tuple[float | None, str]:
    """The figure `min_accuracy` judges, and what it is: the user metric when given, else top-1 %
    on labels, else top-1 agreement % with the float model."""
    for key, unit in (("metric", "metric"), ("accuracy", "top-1 %"), ("agreement", "agreement %")):
        if q.get(key) is not None:
            return float(q[key]), unit
    return None, "not measurable"


def metric_path_hint() -> str:
    return ("pass --metric file.py:function (f(outputs, labels) -> number, higher is better) with "
            "labelled --eval data, or judge fidelity with --budget min_sqnr_db=20 and "
            "--budget max_accuracy_drop=off")


def describe(spec: str | None) -> str:
    return Path(spec.rpartition(":")[0]).name + ":" + spec.rpartition(":")[2] if spec else ""
