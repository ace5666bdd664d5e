"""Run ONNX and TFLite models the same way: arrays in, arrays out, a thread count.

This file is self-contained on purpose (numpy plus whichever runtime is installed): it is
copied next to the on-device agent, which must not import edgepack. Keep it that way.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np


class RuntimeMissing(RuntimeError):
    pass


class Runner:
    """A loaded model. `run(list_of_arrays) -> list_of_arrays` in the model's own input order."""

    format: str
    backend: str
    backend_version: str
    input_names: list[str]
    input_shapes: list[list]
    input_dtypes: list[str]
    output_names: list[str]

    def run(self, inputs):
        raise NotImplementedError

    def __call__(self, *inputs):
        return self.run(list(inputs))


class OnnxRunner(Runner):
    format = "onnx"

    def __init__(self, path, threads: int = 1, profile: bool = False):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the device
            raise RuntimeMissing("onnxruntime is not installed (pip install onnxruntime)") from e
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads made 2 threads slower than 1 on loaded machines (FACTS.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        if profile:
            so.enable_profiling = True
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.backend, self.backend_version = "onnxruntime", ort.__version__
        ins = self.session.get_inputs()
        self.input_names = [i.name for i in ins]
        self.input_shapes = [list(i.shape) for i in ins]
        self.input_dtypes = [_ort_type(i.type) for i in ins]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs):
        feed = {n: np.asarray(a, dtype=d) for n, a, d in zip(self.input_names, inputs, self.input_dtypes)}
        return self.session.run(None, feed)

    def end_profiling(self) -> str | None:
        return self.session.end_profiling()


def _ort_type(t: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
            "tensor(bool)": "bool"}.get(t, t)


def _tflite_interpreter_class():
    """ai-edge-litert first (numpy 2); tflite_runtime for older images that only have it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        import ai_edge_litert
        return Interpreter, "ai-edge-litert", getattr(ai_edge_litert, "__version__", "unknown")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        import tflite_runtime
        return Interpreter, "tflite-runtime", getattr(tflite_runtime, "__version__", "unknown")
    except ImportError as e:
        raise RuntimeMissing(
            "no TFLite runtime: pip install ai-edge-litert (or tflite-runtime on numpy<2 systems)") from e


_SIGNATURE_NAME = re.compile(r"(?:args|output)_(\d+)$")


def _signature_order(interpreter, details, kind):
    """litert-torch's signature names inputs args_0.. and outputs output_0.. in PyTorch order;
    get_*_details() follow the subgraph's order, which may differ. Unchanged without a signature."""
    try:
        sigs = interpreter._get_full_signature_list()  # {key: {"inputs": {name: tensor}, "outputs": {...}}}
    except Exception:
        return details
    if len(sigs) != 1:
        return details
    named = next(iter(sigs.values())).get(kind, {})
    keyed = sorted((int(m.group(1)), t) for n, t in named.items() if (m := _SIGNATURE_NAME.match(n)))
    by_index = {d["index"]: d for d in details}
    if [k for k, _ in keyed] != list(range(len(details))) or any(t not in by_index for _, t in keyed):
        return details
    return [by_index[t] for _, t in keyed]


class TFLiteRunner(Runner):
    format = "tflite"

    def __init__(self, path, threads: int = 1, profile: bool = False):
        Interpreter, self.backend, self.backend_version = _tflite_interpreter_class()
        self.interpreter = Interpreter(model_path=str(path), num_threads=int(threads))
        self.interpreter.allocate_tensors()
        self._in = _signature_order(self.interpreter, self.interpreter.get_input_details(), "inputs")
        self._out = _signature_order(self.interpreter, self.interpreter.get_output_details(), "outputs")
        self.input_names = [d["name"] for d in self._in]
        self.input_shapes = [list(int(s) for s in d["shape"]) for d in self._in]
        self.input_dtypes = [np.dtype(d["dtype"]).name for d in self._in]
        self.output_names = [d["name"] for d in self._out]

    def run(self, inputs):
        for d, a in zip(self._in, inputs):
            a = np.asarray(a)
            scale, zero = d.get("quantization", (0.0, 0))
            if np.issubdtype(d["dtype"], np.integer) and scale and a.dtype.kind == "f":
                # Integer-input model fed with float data: quantize with the tensor's own params.
                info = np.iinfo(d["dtype"])
                a = np.clip(np.round(a / scale + zero), info.min, info.max)
            elif np.issubdtype(d["dtype"], np.integer) and a.dtype.kind in "iu" and a.size:
                info = np.iinfo(d["dtype"])  # int64 token ids into an int32 input must not wrap
                if a.min() < info.min or a.max() > info.max:
                    raise ValueError(f"input {d['name']}: values {a.min()}..{a.max()} do not fit {np.dtype(d['dtype']).name}")
            self.interpreter.set_tensor(d["index"], np.ascontiguousarray(a, dtype=d["dtype"]))
        self.interpreter.invoke()
        outs = []
        for d in self._out:
            o = self.interpreter.get_tensor(d["index"]).copy()
            scale, zero = d.get("quantization", (0.0, 0))
            if np.issubdtype(d["dtype"], np.integer) and scale:
                o = (o.astype(np.float32) - zero) * scale
            outs.append(o)
        return outs


