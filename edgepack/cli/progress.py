"""Progress on stderr, the same for every command: one edgepack.progress.Progress per command
(`cli.reporter(quiet, as_json)`): live bars on a terminal, lines with the seconds since the
command started in logs, JSON lines with `--json`, nothing with `-q`."""
from __future__ import annotations

from ..progress import Progress


def elapsed_printer(quiet: bool = False) -> Progress:
    """The command's Progress (the name this helper had when it printed lines only)."""
    from . import reporter
    return reporter(quiet)
