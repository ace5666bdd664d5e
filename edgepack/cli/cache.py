"""`edgepack cache info|clear`: show or empty the cache of stage results (edgepack.cache)."""
from __future__ import annotations

import typer

from . import emit_json, out


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def register(app: typer.Typer) -> None:
    cache = typer.Typer(help="Show or clear the cache of stage results "
                             "($EDGEPACK_CACHE_DIR, else ~/.cache/edgepack/stages).", no_args_is_help=True)

    @cache.command("info", help="Where the cache is, how many entries and how many bytes it holds.")
    def info(as_json: bool = typer.Option(False, "--json", help="print it as JSON")):
        from ..cache import StageCache
        data = StageCache().info()
        if as_json:
            emit_json(data)
            return
        out.print(f"{'root':>9}: {data['root']}", highlight=False)
        out.print(f"{'entries':>9}: {data['entries']}", highlight=False)
        out.print(f"{'size':>9}: {_human(data['bytes'])} of {_human(data['max_bytes'])} "
                  "(EDGEPACK_CACHE_MAX_GB)", highlight=False)

    @cache.command("clear", help="Remove every cached stage result.")
    def clear(as_json: bool = typer.Option(False, "--json", help="print what was removed as JSON")):
        from ..cache import StageCache
        c = StageCache()
        removed = c.clear() | {"root": str(c.root)}
        if as_json:
            emit_json(removed)
        else:
            out.print(f"removed {removed['entries']} entries ({_human(removed['bytes'])}) from {c.root}",
                      highlight=False)

    app.add_typer(cache, name="cache")
