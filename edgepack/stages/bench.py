"""Stage `bench` (with `--device`): benchmark the deployed build on the device and judge it
there; on an edgepack emulator also run the int8 artifacts on its aarch64 runtimes and compare
their outputs with this machine's on the same inputs (the ARM kernels are real)."""
from __future__ import annotations

from pydantic import BaseModel

from ..devices import bench
from ..emulate import compare_on_emulator, emulator_for_python
from ..manifest import MANIFEST, build_lock, read_manifest, write_json_atomic
from ..report import append_section, table
from .context import BuildContext
from .infer import predict

NAME = "bench"
EMULATION_SAMPLES = 256  # emulated inference is slow; this many samples give a stable agreement


class Config(BaseModel):
    runs: int
    threads: int
    accept_new_host_key: bool = False


def config(ctx: BuildContext) -> Config | None:
    if not ctx.cfg.device:
        return None
    return Config(runs=20 if ctx.device.emulated else 100, threads=ctx.profile.threads,
                  accept_new_host_key=ctx.cfg.accept_new_host_key)


def run(ctx: BuildContext, cfg: Config) -> dict:
    device = ctx.device
    ctx.say(f"benchmarking on {device.name}" + (" (emulated: latency not judged)" if device.emulated else ""))
    r = bench(ctx.path, device, threads=cfg.threads, progress=ctx.say, accept_new_host_key=cfg.accept_new_host_key,
              dirs=ctx.cfg.devices_dir or None, runs=cfg.runs)
    ctx.device_results.append(r)
    if device.emulated:
        _compare_emulated(ctx)
    ctx.manifest = read_manifest(ctx.path)
    lat = r.get("latency_ms", {})
    peak = r.get("memory_mb", {}).get("peak_rss", float("nan"))
    ctx.say(f"{device.name}: p50 {lat.get('p50', float('nan')):.3f} ms, peak memory {peak:.1f} MB, "
            f"{'pass' if r['passed'] else 'FAIL'}")
    return {"device": device.name, "passed": r["passed"]}


def _compare_emulated(ctx: BuildContext) -> None:
    """int8 artifacts on the emulated aarch64 runtimes vs on x86, same inputs."""
    device = ctx.device
    env = emulator_for_python(device.python_cmd)
    if env is None or device.transport != "local":
        ctx.say(f"{device.name} is marked emulated but is not an edgepack emulator: aarch64-vs-x86 comparison skipped")
        return
    m = read_manifest(ctx.path)
    data = ctx.data.report.sample(EMULATION_SAMPLES, seed=0)
    rows, records = [], []
    for a in m.artifacts:
        if a.precision != "int8":
            continue
        path = ctx.path / a.path
        ctx.say(f"running {a.path} on emulated aarch64 ({len(data)} samples)")
        x86 = predict(path, ctx.model, data, 1, a.layout or "NCHW")
        xs = data.arrays()
        if a.format == "tflite" and a.layout == "NHWC":
            xs = [x.transpose(0, 2, 3, 1).copy() if x.ndim == 4 and x.dtype.kind == "f" else x for x in xs]
        c = compare_on_emulator(path, xs, x86, emulator=env)
        records.append({k: c.get(k) for k in ("artifact", "format", "samples", "top1_agreement", "max_abs_diff",
                                              "machine", "backend", "backend_version", "runtimes")})
        rows.append([a.path, c["machine"], f"{c['backend']} {c['backend_version']}", c["samples"],
                     f"{100 * c['top1_agreement']:.2f}", f"{c['max_abs_diff']:.4g}"])
    section = "\n".join([f"## aarch64 (emulated on {device.name}) vs x86", "",
                         "The int8 artifacts run on real aarch64 runtimes under qemu on the same inputs as on x86. "
                         "Emulated latency means nothing and is not judged; outputs are real.", "",
                         table(["artifact", "machine", "runtime", "samples", "top-1 agreement %", "max abs diff"], rows), ""])
    with build_lock(ctx.path):
        m = read_manifest(ctx.path)
        m.stages["emulation"] = {"device": device.name, "results": records}
        write_json_atomic(ctx.path / MANIFEST, m)
        append_section(ctx.path, section)
    ctx.sections["emulation"] = section
