"""report.html: the build report as one self-contained page, figures inline as PNG data URIs.

No scripts, no web fonts, no external URLs: the file opens the same from a laptop, a CI artifact
store or an air-gapped device, and makes no request of its own. It shows what report.md says plus
the distributions behind the numbers: every timed run, every device result, per-node int8
sensitivity, channels per layer before and after pruning, and the per-operator time profile.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from . import report as md
from .manifest import Manifest, read_manifest, write_text_atomic

HTML = "report.html"
SENSITIVE_ROWS = 10  # the table under each sensitivity figure: the names to copy into a fallback list
VERDICT_CLASS = {"pass": "pass", "FAIL": "fail", "not judged": "nj"}
NUMBER = re.compile(r"[-+]?[\d,.]+(e[-+]?\d+)?( ?[a-zA-Z%]+)?|-")  # right-aligned cells: 0.138, 5.93x, 12 ms, -

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#1d2430}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d6dbe3;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d6dbe3;padding:.25em .6em;text-align:left}th{background:#eef1f6}
td.num,td.pass,td.fail,td.nj{text-align:right}
.pass{background:#dff3e4;color:#125c27;font-weight:600}.fail{background:#fbe0e0;color:#8f1717;font-weight:700}
.nj{background:#f1f1f1;color:#555}.primary td{font-weight:600}
.badge{display:inline-block;padding:.1em .6em;border-radius:.3em}
img{max-width:100%;height:auto;border:1px solid #e4e7ec}figure{margin:1em 0}
figcaption,.note{color:#5a6475;font-size:.92em}code{background:#f3f4f7;padding:0 .25em}
"""


def esc(v) -> str:
    return html.escape("" if v is None else str(v))


def table(header: list[str], rows: list[list], row_class: list[str] | None = None) -> str:
    """An HTML table; a cell reading pass / FAIL / not judged gets its verdict colour."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        cells = "".join(f'<td class="{_cell_class(c)}">{esc(c)}</td>' for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell_class(cell) -> str:
    if cell in VERDICT_CLASS:
        return VERDICT_CLASS[cell]
    return "num" if isinstance(cell, (int, float)) or NUMBER.fullmatch(str(cell)) else "txt"


def figure(uri: str | None, alt: str, caption: str = "") -> str:
    if not uri:
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def bench_results(build_dir: Path, m: Manifest) -> list[dict]:
    """Every device result of the build, oldest first: the full result file (every timed run,
    the operator profile) where it is still there, else the manifest's summary of it."""
    root = Path(build_dir).resolve()
    results = []
    for entry in m.bench:
        full = None
        rel = entry.get("result_file")
        path = (root / rel).resolve() if rel else None
        if path is not None and path.is_relative_to(root) and path.is_file():
            try:
                full = json.loads(path.read_text())
            except ValueError:
                full = None
        results.append(_device_row(entry, full))
    return results


def _device_row(entry: dict, full: dict | None) -> dict:
    lat = (full or {}).get("latency_ms") or {}
    rt = entry.get("runtime") or {}
    return {
        "device": entry.get("device"), "emulated": bool(entry.get("emulated")), "timestamp": entry.get("timestamp"),
        "artifact": entry.get("artifact"), "runtime": f"{rt.get('name', '?')} {rt.get('version', '')}".strip(),
        "threads": entry.get("threads"), "machine": entry.get("machine"),
        "cpu": ((full or {}).get("env") or {}).get("cpu_model"),
        "p50_ms": lat.get("p50", entry.get("p50_ms")), "p90_ms": lat.get("p90", entry.get("p90_ms")),
        "p99_ms": lat.get("p99", entry.get("p99_ms")), "peak_mb": entry.get("peak_rss_mb"),
        "runs": lat.get("runs"), "warmup": lat.get("warmup"), "samples_ms": lat.get("samples_ms") or [],
        "op_profile": (full or {}).get("op_profile") or [], "passed": entry.get("passed"),
        "verdicts": entry.get("verdicts") or [], "result_file": entry.get("result_file"),
        "result_missing": full is None, "result": full,
    }


def peak_from_notes(m: Manifest) -> dict[str, float]:
    """validate writes each artifact's measured peak memory into its notes."""
    peaks = {}
    for a in m.artifacts:
        for note in a.notes:
            if found := re.search(r"peak memory ([\d.]+) MB", note):
                peaks[a.path] = float(found.group(1))
    return peaks


