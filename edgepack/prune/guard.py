"""Bounded memory and time for a pruning run.

torch-pruning's work happens in long pure-Python loops (index mappings, group building) that can
grow without bound on graphs it misreads; the kernel then kills the process and nothing is
printed. `ResourceGuard` polls the resident set size and the clock from a watchdog thread and,
past a limit, raises `ResourceLimit` asynchronously in the pruning thread (delivered at its next
bytecode, so inside torch-pruning's loops too). The guarded block turns that into an
`UnprunableModel` naming the step that was running.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
import time

POLL_SECONDS = 0.05
REDELIVER_SECONDS = 0.5  # if a bare `except:` swallowed the first one, raise it again


class ResourceLimit(BaseException):
    """Raised asynchronously in the pruning thread; BaseException so that `except Exception`
    handlers (ours and torch-pruning's) let it through."""


def _proc_mb(path: str, key: str) -> float:
    """A kB field of a /proc file (VmRSS, VmHWM, MemAvailable...) in MB; 0 when absent."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    """Resident set size of this process, MB (VmRSS)."""
    return _proc_mb("/proc/self/status", "VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (VmHWM)."""
    return _proc_mb("/proc/self/status", "VmHWM")


def available_mb() -> float:
    return _proc_mb("/proc/meminfo", "MemAvailable")


def default_memory_limit_mb() -> int:
    """What the process has now plus 3/4 of what the machine can still give: past it, the kernel
    would soon kill the process without a word."""
    return int(rss_mb() + 0.75 * available_mb())


class ResourceGuard:
    """`with ResourceGuard(max_mb, max_minutes) as guard: ...`; set `guard.step` to say what runs.
    On a limit the block ends with `guard.exceeded` set (a sentence) and ResourceLimit raised;
    callers turn it into their own error (see engine.py)."""

    def __init__(self, max_memory_mb: int | None, max_minutes: float | None):
        self.max_memory_mb = max_memory_mb or default_memory_limit_mb()
        self.max_seconds = None if max_minutes is None else 60 * max_minutes
        self.step = "starting"
        self.exceeded: str | None = None
        self.peak_mb = rss_mb()
        self._start = time.monotonic()
        self._done = threading.Event()
        self._paused = False
        self._armed = self._stopping = False
        self._thread_id = threading.get_ident()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start

    @contextlib.contextmanager
    def paused(self):
        """Not counted, not limited: fine-tuning between iterative steps."""
        self._paused, since = True, time.monotonic()
        try:
            yield
        finally:
            self._start += time.monotonic() - since
            self._paused = False

    def __enter__(self) -> "ResourceGuard":
        self._thread_id = threading.get_ident()
        self._start = time.monotonic()
        self._armed = self._stopping = False
        self._watchdog = threading.Thread(target=self._watch, name="edgepack-prune-guard", daemon=True)
        self._watchdog.start()
        # Armed by a plain store, the last statement: a delivery landing inside __enter__ (in
        # Thread.start, say) would skip __exit__ and leave the watchdog raising in this thread
        # for the rest of the process (seen in CI: a later test's worker died of it).
        self._armed = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stopping = True  # a plain store, the first statement: no delivery lands before it
        while True:
            try:
                self._done.set()
                self._watchdog.join()
                _raise_in(self._thread_id, None)  # drop a delivery still pending
                break
            except ResourceLimit:
                continue  # delivered before the watchdog saw `_stopping`: stop it all the same
        if exc_type is None and self.exceeded:
            # The limit was crossed but its delivery was swallowed or came too late (a bare
            # `except:` in the pruned code, or a block shorter than the redelivery interval):
            # the caller still hears of it.
            raise ResourceLimit(self.exceeded)

    def _watch(self) -> None:
        delivered_at = None
        first = True  # check at once: a short block must not slip between two polls
        while first or not self._done.wait(POLL_SECONDS):
            first = False
            if self._paused:
                continue
            rss = rss_mb()
            self.peak_mb = max(self.peak_mb, rss)
            if self.exceeded is None:
                if rss > self.max_memory_mb:
                    self.exceeded = (f"its resident memory reached {rss:.0f} MB, over the limit of "
                                     f"{self.max_memory_mb} MB")
                elif self.max_seconds is not None and self.seconds > self.max_seconds:
                    self.exceeded = f"it ran for {self.seconds / 60:.1f} min, over the limit of {self.max_seconds / 60:g} min"
            if self.exceeded and (delivered_at is None or time.monotonic() - delivered_at > REDELIVER_SECONDS):
                if self._armed and not self._stopping:
                    _raise_in(self._thread_id, ResourceLimit)
                    delivered_at = time.monotonic()


def _raise_in(thread_id: int, exc_type) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc_type) if exc_type else None)
