"""Builds side by side: did this change help?

`compare_builds([a, b, ...])` reads each build's manifest and device results and lines up, per
artifact, per device and per budget, the figures that decide it (size, quality, SQNR, latency p50,
budgets met), each with its change against the first build and whether that change is better.
`markdown()` and `html()` render the same cells; the CLI draws them as a rich table.
"""
from __future__ import annotations

from pathlib import Path

from .errors import EdgepackError
from .manifest import read_manifest, write_text_atomic
from .report_html import bench_results, esc, page, peak_from_notes

# (key, label, better): higher or lower is better; None: not a judgement (counts, names)
ARTIFACT_METRICS = [("size_mb", "size MB", "lower"), ("zip_mb", "zip MB", "lower"), ("accuracy", "top-1 %", "higher"),
                    ("agreement", "agreement %", "higher"), ("metric", "metric", "higher"),
                    ("sqnr_db", "SQNR dB", "higher"), ("p50_ms", "p50 ms (build machine)", "lower"),
                    ("peak_mb", "peak MB (build machine)", "lower")]
DEVICE_METRICS = [("p50_ms", "p50 ms", "lower"), ("p90_ms", "p90 ms", "lower"), ("peak_mb", "peak MB", "lower")]
SAME = 1e-9


def load_build(path: Path | str) -> dict:
    """One build's deciding figures (what `compare_builds` lines up)."""
    path = Path(path)
    m = read_manifest(path)
    peaks = peak_from_notes(m)
    artifacts = {}
    for a in m.artifacts:
        q = a.metrics
        artifacts[a.path] = {"size_mb": round(a.size_bytes / 1e6, 4),
                             "zip_mb": round(a.compressed_bytes / 1e6, 4) if a.compressed_bytes else None, "accuracy": q.accuracy,
                             "agreement": q.agreement, "metric": q.metric, "sqnr_db": q.sqnr_db,
                             "p50_ms": q.latency_ms.p50 if q.latency_ms else None, "peak_mb": peaks.get(a.path)}
    devices: dict[str, dict] = {}
    for r in bench_results(path, m):  # oldest first: the latest result per device and artifact wins
        devices[f"{r['device']} · {r['artifact']}"] = {
            "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "peak_mb": r["peak_mb"], "passed": r["passed"],
            "emulated": r["emulated"], "timestamp": r["timestamp"], "verdicts": r["verdicts"]}
    judged = [v for v in m.verdicts if v.ok is not None]
    dev_judged = [v for d in devices.values() for v in d["verdicts"] if v.get("ok") is not None]
    return {
        "path": str(path), "name": m.name, "target": m.target.get("name"), "created": m.created,
        "primary": m.primary, "passed": m.passed and all(d["passed"] is not False for d in devices.values()),
        "artifacts": artifacts, "devices": devices,
        "budgets": {v.budget: {"limit": v.limit, "value": v.value, "ok": v.ok} for v in m.verdicts},
        "budgets_met": [sum(1 for v in judged if v.ok), len(judged)],
        "device_budgets_met": [sum(1 for v in dev_judged if v["ok"]), len(dev_judged)],
    }


def _labels(paths: list[Path]) -> list[str]:
    """Column names: the directory name, with its parent when two builds share one."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _row(group: str, what: str, values: list, better: str | None) -> dict:
    base = values[0]
    deltas, verdicts = [None], [None]
    for v in values[1:]:
        if not isinstance(v, (int, float)) or not isinstance(base, (int, float)) or isinstance(v, bool):
            deltas.append(None)
            verdicts.append(None)
            continue
        d = float(v) - float(base)
        deltas.append({"abs": round(d, 6), "pct": round(100 * d / abs(base), 2) if base else None})
        if better is None or abs(d) <= SAME * max(1.0, abs(base)):
            verdicts.append("same" if better else None)
        else:
            verdicts.append("better" if (d < 0) == (better == "lower") else "worse")
    return {"group": group, "what": what, "better": better, "values": values, "deltas": deltas, "verdicts": verdicts}


def compare_builds(paths: list[Path | str]) -> dict:
    """Line up the builds' figures; every delta is against the first build."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise EdgepackError("compare needs at least two build directories", "edgepack compare BUILD_A BUILD_B ...")
    builds = [load_build(p) for p in paths]
    rows = [_row("build", "verdict", ["PASS" if b["passed"] else "FAIL" for b in builds], None),
            _row("build", "budgets met (build machine)", [_met(b["budgets_met"]) for b in builds], None),
            _row("build", "budgets met (devices)", [_met(b["device_budgets_met"]) for b in builds], None),
            _row("build", "judged artifact", [b["primary"] for b in builds], None)]
    for art in _union(b["artifacts"] for b in builds):
        for key, label, better in ARTIFACT_METRICS:
            values = [b["artifacts"].get(art, {}).get(key) for b in builds]
            if any(v is not None for v in values):
                rows.append(_row(art, label, values, better))
    for dev in _union(b["devices"] for b in builds):
        for key, label, better in DEVICE_METRICS:
            values = [b["devices"].get(dev, {}).get(key) for b in builds]
            if any(v is not None for v in values):
                rows.append(_row(f"on {dev}", label, values, better))
    for budget in _union(b["budgets"] for b in builds):
        got = [b["budgets"].get(budget) for b in builds]
        better = "higher" if budget.startswith("min_") else "lower"
        rows.append(_row("budget", f"{budget} (limit {_limit(got)})",
                         [g["value"] if g else None for g in got], better))
        rows.append(_row("budget", f"{budget} verdict", [_verdict(g) for g in got], None))
    return {"builds": [{k: b[k] for k in ("path", "name", "target", "created", "primary", "passed")}
                       | {"label": label} for b, label in zip(builds, _labels(paths))],
            "baseline": str(paths[0]), "rows": rows}


