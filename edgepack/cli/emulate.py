"""`edgepack devices emulate rpi [--name pi-emu] [--rebuild]` and
`edgepack devices emulate --remove [NAME]` (also available as top-level `edgepack emulate`):
parse and call edgepack.emulate; nothing else lives here."""
from __future__ import annotations

from typing import Optional

import typer

from ..errors import EdgepackError
from . import console, emit_json, out

HELP = ("Prepare an emulated aarch64 device (qemu-user + Debian arm64 Python + aarch64 onnxruntime "
        "and ai-edge-litert, cached) and register it as a device; or --remove it.")


def emulate(
    what: Optional[str] = typer.Argument(None, metavar="[KIND|NAME]",
                                         help="kind to prepare: rpi (Pi 4, Cortex-A72) or rpi5 "
                                              "(Cortex-A76); with --remove: the device name (default: all)"),
    name: Optional[str] = typer.Option(None, "--name", help="device name to register (default pi-emu, "
                                                            "pi5-emu for rpi5)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="prepare from scratch even when cached"),
    remove: bool = typer.Option(False, "--remove", help="delete the emulated device(s) and the cache"),
    keep_cache: bool = typer.Option(False, "--keep-cache", help="with --remove: keep the prepared "
                                                                "environment, remove only the device file"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    # Imported when the command runs: the CLI imports every command module at start-up.
    from ..emulate import KINDS, prepare_emulator, register_emulated_device, remove_emulator

    if remove:
        target = what or name
        removed = remove_emulator(target, keep_cache=keep_cache)
        if as_json:
            emit_json(removed)
            return
        for k, label in (("devices", "device file"), ("workdirs", "workdir"), ("caches", "cache")):
            for p in removed[k]:
                console.print(f"removed {label} {p}", highlight=False, soft_wrap=True)
        if not any(removed.values()):
            console.print("nothing to remove")
        return

    kind = what or "rpi"
    if kind not in KINDS:
        raise EdgepackError(f"unknown emulated device kind {kind!r}", f"choose one of: {', '.join(KINDS)}")
    env = prepare_emulator(kind, rebuild=rebuild, progress=False if as_json else None)
    dev_name = name or ("pi-emu" if kind == "rpi" else f"{kind.replace('rpi', 'pi')}-emu")
    path = register_emulated_device(dev_name, kind, emulator=env)
    result = env.to_dict() | {"device": dev_name, "device_file": str(path)}
    if as_json:
        emit_json(result)
        return
    v = env.versions
    how = (f"prepared in {env.prepare_seconds:.0f} s" if env.prepare_seconds is not None
           else "from the cache")
    out.print(f"[bold]{dev_name}[/]: emulated {KINDS[kind].description}", highlight=False, soft_wrap=True)
    out.print(f"  {how}; cache {env.size_bytes / 1e6:.0f} MB at {env.root}", highlight=False, soft_wrap=True)
    out.print(f"  aarch64 python {v.get('python')}, onnxruntime {v.get('onnxruntime')}, "
              f"ai-edge-litert {v.get('ai-edge-litert')}, numpy {v.get('numpy')}, "
              f"qemu {str(v.get('qemu', '')).split()[0]} -cpu {v.get('qemu_cpu')}", highlight=False, soft_wrap=True)
    out.print(f"  device file {path}", highlight=False, soft_wrap=True)
    out.print(f"  try: edgepack devices check {dev_name}   |   "
              f"edgepack build --target {KINDS[kind].target} --device {dev_name}", highlight=False, soft_wrap=True)
    out.print("  [dim]latency on an emulated device is measured but never judged[/]")


def register(app: typer.Typer) -> None:
    # Mounted under the device helper's `devices` group when it exists (without editing its
    # module), and always as top-level `edgepack emulate`.
    for info in getattr(app, "registered_groups", []):
        if info.name == "devices" and info.typer_instance is not None:
            sub = info.typer_instance
            if not any(c.name == "emulate" for c in sub.registered_commands):
                sub.command("emulate", help=HELP)(emulate)
    if not any(c.name == "emulate" for c in app.registered_commands):
        app.command("emulate", help=HELP)(emulate)
