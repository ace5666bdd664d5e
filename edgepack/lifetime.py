"""Child processes that end with the process that started them.

A build or search killed with SIGKILL cannot clean up after itself; without this its children
(a TFLite conversion interpreter, a forked TFLite stage, fleet search workers) would go on as
orphans, holding memory and CPU. Linux has PR_SET_PDEATHSIG for that; elsewhere these are no-ops.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Arm SIGKILL for this process when its parent dies. Given the parent's pid (a forked child,
    which may start after its parent has already gone), exit at once if it is gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def popen_tied(argv: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` of a child that is killed when this process dies."""
    parent = os.getpid()
    return subprocess.Popen(argv, preexec_fn=lambda: die_with_parent(parent), **kwargs)
