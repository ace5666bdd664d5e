"""Checks of a freshly prepared emulated device: does its interpreter start under qemu, is it
aarch64, do the runtimes import, and which qemu runs it."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import EdgepackError

PROBE = ("import json, platform, sys, os\n"
         "info = {'machine': platform.machine(), 'python': platform.python_version(),\n"
         "        'executable': sys.executable, 'cpu_count': os.cpu_count()}\n"
         "import numpy; info['numpy'] = numpy.__version__\n"
         "import onnxruntime; info['onnxruntime'] = onnxruntime.__version__\n"
         "from ai_edge_litert.interpreter import Interpreter\n"
         "from importlib.metadata import version; info['ai-edge-litert'] = version('ai-edge-litert')\n"
         "print(json.dumps(info))\n")


def probe_interpreter(wrapper: Path, qemu: str) -> dict:
    """{machine, python, executable, cpu_count, numpy, onnxruntime, ai-edge-litert} as the
    emulated interpreter reports them; EdgepackError when it does not start or is not aarch64."""
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


def qemu_version(qemu: str) -> str | None:
    """The version `qemu --version` prints (like "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"), or None."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].split("version", 1)[1].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
