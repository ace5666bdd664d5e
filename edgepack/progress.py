"""Progress for long work (calibration, fine-tuning, conversion, fleet benches), on stderr only.

    reporter = Progress(quiet=False, json_mode=False)
    with reporter.task("calibrating", total=256) as t:
        for batch in batches:
            ...
            t.advance(len(batch))
    reporter("exported to ONNX")   # a one-line message, like the `progress=` callbacks take

`as_progress(x)` turns what a Python API caller passes as `progress=` (None, a plain
`callable(str)`, or a Progress) into a Progress, so library code can always open tasks.
On a terminal a task is a live rich bar with elapsed time and, once a total is known and some
work is done, the time remaining. Elsewhere (logs, CI, pipes) each task prints one line when it
starts and one when it ends, never a stream of redraws. `json_mode` prints those events as JSON
lines, so a caller whose stdout carries `--json` output can still follow along on stderr.
Nothing is ever written to stdout. `quiet` silences everything; `NullProgress` (the Python API's
default) does nothing at all.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, ProgressColumn, SpinnerColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class Task:
    """One piece of work: `advance(n)`, `update(completed=, total=, description=)`."""

    def __init__(self, owner: "Progress", description: str, total: float | None):
        self.description, self.total, self.completed = description, total, 0.0
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.failed: str | None = None  # set by fail(): the task ends as FAILED without an exception
        self._owner, self._id, self._said = owner, None, self.started

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def remaining(self) -> float | None:
        """Seconds left at the pace so far; None without a total or before any work is done."""
        if not self.total or self.completed <= 0:
            return None
        return max(0.0, self.elapsed * (self.total - self.completed) / self.completed)

    def advance(self, n: float = 1) -> None:
        with self._owner._lock:
            self.completed += n
        self._owner._changed(self)

    def update(self, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        self._owner._changed(self)

    def say(self, message: str) -> None:
        """What the task does now: its bar's text on a terminal, a line of its own in logs."""
        self.description = message
        if self._id is None:  # no bar: the message is the line, and the next timed one waits
            self._said = time.perf_counter()
            self._owner(message)
        else:
            self._owner._changed(self)

    def fail(self, reason: str) -> None:
        """End as FAILED (with `reason`) even though no exception leaves the `with` block."""
        self.failed = reason


