"""Stage `deploy` (with `--device`): copy the fresh build to the device, hashes verified there.
It runs after the build directory is in place; the device is resolved before the long work."""
from __future__ import annotations

from pydantic import BaseModel

from ..devices import deploy, get_device
from ..errors import EdgepackError
from .context import BuildContext

NAME = "deploy"


class Config(BaseModel):
    device: str
    accept_new_host_key: bool = False


def config(ctx: BuildContext) -> Config | None:
    return Config(device=ctx.cfg.device, accept_new_host_key=ctx.cfg.accept_new_host_key) if ctx.cfg.device else None


def resolve_device(ctx: BuildContext):
    """The device named by --device, checked against the target's architecture."""
    cfg, profile = ctx.cfg, ctx.profile
    device = get_device(cfg.device, cfg.devices_dir or None, cfg.targets_dir or None)
    arch = device.profile().arch
    if arch != profile.arch:
        raise EdgepackError(f"device {device.name} is {arch} (target {device.target!r}) but this build is for "
                            f"{profile.name!r} ({profile.arch})",
                            f"build with --target {device.target}, or pick a device of the {profile.name} kind")
    ctx.device = device
    ctx.judged_elsewhere = (f"{device.name} is emulated, so only a real device can judge speed and memory"
                            if device.emulated else f"judged on device {device.name} (see the device results)")
    return device


def run(ctx: BuildContext, cfg: Config) -> dict:
    device = ctx.device
    with ctx.progress.task(f"deploying to {device.name}") as line:  # one line: checking, uploading k/n, verifying
        return deploy(ctx.path, device, accept_new_host_key=cfg.accept_new_host_key, progress=line.say)
