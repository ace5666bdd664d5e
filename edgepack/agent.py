"""edgepack on-device agent: benchmark one deployed artifact and print one JSON object.

    python agent.py --manifest manifest.json --artifact model.int8.onnx --threads 4 --runs 100 --warmup 10

Runs with the device's own Python. It imports nothing from edgepack: only the standard
library, numpy, the model runtime, and `runtime.py` and `cpuinfo.py`, which are deployed next to
this file (devices/deploy.py AGENT_FILES).
Exit codes: 0 ok, 3 artifact/manifest integrity failure, 4 runtime missing, 5 other error,
6 --timeout reached; the
JSON object on stdout always says what happened ({"ok": false, "kind": ..., "error": ...}).
"""
import argparse
import hashlib
import json
import os
import platform
import signal
import sys
import tempfile
import time

import cpuinfo  # the sibling cpuinfo.py, standard library only

EXIT_INTEGRITY, EXIT_RUNTIME, EXIT_OTHER, EXIT_TIMEOUT = 3, 4, 5, 6


class AgentError(Exception):
    def __init__(self, kind, message, code):
        super().__init__(message)
        self.kind, self.code = kind, code


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def proc_status_mb(field):
    """VmRSS / VmHWM from /proc/self/status in MB (Linux only), else None."""
    text = read_text("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def environment(threads):
    cpu = cpuinfo.read_cpuinfo()
    env = {
        "machine": platform.machine(), "system": platform.system(), "kernel": platform.release(),
        "hostname": platform.node(), "python": platform.python_version(),
        "cpu_model": cpu["model"], "cpu_core": cpu["core"], "cpu_count": os.cpu_count(),
        # The ISA extensions int8 kernels dispatch on (AVX2, AVX-512, VNNI; NEON, dot product, i8mm).
        "int8_flags": cpu["int8_flags"], "threads": threads,
    }
    try:
        env["cpus_allowed"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        env["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        env["loadavg"] = None
    gov = read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    env["cpufreq_governor"] = gov.strip() if gov else None
    freq = read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    env["cpufreq_mhz"] = int(freq) / 1000.0 if freq and freq.strip().isdigit() else None
    temp = read_text("/sys/class/thermal/thermal_zone0/temp")  # throttling explains slow runs on a Pi
    env["temperature_c"] = int(temp) / 1000.0 if temp and temp.strip().lstrip("-").isdigit() else None
    return env


def make_inputs(np, specs, runner):
    """Random inputs, one per model input. The model's own static dims win (a TFLite model is
    NHWC even when the manifest's inputs are NCHW); symbolic dims come from the manifest's spec
    (shape/dtype), else 1."""
    rng = np.random.default_rng(0)
    inputs = []
    for i, model_shape in enumerate(runner.input_shapes):
        spec = specs[i] if i < len(specs) else {"shape": [], "dtype": "float32"}
        spec_shape = spec.get("shape") or []
        shape = []
        for j, d in enumerate(model_shape):
            s = spec_shape[j] if j < len(spec_shape) and len(spec_shape) == len(model_shape) else None
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(s, int) and s > 0:
                shape.append(s)
            else:
                shape.append(1)
        dtype = np.dtype(runner.input_dtypes[i] if i < len(runner.input_dtypes) else spec.get("dtype", "float32"))
        if dtype.kind == "f":
            a = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            a = rng.integers(0, 2, shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(max(info.min, 0), min(info.max, 255) + 1, shape).astype(dtype)
        inputs.append(a)
    return inputs


def op_profile(trace_path, calls):
    """Aggregate an ORT profiling trace into per-operator totals (ms per model call)."""
    with open(trace_path) as f:
        events = json.load(f)
    per_op = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        op = ev.get("args", {}).get("op_name", "?")
        rec = per_op.setdefault(op, {"op": op, "calls": 0, "total_ms": 0.0})
        rec["calls"] += 1
        rec["total_ms"] += ev.get("dur", 0) / 1000.0
    total = sum(r["total_ms"] for r in per_op.values()) or 1.0
    rows = sorted(per_op.values(), key=lambda r: -r["total_ms"])
    for r in rows:
        r["share"] = round(r["total_ms"] / total, 4)
        r["ms_per_run"] = round(r["total_ms"] / max(calls, 1), 4)
        r["total_ms"] = round(r["total_ms"], 3)
    return rows


def bench(args):
    t_start = time.perf_counter()
    manifest_path = os.path.abspath(args.manifest)
    build_dir = os.path.dirname(manifest_path)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise AgentError("manifest", "cannot read manifest %s: %s" % (manifest_path, e), EXIT_INTEGRITY)
    entry = next((a for a in manifest.get("artifacts", []) if a.get("path") == args.artifact), None)
    if entry is None:
        known = ", ".join(a.get("path", "?") for a in manifest.get("artifacts", []))
        raise AgentError("artifact", "artifact %s is not in the manifest (known: %s)" % (args.artifact, known),
                         EXIT_INTEGRITY)
    path = os.path.join(build_dir, args.artifact)
    if not os.path.isfile(path):
        raise AgentError("integrity", "artifact %s is missing from %s" % (args.artifact, build_dir), EXIT_INTEGRITY)
    digest = sha256(path)
    if digest != entry["sha256"]:
        # Never benchmark (or run) a file that is not the one that was built and validated.
        raise AgentError("integrity", "artifact %s has sha256 %s but the manifest says %s: the file on the "
                         "device was modified or corrupted; refusing to load it" % (args.artifact, digest,
                                                                                  entry["sha256"]), EXIT_INTEGRITY)
    try:  # here, not at the top: a device without numpy or a runtime gets a JSON answer saying so
        import numpy as np
        import runtime
    except ImportError as e:
        raise AgentError("runtime", "cannot import %s on this device: %s" % (e.name, e), EXIT_RUNTIME)

    profile = args.profile and path.lower().endswith(".onnx")  # per-operator profiles: ORT only
    if profile:
        # ORT writes its trace into the working directory: use a private scratch dir.
        os.chdir(tempfile.mkdtemp(prefix="edgepack-profile-"))
    rss_before = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    try:
        runner = runtime.open_model(path, args.threads, profile=profile)
    except runtime.RuntimeMissing as e:
        raise AgentError("runtime", str(e), EXIT_RUNTIME)
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_loaded = proc_status_mb("VmRSS")
    specs = entry.get("inputs") or manifest.get("inputs", [])
    inputs = make_inputs(np, specs, runner)
    latency = runtime.time_runs(runner, inputs, warmup=args.warmup, runs=args.runs)
    result = {
        "ok": True,
        "artifact": args.artifact, "sha256": digest, "format": entry.get("format"),
        "precision": entry.get("precision"), "build": manifest.get("name"),
        "runtime": {"name": runner.backend, "version": runner.backend_version},
        "load_ms": load_ms, "first_ms": latency.pop("first_ms"), "latency_ms": latency,
        "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in inputs],
        "memory_mb": {"rss_before_load": rss_before, "rss_after_load": rss_loaded, "peak_rss": runtime.peak_rss_mb()},
        "env": environment(args.threads),
    }
    if profile:
        trace = runner.end_profiling()
        try:
            # Every call was profiled: the first, the warm-up and the timed ones.
            result["op_profile"] = op_profile(trace, 1 + args.warmup + args.runs)
        finally:
            os.remove(trace)
            os.rmdir(os.path.dirname(os.path.abspath(trace)))
    elif args.profile:
        result["op_profile_note"] = "per-operator profiles are only available for ONNX Runtime"
    result["agent_s"] = time.perf_counter() - t_start
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--artifact", required=True, help="artifact path as written in the manifest")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="per-operator profile (ONNX Runtime only)")
    p.add_argument("--timeout", type=float, default=0, help="give up (and say so) after this many seconds")
    args = p.parse_args(argv)
    if args.timeout > 0 and hasattr(signal, "SIGALRM"):
        # The host may lose its connection without the device noticing; never run on forever.
        def on_alarm(signum, frame):
            raise AgentError("timeout", "benchmark did not finish within %g s (%d runs requested)"
                             % (args.timeout, args.runs), EXIT_TIMEOUT)
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
    # Runtimes may print to stdout; keep the real stdout for our single JSON object.
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        result, code = bench(args), 0
    except AgentError as e:
        result, code = {"ok": False, "kind": e.kind, "error": str(e)}, e.code
    except Exception as e:  # report anything else as JSON too, so the host can show it
        result, code = {"ok": False, "kind": "error", "error": "%s: %s" % (type(e).__name__, e)}, EXIT_OTHER
    if hasattr(signal, "SIGALRM"):
        signal.setitimer(signal.ITIMER_REAL, 0)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
