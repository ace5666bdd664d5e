"""Progress lines on stderr, the same for every command: seconds since the command started,
then the message."""
from __future__ import annotations

import time
from typing import Callable

from . import console


def elapsed_printer(quiet: bool = False) -> Callable[[str], None]:
    """A progress callback printing `  12.3s message` on stderr; silent when `quiet`."""
    t0 = time.perf_counter()

    def say(message: str) -> None:
        if not quiet:
            console.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {message}", highlight=False)
    return say
