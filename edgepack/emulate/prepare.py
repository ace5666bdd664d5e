"""Prepare, find and remove the cached emulated-device environment.

Layout of `${XDG_CACHE_HOME:-~/.cache}/edgepack/emulate/<kind>-<key>/`:

    sysroot/          arm64 Debian bookworm libraries + python3.11 (dpkg-deb -x, no maintainer
                      scripts), precompiled .pyc, an ARM /proc/cpuinfo at sysroot/proc/cpuinfo
    site/             aarch64 wheels (onnxruntime, ai-edge-litert, numpy) from pip --target
    bin/python3       the wrapper: qemu-aarch64-static -cpu <A72|A76> -L sysroot python3.11 "$@"
    versions.json     what is inside (exact Debian package and wheel versions)
    COMPLETE          written last; a directory without it is never used

Preparation happens in a sibling temporary directory that is renamed into place at the end, so
an interrupted preparation never looks complete. This module finds, orchestrates and caches;
the steps are debian.py (sysroot/), wheels.py (site/, .pyc), wrappers.py (bin/python3 and the
qemu it runs) and probe.py (the start-up check).

Why no mount namespace: onnxruntime crashes under qemu when it parses the host's x86
/proc/cpuinfo. `qemu -L SYSROOT` resolves absolute paths inside SYSROOT first, so a file at
SYSROOT/proc/cpuinfo is what the emulated program reads: same effect as bind-mounting an ARM
cpuinfo in a private mount namespace, without root, `unshare` or user namespaces. Any path not
present in the sysroot (/work/..., /tmp/..., $HOME/...) falls through to the host's.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock
from rich.console import Console

from .debian import PrivateApt, check_tools, download_debs, keep_package, resolve_debs, unpack_sysroot
from .kinds import DEBIAN_SUITE, PYTHON_VERSION, RECIPE, WHEELS, Kind, get_kind
from .probe import probe_interpreter, qemu_version
from .wheels import pip_install, precompile
from .wrappers import find_qemu, write_wrapper

MARKER = "COMPLETE"

Progress = Callable[[str], None]


@dataclass
class EmulatorEnv:
    """A prepared emulated device. `python` is the wrapper to use as the device's interpreter."""

    kind: str
    root: Path
    python: Path
    versions: dict = field(default_factory=dict)
    size_bytes: int = 0
    prepare_seconds: float | None = None   # None when it came from the cache untouched
    cached: bool = True
    qemu: str | None = None

    @property
    def qemu_cpu(self) -> str:
        return get_kind(self.kind).qemu_cpu

    def to_dict(self) -> dict:
        return {"kind": self.kind, "root": str(self.root), "python": str(self.python),
                "versions": self.versions, "size_bytes": self.size_bytes,
                "prepare_seconds": self.prepare_seconds, "cached": self.cached,
                "qemu": self.qemu, "qemu_cpu": self.qemu_cpu}


# ---------------------------------------------------------------------------------------- paths

def cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgepack" / "emulate"


def cache_key(kind: str, wheels: dict | None = None) -> str:
    k = get_kind(kind)
    w = {**WHEELS, **(wheels or {})}
    return (f"py{PYTHON_VERSION}-{DEBIAN_SUITE}-{k.qemu_cpu}-ort{w['onnxruntime']}"
            f"-litert{w['ai-edge-litert']}-np{w['numpy']}-r{RECIPE}")


def env_root(kind: str = "rpi", wheels: dict | None = None) -> Path:
    return cache_base() / f"{kind}-{cache_key(kind, wheels)}"


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            total += st.st_size
    return total


def find_emulator(kind: str = "rpi", wheels: dict | None = None) -> EmulatorEnv | None:
    """The complete cached environment for `kind`, or None (never a half-prepared one)."""
    return _load_env(env_root(kind, wheels), kind)


def emulator_for_python(python: str | Path) -> EmulatorEnv | None:
    """The prepared environment whose wrapper is `python` (a device's interpreter), or None when
    that interpreter is not an edgepack emulator."""
    root = Path(python).expanduser().parent.parent
    try:
        kind = json.loads((root / MARKER).read_text()).get("versions", {}).get("kind", "rpi")
    except (OSError, ValueError):
        return None
    return _load_env(root, kind)


def _load_env(root: Path, kind: str) -> EmulatorEnv | None:
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    python = root / "bin" / "python3"
    if not python.is_file():
        return None
    return EmulatorEnv(kind=kind, root=root, python=python, versions=info.get("versions", {}),
                       size_bytes=int(info.get("size_bytes", 0)),
                       prepare_seconds=None, cached=True)


# ------------------------------------------------------------------------------------- progress