def _union(dicts) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return keys


def _met(pair: list[int]) -> str:
    return f"{pair[0]} of {pair[1]}" if pair[1] else "none judged"


def _limit(got: list) -> str:
    limits = {g["limit"] for g in got if g}
    return "/".join("-" if x is None else f"{x:g}" for x in limits) or "-"


def _verdict(g: dict | None) -> str:
    return "-" if g is None else {True: "pass", False: "FAIL"}.get(g["ok"], "not judged")


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def cells(cmp: dict) -> tuple[list[str], list[list[tuple[str, str | None]]]]:
    """Header and rows of (text, status); status: better / worse / same / pass / FAIL / None."""
    labels = [b["label"] for b in cmp["builds"]]
    header = ["", "figure", f"{labels[0]} (baseline)"] + labels[1:]
    out = []
    for r in cmp["rows"]:
        row = [(r["group"], None), (r["what"], None)]
        for i, v in enumerate(r["values"]):
            text, d = _num(v), r["deltas"][i]
            if d is not None:
                pct = f", {d['pct']:+.1f}%" if d["pct"] is not None else ""
                text += f" ({d['abs']:+.4g}{pct})"
            status = r["verdicts"][i] or (v if v in ("pass", "FAIL", "PASS") else None)
            row.append((text, "pass" if status == "PASS" else "FAIL" if status == "FAIL" else status))
        out.append(row)
    return header, out


def markdown(cmp: dict) -> str:
    header, rows = cells(cmp)
    lines = ["# Build comparison", "", "Deltas are against the first build (the baseline).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        texts = [f"**{t}**" if s == "FAIL" else f"{t} **worse**" if s == "worse" else f"{t} better" if s == "better"
                 else t for t, s in row]
        lines.append("| " + " | ".join(texts) + " |")
    lines += ["", "Builds: " + "; ".join(f"{b['label']} = `{b['path']}` ({b['name']} for {b['target']}, "
                                        f"{b['created']})" for b in cmp["builds"]), ""]
    return "\n".join(lines)


def html(cmp: dict) -> str:
    header, rows = cells(cmp)
    css = {"better": "better", "worse": "worse", "same": "", "pass": "pass", "FAIL": "fail", None: ""}
    body = ["<h1>Build comparison</h1>", "<p>Deltas are against the first build (the baseline); "
            "green: better, red: worse.</p>",
            "<style>.better{background:#dff3e4;color:#125c27}.worse{background:#fbe0e0;color:#8f1717}</style>",
            "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        body.append("<tr>" + "".join(f'<td class="{css[s]}">{esc(t)}</td>' for t, s in row) + "</tr>")
    body.append("</tbody></table>")
    body.append("<ul>" + "".join(f"<li>{esc(b['label'])}: <code>{esc(b['path'])}</code> ({esc(b['name'])} for "
                                 f"{esc(b['target'])}, {esc(b['created'])})</li>" for b in cmp["builds"]) + "</ul>")
    return page("Build comparison", body)


def write(cmp: dict, out: Path | str) -> Path:
    """Markdown, or HTML when the file name ends with .html."""
    out = Path(out)
    if not out.parent.is_dir():
        raise EdgepackError(f"cannot write {out}: {out.parent} is not a directory", "create it or pick another --out")
    write_text_atomic(out, html(cmp) if out.suffix.lower() in (".html", ".htm") else markdown(cmp))
    return out