class Progress:
    """Progress lines and bars on stderr (or on `file`, for tests); see the module docstring."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, file: IO[str] | None = None,
                 every_s: float = 10.0):
        self.quiet, self.json_mode, self.every_s = quiet, json_mode, every_s
        self._file = file
        self._t0 = time.perf_counter()
        self._lock = threading.RLock()  # fleet benches report from several threads
        self._bars: RichProgress | None = None
        self._open = 0
        # file=None: rich resolves sys.stderr at every write, so redirections made later still apply.
        self._console = Console(file=file, stderr=True, highlight=False, soft_wrap=True)
        self.live = not json_mode and self._console.is_terminal

    def __call__(self, message: str) -> None:
        """A one-line message, prefixed with the seconds since this reporter was made."""
        if self.quiet:
            return
        with self._lock:
            if self.json_mode:
                self._event({"event": "message", "message": message})
            elif self._bars is not None:  # escaped: stage messages name tables like [compress.qat]
                self._bars.console.print(f"[dim]{self._since():6.1f}s[/] {escape(message)}", markup=True)
            else:
                self._console.print(f"[dim]{self._since():6.1f}s[/] {escape(message)}")

    def say(self, message: str) -> None:
        self(message)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        task = Task(self, description, total)
        self._start(task)
        ok = False
        try:
            yield task
            ok = True
        finally:
            task.finished = time.perf_counter()
            self._end(task, ok)

    def _since(self) -> float:
        return time.perf_counter() - self._t0

    def _event(self, data: dict) -> None:
        self._console.file.write(json.dumps({"t": round(self._since(), 3), **data}) + "\n")
        self._console.file.flush()

    def _start(self, task: Task) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.json_mode:
                self._event({"event": "start", "task": task.description, "total": task.total})
            elif self.live:
                if self._bars is None:
                    self._bars = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                              _IfTotal(MofNCompleteColumn()), TimeElapsedColumn(),
                                              _IfTotal(TextColumn("eta")), _IfTotal(TimeRemainingColumn()),
                                              console=self._console, transient=False)
                    self._bars.start()
                task._id = self._bars.add_task(task.description, total=task.total)
                self._bars.refresh()  # drawn at once (0/N), not at the next tick: short tasks show too
                self._open += 1
            else:
                self(f"{task.description}" + (f" ({_num(task.total)} to do)" if task.total else "") + " ...")

    def _changed(self, task: Task) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._bars is not None and task._id is not None:
                self._bars.update(task._id, completed=task.completed, total=task.total, description=task.description)
                return
            now = time.perf_counter()
            if now - task._said < self.every_s:  # logs get a line every `every_s`, not every advance
                return
            if task.total and task.completed >= task.total:
                return  # all done: the end line says so
            task._said = now
            left = task.remaining
            if self.json_mode:
                self._event({"event": "progress", "task": task.description, "completed": task.completed,
                             "total": task.total, "elapsed_s": round(task.elapsed, 3),
                             "remaining_s": None if left is None else round(left, 1)})
            else:
                done = f"{_num(task.completed)}/{_num(task.total)}" if task.total else _num(task.completed)
                self(f"{task.description}: {done}, {task.elapsed:.1f} s"
                     + (f", about {left:.1f} s left" if left is not None else ""))

    def _end(self, task: Task, ok: bool) -> None:
        if self.quiet:
            return
        ok = ok and task.failed is None
        with self._lock:
            if self.json_mode:
                self._event({"event": "end", "task": task.description, "ok": ok, "completed": task.completed,
                             "total": task.total, "elapsed_s": round(task.elapsed, 3),
                             **({"error": task.failed} if task.failed else {})})
            elif self._bars is not None and task._id is not None:
                failed = "" if ok else f" [red]FAILED[/]{': ' + task.failed if task.failed else ''}"
                self._bars.update(task._id, completed=task.completed, description=task.description + failed)
                self._open -= 1
                if self._open == 0:
                    self._bars.stop()
                    self._bars = None
            else:
                done = f"{_num(task.completed)}/{_num(task.total)}" if task.total else _num(task.completed)
                count = "" if not task.total and not task.completed else f" ({done})"
                why = f": {task.failed}" if task.failed else ""
                self(f"{task.description}: {'done' if ok else 'FAILED' + why}{count} in {task.elapsed:.1f} s")


class NullProgress(Progress):
    """Does nothing: the default of the Python API, which prints nothing unless asked."""

    def __init__(self):
        super().__init__(quiet=True)


class CallbackProgress(Progress):
    """A Progress over a plain `callable(str)` (the Python API's `progress=`): messages go to it
    as they are, and each task as the lines a log gets (start, every `every_s`, end)."""

    def __init__(self, callback: Callable[[str], None], every_s: float = 10.0):
        super().__init__(every_s=every_s)
        self.callback, self.live = callback, False

    def __call__(self, message: str) -> None:
        self.callback(message)


def as_progress(progress) -> Progress:
    """A Progress from a `progress=` argument: None (silence), a Progress, or a plain callable(str)."""
    if progress is None:
        return NullProgress()
    return progress if isinstance(progress, Progress) else CallbackProgress(progress)


def reporter_and_events(progress) -> tuple[Progress, Callable[[dict], None] | None]:
    """For APIs whose `progress=` took event dicts before it took a Progress (edgepack.prune): a
    Progress gets tasks and messages (no dicts); any other callable keeps getting the dicts."""
    if isinstance(progress, Progress):
        return progress, None
    return NullProgress(), progress


class _IfTotal(ProgressColumn):
    """A column shown only for tasks with a total: a conversion with no count to report shows
    its spinner and elapsed time, not "0/?" and an empty estimate."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task):
        return self.column(task) if task.total is not None else Text("")


def _num(v: float | None) -> str:
    if v is None:
        return "?"
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"
