"""A real OpenSSH server on 127.0.0.1 for tests: own host key, port, authorized key.

Runs as our child (`sshd -D -e -f CONFIG`); `stop()` kills it and every process it spawned
(sessions setsid() away from its process group, so we walk /proc for descendants).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None and os.geteuid() == 0


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgepack-test", "-f", str(path)],
                   check=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_files(name: str):
    """(pid, bytes of /proc/PID/NAME) for every process that is still there to read."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/{name}").read_bytes()
            except OSError:
                continue


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, stat in _proc_files("stat"):
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class Sshd:
    def __init__(self, root: Path, client_pubkey: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = keygen(self.root / "host_ed25519") if not (self.root / "host_ed25519").exists() \
            else self.root / "host_ed25519"
        self.authorized = self.root / "authorized_keys"
        shutil.copy(client_pubkey, self.authorized)
        self.config = self.root / "sshd_config"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sshd":
        os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir a root sshd insists on
        self.config.write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
AuthorizedKeysFile {self.authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "ab"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("sshd did not start listening")

    def kill(self) -> None:
        """Hard-kill the server and all its sessions: the device 'dies'."""
        if self.proc is None:
            return
        pids = descendants(self.proc.pid)
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=5)
        self.proc = None

    stop = kill

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", f"{self.host_key}.pub"], capture_output=True, text=True)
        return out.stdout.split()[1]

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} " + " ".join((self.root / "host_ed25519.pub").read_text().split()[:2]) + "\n"


def agent_running(workdir: str) -> bool:
    """Is an edgepack agent deployed under `workdir` running right now? (to kill a device mid-run)"""
    for _, cmd in _proc_files("cmdline"):
        # The agent itself (not a deploy step whose arguments merely mention agent.py).
        if any(a.endswith(b"/agent.py") and a.startswith(workdir.encode()) for a in cmd.split(b"\0")):
            return True
    return False
