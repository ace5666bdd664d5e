"""`edgepack search` for real: the embedded digits example built per trial (the stage cache makes
repeats cheap), a SQLite study killed with SIGKILL and resumed, --json and `search show`, a
device that dies, and two workers on a real PostgreSQL server, one killed mid-trial."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from edgepack.search.study import driver_url

EDGEPACK = str(Path(sys.executable).with_name("edgepack"))
# Cheap trials: no pruning fine-tune, few timed runs, small evaluation split; two int8 settings.
CONFIG = """
latency_runs = 5
choose_samples = 64
device_eval_samples = 64
[search]
max_float_nodes = 0
threads = 1
[search.prune]
ratio = [0.0, 0.25]
epochs = 0
[search.quantization]
calibration_method = ["MinMax", "Percentile"]
per_channel = [true, false]
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "edgepack.toml"
    path.write_text(CONFIG)
    return path


def _sqlite_ready(path: Path) -> bool:
    """Whether the search has finished making its database: Optuna stamps the schema version last.
    Opening it any earlier would make this process race the search at creating the tables."""
    import sqlite3
    if not path.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("select count(*) from alembic_version").fetchone()[0] > 0
    except sqlite3.Error:  # no such table yet, or locked while the tables are made
        return False


def _trials(url: str, study: str):
    if url.startswith("sqlite:///") and not _sqlite_ready(Path(url.removeprefix("sqlite:///"))):
        return []  # the search has not made its database yet (opening it here would make it)
    try:
        return optuna.load_study(study_name=study, storage=driver_url(url)).get_trials(deepcopy=False)
    except KeyError:  # the study is not created yet
        return []


def _wait_running(url: str, study: str, pid: int, proc, timeout: float = 240):
    """Until the process `pid` holds a RUNNING trial (its worker attribute names the pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before it could be killed"
        for t in _trials(url, study):
            if t.state.name == "RUNNING" and f":{pid}:" in str(t.user_attrs.get("worker")):
                return t.number
        time.sleep(0.5)
    raise AssertionError("no trial started in time")


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_search_resumes_from_sqlite_then_json_and_show(tmp_path):
    cfg, out = _config(tmp_path), tmp_path / "dist"
    study, url = "digits-cnn-x86", f"sqlite:///{tmp_path / 'dist' / 'digits-cnn-x86.search' / 'study.db'}"
    argv = [EDGEPACK, "search", "-c", str(cfg), "--out", str(out), "--trials", "2", "--seed", "3"]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_running(url, study, first.pid, first)
        deadline = time.monotonic() + 240  # let one trial finish and the next one start, then kill
        while not (any(t.state.name == "COMPLETE" for t in _trials(url, study))
                   and any(t.state.name == "RUNNING" for t in _trials(url, study))):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.3)
        time.sleep(1.0)  # mid-trial
    finally:
        _kill(first)
    before = {t.number: (t.state.name, t.datetime_complete) for t in _trials(url, study)}
    killed = [n for n, (s, _) in before.items() if s == "RUNNING"]
    finished = {n: when for n, (s, when) in before.items() if s == "COMPLETE"}
    assert len(killed) == 1 and finished

    second = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout)  # one JSON document; progress went to stderr
    assert "re-queued" in second.stderr
    trials = {t["number"]: t for t in result["trials"]}
    assert sum(t["state"] == "COMPLETE" for t in trials.values()) == 2
    assert trials[killed[0]]["state"] == "FAIL"
    retries = [t for t in trials.values() if t["retry_of"] == killed[0]]
    assert len(retries) == 1 and retries[0]["state"] == "COMPLETE"  # the killed trial ran again, once
    now = {t.number: t.datetime_complete for t in _trials(url, study)}
    assert all(now[n] == when for n, when in finished.items())  # finished trials were not redone
    assert result["pareto"] and set(result["pareto"]) <= {n for n, t in trials.items() if t["state"] == "COMPLETE"}
    best = Path(result["best_path"])
    assert best == out / "digits-cnn-x86" and (best / "manifest.json").is_file()
    assert result["best"]["number"] in result["pareto"] and result["best"]["feasible"]
    assert (best / "search.json").is_file() and "<h2>Search</h2>" in (best / "report.html").read_text()
    for key in ("table_path", "plot_path", "markdown_path"):
        assert Path(result[key]).is_file()
    assert Path(result["plot_path"]).read_bytes()[:4] == b"\x89PNG"
    assert len(Path(result["table_path"]).read_text().splitlines()) == 1 + len(trials)
    assert all(t["latency_where"] == "host" for t in trials.values() if t["state"] == "COMPLETE")
    # the best was benchmarked again before it was written (3 rounds on this host) and held up
    again = result["best"]["confirm"]
    assert again["confirmed"] and len(again["p50_rounds_ms"]) == 3 and again["limits"]["latency_p50_ms"] == 50.0
    written = json.loads((best / "search.json").read_text())
    assert written["confirm"]["best"] == result["best"]["number"] and written["confirm"]["rounds"] == 3

    shown = subprocess.run([EDGEPACK, "search", "show", study, "--out", str(out)], capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "Pareto front of digits-cnn-x86" in shown.stdout and f"best build: trial {result['best']['number']}" \
        in shown.stdout
    missing = subprocess.run([EDGEPACK, "search", "show", "nope", "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no search 'nope'" in missing.stderr


@pytest.mark.slow
def test_a_dead_device_fails_its_trial_with_the_reason(tmp_path):
    from edgepack.config import BuildConfig
    from edgepack.search import SearchConfig, search
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "dead-pi.toml").write_text('name = "dead-pi"\ntarget = "x86"\ntransport = "ssh"\n[ssh]\n'
                                          'host = "127.0.0.1"\nport = 1\nuser = "nobody"\nconnect_timeout_s = 2\n')
    cfg = BuildConfig(target="x86", latency_runs=5, choose_samples=64, devices_dir=[str(devices)])
    r = search(cfg, SearchConfig(trials=1, out=str(tmp_path / "dist"), devices=["dead-pi"], seed=0,
                                 space={"prune": {"ratio": 0.0}, "quantization": {"calibration_method": ["MinMax"]},
                                        "max_float_nodes": 0, "threads": 1}))
    (t,) = r.trials
    assert t["state"] == "FAIL" and t["reason"].startswith("device dead-pi:")
    assert r.best is None and r.best_path is None and any("no trial met" in n for n in r.notes)