def sensitivity_lists(m: Manifest) -> list[tuple[str, list[dict]]]:
    """(title, rows) for each int8 sensitivity ranking the manifest holds: every node when the
    quantize/tflite stages recorded it, else the fallback's shortlist. A ranking is a list of
    {"node" (ONNX) or "module"/"name" (TFLite), "op", "sqnr_db", "lost_db"}, or a dict holding
    that list under "ops" or "nodes" with its sampling details beside it."""
    out = []
    q, t = m.stages.get("quantize") or {}, m.stages.get("tflite") or {}
    fb = q.get("fallback") or m.stages.get("fallback") or {}
    if _ranking(q.get("sensitivity")):
        out.append(("ONNX int8: SQNR lost per node", _ranking(q["sensitivity"])))
    elif fb.get("ranking"):
        out.append(("ONNX int8: SQNR lost per node (the fallback's most sensitive nodes)", fb["ranking"]))
    tfl = _ranking(t.get("sensitivity")) or _ranking((t.get("int8") or {}).get("sensitivity"))
    if tfl:
        out.append(("TFLite int8: SQNR lost per op", tfl))
    return out


def _ranking(value) -> list[dict]:
    if isinstance(value, dict):
        value = value.get("ops") or value.get("nodes")
    return [r for r in value or [] if isinstance(r, dict)]


def node_name(r: dict) -> str:
    return str(r.get("node") or r.get("module") or r.get("name") or r.get("op") or "?")


def _label(r: dict) -> str:
    return f"{r['device']}{' (emulated)' if r['emulated'] else ''} · {r['artifact']} · {r['timestamp'] or '?'}"


def _header(m: Manifest) -> list[str]:
    t = m.target
    verdict = "PASS" if m.passed else "FAIL"
    return [f"<h1>{esc(m.name)} for {esc(t.get('name'))}: <span class=\"badge {'pass' if m.passed else 'fail'}\">"
            f"{verdict}</span></h1>",
            f"<p>Target <code>{esc(t.get('name'))}</code> ({esc(t.get('description', ''))}): {esc(t.get('arch'))}, "
            f"{esc(t.get('runtime'))}, {esc(t.get('threads'))} thread(s). Built {esc(m.created)} with edgepack "
            f"{esc(m.edgepack_version)} on {esc(m.versions.get('machine', '?'))}. Judged artifact: "
            f"<code>{esc(m.primary)}</code>.</p>"]


def _artifacts(m: Manifest, peak_mb: dict) -> list[str]:
    rows = md.artifact_rows(m, peak_mb)
    cls = ["primary" if a.path == m.primary else "" for a in m.artifacts]
    return ["<h2>Artifacts</h2>", table(md.ARTIFACT_HEADER, rows, cls),
            "<p class=\"note\">Bold: the judged artifact. Latency measured on the build machine at the shapes "
            "below; quality on the reporting samples.</p>",
            "<h2>Budgets</h2>", table(["budget", "limit", "value", "verdict", "note"], md.verdict_rows(m.verdicts))]


def _io(m: Manifest) -> list[str]:
    first = m.artifacts[0] if m.artifacts else None
    declared = {s.name: s.shape for s in (first.inputs if first else [])}
    x = "x".join
    parts = ["<h2>Inputs and outputs</h2>",
             "<p>Latency and memory were measured at exactly these shapes (batch first); the artifacts keep the "
             "dimensions the file declares.</p>",
             table(["input", "dtype", "layout", "measured at", "artifact declares"],
                   [[s.name, s.dtype, s.layout or "-", x(map(str, s.shape)), x(map(str, declared.get(s.name, s.shape)))]
                    for s in m.inputs]),
             table(["output", "dtype", "shape"], [[s.name, s.dtype, x(map(str, s.shape))] for s in m.outputs])]
    fid = [[a.path, n, md.fmt(o.get("sqnr_db"), 1), md.fmt(o.get("cosine"), 5), md.fmt(o.get("max_abs_diff"), 4)]
           for a in m.artifacts if a.metrics.outputs for n, o in a.metrics.outputs.items()]
    if fid:
        samples = next((a.metrics.samples for a in m.artifacts if a.metrics.samples), None)
        parts += [f"<h3>Per-output fidelity against the float model{f' ({samples} samples)' if samples else ''}</h3>",
                  table(["artifact", "output", "SQNR dB", "cosine", "max abs diff"], fid)]
    return parts


def _latency(m: Manifest, plots) -> list[str]:
    series = [(a.path, a.metrics.latency_ms.samples_ms) for a in m.artifacts
              if a.metrics.latency_ms and a.metrics.latency_ms.samples_ms]
    if not series:
        return ["<h2>Latency on the build machine</h2><p class=\"note\">No per-run latency samples in this "
                "manifest (built by an older edgepack).</p>"]
    lat = next(a.metrics.latency_ms for a in m.artifacts if a.metrics.latency_ms)
    where = f"{lat.measured_on or '?'}, {lat.threads or '?'} thread(s)"
    uri = plots.latency(series, f"Latency of each artifact on the build machine ({where})")
    return ["<h2>Latency on the build machine</h2>", figure(uri, "latency distribution of every artifact",
                                                           "Measured in a fresh process after warm-up.")]


