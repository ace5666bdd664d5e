"""`edgepack compare BUILD_A BUILD_B ... [--out FILE] [--json]`: builds side by side, deltas
against the first (edgepack.compare)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import console, emit_json, out

STYLE = {"better": "green", "worse": "bold red", "pass": "green", "FAIL": "bold red"}


def register(app: typer.Typer) -> None:
    @app.command(help="Compare builds side by side (size, quality, SQNR, latency per artifact and device, "
                      "budgets), with deltas against the first build.")
    def compare(builds: list[Path] = typer.Argument(..., help="build directories; the first is the baseline"),
                out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="also write it: .md (markdown) "
                                                                               "or .html"),
                as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON")):
        from ..compare import cells, compare_builds, write
        cmp = compare_builds(builds)
        written = write(cmp, out_file) if out_file else None
        if as_json:
            emit_json(cmp | {"written": str(written) if written else None})
            return
        header, rows = cells(cmp)
        t = Table(title="build comparison (deltas against the baseline)", title_justify="left")
        for i, h in enumerate(header):
            t.add_column(escape(h), justify="left" if i < 2 else "right")
        group = None
        for row in rows:
            first = row[0][0]
            cells_ = [escape(first if first != group else "")] + [
                f"[{STYLE[s]}]{escape(text)}[/]" if s in STYLE else escape(text) for text, s in row[1:]]
            t.add_row(*cells_, end_section=False)
            group = first
        out.print(t)
        if written:
            console.print(f"wrote {written}", highlight=False, soft_wrap=True)
