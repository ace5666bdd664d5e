"""What a search leaves: the trial table (CSV and Markdown), the trade-off plot, search.json, and
the best build that meets every judged budget, copied as a normal build directory.

Best: among the feasible finished trials, the highest quality figure; among equals the fastest,
then the smallest. The Pareto front is Optuna's (`study.best_trials`: feasible trials only when
constraints were set) over (quality up, latency down, size down).
"""
from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from ..manifest import write_text_atomic
from ..outdir import replace_dir, staging_dir
from .config import redact

SEARCH_JSON = "search.json"
PLOT = "tradeoff.png"
TABLE_CSV, TABLE_MD = "trials.csv", "trials.md"
COLUMNS = ["number", "state", "feasible", "metric", "latency_ms", "latency_where", "size_mb", "violations",
           "not_judged", "params", "worker", "retry_of", "reason", "build_dir"]


def as_written(params: dict) -> dict:
    """A trial's parameters as the build got them (edgepack.search.space.suggest): Optuna stores
    low + k * step, which reads 0.35000000000000003 in search.json and --json."""
    return {k: round(v, 10) if isinstance(v, float) else v for k, v in params.items()}


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        res = t.user_attrs.get("result") or {}
        surplus = bool(t.user_attrs.get("surplus"))
        rows.append({
            "number": t.number, "state": "SURPLUS" if surplus else t.state.name, "params": as_written(t.params),
            "metric": res.get("metric"), "metric_name": res.get("metric_name"), "latency_ms": res.get("latency_ms"),
            "latency_where": res.get("latency_where"), "size_mb": res.get("size_mb"),
            "feasible": bool(res.get("feasible")) and t.state.name == "COMPLETE",
            "violations": res.get("violations") or {}, "not_judged": res.get("not_judged") or [],
            "build_dir": res.get("build_dir"), "artifact": res.get("artifact"), "reason": t.user_attrs.get("reason"),
            "worker": t.user_attrs.get("worker"), "device": t.user_attrs.get("device"),
            "retry_of": t.system_attrs.get("failed_trial"),
            "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
        })
    return rows


def pareto_numbers(study) -> list[int]:
    return sorted(t.number for t in study.best_trials)


def best_row(rows: list[dict]) -> dict | None:
    feasible = [r for r in rows if r["feasible"] and r["metric"] is not None]
    if not feasible:
        return None
    return max(feasible, key=lambda r: (round(r["metric"], 6), -r["latency_ms"], -r["size_mb"], -r["number"]))


def write_tables(rows: list[dict], pareto: list[int], best: dict | None, sdir: Path) -> tuple[Path, Path]:
    csv_path, md_path = sdir / TABLE_CSV, sdir / TABLE_MD
    tmp = sdir / f".{TABLE_CSV}.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + ["pareto", "best"])
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in COLUMNS] + [r["number"] in pareto, best is not None
                                                             and r["number"] == best["number"]])
    tmp.replace(csv_path)
    write_text_atomic(md_path, "\n".join(markdown(rows, pareto, best)) + "\n")
    return csv_path, md_path


def _cell(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return "" if v is None else str(v)


def markdown(rows: list[dict], pareto: list[int], best: dict | None) -> list[str]:
    metric = next((r["metric_name"] for r in rows if r.get("metric_name")), "metric")
    lines = [f"| trial | state | {metric} | p50 ms | where | size MB | budgets | params | note |",
             "|---:|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        mark = " **best**" if best and r["number"] == best["number"] else " (front)" if r["number"] in pareto else ""
        budgets = ("met" if r["feasible"] else "missed: " + ", ".join(r["violations"])) if r["metric"] is not None \
            else "-"
        if r["not_judged"] and r["metric"] is not None:
            budgets += f"; not judged: {', '.join(r['not_judged'])}"
        again = r.get("confirm")
        if again:  # benchmarked again before the best was chosen (search.confirm)
            budgets += (f"; confirmed (median p50 {_fmt(again['median_p50_ms'], 3)})" if again["confirmed"] else
                        f"; NOT confirmed (median p50 {_fmt(again['median_p50_ms'], 3)})")
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        note = r["reason"] or (f"retry of {r['retry_of']}" if r["retry_of"] is not None else "")
        lines.append(f"| {r['number']}{mark} | {r['state']} | {_fmt(r['metric'])} | {_fmt(r['latency_ms'], 3)} | "
                     f"{r['latency_where'] or '-'} | {_fmt(r['size_mb'], 3)} | {budgets} | {params} | "
                     f"{note.replace('|', '/')[:160]} |")
    return lines


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary(study_name: str, url: str, target: str, rows: list[dict], pareto: list[int], best: dict | None,
            latency_note: str, trials: int, confirm: dict | None = None) -> dict:
    """search.json: everything `search show` and report.html need, with no database at hand."""
    return {"study": study_name, "storage": redact(url), "target": target, "trials_requested": trials,
            "objectives": {"metric": "maximize", "latency_ms": "minimize", "size_mb": "minimize"},
            "latency_note": latency_note, "pareto": pareto, "best": best["number"] if best else None,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "confirm": confirm,
            "trials": [{**{k: r[k] for k in ("number", "state", "params", "metric", "metric_name", "latency_ms",
                                             "latency_where", "size_mb", "feasible", "violations", "not_judged",
                                             "reason")}, **({"confirm": r["confirm"]} if "confirm" in r else {})}
                       for r in rows]}


def write_plot(data: dict, path: Path) -> Path | None:
    from .. import plots  # matplotlib: paid only when a search writes its results
    fig = plots.tradeoff_figure(data["trials"], data["pareto"], data["best"], plot_title(data))
    if fig is None:
        return None
    plots.save_png(fig, path)
    return path


def plot_title(data: dict) -> str:
    done = sum(1 for t in data["trials"] if t["metric"] is not None)
    return f"Search {data['study']} ({data['target']}): {done} measured trial(s); {data['latency_note']}"


def write_best(best: dict, out_root: Path, data: dict, plot: Path | None) -> Path:
    """Copy the best trial's build directory to <out>/<its name>, add search.json (and the
    plot), and redraw report.html so it shows the search."""
    from ..report_html import write_html
    src = Path(best["build_dir"])
    final = Path(out_root) / src.name
    with staging_dir(final) as tmp:
        for item in src.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_text_atomic(tmp / SEARCH_JSON, json.dumps(data, indent=2, default=str) + "\n")
        if plot is not None and plot.exists():
            shutil.copy2(plot, tmp / PLOT)
        write_html(tmp)
        replace_dir(tmp, final)
    return final


ARTIFACT_SUFFIXES = (".onnx", ".tflite", ".data", ".npz", ".safetensors", ".pt", ".bin")


def drop_dominated_artifacts(rows: list[dict], pareto: list[int], best: dict | None) -> tuple[int, int]:
    """Delete the model files of finished trials off the Pareto front and of failed ones (their
    manifest and report stay), so that a 200-trial search does not keep 200 builds on disk. A
    trial the front dominates stays dominated as trials are added, so this is safe while other
    workers run; running trials and the best are never touched. Returns (trials, bytes) freed."""
    keep = set(pareto) | ({best["number"]} if best else set())
    trials = freed = 0
    for r in rows:
        if r["number"] in keep or r["state"] not in ("COMPLETE", "FAIL") or not r.get("build_dir"):
            continue
        build = Path(r["build_dir"])
        files = [f for f in build.rglob("*") if f.is_file() and f.name.endswith(ARTIFACT_SUFFIXES)] \
            if build.is_dir() else []
        for f in files:
            freed += f.stat().st_size
            f.unlink()
        trials += bool(files)
    return trials, freed

