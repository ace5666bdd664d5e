"""How edgepack reaches a device: run a command, upload a file. Local or SSH (paramiko).

Commands are argument lists. The local transport runs them without a shell (the device's
`python` may be a wrapper script, e.g. qemu for an emulated Pi, and is run exactly as given);
the SSH transport quotes every argument with shlex.quote for the remote shell.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import select
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DeviceError, DeviceUnreachable
from .inventory import Device

Progress = Callable[[int, int], None]  # (bytes sent, total bytes) of the current file


@dataclass
class CommandResult:
    rc: int
    stdout: str
    stderr: str


class Transport:
    device: Device

    def run(self, argv: list[str], timeout: float | None = None) -> CommandResult:
        raise NotImplementedError

    def put(self, source: Path | bytes, remote: str, progress: Progress | None = None) -> None:
        """Copy a local file (or bytes) to an absolute path on the device."""
        raise NotImplementedError

    def get(self, remote: str, local: Path) -> None:
        """Copy a file from an absolute path on the device to a local file."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def python(self, *args: str) -> list[str]:
        return [self.device.python_cmd, *args]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalTransport(Transport):
    def __init__(self, device: Device):
        self.device = device

    def python(self, *args: str) -> list[str]:
        return [os.path.expanduser(self.device.python_cmd), *args]

    def run(self, argv, timeout=None):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise DeviceError(f"device {self.device.name}: cannot run {argv[0]!r}: not found",
                              f"set python = \"/path/to/python3\" in {self.device.source}") from e
        except PermissionError as e:
            raise DeviceError(f"device {self.device.name}: cannot run {argv[0]!r}: permission denied",
                              f"make it executable (chmod +x) or fix python in {self.device.source}") from e
        except subprocess.TimeoutExpired as e:
            raise DeviceUnreachable(f"device {self.device.name}: command timed out after {timeout:.0f} s "
                                    f"and was killed: {_short(argv)}",
                                    "raise the timeout (--timeout) or use fewer --runs") from e
        return CommandResult(p.returncode, p.stdout, p.stderr)

    def put(self, source, remote, progress=None):
        try:
            self._put(source, Path(remote), progress)
        except OSError as e:
            raise DeviceError(f"device {self.device.name}: writing {remote} failed: {e.strerror or e}",
                              "check free disk space and permissions of the workdir on the device") from e

    def get(self, remote, local):
        try:
            shutil.copyfile(remote, local)
        except OSError as e:
            raise DeviceError(f"device {self.device.name}: reading {remote} failed: {e.strerror or e}",
                              "check the workdir on the device") from e

    def _put(self, source, remote: Path, progress):
        if isinstance(source, bytes):
            remote.write_bytes(source)
            if progress:
                progress(len(source), len(source))
            return
        total = os.path.getsize(source)
        with open(source, "rb") as src, open(remote, "wb") as dst:
            sent = 0
            while block := src.read(1 << 20):
                dst.write(block)
                sent += len(block)
                if progress:
                    progress(sent, total)
        shutil.copymode(source, remote)


def fingerprint(key) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _short(argv: list[str], limit: int = 240) -> str:
    # A `python -c SCRIPT` argument would swamp the message: name it instead of printing it.
    text = " ".join("<script>" if "\n" in a else a if len(a) < 80 else a[:25] + "..." + a[-45:] for a in argv)
    return text if len(text) <= limit else text[:limit] + "..."


