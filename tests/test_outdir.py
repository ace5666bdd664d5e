"""Build directories: what a killed build leaves behind is cleaned by the next one, never what a
running build is still writing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from edgepack.outdir import remove_abandoned, replace_dir, staging_dir

HOLDER = """
import sys, time
from pathlib import Path
from edgepack.outdir import staging_dir
with staging_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.onnx").write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def start_holder(final):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(final)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_staging_dir_of_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    final = tmp_path / "net-x86"
    live, live_tmp = start_holder(final)
    dead, dead_tmp = start_holder(final)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        assert os.path.isdir(dead_tmp)
        assert [str(p) for p in remove_abandoned(final)] == [dead_tmp]
        assert not os.path.exists(dead_tmp) and os.path.isdir(live_tmp)
    finally:
        live.kill()
        live.wait()


def test_failed_build_removes_its_staging_dir_and_success_swaps_in(tmp_path):
    final = tmp_path / "net-x86"
    with pytest.raises(RuntimeError), staging_dir(final) as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
    with staging_dir(final) as tmp:
        (tmp / "model.onnx").write_text("v1")
        replace_dir(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net-x86"]
    assert [p.name for p in final.iterdir()] == ["model.onnx"]  # no lock file shipped


def test_previous_build_renamed_aside_by_a_killed_swap_is_put_back(tmp_path):
    final = tmp_path / "net-x86"
    aside = tmp_path / ".net-x86.old-999999999"  # no such pid
    aside.mkdir()
    (aside / "model.onnx").write_text("previous")
    remove_abandoned(final)
    assert (final / "model.onnx").read_text() == "previous" and not aside.exists()


def test_unlocked_staging_dir_is_kept_while_young(tmp_path):
    final = tmp_path / "net-x86"
    young = tmp_path / ".net-x86.tmp-young"  # killed before taking its lock, or mid-rename
    young.mkdir()
    old = tmp_path / ".net-x86.tmp-old"
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_abandoned(final) == [old] and young.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_build_directory_gets_the_mode_the_umask_gives(tmp_path, umask):
    """Not mkdtemp's 0700: other users and tools read a build directory, unless the umask says no."""
    final = tmp_path / "net-x86"
    old = os.umask(umask)
    try:
        with staging_dir(final) as tmp:
            (tmp / "model.onnx").write_text("v1")
            replace_dir(tmp, final)
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask
