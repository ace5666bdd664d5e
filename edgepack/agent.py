"""edgepack on-device agent: benchmark one deployed artifact and print one JSON object.

    python agent.py --manifest manifest.json --artifact model.int8.onnx --threads 4 --runs 100 --warmup 10
    python agent.py ... --eval-out /path/outputs.npz [--eval-only]

With --eval-out it also runs the build's evaluation subset (manifest.eval_subset, sha256-checked
like the artifact) through the artifact with this device's kernels and writes the outputs there
for the host to fetch and score.

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
EVAL_BATCH = 32  # the host runs its own copy of this agent with the same batches (devices/evaluate.py)
MAX_OUTPUT_BYTES = 64 << 20  # outputs travel back to the host: the subset is <= 256 samples


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


def _matched(names, by_name, ordered):
    """Per runner input, its manifest entry: by name when every name is there (ONNX), else by
    position (TFLite names its tensors serving_default_args_0:0, in the model's argument order)."""
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    return [ordered[i] if i < len(ordered) else None for i in range(len(names))]


def _nhwc(shape, dtype, layout):
    """The converter's rule: a 4-D float (image) input of an NHWC artifact is transposed."""
    image = len(shape) == 4 and str(dtype).startswith("float")
    return [shape[0], shape[2], shape[3], shape[1]] if layout == "NHWC" and image else list(shape)


def make_inputs(np, manifest, entry, runner):
    """Random inputs, one per model input, at the shapes the build validated and timed at. The
    model's own static dims win (a TFLite model is NHWC even when the manifest's inputs are NCHW);
    every symbolic dim ("batch", "h") takes the manifest's concrete size (manifest.inputs, batch
    first). A dim neither gives is an error: nothing is timed at a shape the user did not give."""
    rng = np.random.default_rng(0)
    specs = manifest.get("inputs") or []
    per_input = _matched(runner.input_names, {s.get("name"): s for s in specs}, specs)
    inputs = []
    for i, model_shape in enumerate(runner.input_shapes):
        spec = per_input[i] or {}
        given = _nhwc(spec.get("shape") or [], spec.get("dtype", "float32"), entry.get("layout"))
        shape = []
        for j, d in enumerate(model_shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif len(given) == len(model_shape) and isinstance(given[j], int) and given[j] > 0:
                shape.append(given[j])
            else:
                raise AgentError("shape", "input %s dimension %d is %r in %s and the manifest gives no concrete "
                                 "size for it (manifest inputs: %s); refusing to time at a guessed shape"
                                 % (runner.input_names[i], j, d, entry.get("path"), json.dumps(specs)),
                                 EXIT_OTHER)
        dtype = np.dtype(runner.input_dtypes[i])
        if dtype.kind == "f":
            a = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            a = rng.integers(0, 2, shape).astype(dtype)
        else:  # small values: token ids must stay inside any vocabulary (as runtime.random_inputs)
            a = rng.integers(0, 10, shape).astype(dtype)
        inputs.append(a)
    return inputs


def subset_path(manifest, build_dir):
    """The deployed evaluation subset, verified against its sha256 in the manifest."""
    subset = manifest.get("eval_subset")
    if not subset:
        raise AgentError("eval", "the manifest has no eval_subset: this build ships no evaluation data", EXIT_OTHER)
    rel = subset.get("path", "")
    if os.path.isabs(rel) or ".." in rel.split("/"):
        raise AgentError("integrity", "eval_subset path %r is not a plain relative path" % rel, EXIT_INTEGRITY)
    path = os.path.join(build_dir, rel)
    if not os.path.isfile(path):
        raise AgentError("integrity", "evaluation subset %s is missing from %s" % (rel, build_dir), EXIT_INTEGRITY)
    digest = sha256(path)
    if digest != subset.get("sha256"):
        raise AgentError("integrity", "evaluation subset %s has sha256 %s but the manifest says %s: the file on "
                         "the device was modified or corrupted; refusing to load it" % (rel, digest,
                                                                                      subset.get("sha256")),
                         EXIT_INTEGRITY)
    return path, subset


def _stale_outputs(folder, older_than_s=600):
    """Outputs of an earlier evaluation the host never fetched (it lost its connection)."""
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        try:
            if name.endswith(".npz") and time.time() - os.stat(full).st_mtime > older_than_s:
                os.remove(full)
        except OSError:
            pass


def evaluate(np, runtime, runner, manifest, entry, build_dir, out_path):
    """Run the evaluation subset through the artifact with this device's kernels and write every
    output to `out_path` (.npz: o0, o1, ... in the model's output order). Inputs come in PyTorch
    layout and argument order, in batches of EVAL_BATCH (a fixed-batch model gets its own)."""
    path, subset = subset_path(manifest, build_dir)
    t0 = time.perf_counter()
    with np.load(path, allow_pickle=False) as z:
        missing = [n for n in subset["inputs"] if n not in z.files]
        if missing:
            raise AgentError("eval", "evaluation subset lacks %s (it has %s)" % (missing, z.files), EXIT_OTHER)
        arrays = [z[n] for n in subset["inputs"]]
    layout = entry.get("layout")
    arrays = [np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if _nhwc(a.shape, a.dtype, layout) != list(a.shape)
              else a for a in arrays]
    xs = _matched(runner.input_names, dict(zip(subset["inputs"], arrays)), arrays)
    n = len(arrays[0])
    # A sample is one whole feed when its arrays carry the model's full rank (a fixed-shape model
    # whose axis 0 is not a batch); otherwise samples are stacked on axis 0.
    whole = len(xs[0].shape) == len(runner.input_shapes[0]) + 1
    step = 1 if whole else EVAL_BATCH
    parts = []
    for start in range(0, n, step):
        if whole:
            outs = [np.asarray(o)[None] for o in runner.run([x[start] for x in xs])]
        else:
            outs = runtime.run_batched(runner, [x[start:start + step] for x in xs], EVAL_BATCH)
        if not parts:
            projected = sum(o[:1].nbytes for o in outs) * n
            if projected > MAX_OUTPUT_BYTES:
                return {"skipped": "the outputs of %d samples would be %.1f MB, over the %d MB the host fetches"
                                   % (n, projected / 1e6, MAX_OUTPUT_BYTES >> 20), "samples": n}
        parts.append(outs)
    outputs = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    names = [o.get("name") for o in (entry.get("outputs") or manifest.get("outputs") or [])]
    if len(names) == len(outputs) and set(names) <= set(runner.output_names):
        outputs = [outputs[runner.output_names.index(n)] for n in names]  # by name: ONNX may reorder
    elif len(names) != len(outputs):
        names = list(runner.output_names)
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    _stale_outputs(folder)
    tmp = out_path + ".%d.tmp.npz" % os.getpid()
    np.savez(tmp, **{"o%d" % i: o for i, o in enumerate(outputs)})
    os.replace(tmp, out_path)
    return {"file": out_path, "bytes": os.path.getsize(out_path), "samples": n, "outputs": names,
            "shapes": [list(o.shape) for o in outputs], "subset_sha256": subset["sha256"],
            "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": runtime.peak_rss_mb()}


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
    if args.eval_out:
        subset_path(manifest, build_dir)  # refuse a tampered subset before running anything
    try:  # here, not at the top: a device without numpy or a runtime gets a JSON answer saying so
        import numpy as np
        import runtime
    except ImportError as e:
        raise AgentError("runtime", "cannot import %s on this device: %s" % (e.name, e), EXIT_RUNTIME)

    profile = args.profile and not args.eval_only and path.lower().endswith(".onnx")  # per-operator: ORT only
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
    result = {
        "ok": True,
        "artifact": args.artifact, "sha256": digest, "format": entry.get("format"),
        "precision": entry.get("precision"), "build": manifest.get("name"),
        "runtime": {"name": runner.backend, "version": runner.backend_version},
        "load_ms": load_ms, "env": environment(args.threads),
    }
    if not args.eval_only:
        inputs = make_inputs(np, manifest, entry, runner)
        latency = runtime.time_runs(runner, inputs, warmup=args.warmup, runs=args.runs)
        result.update({
            "first_ms": latency.pop("first_ms"), "latency_ms": latency,
            "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in inputs],
            # Taken before the evaluation: its batches of real samples are not the timed workload.
            "memory_mb": {"rss_before_load": rss_before, "rss_after_load": rss_loaded,
                          "peak_rss": runtime.peak_rss_mb()},
        })
    if profile:
        trace = runner.end_profiling()
        try:
            # Every call was profiled: the first, the warm-up and the timed ones.
            result["op_profile"] = op_profile(trace, 1 + args.warmup + args.runs)
        finally:
            os.remove(trace)
            os.rmdir(os.path.dirname(os.path.abspath(trace)))
    elif args.profile and not args.eval_only:
        result["op_profile_note"] = "per-operator profiles are only available for ONNX Runtime"
    if args.eval_out:
        try:
            result["eval"] = evaluate(np, runtime, runner, manifest, entry, build_dir, args.eval_out)
        except OSError as e:  # a full disk must not cost the benchmark that already ran
            result["eval"] = {"skipped": "cannot write the outputs to %s: %s" % (args.eval_out, e)}
    if args.eval_only:  # what else runs here (importing a runtime costs time: not while benchmarking)
        result["runtimes"] = runtime.available_runtimes()
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
    p.add_argument("--eval-out", help="run the manifest's eval_subset through the artifact; outputs to this .npz")
    p.add_argument("--eval-only", action="store_true", help="with --eval-out: evaluate, do not time")
    args = p.parse_args(argv)
    if args.eval_only and not args.eval_out:
        p.error("--eval-only needs --eval-out")
    if args.eval_out:
        args.eval_out = os.path.abspath(args.eval_out)  # --profile changes the working directory
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
