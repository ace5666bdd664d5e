"""The emulated device's site-packages: aarch64 wheels installed by the host's pip, and .pyc
files compiled by the host so the emulated interpreter never compiles under qemu."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import EdgepackError
from .kinds import PIP_PLATFORMS, PYTHON_VERSION


def pip_install(site: Path, wheels: dict, workdir: Path) -> dict:
    """Install `wheels` ({name: version}) for aarch64 / CPython PYTHON_VERSION into `site`.
    Returns {name: version} of everything installed (dependencies included)."""
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
        _raise_pip_error(p)
    try:
        report = json.loads((workdir / "pip-report.json").read_text())
        return {i["metadata"]["name"]: i["metadata"]["version"] for i in report.get("install", [])}
    except (OSError, ValueError, KeyError):
        return dict(wheels)


def _raise_pip_error(p: subprocess.CompletedProcess) -> None:
    err = p.stderr or p.stdout
    if "No module named pip" in err:
        raise EdgepackError(f"pip is not available for {sys.executable}",
                            f"{sys.executable} -m ensurepip")
    missing = [line for line in err.splitlines() if "No matching distribution" in line
               or "Could not find a version" in line]
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


def precompile(path: Path, strip: Path, prepend: str) -> None:
    """Compile the modules under `path`, recording them as under `prepend` instead of `strip`
    (where the tree will live once the environment is renamed into place)."""
    # The sysroot interpreter is 3.11.x like the host's: the .pyc format only changes between
    # minor versions, so the host compiles (fast) and the emulated interpreter never has to.
    if sys.version_info[:2] != tuple(int(x) for x in PYTHON_VERSION.split(".")):
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(strip), "-p", prepend,
                    str(path)], capture_output=True, timeout=1800)
