"""The build directory's life cycle: a staging directory next to the final one, swapped in by
rename, and clean-up of what a killed build (SIGKILL, power loss) left behind.

A live staging directory holds an flock on its `.owner` file; the kernel drops the lock when
the process dies, so a staging directory whose lock can be taken belongs to nobody.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgepackError

OWNER = ".owner"
UNLOCKED_GRACE_S = 3600  # a staging dir killed before it took its lock: removed once this old


def writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".edgepack-probe-")
        probe.close()
    except OSError as e:
        raise EdgepackError(f"output directory {path} is not writable: {e.strerror}",
                            "pass --out DIR somewhere you can write") from e
    return path


@contextmanager
def staging_dir(final: Path):
    """A locked, empty directory beside `final`; removed on error, left for the caller to swap
    in with `replace_dir` on success."""
    remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    owner = open(tmp / OWNER, "w")
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        owner.close()


def replace_dir(new: Path, final: Path) -> None:
    """Swap the finished directory into place; the old one is removed only after the swap, and
    put back if the swap fails (say, a concurrent build of the same name got there first)."""
    (new / OWNER).unlink(missing_ok=True)  # the lock stays held through the open file
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    try:
        new.rename(final)
    except OSError as e:
        if old is not None and not final.exists():
            old.rename(final)
        raise EdgepackError(f"could not move the new build into {final}: {e.strerror}",
                            "another build of the same name may be running; the previous build is kept") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_abandoned(final: Path) -> list[Path]:
    """Delete staging directories of `final` whose build died; put back a previous build that a
    death in the middle of `replace_dir` left renamed aside. Returns what was removed."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        if _abandoned(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    for old in final.parent.glob(f".{final.name}.old-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
            else:
                old.rename(final)
    return removed


def _abandoned(tmp: Path) -> bool:
    try:
        with open(tmp / OWNER, "r") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when `f` closes
            return True
    except BlockingIOError:
        return False  # a live build holds it
    except FileNotFoundError:
        try:  # no lock file: killed right after mkdtemp, or just renaming into place
            return time.time() - tmp.stat().st_mtime > UNLOCKED_GRACE_S
        except FileNotFoundError:
            return False
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