def open_model(path, threads: int = 1, profile: bool = False) -> Runner:
    """Open a `.onnx` or `.tflite` file with the matching runtime."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxRunner(path, threads, profile)
    if suffix == ".tflite":
        return TFLiteRunner(path, threads, profile)
    raise ValueError(f"{path}: unknown model format {suffix!r} (expected .onnx or .tflite)")


def available_runtimes() -> dict:
    """Which runtimes import here, with versions: used by device checks and the agent."""
    found = {}
    try:
        import onnxruntime
        found["onnxruntime"] = onnxruntime.__version__
    except Exception:
        pass
    try:
        _, name, version = _tflite_interpreter_class()
        found[name] = version
    except Exception:
        pass
    found["numpy"] = np.__version__
    found["cpu_count"] = os.cpu_count()
    return found


def fixed_batch(runner: Runner) -> int | None:
    """The batch size the model insists on (TFLite, or an ONNX file exported without dynamic axes)."""
    dims = runner.input_shapes[0] if runner.input_shapes else []
    return int(dims[0]) if dims and isinstance(dims[0], (int, np.integer)) and dims[0] > 0 else None


def run_batched(runner: Runner, inputs, batch_size: int = 32) -> list:
    """Run whole arrays (N, ...) through a model in batches; a fixed-batch model gets its own batch
    size, with the ragged tail padded by repeating the last sample and the padding dropped."""
    inputs = [np.asarray(x) for x in inputs]
    n = len(inputs[0])
    step = fixed_batch(runner) or batch_size
    outs = None
    for start in range(0, n, step):
        chunk = [x[start:start + step] for x in inputs]
        real = len(chunk[0])
        if real < step and fixed_batch(runner):
            chunk = [np.concatenate([c, np.repeat(c[-1:], step - real, 0)]) for c in chunk]
        ys = runner.run(chunk)
        outs = outs or [[] for _ in ys]
        for acc, y in zip(outs, ys):
            acc.append(np.asarray(y)[:real])
    return [np.concatenate(acc) for acc in outs]


def time_runs(runner: Runner, inputs, warmup: int = 10, runs: int = 50) -> dict:
    """Latency statistics in milliseconds: first run, then warm-up, then `runs` timed calls."""
    import time
    t0 = time.perf_counter()
    runner.run(inputs)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        runner.run(inputs)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        runner.run(inputs)
        times[i] = time.perf_counter() - t0
    times *= 1e3
    return {
        "first_ms": first,
        "min": float(times.min()), "p50": float(np.percentile(times, 50)),
        "p90": float(np.percentile(times, 90)), "p99": float(np.percentile(times, 99)),
        "max": float(times.max()), "mean": float(times.mean()), "std": float(times.std()),
        "runs": int(runs), "warmup": int(warmup),
        "throughput_per_s": float(1e3 / times.mean()),
        "samples_ms": [round(float(t), 4) for t in times],  # every timed run, for distributions
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def random_inputs(runner: Runner, seed: int = 0, shapes=None) -> list:
    """Inputs for timing runs. The model's static dims are kept; every dynamic dim must come from
    `shapes` (a list in input order, or a dict by input name): nothing is timed at a shape nobody
    gave. Without `shapes`, a dynamic batch axis alone becomes 1."""
    rng = np.random.default_rng(seed)
    arrays = []
    for i, (model_shape, dtype) in enumerate(zip(runner.input_shapes, runner.input_dtypes)):
        given = None
        if isinstance(shapes, dict):
            given = shapes.get(runner.input_names[i])
        elif shapes is not None and i < len(shapes):
            given = shapes[i]
        shape = []
        for j, d in enumerate(model_shape):
            if isinstance(d, (int, np.integer)) and d > 0:
                shape.append(int(d))
            elif given is not None and len(given) == len(model_shape):
                shape.append(int(given[j]))
            elif j == 0:
                shape.append(1)
            else:
                raise ValueError(f"input {runner.input_names[i]} has dynamic dimension {j} ({d!r}); "
                                 f"give its shape to time it")
        kind = np.dtype(dtype).kind
        if kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif kind == "b":
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 10, shape).astype(dtype))
    return arrays


def measure_file(path, threads: int = 1, warmup: int = 10, runs: int = 50, shapes=None) -> dict:
    """Load time, first run, latency statistics and peak memory of one model in this process,
    at `shapes` (see random_inputs); the result records the shapes it was timed at."""
    import time
    base = peak_rss_mb()
    t0 = time.perf_counter()
    runner = open_model(path, threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    inputs = random_inputs(runner, shapes=shapes)
    stats = time_runs(runner, inputs, warmup, runs)
    return {"load_ms": load_ms, "latency_ms": stats, "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": base, "threads": threads, "backend": runner.backend,
            "backend_version": runner.backend_version,
            "input_shapes": {n: list(a.shape) for n, a in zip(runner.input_names, inputs)}}


if __name__ == "__main__":  # python runtime.py MODEL [threads warmup runs] -> one JSON line
    import json
    import sys
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python runtime.py MODEL [threads] [warmup] [runs] [SHAPES_JSON]")
    nums = [int(a) for a in args[1:4]] + [1, 10, 50][len(args[1:4]):]
    shapes = json.loads(args[4]) if len(args) > 4 else None
    print(json.dumps(measure_file(args[0], *nums, shapes=shapes)))
