"""Run one conversion in a forked child process, bounded in time, and publish its file atomically.

Why a child process: litert-torch conversion (and PT2E calibration before it) can run for
minutes and allocate gigabytes. In a child, a time limit is a kill, an out-of-memory kill takes
down the child and not the build, and the parent always gets to clean up the temporary file.
`fork` (not `spawn`) so the model need not be picklable and nothing is re-imported: measured
overhead is a few milliseconds on top of a conversion that takes seconds.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Callable

from ..errors import EdgepackError


def tmp_path_for(out: Path) -> Path:
    # Same directory as the destination so the final rename is atomic (same filesystem).
    return out.with_name(f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}")


def _child(conn, work: Callable[[Path], dict], tmp: Path) -> None:
    # litert-torch prints a rich progress tree on stdout for every stage; edgepack has its own.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    try:
        record = work(tmp)
        conn.send(("ok", record))
    except MemoryError:
        conn.send(("oom", "the conversion ran out of memory (MemoryError)", None))
    except EdgepackError as e:
        conn.send(("error", e.message, e.hint))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent as text
        conn.send(("crash", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(work: Callable[[Path], dict], out: Path, what: str,
                 timeout_s: float | None = None, isolate: bool = True) -> dict:
    """Call `work(tmp_path)` (in a child unless `isolate=False`), then rename tmp to `out`.

    `work` writes the model to the path it is given and returns a JSON-able record. On any
    failure the temporary file is removed and an `EdgepackError` is raised; `out` is only ever
    replaced by a complete file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    try:
        if not isolate:
            record = work(tmp)
        else:
            record = _run_in_child(work, tmp, what, timeout_s)
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise EdgepackError(f"{what}: the converter finished but wrote no model",
                                "rerun with --debug and report it as an edgepack bug")
        tmp.replace(out)
        return record
    finally:
        tmp.unlink(missing_ok=True)


def _run_in_child(work, tmp: Path, what: str, timeout_s) -> dict:
    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, work, tmp), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child_conn.close()
    try:
        # Wait on the pipe, not on the process: a large message would otherwise block the child.
        ready = parent_conn.poll(timeout_s)
        msg = None
        if ready:
            try:
                msg = parent_conn.recv()
            except EOFError:  # the child died without a word: killed by a signal
                msg = None
        elif proc.is_alive():
            raise EdgepackError(
                f"{what} exceeded its time limit of {timeout_s:g} s and was stopped",
                "raise the time limit, use a smaller input size, or drop the TFLite format "
                "for this target")
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
    if msg is None:
        code = proc.exitcode
        if code is not None and code < 0 and -code == signal.SIGKILL:
            raise EdgepackError(
                f"{what} was killed after {time.perf_counter() - t0:.0f} s (SIGKILL), most "
                "likely by the kernel's out-of-memory killer",
                "free memory or run on a machine with more RAM; TFLite conversion of a large "
                "model can need several GB")
        raise EdgepackError(f"{what} crashed (exit code {code})",
                            "rerun with --debug; if it persists, report it with the model")
    status, *rest = msg
    if status == "ok":
        return rest[0]
    message, detail = rest
    if status == "oom":
        raise EdgepackError(f"{what}: {message}", "free memory or use a machine with more RAM")
    if status == "error":
        raise EdgepackError(message, detail)
    err = EdgepackError(f"{what} failed: {message}",
                        "this is a converter failure edgepack does not recognise; the child's "
                        "traceback is attached to the error as `.detail`")
    err.detail = detail  # the child's traceback: the parent's own traceback says nothing useful
    raise err