def _devices(results: list[dict], plots) -> list[str]:
    if not results:
        return []
    rows = [[r["device"] + (" (emulated)" if r["emulated"] else ""), r["timestamp"] or "-", r["artifact"],
             r["runtime"], r["threads"], r["machine"], md.fmt(r["p50_ms"], 3), md.fmt(r["p90_ms"], 3),
             md.fmt(r["p99_ms"], 3), md.fmt(r["peak_mb"], 1), r["runs"] or "-",
             {True: "pass", False: "FAIL"}.get(r["passed"], "not judged")] for r in results]
    parts = [f"<h2>On-device results ({len(results)})</h2>",
             table(["device", "when", "artifact", "runtime", "threads", "machine", "p50 ms", "p90 ms", "p99 ms",
                    "peak MB", "runs", "verdict"], rows)]
    series = [(_label(r), r["samples_ms"]) for r in results if r["samples_ms"]]
    emulated = "Emulated devices run real kernels under qemu: their latency is shown, never judged."
    parts.append(figure(plots.latency(series, f"Latency on the device(s): {len(series)} benchmark result(s)"),
                        "latency distribution of every device result",
                        emulated if any(r["emulated"] for r in results) else ""))
    verdicts = [[r["device"], v["budget"], md.fmt(v.get("limit")), md.fmt(v.get("value"), 3),
                 {True: "pass", False: "FAIL"}.get(v.get("ok"), "not judged"), v.get("note") or ""]
                for r in results for v in r["verdicts"]]
    if verdicts:
        parts += ["<h3>Budgets judged on the device(s)</h3>",
                  table(["device", "budget", "limit", "value", "verdict", "note"], verdicts)]
    for r in results:
        if r["op_profile"]:
            runs = 1 + (r["warmup"] or 0) + (r["runs"] or 0)
            parts.append(figure(plots.op_profile(r["op_profile"], f"Per-operator time: {_label(r)}, "
                                                 f"ONNX Runtime profile over {runs} model runs"),
                                f"operator time profile on {r['device']}",
                                "Timings taken with the profiler on (it adds overhead to every kernel)."))
    missing = [r["result_file"] for r in results if r["result_missing"]]
    if missing:
        parts.append(f"<p class=\"note\">Result file(s) missing, summary only: {esc(', '.join(map(str, missing)))}</p>")
    return parts


def _prune(m: Manifest, plots) -> list[str]:
    p = m.stages.get("prune") or {}
    if p.get("skipped"):
        return ["<h2>Pruning</h2>", f"<p>Skipped: {esc(p['skipped'])}</p>"]
    if not p.get("layers"):
        return []
    macs = f"MACs {p['macs_before']:,} → {p['macs_after']:,} ({p.get('macs_reduction', 0):.2f}x fewer)"
    params = f"parameters {p['params_before']:,} → {p['params_after']:,}"
    acc = p.get("accuracy") or {}
    steps = [f"{100 * acc[k]:.2f}% {label}" for k, label in (("before", "before"), ("pruned", "pruned"),
             ("finetuned", "fine-tuned")) if acc.get(k) is not None]
    changed = [c for c in p["layers"] if (c["in_before"], c["out_before"]) != (c["in_after"], c["out_after"])]
    uri = plots.channels(p["layers"], f"Channels per layer, pruning ratio {p.get('ratio', 0):.3f}: {macs}")
    rows = [[c["name"], c["type"], f"{c['in_before']} → {c['in_after']}", f"{c['out_before']} → {c['out_after']}"]
            for c in changed]
    return ["<h2>Pruning</h2>",
            f"<p>Structured channel pruning ({esc(', '.join(f'{k}={v}' for k, v in (p.get('requested') or {}).items()))}), "
            f"{esc(p.get('importance'))} importance: {esc(macs)}; {esc(params)}."
            + (f" {esc(acc.get('metric', 'accuracy'))}: {esc(' → '.join(steps))}." if steps else "") + "</p>",
            figure(uri, "channels per layer before and after pruning"),
            f"<details><summary>{len(changed)} of {len(p['layers'])} layers changed width</summary>"
            + table(["layer", "type", "in channels", "out channels"], rows) + "</details>"]


