"""Children started with edgepack.lifetime die with the process that started them (SIGKILL
included), where a plain Popen child lives on as an orphan."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

PARENT = """
import subprocess, sys, time
from edgepack.lifetime import popen_tied
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
child = popen_tied(sleeper) if sys.argv[1] == "tied" else subprocess.Popen(sleeper)
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def child_after_parent_killed(mode: str) -> bool:
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    still = alive(child)
    if still:
        os.kill(child, signal.SIGKILL)
    return still


def test_a_tied_child_dies_when_its_parent_is_killed():
    assert child_after_parent_killed("tied") is False


def test_an_untied_child_outlives_its_parent():
    # The control: what a plain Popen leaves behind, and what the tied one prevents.
    assert child_after_parent_killed("plain") is True
