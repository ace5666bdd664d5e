"""Command line: parses options and calls the Python API; nothing else lives here.

Each command group is a module with `register(app)`; errors become messages and exit codes in
`main()` (EdgepackError: 2, BudgetNotMet: 1), with a traceback only under --debug.

Output contract: results go to stdout (`out`), everything else (progress, warnings, errors) to
stderr (`console`). With `--json` a command prints exactly one JSON document on stdout
(`emit_json`); `-q` before the command (`edgepack -q build ...`) silences stderr except errors.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from contextlib import contextmanager, redirect_stdout

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import EdgepackError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, export, quantize, validate, deploy and benchmark models for edge devices.")
# Piped output would otherwise wrap tables at 80 columns; a terminal keeps its own width.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)

# Command modules; each defines register(app). Order is the order of `edgepack --help`.
COMMAND_MODULES = ["build", "prune", "report", "compare", "targets", "devices", "emulate", "cache"]
COMMAND_MODULES.insert(COMMAND_MODULES.index("build") + 1, "search")  # edgepack search, search show


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks on errors, and the log lines "
                                      "native libraries print (absl, XNNPACK, oneDNN)"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress or notes on stderr (errors still show)")):
    if debug:
        os.environ["EDGEPACK_DEBUG"] = "1"
    console.quiet = quiet  # every progress line and note goes through `console`


def emit_json(data) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def stdout_to_stderr(active: bool = True):
    """While a `--json` command works, whatever a library prints goes to stderr, not into the JSON."""
    if not active:
        yield
        return
    with redirect_stdout(sys.stderr):
        yield


def reporter(quiet: bool = False, as_json: bool = False):
    """A progress reporter (edgepack.progress.Progress) honouring the command's and the root `-q`."""
    from ..progress import Progress
    return Progress(quiet=quiet or console.quiet, json_mode=as_json)


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
    console.quiet = False  # main() may run many times in one process; `-q` is per invocation
    debug_before = os.environ.get("EDGEPACK_DEBUG")  # so is --debug: restored when this call ends
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except EdgepackError as e:
        console.quiet = False  # `-q` silences progress, never the reason a command failed
        if debug:
            console.print_exception()
        # escaped: messages name config tables ("[compress.qat]") that rich would eat as markup
        console.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
        if e.hint:
            console.print(f"[yellow]hint:[/] {escape(e.hint)}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors and friends
        console.quiet = False
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        if debug:
            raise
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}\n"
                      "  rerun with --debug for the traceback, and please report it")
        return 3
    finally:
        if debug_before is None:
            os.environ.pop("EDGEPACK_DEBUG", None)
        else:
            os.environ["EDGEPACK_DEBUG"] = debug_before


def run() -> None:
    sys.exit(main())