def _sensitivity(m: Manifest, plots) -> list[str]:
    lists = sensitivity_lists(m)
    if not lists:
        return []
    parts = ["<h2>Per-layer int8 sensitivity</h2>",
             "<p>SQNR of a node's output minus that of its input (float vs int8 model, same inputs): the error "
             "the node itself adds. The fallback leaves the worst ones in float.</p>"]
    for title, rows in lists:
        worst = sorted((r for r in rows if r.get("lost_db") is not None), key=lambda r: -float(r["lost_db"]))
        parts += [figure(plots.sensitivity(rows, title), title),
                  table(["node", "op", "SQNR dB", "lost dB"],
                        [[node_name(r), r.get("op"), md.fmt(r.get("sqnr_db"), 2),
                          md.fmt(r.get("lost_db"), 2)] for r in worst[:SENSITIVE_ROWS]])]
    return parts


def _quantize(m: Manifest) -> list[str]:
    q = m.stages.get("quantize")
    if not q or "activation_type" not in q:
        return []
    parts = ["<h2>Quantization</h2>",
             f"<p>Static int8, QDQ, {esc(q['activation_type'])} activations, {esc(q['weight_type'])} weights, "
             f"{'per-channel' if q.get('per_channel') else 'per-tensor'}, {esc(q.get('method'))} calibration on "
             f"{esc(q.get('calibration_samples'))} samples.</p>"]
    if q.get("float_nodes"):
        parts.append(table(["node still in float", "op", "why"],
                           [[r["node"], r["op"], r.get("reason", "")] for r in q["float_nodes"][:40]]))
    return parts


def _search(build_dir: Path, plots) -> list[str]:
    """The search that chose this build (`edgepack search` leaves search.json beside the manifest)."""
    path = Path(build_dir) / "search.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
        return []
    trials, pareto, best = data["trials"], data.get("pareto") or [], data.get("best")
    done = [t for t in trials if t.get("metric") is not None]
    title = f"Search {data.get('study')}: {len(done)} measured trial(s); {data.get('latency_note', '')}"
    rows = [[t["number"], md.fmt(t.get("metric"), 2), md.fmt(t.get("latency_ms"), 3), t.get("latency_where") or "-",
             md.fmt(t.get("size_mb"), 3), "pass" if t.get("feasible") else "FAIL",
             ", ".join(f"{k}={v}" for k, v in (t.get("params") or {}).items())]
            for t in sorted(done, key=lambda t: t["number"]) if t["number"] in pareto]
    metric = next((t.get("metric_name") for t in done if t.get("metric_name")), "metric")
    return [f"<h2>Search</h2><p>This build is trial {esc(best)} of the study <code>{esc(data.get('study'))}</code> "
            f"({len(trials)} trials, storage <code>{esc(data.get('storage'))}</code>): the feasible trial with the "
            f"highest {esc(metric)}, then the lowest latency, then the smallest size. "
            f"{esc(data.get('latency_note', ''))}.</p>",
            figure(plots.tradeoff(trials, pareto, best, title), "accuracy against latency of every trial",
                   "Ringed: the Pareto front (quality, latency and size). Star: this build. Hollow: a budget missed."),
            f"<h3>Pareto front ({len(rows)})</h3>",
            table(["trial", metric, "p50 ms", "where", "size MB", "budgets", "params"], rows)]


def render_html(build_dir: Path, m: Manifest, peak_mb: dict | None = None) -> str:
    from . import plots  # matplotlib: paid only when a page is drawn, not by everything importing report
    peak = peak_mb or peak_from_notes(m)
    body = (_header(m) + _artifacts(m, peak) + _io(m) + _latency(m, plots) + _devices(bench_results(build_dir, m), plots)
            + _search(build_dir, plots) + _prune(m, plots) + _sensitivity(m, plots) + _quantize(m)
            + ["<h2>Versions</h2>", f"<p>{esc(', '.join(f'{k} {v}' for k, v in m.versions.items()))}</p>",
               f"<p class=\"note\">Config hash <code>{esc(m.config_hash)}</code>, data hash "
               f"<code>{esc(m.data_hash)}</code>. The same figures as text: report.md; every number: manifest.json.</p>"])
    return page(f"{m.name} for {m.target.get('name')}: {'PASS' if m.passed else 'FAIL'}", body)


def write_html(build_dir: Path, m: Manifest | None = None, peak_mb: dict | None = None) -> Path:
    """Write `report.html` into the build directory (reads manifest.json when `m` is None)."""
    build_dir = Path(build_dir)
    m = m if m is not None else read_manifest(build_dir)
    path = build_dir / HTML
    write_text_atomic(path, render_html(build_dir, m, peak_mb))
    return path


def write_reports(build_dir: Path, m: Manifest, sections: dict) -> tuple[Path, Path]:
    """report.md (edgepack.report) and report.html, from the same manifest and sections."""
    return md.write_report(build_dir, m, sections), write_html(build_dir, m, sections.get("peak_mb"))
