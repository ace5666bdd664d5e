"""Before the best trial is written: its latency measured again, and its runners-up's.

A trial is feasible on one p50. On a shared machine or a device that throttles, the same file
measures 30% apart from one minute to the next (`bench/search_vs_baselines.py`), and a search
that measured many trials near a budget has, among them, some that met it by luck. So the
preferred feasible trials (best first, up to `candidates`) are benchmarked again where their
latency was measured, in `rounds` interleaved rounds (each candidate once per round, so that a
slow minute hits all of them). The best is the first whose median p50 and p90 meet the trial's own
latency budgets; one that misses stays in the table, marked. No candidate confirmed: no best
(fail closed).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable

LATENCY_BUDGETS = {"latency_p50_ms": "p50", "latency_p90_ms": "p90"}

# row -> {"p50": ms, "p90": ms}, measured where the row's latency was (its device, or this host)
Measure = Callable[[dict], dict]


def latency_limits(row: dict) -> dict[str, float]:
    """The latency budgets the trial was judged against, from its manifest (the device's verdicts
    and the build's); none that were not judged (an emulated device's latency, say)."""
    manifest = json.loads((Path(row["build_dir"]) / "manifest.json").read_text())
    verdicts = list(manifest.get("verdicts") or [])
    verdicts += [v for b in manifest.get("bench") or [] for v in b.get("verdicts") or []]
    skip = set(row.get("not_judged") or [])
    return {v["budget"]: float(v["limit"]) for v in verdicts
            if v.get("budget") in LATENCY_BUDGETS and v.get("limit") is not None and v.get("ok") is not None
            and v["budget"] not in skip}


def preference(row: dict) -> tuple:
    """The best trial is the most preferred (results.best_row's order)."""
    return round(row["metric"], 6), -row["latency_ms"], -row["size_mb"], -row["number"]


def confirm_best(rows: list[dict], measure: Measure, rounds: int, candidates: int,
                 say: Callable[[str], None]) -> tuple[dict | None, dict | None]:
    """(best, record): the first candidate whose re-measured medians meet its latency budgets.
    Each candidate row gets a "confirm" entry. Record None when there was nothing to confirm (no
    latency budget judged, or confirmation off); then the best is the usual one."""
    feasible = sorted((r for r in rows if r["feasible"] and r["metric"] is not None), key=preference, reverse=True)
    if not feasible:
        return None, None
    order = feasible[:max(1, candidates)]
    if rounds <= 0 or not order[0].get("build_dir") or not Path(order[0]["build_dir"], "manifest.json").is_file():
        return order[0], None  # off, or the best was built on another machine: nothing here to time
    limits = {r["number"]: latency_limits(r) for r in order
              if r.get("build_dir") and Path(r["build_dir"], "manifest.json").is_file()}
    if not limits.get(order[0]["number"]):
        return order[0], None  # no latency budget: nothing to confirm
    order = [r for r in order if limits.get(r["number"])]
    say(f"confirming latency: trials {', '.join(str(r['number']) for r in order)} benchmarked again, "
        f"{rounds} interleaved round(s), where each was measured")
    samples: dict[int, dict[str, list]] = {r["number"]: {"p50": [], "p90": [], "errors": []} for r in order}
    for _ in range(rounds):
        for r in order:
            try:
                lat = measure(r)
            except Exception as e:  # noqa: BLE001  (a device that died: this candidate is unconfirmed)
                samples[r["number"]]["errors"].append(f"{type(e).__name__}: {getattr(e, 'message', e)}")
                continue
            samples[r["number"]]["p50"].append(round(float(lat["p50"]), 4))
            samples[r["number"]]["p90"].append(round(float(lat["p90"]), 4))
    best = None
    for r in order:
        s = samples[r["number"]]
        medians = {k: (statistics.median(s[k]) if s[k] else None) for k in ("p50", "p90")}
        missed = {b: {"limit": lim, "median": medians[LATENCY_BUDGETS[b]]} for b, lim in limits[r["number"]].items()
                  if medians[LATENCY_BUDGETS[b]] is None or medians[LATENCY_BUDGETS[b]] > lim}
        r["confirm"] = {"p50_rounds_ms": s["p50"], "p90_rounds_ms": s["p90"], "median_p50_ms": medians["p50"],
                        "median_p90_ms": medians["p90"], "limits": limits[r["number"]], "confirmed": not missed,
                        "missed": missed, "errors": s["errors"], "where": r.get("latency_where")}
        say(f"trial {r['number']}: p50 {r['latency_ms']:.3f} ms in the trial, median {_ms(medians['p50'])} of "
            f"{len(s['p50'])} round(s) now: " + ("confirmed" if not missed else "NOT confirmed ("
                                                 + ", ".join(f"{b} {_ms(v['median'], v['limit'])} > {v['limit']}" if v["median"]
                                                             is not None else f"{b} not measured"
                                                             for b, v in missed.items()) + ")"))
        if best is None and not missed:
            best = r
    record = {"rounds": rounds, "candidates": [r["number"] for r in order],
              "best": best["number"] if best else None}
    return best, record


def _ms(v, limit=None) -> str:
    """v in ms to 3 decimals, or as many more as it takes to differ from `limit` (a median of
    0.5543 against a limit of 0.554 printed as "0.554 > 0.554" before)."""
    if v is None:
        return "-"
    digits = 3
    while limit is not None and digits < 9 and f"{v:.{digits}f}" == f"{limit:.{digits}f}":
        digits += 1
    return f"{v:.{digits}f} ms"


def measurer(devices_dir: list[str] | None, accept_new_host_key: bool, host_runs: int = 50) -> Measure:
    """Measure a trial's judged artifact again where its latency was measured: on its device
    (deployed there already: only the hash is checked) at the threads it was benchmarked with, or
    in this process at the shapes and threads of the build's own timing."""
    def measure(row: dict) -> dict:
        build_dir = Path(row["build_dir"])
        manifest = json.loads((build_dir / "manifest.json").read_text())
        artifact = row.get("artifact") or manifest.get("primary")
        where = row.get("latency_where")
        if where and where != "host":
            from ..devices import bench
            runs = [b for b in manifest.get("bench") or [] if b.get("device") == where]
            threads = runs[-1].get("threads") if runs else None
            result = bench(build_dir, where, threads=threads, runs=100, artifact=artifact, evaluate=False,
                           accept_new_host_key=accept_new_host_key, dirs=devices_dir or None)
            return result["latency_ms"]
        from ..runtime import measure_file
        entry = next(a for a in manifest["artifacts"] if a["path"] == artifact)
        timed = (entry.get("metrics") or {}).get("latency_ms") or {}
        return measure_file(build_dir / artifact, int(timed.get("threads") or 1), runs=int(timed.get("runs") or host_runs),
                            shapes=timed.get("input_shapes"))["latency_ms"]
    return measure


def as_confirmed(rows: list[dict], best: dict | None, search_json: Path) -> tuple[dict | None, dict | None]:
    """For `search show`: the confirmation the search wrote (search.json), back on the rows, and
    the best it chose, rather than the best by the trials' single measurements."""
    if not search_json.is_file():
        return best, None
    previous = json.loads(search_json.read_text())
    record = previous.get("confirm")
    if not record:
        return best, None
    again = {t["number"]: t["confirm"] for t in previous.get("trials", []) if t.get("confirm")}
    for r in rows:
        if r["number"] in again:
            r["confirm"] = again[r["number"]]
    return next((r for r in rows if r["number"] == record["best"]), None), record
