"""edgepack.progress: tasks with elapsed time and an estimate, on stderr only, silenced by quiet."""
from __future__ import annotations

import io
import json
import os
import pty
import select
import threading

import pytest

from edgepack import progress as progress_mod
from edgepack.progress import CallbackProgress, NullProgress, Progress, as_progress, reporter_and_events


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand: elapsed times and estimates become exact."""
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    return now


def test_lines_for_logs_with_elapsed_and_estimate(clock):
    buf = io.StringIO()
    p = Progress(file=buf, every_s=3)
    with p.task("calibrating", total=8) as t:
        clock[0] += 4
        t.advance(2)  # 4 s for 2 of 8: 12 s left
        assert t.elapsed == 4 and t.remaining == 12
        clock[0] += 0.5
        t.advance()  # less than every_s since the last line: no new line
        clock[0] += 5
        t.update(completed=6)
    lines = buf.getvalue().splitlines()
    assert lines == ["   0.0s calibrating (8 to do) ...",
                     "   4.0s calibrating: 2/8, 4.0 s, about 12.0 s left",
                     "   9.5s calibrating: 6/8, 9.5 s, about 3.2 s left",
                     "   9.5s calibrating: done (6/8) in 9.5 s"]


def test_no_total_no_estimate(clock):
    buf = io.StringIO()
    p = Progress(file=buf, every_s=1)
    with p.task("tracing the graph") as t:
        clock[0] += 2
        t.advance()
        assert t.remaining is None
    assert buf.getvalue().splitlines()[1:] == ["   2.0s tracing the graph: 1, 2.0 s",
                                               "   2.0s tracing the graph: done (1) in 2.0 s"]


def test_stderr_only_and_quiet(capfd):
    p = Progress(every_s=0)
    p("exported")
    with p.task("quantizing", total=2) as t:
        t.advance(2)
    got = capfd.readouterr()
    assert got.out == "" and "exported" in got.err and "quantizing: done (2/2)" in got.err
    q = Progress(quiet=True, every_s=0)
    q("exported")
    with q.task("quantizing", total=2) as t:
        t.advance(2)
    n = NullProgress()
    n("nothing")
    with n.task("nothing", total=1) as t:
        t.advance()
    assert capfd.readouterr() == ("", "")


def test_json_mode_events(clock):
    buf = io.StringIO()
    p = Progress(json_mode=True, file=buf, every_s=1)
    p("loading")
    with p.task("fine-tuning", total=4) as t:
        clock[0] += 2
        t.advance()
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["message", "start", "progress", "end"]
    assert events[2] == {"t": 2.0, "event": "progress", "task": "fine-tuning", "completed": 1, "total": 4,
                         "elapsed_s": 2.0, "remaining_s": 6.0}
    assert events[3]["ok"] is True and events[3]["elapsed_s"] == 2.0


def test_a_failing_task_says_so_and_raises(clock):
    buf = io.StringIO()
    p = Progress(file=buf)
    with pytest.raises(RuntimeError, match="out of memory"):
        with p.task("converting", total=3) as t:
            t.advance()
            clock[0] += 1
            raise RuntimeError("out of memory")
    assert buf.getvalue().splitlines()[-1] == "   1.0s converting: FAILED (1/3) in 1.0 s"


def test_live_bar_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            p = Progress(file=tty)
            assert p.live
            with p.task("calibrating", total=3) as t:
                for _ in range(3):
                    t.advance()
            p("after the bar")
            tty.flush()
        chunks = []
        while select.select([master], [], [], 0.2)[0]:
            chunks.append(os.read(master, 1 << 16))
        text = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "calibrating" in text and "3/3" in text and "eta" in text and "after the bar" in text


def test_threads_advance_one_task():
    p = Progress(file=io.StringIO(), every_s=0)
    with p.task("benchmarking the fleet", total=1000) as t:
        workers = [threading.Thread(target=lambda: [t.advance() for _ in range(250)]) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert t.completed == 1000


def test_plain_callables_get_tasks_as_lines(clock):
    """The Python API's progress=print (or any callable(str)) gets tasks as the lines logs get."""
    said = []
    p = as_progress(said.append)
    assert isinstance(p, CallbackProgress) and as_progress(p) is p and isinstance(as_progress(None), NullProgress)
    p("loading")
    with p.task("deploying to pi") as t:
        clock[0] += 1
        t.say("pi: uploading model.int8.onnx [1/2]")
        t.fail("the disk is full")
    assert said == ["loading", "deploying to pi ...", "pi: uploading model.int8.onnx [1/2]",
                    "pi: uploading model.int8.onnx [1/2]: FAILED: the disk is full in 1.0 s"]


def test_reporter_and_events_keep_dict_callbacks_apart():
    events = []
    bars, got = reporter_and_events(events.append)
    assert isinstance(bars, NullProgress) and got == events.append  # dicts stay dicts
    p = Progress(file=io.StringIO())
    assert reporter_and_events(p) == (p, None)


def test_a_task_without_total_shows_no_count_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            p = Progress(file=tty)
            with p.task("converting to TFLite int8") as t:
                t.say("converting to TFLite int8, still")
            tty.flush()
        text = b""
        while select.select([master], [], [], 0.2)[0]:
            text += os.read(master, 1 << 16)
    finally:
        os.close(master)
        os.close(slave)
    text = text.decode(errors="replace")
    assert "converting to TFLite int8, still" in text and "0/?" not in text and "eta" not in text


def test_messages_keep_square_brackets(capfd):
    """Stage messages name config tables; rich markup would eat "[compress.qat]" as a tag."""
    Progress(every_s=0)("QAT exists: add a [compress.qat] table or pass --qat; [bold]not a tag[/]")
    err = capfd.readouterr().err
    assert "[compress.qat] table" in err and "[bold]not a tag[/]" in err
