"""The arm64 Debian sysroot of an emulated device: resolve, download and unpack Debian's
python3.11 and its libraries with a private apt, without root and without touching the host's
package state.

The sysroot also carries the device's ARM /proc/cpuinfo at sysroot/proc/cpuinfo: onnxruntime
crashes under qemu when it parses the host's x86 one, and `qemu -L SYSROOT` resolves absolute
paths inside SYSROOT first (see prepare.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

from ..errors import EdgepackError
from .kinds import DEBIAN_PACKAGES, DEBIAN_SUITE, PYTHON_VERSION, Kind

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
TOOLS = {"apt-get": "preparing the emulated device needs Debian's apt: run on Debian or Ubuntu "
                    "(apt-get install apt)",
         "dpkg-deb": "apt-get install dpkg"}


def check_tools() -> None:
    for tool, hint in TOOLS.items():
        if shutil.which(tool) is None:
            raise EdgepackError(f"{tool} not found", hint)


def run_tool(argv: list[str], what: str, hint: str, timeout: float = 1800, env: dict | None = None,
             cwd: Path | None = None) -> str:
    """stdout of `argv`; EdgepackError(what + the stderr tail, hint) when it cannot run or fails."""
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


class PrivateApt:
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
        return run_tool(argv, f"apt-get {args[0]} (arm64)", self.hint, cwd=cwd)


def keep_package(name: str) -> bool:
    """Shared libraries and the interpreter; not dpkg, tar, readline-common, media-types..."""
    return name.startswith(("lib", "python3.", "zlib"))


def resolve_debs(apt: PrivateApt) -> list[tuple[str, str]]:
    """(package, exact version) of the arm64 dependency closure of DEBIAN_PACKAGES."""
    out = apt("install", "--print-uris", "-y", *DEBIAN_PACKAGES)
    pkgs = []
    for line in out.splitlines():
        if not line.startswith("'"):
            continue
        filename = line.split()[1]
        name, version, _arch = filename[:-4].split("_")
        pkgs.append((name, unquote(version)))
    if not pkgs:
        raise EdgepackError(f"apt resolved no arm64 packages for {' '.join(DEBIAN_PACKAGES)}", apt.hint)
    return pkgs


def download_debs(apt: PrivateApt, packages: list[tuple[str, str]], into: Path) -> list[Path]:
    into.mkdir(parents=True)
    apt("download", *[f"{n}:arm64={v}" for n, v in packages], cwd=into)
    return sorted(into.glob("*.deb"))


def unpack_sysroot(debs: list[Path], sysroot: Path, kind: Kind) -> None:
    """Unpack the packages (dpkg-deb -x: files only, no maintainer scripts), drop what an
    interpreter never reads, and add the device's ARM /proc/cpuinfo."""
    for deb in debs:
        run_tool(["dpkg-deb", "-x", str(deb), str(sysroot)], f"dpkg-deb -x {deb.name}",
                 "the download may be corrupt: retry with --rebuild")
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian",
                "usr/share/info", "usr/share/bug"):
        shutil.rmtree(sysroot / rel, ignore_errors=True)
    # Shadow the host's dist-packages dirs (x86 modules) that Debian's site.py would add.
    for rel in (f"usr/local/lib/python{PYTHON_VERSION}/dist-packages", "usr/lib/python3/dist-packages"):
        (sysroot / rel).mkdir(parents=True, exist_ok=True)
    (sysroot / "proc").mkdir(exist_ok=True)
    (sysroot / "proc" / "cpuinfo").write_text(kind.cpuinfo())