class _Reporter:
    """Rich status lines on stderr by default; a callable gets plain messages; False is silent."""

    def __init__(self, progress):
        self.progress = progress
        self.console = None
        self._status = None
        if progress is None:
            self.console = Console(stderr=True)
        self.t_step = time.perf_counter()

    def step(self, message: str) -> None:
        self._finish()
        self.t_step = time.perf_counter()
        self.current = message
        if callable(self.progress):
            self.progress(message)
        elif self.console is not None:
            self._status = self.console.status(f"[cyan]{message}[/]")
            self._status.start()

    def _finish(self, ok: bool = True) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            self.console.print(f"{mark} {self.current} [dim]({time.perf_counter() - self.t_step:.1f} s)[/]",
                               highlight=False)

    def done(self, ok: bool = True) -> None:
        self._finish(ok)


# ---------------------------------------------------------------------------------- preparing

def prepare_emulator(kind: str = "rpi", rebuild: bool = False, progress=None, *,
                     wheels: dict | None = None, qemu: str | None = None) -> EmulatorEnv:
    """Prepare (or reuse from the cache) the emulated `kind` device and return it.

    `progress`: None prints rich status lines on stderr; a callable receives step messages;
    False is silent. `wheels` overrides pinned wheel versions (part of the cache key).
    Raises EdgepackError naming the fix when qemu, apt, the keyring, a wheel or the network is
    missing, or when the prepared interpreter does not run.
    """
    k = get_kind(kind)
    qemu_path = find_qemu(qemu)
    pins = {**WHEELS, **(wheels or {})}
    if not rebuild:
        env = find_emulator(kind, wheels)
        if env is not None:
            env.qemu = qemu_path
            return env
    root = env_root(kind, wheels)
    root.parent.mkdir(parents=True, exist_ok=True)
    # One preparation per environment at a time (parallel test workers, two shells): the
    # second waits, then finds the first one's complete environment.
    with FileLock(root.parent / f".{root.name}.lock"):
        if not rebuild:
            env = find_emulator(kind, wheels)
            if env is not None:
                env.qemu = qemu_path
                return env
        return _prepare_locked(k, kind, root, pins, qemu_path, progress)


def _prepare_locked(k: Kind, kind: str, root: Path, pins: dict, qemu_path: str, progress) -> EmulatorEnv:
    check_tools()
    for stale in root.parent.glob(f".{root.name}.tmp-*"):  # interrupted earlier preparations
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    rep = _Reporter(progress)
    t0 = time.perf_counter()
    ok = False
    try:
        work, sysroot = tmp / "_work", tmp / "sysroot"
        apt = PrivateApt(work / "apt")
        rep.step(f"arm64 package lists (Debian {DEBIAN_SUITE})")
        apt("update")
        rep.step("resolving arm64 python3.11 and libraries")
        keep = [(n, v) for n, v in resolve_debs(apt) if keep_package(n)]
        rep.step(f"downloading {len(keep)} arm64 .deb packages")
        debs = download_debs(apt, keep, work / "debs")
        rep.step("unpacking the arm64 sysroot")
        unpack_sysroot(debs, sysroot, k)
        rep.step(f"aarch64 wheels: {', '.join(f'{n} {v}' for n, v in pins.items())}")
        installed = pip_install(tmp / "site", pins, work)
        rep.step("precompiling Python modules")
        precompile(sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}", sysroot, "/")
        precompile(tmp / "site", tmp, str(root))
        wrapper = write_wrapper(tmp, k)
        shutil.rmtree(work, ignore_errors=True)
        rep.step("checking the emulated interpreter")
        info = probe_interpreter(wrapper, qemu_path)
        versions = {
            "kind": kind, "qemu_cpu": k.qemu_cpu, "debian": DEBIAN_SUITE,
            "python": info.get("python"), "machine": info.get("machine"),
            "onnxruntime": info.get("onnxruntime"), "ai-edge-litert": info.get("ai-edge-litert"),
            "numpy": info.get("numpy"), "qemu": qemu_version(qemu_path), "recipe": RECIPE,
            "debs": dict(keep), "wheels": installed,
        }
        (tmp / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
        size = _dir_size(tmp)
        seconds = time.perf_counter() - t0
        (tmp / MARKER).write_text(json.dumps({"versions": versions, "size_bytes": size,
                                              "prepare_seconds": round(seconds, 1),
                                              "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                             indent=2) + "\n")
        if root.exists():
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(root)
        ok = True
        rep.done(True)
        return EmulatorEnv(kind=kind, root=root, python=root / "bin" / "python3", versions=versions,
                           size_bytes=size, prepare_seconds=round(seconds, 1), cached=False,
                           qemu=qemu_path)
    finally:
        if not ok:
            rep.done(False)
            shutil.rmtree(tmp, ignore_errors=True)


def remove_emulator_cache(kind: str | None = None) -> list[Path]:
    """Delete cached environments (of `kind`, or all) including interrupted ones."""
    base = cache_base()
    removed = []
    if not base.is_dir():
        return removed
    for p in sorted(base.iterdir()):
        name = p.name.lstrip(".")
        if kind is not None and not name.startswith(f"{kind}-"):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            if not name.endswith(".lock"):
                removed.append(p)
        else:
            p.unlink(missing_ok=True)
    if kind is None:
        try:
            base.rmdir()
        except OSError:
            pass
    return removed
