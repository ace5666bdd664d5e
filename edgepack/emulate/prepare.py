"""Prepare, find and remove the cached emulated-device environment.

Layout of `${XDG_CACHE_HOME:-~/.cache}/edgepack/emulate/<kind>-<key>/`:

    sysroot/          arm64 Debian bookworm libraries + python3.11 (dpkg-deb -x, no maintainer
                      scripts), precompiled .pyc, an ARM /proc/cpuinfo at sysroot/proc/cpuinfo
    site/             aarch64 wheels (onnxruntime, ai-edge-litert, numpy) from pip --target
    bin/python3       the wrapper: qemu-aarch64-static -cpu <A72|A76> -L sysroot python3.11 "$@"
    versions.json     what is inside (exact Debian package and wheel versions)
    COMPLETE          written last; a directory without it is never used

Preparation happens in a sibling temporary directory that is renamed into place at the end, so
an interrupted preparation never looks complete.

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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EdgepackError
from .kinds import (DEBIAN_PACKAGES, DEBIAN_SUITE, PIP_PLATFORMS, PYTHON_VERSION, RECIPE, WHEELS,
                    Kind, get_kind)

QEMU_NAMES = ("qemu-aarch64-static", "qemu-aarch64")
QEMU_HINT = "apt-get install qemu-user-static   (Debian/Ubuntu; provides qemu-aarch64-static)"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
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


def find_qemu(qemu: str | None = None) -> str:
    """Absolute path of qemu-aarch64(-static), or EdgepackError with the install command."""
    if qemu:
        found = shutil.which(qemu)
        if not found:
            raise EdgepackError(f"qemu binary {qemu!r} not found or not executable", QEMU_HINT)
        return found
    env = os.environ.get("EDGEPACK_QEMU")
    if env:
        return find_qemu(env)
    for name in QEMU_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise EdgepackError("qemu-aarch64-static not found: emulating an aarch64 device needs qemu's "
                        "user-mode emulator", QEMU_HINT)


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
            from rich.console import Console
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


# ------------------------------------------------------------------------------------- commands

def _run(argv: list[str], what: str, hint: str, timeout: float = 1800, env: dict | None = None,
         cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except FileNotFoundError:
        raise EdgepackError(f"{what}: {argv[0]} not found", hint) from None
    except subprocess.TimeoutExpired:
        raise EdgepackError(f"{what}: timed out after {timeout:.0f} s", hint) from None
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-12:])
        raise EdgepackError(f"{what} failed (exit {p.returncode}):\n{tail}", hint)
    return p.stdout


class _PrivateApt:
    """apt-get for arm64 with its own state, lists and cache dirs: the host's apt is untouched
    (no `dpkg --add-architecture`, no root needed, no lock on /var/lib/dpkg)."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        for d in ("lists/partial", "archives/partial", "etc/apt.conf.d", "etc/preferences.d",
                  "etc/sources.list.d"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        (workdir / "status").write_text("")
        keyring = os.environ.get("EDGEPACK_DEBIAN_KEYRING", DEBIAN_KEYRING)
        if not Path(keyring).is_file():
            raise EdgepackError(f"Debian archive keyring {keyring} not found (needed to verify the "
                                "arm64 packages)", "apt-get install debian-archive-keyring")
        mirror = os.environ.get("EDGEPACK_DEBIAN_MIRROR", DEFAULT_MIRROR).rstrip("/")
        security = os.environ.get("EDGEPACK_DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR).rstrip("/")
        opts = f"[arch=arm64 signed-by={keyring}]"
        (workdir / "etc/sources.list").write_text(
            f"deb {opts} {mirror} {DEBIAN_SUITE} main\n"
            f"deb {opts} {mirror} {DEBIAN_SUITE}-updates main\n"
            f"deb {opts} {security} {DEBIAN_SUITE}-security main\n")
        d = str(workdir)
        self.opts = [
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", f"Dir::State={d}", "-o", f"Dir::State::Lists={d}/lists",
            "-o", f"Dir::State::status={d}/status", "-o", f"Dir::Cache={d}",
            "-o", f"Dir::Cache::archives={d}/archives",
            "-o", f"Dir::Etc::SourceList={d}/etc/sources.list",
            "-o", f"Dir::Etc::SourceParts={d}/etc/sources.list.d",
            "-o", f"Dir::Etc::Parts={d}/etc/apt.conf.d",
            "-o", f"Dir::Etc::Preferences={d}/etc/preferences",
            "-o", f"Dir::Etc::PreferencesParts={d}/etc/preferences.d",
            "-o", "Acquire::Languages=none", "-o", "Debug::NoLocking=1",
            "-o", "APT::Install-Recommends=false",
        ]
        if os.geteuid() == 0:
            # root apt drops to the _apt user for downloads, which cannot write our private dirs
            self.opts += ["-o", "APT::Sandbox::User=root"]
        self.hint = ("check that deb.debian.org is reachable (or set EDGEPACK_DEBIAN_MIRROR to a "
                     "Debian mirror) and that apt-get works: apt-get update")

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        argv = ["apt-get", "-q", *self.opts, *args]
        # (apt-get download writes into the current directory)
        return _run(argv, f"apt-get {args[0]} (arm64)", self.hint, cwd=cwd)


def _keep_package(name: str) -> bool:
    """Shared libraries and the interpreter; not dpkg, tar, readline-common, media-types..."""
    return name.startswith(("lib", "python3.", "zlib"))


def _resolve_debs(apt: _PrivateApt) -> list[tuple[str, str]]:
    out = apt("install", "--print-uris", "-y", *DEBIAN_PACKAGES)
    pkgs = []
    for line in out.splitlines():
        if not line.startswith("'"):
            continue
        filename = line.split()[1]
        name, version, _arch = filename[:-4].split("_")
        from urllib.parse import unquote
        pkgs.append((name, unquote(version)))
    if not pkgs:
        raise EdgepackError(f"apt resolved no arm64 packages for {' '.join(DEBIAN_PACKAGES)}", apt.hint)
    return pkgs


def _pip_install(site: Path, wheels: dict, workdir: Path) -> dict:
    argv = [sys.executable, "-m", "pip", "install", "--no-compile", "--no-warn-script-location",
            "--disable-pip-version-check", "--target", str(site), "--only-binary=:all:",
            "--implementation", "cp", "--python-version", PYTHON_VERSION,
            "--report", str(workdir / "pip-report.json")]
    for p in PIP_PLATFORMS:
        argv += ["--platform", p]
    argv += [f"{name}=={version}" for name, version in wheels.items()]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise EdgepackError("pip install of the aarch64 wheels timed out after 30 min",
                            "check access to PyPI (pip download onnxruntime)") from None
    if p.returncode != 0:
        err = (p.stderr or p.stdout)
        if "No module named pip" in err:
            raise EdgepackError(f"pip is not available for {sys.executable}",
                                f"{sys.executable} -m ensurepip") from None
        missing = [l for l in err.splitlines() if "No matching distribution" in l
                   or "Could not find a version" in l]
        if missing:
            raise EdgepackError(
                "a wheel is not available for aarch64 / CPython " + PYTHON_VERSION + ":\n" +
                "\n".join(missing[:4]),
                "check the version exists with an aarch64 wheel on PyPI "
                "(https://pypi.org/project/NAME/#files) or pass other versions via "
                "prepare_emulator(wheels={...})")
        tail = "\n".join(err.strip().splitlines()[-12:])
        raise EdgepackError(f"pip install of the aarch64 wheels failed (exit {p.returncode}):\n{tail}",
                            "check access to PyPI; retry with --rebuild")
    try:
        report = json.loads((workdir / "pip-report.json").read_text())
        return {i["metadata"]["name"]: i["metadata"]["version"] for i in report.get("install", [])}
    except (OSError, ValueError, KeyError):
        return dict(wheels)


WRAPPER = r"""#!/bin/sh
# edgepack emulated device ({description}): aarch64 CPython {py} from Debian {suite}
# under qemu user-mode emulation with -cpu {cpu}. Generated by edgepack; do not edit.
# Arguments, the working directory, stdin/stdout/stderr and the exit code pass straight through.
# Host paths not present in the sysroot (your files, /tmp, $HOME) are read as usual.
self=$(readlink -f -- "$0") || exit 127
root=${{self%/bin/*}}
qemu=${{EDGEPACK_QEMU:-}}
if [ -n "$qemu" ]; then
  qemu=$(command -v -- "$qemu") || {{ echo "edgepack: qemu binary '$EDGEPACK_QEMU' not found; install it: {qemu_hint}" >&2; exit 127; }}
else
  qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64) || {{
    echo "edgepack: qemu-aarch64-static not found; install it: {qemu_hint}" >&2; exit 127; }}
fi
unset PYTHONHOME PYTHONSTARTUP PYTHONEXECUTABLE
# No x86 user site-packages, no .pyc written into host directories from the emulated interpreter.
PYTHONNOUSERSITE=1
PYTHONDONTWRITEBYTECODE=1
PYTHONPATH="$root/site${{PYTHONPATH:+:$PYTHONPATH}}"
export PYTHONNOUSERSITE PYTHONDONTWRITEBYTECODE PYTHONPATH
# -0 makes sys.executable this wrapper, so the emulated Python can start itself again.
exec "$qemu" -cpu {cpu} -L "$root/sysroot" -0 "$self" "$root/sysroot/usr/bin/python{py}" "$@"
"""

PROBE = ("import json, platform, sys, os\n"
         "info = {'machine': platform.machine(), 'python': platform.python_version(),\n"
         "        'executable': sys.executable, 'cpu_count': os.cpu_count()}\n"
         "import numpy; info['numpy'] = numpy.__version__\n"
         "import onnxruntime; info['onnxruntime'] = onnxruntime.__version__\n"
         "from ai_edge_litert.interpreter import Interpreter\n"
         "from importlib.metadata import version; info['ai-edge-litert'] = version('ai-edge-litert')\n"
         "print(json.dumps(info))\n")


def _write_wrapper(root: Path, k: Kind) -> Path:
    path = root / "bin" / "python3"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(WRAPPER.format(description=k.description, py=PYTHON_VERSION, suite=DEBIAN_SUITE,
                                   cpu=k.qemu_cpu, qemu_hint=QEMU_HINT))
    path.chmod(0o755)
    (root / "bin" / f"python{PYTHON_VERSION}").symlink_to("python3")
    return path


def _trim_sysroot(sysroot: Path) -> None:
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian",
                "usr/share/info", "usr/share/bug"):
        shutil.rmtree(sysroot / rel, ignore_errors=True)