class SshTransport(Transport):
    def __init__(self, device: Device, accept_new_host_key: bool = False):
        import paramiko  # imported here: local-only users never pay for it

        self.device = device
        cfg = device.ssh
        self.known_hosts = Path(cfg.known_hosts).expanduser()
        self.client = paramiko.SSHClient()
        if self.known_hosts.exists():
            # "system" host keys are only read, never rewritten wholesale by paramiko.
            try:
                self.client.load_system_host_keys(str(self.known_hosts))
            except OSError as e:
                raise DeviceError(f"device {device.name}: cannot read known_hosts {self.known_hosts}: {e}",
                                  f"fix its permissions or set [ssh].known_hosts in {device.source}") from e
        self.client.set_missing_host_key_policy(_HostKeyPolicy(device, self.known_hosts, accept_new_host_key))
        key_file = None
        if cfg.key_file:
            key_file = str(Path(cfg.key_file).expanduser())
            if not Path(key_file).exists():
                raise DeviceError(f"device {device.name}: key_file {key_file} does not exist",
                                  f"create one (ssh-keygen -t ed25519) or fix [ssh].key_file in {device.source}")
        where = device.where()
        try:
            self.client.connect(cfg.host, port=cfg.port, username=cfg.user, key_filename=key_file,
                                look_for_keys=key_file is None, allow_agent=key_file is None,
                                timeout=cfg.connect_timeout_s, banner_timeout=cfg.connect_timeout_s,
                                auth_timeout=cfg.connect_timeout_s)
        except DeviceError:
            self.client.close()
            raise
        except paramiko.BadHostKeyException as e:
            self.client.close()
            raise DeviceError(
                f"device {device.name}: the host key of {where} has CHANGED: it offered "
                f"{e.key.get_name()} {fingerprint(e.key)}, but {self.known_hosts} has "
                f"{e.expected_key.get_name()} {fingerprint(e.expected_key)}. Refusing to connect "
                "(this can be a man-in-the-middle attack, or the device was reinstalled)",
                "if the device was reinstalled, check the new fingerprint on it and remove the old entry: "
                f"ssh-keygen -R '{_hostkey_name(cfg.host, cfg.port)}' -f {self.known_hosts}") from e
        except paramiko.PasswordRequiredException as e:  # before its base class below
            self.client.close()
            raise DeviceError(f"device {device.name}: key {key_file} is encrypted and needs a passphrase",
                              "load it into ssh-agent and remove key_file from the device file") from e
        except paramiko.AuthenticationException as e:
            self.client.close()
            raise DeviceError(
                f"device {device.name}: {where} refused the key {key_file or '(agent/default keys)'}: {e}",
                f"install the public key on the device (ssh-copy-id -i {key_file or '~/.ssh/id_ed25519'}.pub "
                f"-p {cfg.port} {cfg.user}@{cfg.host}) or fix [ssh].user/key_file in {device.source}") from e
        except (OSError, paramiko.SSHException, EOFError) as e:
            self.client.close()
            raise DeviceUnreachable(
                f"device {device.name}: cannot connect to {where} ({_connect_reason(e)})",
                f"is the device on and sshd running? check [ssh].host/port in {device.source}") from e
        self.transport = self.client.get_transport()
        self.transport.set_keepalive(5)  # notice a device that vanished without closing TCP
        self._sftp = None

    def python(self, *args):
        return [self.device.python_cmd, *args]

    def _command(self, argv: list[str]) -> str:
        parts = []
        for i, a in enumerate(argv):
            if i == 0 and a.startswith("~/"):
                parts.append('"$HOME"/' + shlex.quote(a[2:]))  # let the device's shell expand ~
            else:
                parts.append(shlex.quote(a))
        return " ".join(parts)

    def run(self, argv, timeout=None):
        cmd = self._command(argv)
        name = self.device.name
        try:
            chan = self.transport.open_session(timeout=self.device.ssh.connect_timeout_s)
            chan.exec_command(cmd)
        except Exception as e:
            raise DeviceUnreachable(f"device {name}: connection to {self.device.where()} lost "
                                    f"({type(e).__name__}: {e})") from e
        chan.shutdown_write()
        out, err = io.BytesIO(), io.BytesIO()
        start = time.monotonic()
        while True:
            select.select([chan], [], [], 0.5)
            while chan.recv_ready():
                out.write(chan.recv(1 << 16))
            while chan.recv_stderr_ready():
                err.write(chan.recv_stderr(1 << 16))
            if chan.exit_status_ready() and chan.eof_received and not chan.recv_ready() \
                    and not chan.recv_stderr_ready():
                break
            if not self.transport.is_active() or (chan.closed and not chan.exit_status_ready()):
                chan.close()
                raise DeviceUnreachable(
                    f"device {name}: connection to {self.device.where()} lost after "
                    f"{time.monotonic() - start:.1f} s while running {_short(argv)}",
                    "the device rebooted, lost power or network, or sshd was stopped; "
                    f"output so far: {(out.getvalue() + err.getvalue()).decode(errors='replace')[-300:]!r}")
            if timeout is not None and time.monotonic() - start > timeout:
                chan.close()
                raise DeviceUnreachable(f"device {name}: command timed out after {timeout:.0f} s: {_short(argv)}",
                                        "the device stopped answering, or the command needs longer: "
                                        "check the device, raise --timeout or use fewer --runs")
        rc = chan.recv_exit_status()
        chan.close()
        return CommandResult(rc, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"))

    def put(self, source, remote, progress=None):
        try:
            sftp = self._sftp_client()
            cb = progress or None
            if isinstance(source, bytes):
                sftp.putfo(io.BytesIO(source), remote, len(source), callback=cb, confirm=True)
            else:
                sftp.put(str(source), remote, callback=cb, confirm=True)
        except (OSError, EOFError) as e:
            raise self._sftp_error(e, f"uploading {remote}", f"upload of {remote}",
                                   "check free disk space and permissions of the workdir on the device") from e

    def _sftp_error(self, e: BaseException, doing: str, what: str, hint: str) -> DeviceError:
        # EOF means the channel died; paramiko may not have marked the transport inactive yet.
        if isinstance(e, EOFError) or not self.transport.is_active():
            return DeviceUnreachable(f"device {self.device.name}: connection lost while {doing}")
        return DeviceError(f"device {self.device.name}: {what} failed: {e}", hint)

    def _sftp_client(self):
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
            self._sftp.get_channel().settimeout(max(60.0, self.device.ssh.connect_timeout_s))
        return self._sftp

    def get(self, remote, local):
        try:
            self._sftp_client().get(remote, str(local))
        except (OSError, EOFError) as e:
            raise self._sftp_error(e, f"fetching {remote}", f"fetching {remote}", "check the workdir on the device") from e

    def close(self):
        # Closing sends a last packet; over a connection that just died that raises EOFError or
        # OSError, which must not replace the error that explains what happened.
        try:
            if self._sftp is not None:
                self._sftp.close()
        except (OSError, EOFError):
            pass
        finally:
            try:
                self.client.close()
            except (OSError, EOFError):
                pass


def _connect_reason(e: BaseException) -> str:
    import paramiko  # only SSH devices get here; local-only users never import it
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError) and e.errors:
        e = next(iter(e.errors.values()))  # paramiko wraps the per-address socket errors
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def _hostkey_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _HostKeyPolicy:
    """Unknown host key: refuse, or with accept_new add it to known_hosts (like
    StrictHostKeyChecking=accept-new). A changed key never reaches here: paramiko raises
    BadHostKeyException for it, which we always refuse."""

    def __init__(self, device: Device, known_hosts: Path, accept_new: bool):
        self.device, self.known_hosts, self.accept_new = device, known_hosts, accept_new

    def missing_host_key(self, client, hostname, key):
        fp = fingerprint(key)
        if not self.accept_new:
            raise DeviceError(
                f"device {self.device.name}: host {hostname} is not in {self.known_hosts}; "
                f"it offered a {key.get_name()} key with fingerprint {fp}",
                "compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the device, "
                "then rerun with --accept-new-host-key to trust and remember it")
        from paramiko.hostkeys import HostKeyEntry  # as in SshTransport: only for SSH devices

        self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = HostKeyEntry([hostname], key).to_line()
        if self.known_hosts.exists() and not self.known_hosts.read_bytes().endswith(b"\n") \
                and self.known_hosts.stat().st_size:
            line = "\n" + line  # never glue our entry onto someone's last line
        with open(self.known_hosts, "a") as f:
            os.chmod(self.known_hosts, 0o600)
            f.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)


def connect(device: Device, accept_new_host_key: bool = False) -> Transport:
    if device.transport == "local":
        return LocalTransport(device)
    return SshTransport(device, accept_new_host_key)
