"""Command line: parses options and calls the Python API; nothing else lives here.

Each command group is a module with `register(app)`; errors become messages and exit codes in
`main()` (EdgepackError: 2, BudgetNotMet: 1), with a traceback only under --debug.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

from ..errors import EdgepackError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, export, quantize, validate, deploy and benchmark models for edge devices.")
# Piped output would otherwise wrap tables at 80 columns; a terminal keeps its own width.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)

# Command modules; each defines register(app). Order is the order of `edgepack --help`.
COMMAND_MODULES = ["build", "prune", "targets", "devices", "emulate", "cache"]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks on errors")):
    if debug:
        os.environ["EDGEPACK_DEBUG"] = "1"


_registered = False


def _register_all() -> None:
    global _registered
    if _registered:  # main() may run many times in one process (tests, notebooks)
        return
    _registered = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command group not present in this build
            raise
        mod.register(app)


def main(argv: list[str] | None = None) -> int:
    _register_all()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except EdgepackError as e:
        if debug:
            console.print_exception()
        console.print(f"[bold red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        if e.hint:
            console.print(f"[yellow]hint:[/] {e.hint}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors and friends
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        if debug:
            raise
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e}\n"
                      "  rerun with --debug for the traceback, and please report it")
        return 3


def run() -> None:
    sys.exit(main())
