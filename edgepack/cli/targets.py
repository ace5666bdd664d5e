"""`edgepack targets`: list the target profiles, or show one as TOML."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from . import out


def _toml(profile) -> str:
    data = profile.model_dump(mode="json", exclude_none=True)
    lines = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_value(v)}")
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def register(app: typer.Typer) -> None:
    targets = typer.Typer(help="List target profiles, or show one.", invoke_without_command=True)

    @targets.callback()
    def list_targets(ctx: typer.Context,
                     targets_dir: list[Path] = typer.Option([], "--targets-dir", help="extra profile directory")):
        if ctx.invoked_subcommand:
            return
        from ..targets import list_profiles
        t = Table("name", "arch", "runtime", "formats", "threads", "int8 scheme", "p50 budget ms", "file")
        for p in list_profiles(targets_dir).values():
            q = p.quantization
            t.add_row(p.name, p.arch, p.runtime, ",".join(p.formats), str(p.threads),
                      f"{q.activation_type}/{q.weight_type} {q.calibration_method}",
                      str(p.budgets.latency_p50_ms or "-"), Path(p.source).name if p.source else "-")
        out.print(t)

    @targets.command("show", help="Print one profile as TOML (a starting point for your own).")
    def show(name: str, targets_dir: list[Path] = typer.Option([], "--targets-dir")):
        from ..targets import load_profile
        out.print(_toml(load_profile(name, targets_dir)), markup=False, highlight=False)

    app.add_typer(targets, name="targets")
