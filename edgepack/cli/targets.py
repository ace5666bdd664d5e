"""`edgepack targets`: list the target profiles, or show one as TOML."""
from __future__ import annotations

from pathlib import Path

import tomli_w
import typer
from rich.table import Table

from . import emit_json, out


def register(app: typer.Typer) -> None:
    targets = typer.Typer(help="List target profiles, or show one.", invoke_without_command=True)

    @targets.callback()
    def list_targets(ctx: typer.Context,
                     targets_dir: list[Path] = typer.Option([], "--targets-dir", help="extra profile directory"),
                     as_json: bool = typer.Option(False, "--json", help="print the profiles as JSON")):
        if ctx.invoked_subcommand:
            return
        # Imported when the command runs: the CLI imports every command module at start-up.
        from ..targets import list_profiles
        if as_json:
            emit_json([p.model_dump(mode="json") | {"source": p.source} for p in list_profiles(targets_dir).values()])
            return
        t = Table("name", "arch", "runtime", "formats", "threads", "int8 scheme", "p50 budget ms", "file")
        for p in list_profiles(targets_dir).values():
            q = p.quantization
            t.add_row(p.name, p.arch, p.runtime, ",".join(p.formats), str(p.threads),
                      f"{q.activation_type}/{q.weight_type} {q.calibration_method}",
                      str(p.budgets.latency_p50_ms or "-"), Path(p.source).name if p.source else "-")
        out.print(t)

    @targets.command("show", help="Print one profile as TOML (a starting point for your own).")
    def show(name: str, targets_dir: list[Path] = typer.Option([], "--targets-dir"),
             as_json: bool = typer.Option(False, "--json", help="print the profile as JSON instead of TOML")):
        from ..targets import load_profile
        loaded = load_profile(name, targets_dir)
        profile = loaded.model_dump(mode="json", exclude_none=True)
        if as_json:
            emit_json(profile | {"source": loaded.source})
            return
        out.print(tomli_w.dumps(profile), markup=False, highlight=False, end="")

    app.add_typer(targets, name="targets")
