"""The build directory's life cycle: a staging directory next to the final one, swapped in by
rename, and clean-up of what a killed build (SIGKILL, power loss) left behind.

A live staging directory holds a lock (filelock's FileLock: an flock) on its `.owner` file; the
kernel drops the lock when the process dies, so a staging directory whose lock can be taken
belongs to nobody.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, lock_descriptor

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
    tmp = _new_dir(final.parent, f".{final.name}.tmp-")
    try:
        # The process holds it, not a thread: a build may finish in another thread than it began.
        with FileLock(tmp / OWNER, timeout=0, thread_local=False):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new directory with a unique name. Unlike mkdtemp's 0700 it gets the mode the umask gives
    (0755 under the usual 022): the build directory it becomes is read by other users and tools."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise EdgepackError(f"cannot create a staging directory in {parent}: every name tried exists",
                        f"remove the {prefix}* directories there")


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
    # Opened, never created: FileLock(...).acquire() would create a missing `.owner`, and a
    # live build unlinks its own just before renaming the directory into place.
    try:
        fd = os.open(tmp / OWNER, os.O_RDONLY)
    except FileNotFoundError:
        try:  # no lock file: killed before taking its lock, or just renaming into place
            return time.time() - tmp.stat().st_mtime > UNLOCKED_GRACE_S
        except FileNotFoundError:
            return False
    except OSError:
        return False
    try:
        # The same flock FileLock takes; False: a live build holds it. Closing fd releases ours.
        return lock_descriptor(fd, blocking=False)
    except OSError:
        return False  # a filesystem without flock: never guess that a build is dead
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
