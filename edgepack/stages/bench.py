"""Stage `bench` (with `--device`): benchmark the deployed build on the device and judge it
there, accuracy included: the build's evaluation subset runs through the judged artifact and
every other int8 artifact with the device's own kernels (on an emulated Pi: real aarch64
kernels under qemu), scored beside this machine's outputs of the same artifacts on the same
samples, with the build's --metric when it has one."""
from __future__ import annotations

from pydantic import BaseModel

from ..devices import bench
from ..devices.results import headline
from ..devices.summary import disagreeing
from ..manifest import read_manifest
from .context import BuildContext

NAME = "bench"


class Config(BaseModel):
    runs: int
    threads: int
    accept_new_host_key: bool = False
    metric: str | None = None  # part of the record only; the function itself comes from ctx.metric


def config(ctx: BuildContext) -> Config | None:
    if not ctx.cfg.device:
        return None
    return Config(runs=20 if ctx.device.emulated else 100, threads=ctx.profile.threads,
                  accept_new_host_key=ctx.cfg.accept_new_host_key, metric=ctx.metric[0] if ctx.metric else None)


def run(ctx: BuildContext, cfg: Config) -> dict:
    device = ctx.device
    ctx.say(f"benchmarking on {device.name}" + (" (emulated: latency not judged)" if device.emulated else ""))
    m = read_manifest(ctx.path)
    others = [a.path for a in m.artifacts if a.precision == "int8" and a.path != m.primary]
    # The deploy stage has just sent and verified this build (the agent checks every file again):
    # deploying once more would only repeat the device probe, half a minute under emulation.
    r = bench(ctx.path, device, threads=cfg.threads, progress=ctx.progress, accept_new_host_key=cfg.accept_new_host_key,
              dirs=ctx.cfg.devices_dir or None, runs=cfg.runs, metric=ctx.metric, also_evaluate=others,
              redeploy=False)
    ctx.device_results.append(r)
    ctx.manifest = read_manifest(ctx.path)
    lat = r.get("latency_ms", {})
    peak = r.get("memory_mb", {}).get("peak_rss", float("nan"))
    ctx.say(f"{device.name}: p50 {lat.get('p50', float('nan')):.3f} ms, peak memory {peak:.1f} MB, "
            f"{'pass' if r['passed'] else 'FAIL'}")
    for e in r["eval"]:
        label, dev = headline(e["device"])
        _, host = headline(e["host"])
        ctx.say(f"{device.name}: {e['artifact']} {label} {_num(dev)} on the device, {_num(host)} here "
                f"({e['samples']} samples; drop vs fp32 {_num(e['drop'])} {e['drop_unit']})")
    for d in disagreeing([r]):
        ctx.say(f"WARNING {d['device']}: outputs of {d['artifact']} differ from this machine's: {d['why']}")
    for note in r["eval_notes"]:
        ctx.say(f"{device.name}: {note}")
    return {"device": device.name, "passed": r["passed"], "consistent": r["consistent"],
            "eval": [{"artifact": e["artifact"], "device": e["device"], "host": e["host"], "drop": e["drop"]}
                     for e in r["eval"]]}


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"
