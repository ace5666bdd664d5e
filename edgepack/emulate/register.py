"""Register the emulated device in the user's device inventory, and remove it again."""
from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import tomli_w

from ..errors import EdgepackError
from ..names import PLAIN_NAME_RULE, is_plain_name
from .kinds import get_kind
from .prepare import EmulatorEnv, cache_base, prepare_emulator, remove_emulator_cache

def devices_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "edgepack" / "devices"


def default_workdir(name: str) -> str:
    return f"~/.local/share/edgepack/devices/{name}"


def device_toml(name: str, env: EmulatorEnv) -> str:
    k = get_kind(env.kind)
    v = env.versions
    comment = (
        f"# Emulated {k.description}: aarch64 Python {v.get('python', '3.11')} under qemu-user "
        f"(-cpu {k.qemu_cpu}),\n"
        f"# onnxruntime {v.get('onnxruntime')}, ai-edge-litert {v.get('ai-edge-litert')}, "
        f"numpy {v.get('numpy')}.\n"
        "# Written by `edgepack devices emulate`; `edgepack devices emulate --remove NAME` deletes it.\n"
        "# Outputs and ARM kernels are real; latency is emulated and never judged against budgets.\n")
    return comment + tomli_w.dumps({
        "name": name, "target": k.target, "transport": "local", "workdir": default_workdir(name),
        "python": str(env.python), "emulated": True})


def register_emulated_device(name: str = "pi-emu", kind: str = "rpi", *,
                             emulator: EmulatorEnv | None = None, config_dir: Path | None = None,
                             progress=None) -> Path:
    """Write `<config_dir>/<name>.toml` (default ${XDG_CONFIG_HOME:-~/.config}/edgepack/devices)
    describing the emulated device, preparing the environment first if needed (cached: instant).
    Returns the path written. Refuses (EdgepackError) to overwrite a non-emulated device file
    or to use a name that is not a plain file name."""
    if not is_plain_name(name):
        raise EdgepackError(f"invalid device name {name!r}: it names the file <name>.toml",
                            f"use {PLAIN_NAME_RULE} characters (e.g. pi-emu)")
    env = emulator or prepare_emulator(kind, progress=progress)
    d = Path(config_dir) if config_dir else devices_config_dir()
    path = d / f"{name}.toml"
    if path.exists():
        existing = _read(path)
        if existing is not None and not existing.get("emulated", False):
            raise EdgepackError(f"{path} already describes a real (non-emulated) device {name!r}",
                                "choose another --name, or delete that file first")
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(device_toml(name, env))
    tmp.replace(path)
    return path


def _read(path: Path) -> dict | None:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None


def _is_ours(data: dict) -> bool:
    """An emulated device whose interpreter lives in edgepack's emulator cache."""
    py = str(data.get("python", ""))
    return bool(data.get("emulated")) and py.startswith(str(cache_base()) + os.sep)


def _cache_dir_of(data: dict) -> Path | None:
    py = Path(str(data.get("python", "")))
    try:
        rel = py.relative_to(cache_base())
    except ValueError:
        return None
    return cache_base() / rel.parts[0] if rel.parts else None


def list_emulated_devices(config_dir: Path | None = None) -> dict[str, Path]:
    d = Path(config_dir) if config_dir else devices_config_dir()
    found = {}
    for f in sorted(d.glob("*.toml")) if d.is_dir() else []:
        data = _read(f)
        if data is not None and _is_ours(data):
            found[data.get("name", f.stem)] = f
    return found


def remove_emulator(name: str | None = None, *, kind: str | None = None,
                    config_dir: Path | None = None, keep_cache: bool = False) -> dict:
    """Remove emulated devices and their cached environments.

    name=None: every emulated device registered by edgepack plus the whole emulator cache.
    name="pi-emu": that device's toml (and its default workdir), and its cached environment
    unless another registered emulated device still uses it. A kind name ("rpi", "rpi5") with
    no such device removes that kind's cache and the devices using it.
    Returns {"devices": [toml paths removed], "caches": [dirs removed], "workdirs": [...]}.
    Raises EdgepackError for an unknown name or a device that is not emulated.
    """
    d = Path(config_dir) if config_dir else devices_config_dir()
    ours = list_emulated_devices(d)
    removed = {"devices": [], "caches": [], "workdirs": []}

    def drop_device(dev_name: str, path: Path):
        data = _read(path) or {}
        path.unlink(missing_ok=True)
        removed["devices"].append(str(path))
        wd = str(data.get("workdir", ""))
        if wd == default_workdir(dev_name):
            p = Path(wd).expanduser()
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed["workdirs"].append(str(p))

    if name is None and kind is None:
        for n, p in ours.items():
            drop_device(n, p)
        if not keep_cache:
            removed["caches"] = [str(p) for p in remove_emulator_cache(None)]
        return removed

    if name is not None and name in ours:
        data = _read(ours[name]) or {}
        cache_dir = _cache_dir_of(data)
        drop_device(name, ours[name])
        still_used = any(_cache_dir_of(_read(p) or {}) == cache_dir for n, p in ours.items() if n != name)
        if cache_dir is not None and not still_used and not keep_cache and cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
            removed["caches"].append(str(cache_dir))
        return removed

    if name is not None and (d / f"{name}.toml").exists():
        raise EdgepackError(f"device {name!r} ({d / f'{name}.toml'}) is not an emulated device "
                            "registered by edgepack; not removing it",
                            "delete the file yourself if you mean it")
    kind = kind or name
    try:
        get_kind(kind)
    except EdgepackError:
        raise EdgepackError(f"no emulated device or kind named {name!r}",
                            "registered emulated devices: " + (", ".join(ours) or "(none)")) from None
    for n, p in ours.items():
        cd = _cache_dir_of(_read(p) or {})
        if cd is not None and cd.name.startswith(f"{kind}-"):
            drop_device(n, p)
    if not keep_cache:
        removed["caches"] = [str(p) for p in remove_emulator_cache(kind)]
    return removed
