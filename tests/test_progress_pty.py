"""Progress on a real terminal: `edgepack build --prune` with fine-tuning, run under a
pseudo-terminal, redraws live bars whose completed counts move (batches k/N per epoch); off a
terminal the same tasks print start and end lines instead of redraws."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

COLOUR = re.compile(r"\x1b\[[0-9;]*m")
COUNT = r"\s(\d+)/(\d+)\s+\d+:\d\d:\d\d"  # a bar's completed/total, then its elapsed time
CURSOR = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")  # moves, erases, titles


def run_on_pty(argv: list[str], cwd: Path, timeout_s: float = 240) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a 40x200 pseudo-terminal; what it wrote, escapes kept."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(TERM="xterm-256color", COLUMNS="200", LINES="40")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def frames(stream: str) -> list[str]:
    """The screen lines as they were drawn, one per redraw (escapes removed, \\r and \\n split)."""
    return [line for line in re.split(r"[\r\n]+", CURSOR.sub("\n", COLOUR.sub("", stream))) if line.strip()]


@pytest.mark.slow
def test_pruning_build_with_fine_tuning_redraws_its_bars_on_a_terminal(user_model, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.standard_normal((128, 3, 16, 16)).astype(np.float32),
             y=rng.integers(0, 4, 128))
    (tmp_path / "edgepack.toml").write_text(  # 2 epochs of 8 batches
        "[prune]\nratio = 0.5\n[prune.finetune]\nepochs = 2\nbatch_size = 16\npatience = 5\n")
    code, stream = run_on_pty([str(Path(sys.executable).with_name("edgepack")), "build", "--model",
                               user_model["model"], "--weights", user_model["weights"], "--calib", user_model["calib"],
                               "--eval", user_model["eval"], "--train", str(tmp_path / "train.npz"),
                               "--latency-runs", "5", "--no-fallback", "--no-cache", "--out", str(tmp_path / "dist")],
                              tmp_path)
    (tmp_path / "terminal.txt").write_text(stream)  # what the terminal got, for a failure's post-mortem
    assert code in (0, 1), stream[-3000:]  # built (a budget may fail: random training labels)
    lines = frames(stream)
    assert "\x1b[" in stream  # rich drew on the terminal: colours and cursor moves, not plain lines
    counts: dict[str, set[str]] = {}
    for line in lines:
        m = re.search(rf"fine-tune epoch (\d+)/2\b.*?{COUNT}", line)
        if m:
            counts.setdefault(m.group(1), set()).add(m.group(2))
    assert set(counts) == {"1", "2"}, lines[-40:]
    for epoch, seen in counts.items():  # each epoch's bar was redrawn with different completed counts
        assert len(seen) >= 2, (epoch, seen)
    batches = [re.search(COUNT, line) for line in lines if "pruning channel groups" in line]
    assert any(b and b.group(1) == b.group(2) for b in batches)  # the group bar reached N/N
    assert re.search(r"calibrating \(MinMax, \d+ samples", stream)
    assert "0:00:" in stream and "eta" in stream  # elapsed time and the estimate column
    assert "Traceback" not in stream


def test_a_pipe_gets_lines_not_redraws(user_model, tmp_path):
    """Off a terminal (logs, CI, here a StringIO) each task is a start line and an end line."""
    code, _, err = run_cli("prune", "--model", user_model["model"], "--weights", user_model["weights"],
                           "--input-shape", user_model["shape"], "--ratio", "0.5", "--epochs", "1",
                           "--train", user_model["eval"], "--out", str(tmp_path / "p.safetensors"))
    assert code == 0, err
    assert "\x1b[" not in err
    assert re.search(r"fine-tune epoch 1/1 \(\d+ to do\) \.\.\.", err)
    assert re.search(r"fine-tune epoch 1/1, loss [\d.]+, eval (-|[\d.]+%): done \(1/1\) in [\d.]+ s", err), err
    assert re.search(r"pruning channel groups \(step 1/1\): .*: done \((\d+)/\1\)", err), err
