"""Device inventory: `devices/*.toml`, one device per file, validated on load.

Search order (first definition of a name wins): each `--devices-dir`, then
`$EDGEPACK_DEVICES_DIR`, then `${XDG_CONFIG_HOME:-~/.config}/edgepack/devices`, then the
built-in `devices/` shipped with edgepack (the `local` device).
"""
from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import EdgepackError
from ..targets import TargetProfile, format_validation, list_profiles, load_profile

_PACKAGE = Path(__file__).resolve().parent.parent
BUILTIN_DIRS = [_PACKAGE.parent / "devices", _PACKAGE / "_data" / "devices"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SshConfig(_Strict):
    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str
    key_file: str | None = None  # None: ssh-agent and ~/.ssh/id_* keys
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout_s: float = Field(10, gt=0)


class Device(_Strict):
    name: str
    target: str
    transport: Literal["local", "ssh"]
    workdir: str = "~/edgepack"
    # None means: local transport -> the interpreter running edgepack, ssh -> "python3".
    python: str | None = None
    emulated: bool = False
    ssh: SshConfig | None = None
    source: str | None = Field(None, exclude=True)  # the toml file it came from
    targets_dirs: list[str] = Field([], exclude=True)  # where its target profile was found

    @model_validator(mode="after")
    def _ssh_table_matches_transport(self):
        if self.transport == "ssh" and self.ssh is None:
            raise ValueError("transport = \"ssh\" needs an [ssh] table (host, user, ...)")
        if self.transport == "local" and self.ssh is not None:
            raise ValueError("an [ssh] table is only used with transport = \"ssh\"")
        return self

    @property
    def python_cmd(self) -> str:
        if self.python:
            return self.python
        return sys.executable if self.transport == "local" else "python3"

    def where(self) -> str:
        """Human-readable location for messages: `user@host:port` or `local`."""
        if self.ssh:
            return f"{self.ssh.user}@{self.ssh.host}:{self.ssh.port}"
        return "local"

    def profile(self) -> TargetProfile:
        return load_profile(self.target, [Path(d) for d in self.targets_dirs])


def search_dirs(dirs: list[Path | str] | None = None) -> list[Path]:
    found = [Path(d).expanduser() for d in (dirs or [])]
    if os.environ.get("EDGEPACK_DEVICES_DIR"):
        found.append(Path(os.environ["EDGEPACK_DEVICES_DIR"]).expanduser())
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    found.append(Path(xdg) / "edgepack" / "devices")
    found += BUILTIN_DIRS
    return found


def load_device_file(path: Path, targets: dict[str, TargetProfile] | None = None) -> Device:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise EdgepackError(f"cannot read device file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"device file {path} is not valid TOML: {e}") from e
    data.setdefault("name", path.stem)
    try:
        device = Device.model_validate(data)
    except ValidationError as e:
        raise EdgepackError(f"device file {path} is invalid:\n{format_validation(e)}",
                            "fix the fields named above; see devices/ssh-example.toml.example") from e
    targets = targets if targets is not None else list_profiles()
    if device.target not in targets:
        raise EdgepackError(
            f"device file {path} is invalid:\n  - target: unknown target {device.target!r} "
            f"(known: {', '.join(sorted(targets))})",
            "set target to one of those names (`edgepack targets` lists them)")
    device.source = str(path)
    return device


@dataclass
class BrokenDeviceFile:
    """A device file that could not be loaded; it breaks only commands that use that device."""
    name: str  # the file's stem: the device name it defines unless it says otherwise
    path: Path
    error: EdgepackError


def load_inventory(dirs: list[Path | str] | None = None,
                   targets_dirs: list[Path | str] | None = None,
                   broken: list[BrokenDeviceFile] | None = None) -> dict[str, Device]:
    """All devices by name; earlier directories shadow later ones. Missing dirs are skipped,
    except a `--devices-dir` the user named explicitly. `targets_dirs`: extra profile directories
    (as `--targets-dir`) in which device targets may be defined. A bad device file raises, unless
    a `broken` list is given: then it is recorded there and the other devices still load."""
    targets = list_profiles([Path(d) for d in (targets_dirs or [])])
    explicit = {Path(d).expanduser() for d in (dirs or [])}
    devices: dict[str, Device] = {}
    for d in search_dirs(dirs):
        if not d.is_dir():
            if d in explicit:
                raise EdgepackError(f"devices directory {d} does not exist")
            continue
        for f in sorted(d.glob("*.toml")):
            try:
                dev = load_device_file(f, targets)
            except EdgepackError as e:
                if broken is None:
                    raise
                broken.append(BrokenDeviceFile(f.stem, f, e))
                continue
            dev.targets_dirs = [str(d) for d in (targets_dirs or [])]
            devices.setdefault(dev.name, dev)
    return devices


def get_device(name: str, dirs: list[Path | str] | None = None,
               targets_dirs: list[Path | str] | None = None) -> Device:
    """The named device. Other devices' broken files do not matter; the named one's error is
    raised as it is."""
    broken: list[BrokenDeviceFile] = []
    inv = load_inventory(dirs, targets_dirs, broken)
    for b in broken:  # before `inv`: a broken file must not silently fall back to a shadowed one
        if b.name == name:
            raise b.error
    if name in inv:
        return inv[name]
    known = ", ".join(sorted(inv)) or "(none)"
    also = "".join(f"; {b.path} could not be loaded" for b in broken)
    raise EdgepackError(f"unknown device {name!r}; known devices: {known}{also}",
                        "add a NAME.toml to ~/.config/edgepack/devices (see devices/ssh-example.toml.example)"
                        " or pass --devices-dir DIR")
