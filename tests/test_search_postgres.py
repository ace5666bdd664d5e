"""Two `edgepack search` workers on one study in a real PostgreSQL server (started here: initdb in
a temporary directory, on a free loopback port, as the `postgres` OS user when run as root). One
worker is killed with SIGKILL mid-trial: its heartbeat stops, the other worker fails the trial
after the grace period, re-runs it from the re-queued parameters, and the study ends with exactly
its trial count, no trial run twice."""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sshd import free_port
from test_search_runs import CONFIG, EDGEPACK, _kill, _trials, _wait_running


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres_url():
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries not found under CI: scripts/install-system-deps.sh installs postgresql")
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not installed: run scripts/install-system-deps.sh")
    pytest.importorskip("psycopg2", reason="pip install -c constraints.txt psycopg2-binary (the test extra)")
    root = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))  # not under pytest's 0700 tmp: postgres must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*argv, check=True):
        return subprocess.run(as_user + [str(bindir / argv[0]), *argv[1:]], capture_output=True, text=True,
                              check=check, timeout=120)
    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "edgepack")
        yield f"postgresql://postgres@127.0.0.1:{port}/edgepack"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgres_study_one_killed_mid_trial(tmp_path, postgres_url):
    (tmp_path / "edgepack.toml").write_text(CONFIG)
    study = "shared"

    def worker(name: str, seed: int):
        # Each worker has its own output root, as on its own machine; the study is the shared state.
        argv = [EDGEPACK, "search", "-c", str(tmp_path / "edgepack.toml"), "--out", str(tmp_path / name),
                "--storage", postgres_url, "--study", study, "--trials", "2", "--seed", str(seed),
                "--heartbeat", "1", "--grace", "8", "--json"]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    a, b = worker("a", 1), worker("b", 2)
    try:
        killed = _wait_running(postgres_url, study, a.pid, a)
        import time
        time.sleep(1.0)  # mid-trial: its build is under way
        _kill(a)
        out, err = b.communicate(timeout=600)
    finally:
        for p in (a, b):
            if p.poll() is None:
                _kill(p)
    assert b.returncode == 0, err[-3000:]
    result = json.loads(out)
    trials = _trials(postgres_url, study)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2  # exactly the study's count, across both workers
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state.name == "FAIL"  # failed by the survivor once its heartbeat stopped
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == by_number[killed].params  # the same trial, run again once, not a new one
    origins = [t.system_attrs.get("failed_trial", t.number) for t in complete]
    assert len(origins) == len(set(origins))  # no trial completed twice
    assert all(f":{b.pid}:" in t.user_attrs["worker"] for t in complete)
    assert result["study_name"] == study and result["storage"] == postgres_url
    assert sum(t["state"] == "COMPLETE" for t in result["trials"]) == 2
    assert Path(result["best_path"]).parent == tmp_path / "b"