def _compile(path: Path, strip: Path, prepend: str) -> None:
    # The sysroot interpreter is 3.11.x like the host's: the .pyc format only changes between
    # minor versions, so the host compiles (fast) and the emulated interpreter never has to.
    if sys.version_info[:2] != tuple(int(x) for x in PYTHON_VERSION.split(".")):
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(strip), "-p", prepend,
                    str(path)], capture_output=True, timeout=1800)


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
    import fcntl
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild:
            env = find_emulator(kind, wheels)
            if env is not None:
                env.qemu = qemu_path
                return env
        return _prepare_locked(k, kind, root, pins, qemu_path, progress)


def _prepare_locked(k: Kind, kind: str, root: Path, pins: dict, qemu_path: str, progress) -> EmulatorEnv:
    for tool, hint in (("apt-get", "preparing the emulated device needs Debian's apt: run on Debian "
                                   "or Ubuntu (apt-get install apt)"),
                       ("dpkg-deb", "apt-get install dpkg")):
        if shutil.which(tool) is None:
            raise EdgepackError(f"{tool} not found", hint)
    for stale in root.parent.glob(f".{root.name}.tmp-*"):  # interrupted earlier preparations
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    rep = _Reporter(progress)
    t0 = time.perf_counter()
    ok = False
    try:
        work = tmp / "_work"
        sysroot = tmp / "sysroot"
        apt = _PrivateApt(work / "apt")
        rep.step(f"arm64 package lists (Debian {DEBIAN_SUITE})")
        apt("update")
        rep.step("resolving arm64 python3.11 and libraries")
        resolved = _resolve_debs(apt)
        keep = [(n, v) for n, v in resolved if _keep_package(n)]
        rep.step(f"downloading {len(keep)} arm64 .deb packages")
        debs = work / "debs"
        debs.mkdir()
        apt("download", *[f"{n}:arm64={v}" for n, v in keep], cwd=debs)
        rep.step("unpacking the arm64 sysroot")
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(sysroot)], f"dpkg-deb -x {deb.name}",
                 "the download may be corrupt: retry with --rebuild")
        _trim_sysroot(sysroot)
        # Shadow the host's dist-packages dirs (x86 modules) that Debian's site.py would add.
        for rel in (f"usr/local/lib/python{PYTHON_VERSION}/dist-packages", "usr/lib/python3/dist-packages"):
            (sysroot / rel).mkdir(parents=True, exist_ok=True)
        (sysroot / "proc").mkdir(exist_ok=True)
        (sysroot / "proc" / "cpuinfo").write_text(k.cpuinfo())
        rep.step(f"aarch64 wheels: {', '.join(f'{n} {v}' for n, v in pins.items())}")
        installed = _pip_install(tmp / "site", pins, work)
        rep.step("precompiling Python modules")
        _compile(sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}", sysroot, "/")
        _compile(tmp / "site", tmp, str(root))
        wrapper = _write_wrapper(tmp, k)
        shutil.rmtree(work, ignore_errors=True)
        rep.step("checking the emulated interpreter")
        info = _probe(wrapper, qemu_path)
        versions = {
            "kind": kind, "qemu_cpu": k.qemu_cpu, "debian": DEBIAN_SUITE,
            "python": info.get("python"), "machine": info.get("machine"),
            "onnxruntime": info.get("onnxruntime"), "ai-edge-litert": info.get("ai-edge-litert"),
            "numpy": info.get("numpy"), "qemu": _qemu_version(qemu_path), "recipe": RECIPE,
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


def _qemu_version(qemu: str) -> str | None:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].split("version", 1)[1].strip()
    except Exception:
        return None


def _probe(wrapper: Path, qemu: str) -> dict:
    env = dict(os.environ, EDGEPACK_QEMU=qemu)
    try:
        p = subprocess.run([str(wrapper), "-c", PROBE], capture_output=True, text=True, timeout=600,
                           env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        raise EdgepackError("the emulated interpreter did not answer within 10 min",
                            "retry with --rebuild") from None
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-12:])
        raise EdgepackError(f"the emulated aarch64 interpreter failed its start-up check "
                            f"(exit {p.returncode}):\n{tail}",
                            "retry with --rebuild; if it persists run with --debug and report it")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    if info.get("machine") != "aarch64":
        raise EdgepackError(f"the emulated interpreter reports machine {info.get('machine')!r}, "
                            "expected aarch64", "retry with --rebuild")
    return info


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
