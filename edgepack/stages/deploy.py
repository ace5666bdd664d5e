"""`edgepack build --device NAME`: deploy the fresh build, benchmark it there, judge, and on an
emulated device also compare its aarch64 outputs with this machine's."""
from __future__ import annotations


from ..data import Dataset
from ..manifest import MANIFEST, build_lock, read_manifest, write_json_atomic
from ..report import append_section, table

EMULATION_SAMPLES = 256  # emulated inference is slow; this many eval samples give a stable agreement


def deploy_and_bench(result, device, cfg, evals: Dataset, say) -> None:
    from ..devices import bench
    say(f"deploying to {device.name} and benchmarking there" + (" (emulated: latency not judged)" if device.emulated else ""))
    r = bench(result.path, device, threads=result.manifest.target["threads"], progress=say,
              accept_new_host_key=cfg.accept_new_host_key, dirs=cfg.devices_dir or None,
              runs=100 if not device.emulated else 20)
    result.device_results.append(r)
    if device.emulated:
        _compare_emulated(result, device, evals, say)
    result.manifest = read_manifest(result.path)
    lat = r.get("latency_ms", {})
    peak = r.get("memory_mb", {}).get("peak_rss", float("nan"))
    say(f"{device.name}: p50 {lat.get('p50', float('nan')):.3f} ms, peak memory {peak:.1f} MB, "
        f"{'pass' if r['passed'] else 'FAIL'}")


def _compare_emulated(result, device, evals: Dataset, say) -> None:
    """int8 artifacts on the emulated aarch64 runtimes vs on x86, same inputs: the ARM kernels differ."""
    from .. import runtime
    from ..emulate import compare_on_emulator, emulator_for_python
    from ..tflite.validate import run_tflite
    env = emulator_for_python(device.python_cmd)
    if env is None or device.transport != "local":
        say(f"{device.name} is marked emulated but is not an edgepack emulator: aarch64-vs-x86 comparison skipped")
        return
    m = read_manifest(result.path)
    data = evals.take(EMULATION_SAMPLES)
    rows, records = [], []
    for a in m.artifacts:
        if a.precision != "int8":
            continue
        path = result.path / a.path
        say(f"running {a.path} on emulated aarch64 ({len(data)} samples)")
        if a.format == "tflite":
            x86 = run_tflite(path, data.x, a.layout or "NCHW")
            x = data.x.transpose(0, 2, 3, 1).copy() if a.layout == "NHWC" else data.x
        else:
            x86 = runtime.open_model(path).run([data.x])[0]
            x = data.x
        c = compare_on_emulator(path, x, x86, emulator=env)
        records.append({k: c.get(k) for k in ("artifact", "format", "samples", "top1_agreement", "max_abs_diff",
                                              "machine", "backend", "backend_version", "runtimes")})
        rows.append([a.path, c["machine"], f"{c['backend']} {c['backend_version']}", c["samples"],
                     f"{100 * c['top1_agreement']:.2f}", f"{c['max_abs_diff']:.4g}"])
    section = "\n".join([f"## aarch64 (emulated on {device.name}) vs x86", "",
                         "The int8 artifacts run on real aarch64 runtimes under qemu on the same inputs as on x86. "
                         "Emulated latency means nothing and is not judged; outputs are real.", "",
                         table(["artifact", "machine", "runtime", "samples", "top-1 agreement %", "max abs diff"], rows), ""])
    with build_lock(result.path):
        m = read_manifest(result.path)
        m.stages["emulation"] = {"device": device.name, "results": records}
        write_json_atomic(result.path / MANIFEST, m)
        append_section(result.path, section)
    result.sections["emulation"] = section
