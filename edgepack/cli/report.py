"""`edgepack report BUILD [--open] [--json]`: rewrite report.md and report.html from the build's
manifest and its device results (after benches, or after an edgepack upgrade changed the report)."""
from __future__ import annotations

import dataclasses
import webbrowser
from pathlib import Path

import typer

from . import console, emit_json, out


def _sections(build_dir: Path, m) -> dict:
    """report.md's stage sections, rebuilt from the records the stages left in the manifest."""
    # Imported here: torch comes with edgepack.prune, and the CLI imports every command module at start-up.
    from ..devices.results import report_section
    from ..prune.record import LayerChange, PruneRecord
    from ..report import table
    from ..report_html import bench_results, peak_from_notes
    from ..stages.tflite import section as tflite_section
    sections: dict = {"peak_mb": peak_from_notes(m)}
    p = m.stages.get("prune")
    if p and p.get("skipped"):
        sections["prune"] = f"## Pruning\n\nSkipped: {p['skipped']}\n"
    elif p and "layers" in p:
        names = {f.name for f in dataclasses.fields(PruneRecord)}
        layer_names = {f.name for f in dataclasses.fields(LayerChange)}
        try:
            record = PruneRecord(**{k: v for k, v in p.items() if k in names and k != "layers"},
                                 layers=[LayerChange(**{k: v for k, v in c.items() if k in layer_names})
                                         for c in p["layers"]])
            sections["prune"] = record.markdown()
        except TypeError:  # a record written by another edgepack version: its headline figures only
            sections["prune"] = (f"## Pruning\n\nChannel ratio {p.get('ratio')}: MACs {p.get('macs_before')} -> "
                                 f"{p.get('macs_after')}, parameters {p.get('params_before')} -> "
                                 f"{p.get('params_after')} (the full record is in manifest.json).\n")
    t = m.stages.get("tflite")
    if t and t.get("skipped"):
        sections["tflite"] = f"## TFLite\n\nNot produced: {t['skipped']}\n"
    elif t and "int8" in t:
        sections["tflite"] = tflite_section(t)
    from ..stages import cluster, factorize, fp16, qat, sparsify
    for stage in (factorize, cluster, sparsify, qat, fp16):  # their sections are made from the stage record alone
        record = m.stages.get(stage.NAME)
        if record and not isinstance(record.get("skipped"), str):  # a str: the whole stage was skipped
            sections[stage.NAME] = stage.markdown(record)
    bench = []
    for entry, row in zip(m.bench, bench_results(build_dir, m)):
        if row["result_missing"]:
            bench.append(f"## On-device benchmark: {entry['device']}\n\nResult file `{entry.get('result_file')}` "
                         f"is missing; summary: p50 {entry.get('p50_ms')} ms, p90 {entry.get('p90_ms')} ms.\n")
        else:
            bench.append(report_section({**row["result"], "result_file": entry["result_file"]}))
    if bench:
        sections["bench"] = "\n".join(bench)
    return sections


def _open(path: Path) -> bool:
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    return bool(browser.open(path.resolve().as_uri()))


def register(app: typer.Typer) -> None:
    @app.command(help="Rewrite a build's report.md and report.html (figures inline) from its manifest and "
                      "device results.")
    def report(build_dir: Path = typer.Argument(..., help="build directory (has manifest.json)"),
               open_: bool = typer.Option(False, "--open", help="open report.html in the system browser"),
               as_json: bool = typer.Option(False, "--json", help="print the paths written as JSON")):
        from ..manifest import build_lock, read_manifest
        from ..report_html import HTML, write_reports
        read_manifest(build_dir)  # a clear error for a directory that is not a build, before the lock
        with build_lock(build_dir):  # a bench finishing now would append to the report being rewritten
            m = read_manifest(build_dir)
            md, _ = write_reports(build_dir, m, _sections(build_dir, m))
        page = build_dir / HTML
        opened = _open(page) if open_ else None
        if as_json:
            emit_json({"build": str(build_dir), "report_md": str(md), "report_html": str(page), "passed": m.passed,
                       "device_results": len(m.bench), "opened": opened})
            return
        out.print(f"wrote {md} and {page}", highlight=False, soft_wrap=True)
        if open_ and not opened:
            console.print(f"no browser available here: open {page.resolve().as_uri()} yourself",
                          highlight=False, soft_wrap=True)
