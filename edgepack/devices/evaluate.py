"""Accuracy on the device: the build's evaluation subset (manifest.eval_subset) run through an
artifact with the device's own kernels, its outputs fetched back and scored here beside this
machine's figure for the same artifact on the same samples.

Both sets of outputs come from the same code: the agent (`agent.py --eval-out`) on the device,
and the same agent run here with this machine's Python on the build directory itself. What
differs is the kernels, which is what this measures.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from ..errors import EdgepackError
from ..manifest import MANIFEST, Artifact, Manifest
from ..names import plain_name
from ..quality import drop, measure
from .deploy import AGENT_FILES, device_op
from .device_ops import EVAL_OUTPUTS
from .errors import DeviceError
from .transport import Transport

# The agent refuses to write more than 64 MB of outputs (agent.MAX_OUTPUT_BYTES); npz adds headers.
MAX_FETCH_BYTES = (64 << 20) + (1 << 20)
# When are a device's outputs "not the host's"? Measured here, ARM (aarch64 under qemu: ORT 1.32
# QDQ S8S8 and LiteRT XNNPACK) vs x86 on the embedded example and the test CNN: int8 outputs are
# bit-identical (max abs diff 0, top-1 agreement 100%), fp32 ones within 6e-8. Legitimate
# differences exist elsewhere: kernels that requantize the int32 accumulator with fixed-point vs
# float arithmetic, or AVX2's saturating u8*s8 pair sums, move a value by a quantization step,
# and a step moved early can grow by a few steps through the layers. One step of an int8 output
# is about 1/128 of its largest magnitude (0.8%), so 5% of the largest |output| is about 6 steps:
# more than rounding explains, while a broken kernel, a wrong layout or a miscompiled runtime
# moves outputs by tens of percent and flips decisions. A decision may flip for a sample on a
# class boundary: 1 in 100 is allowed.
MIN_TOP1_AGREEMENT = 99.0  # percent, device vs host, same artifact
MAX_RELATIVE_DIFF = 0.05  # max abs diff / max |host output|, worst output
HOST_THREADS = 1  # the host's figure is a reference: one deterministic thread


def remote_outputs(dep: dict, manifest: Manifest, artifact: str) -> str:
    """Where the agent writes its outputs on the device: a unique file under the workdir."""
    name = plain_name(f"{manifest.name}-{artifact}")
    return f"{dep['workdir']}/{EVAL_OUTPUTS}/{name}-{uuid.uuid4().hex[:12]}.npz"


def agent_argv(t: Transport, dep: dict, artifact: str, threads: int, out: str, timeout_s: float | None) -> list[str]:
    """The agent evaluating (not timing) one deployed artifact."""
    argv = t.python(f"{dep['path']}/agent.py", "--manifest", f"{dep['path']}/{MANIFEST}", "--artifact", artifact,
                    "--threads", str(threads), "--eval-only", "--eval-out", out)
    return argv + (["--timeout", str(timeout_s)] if timeout_s else [])


def fetch(t: Transport, info: dict) -> list[np.ndarray]:
    """The outputs the agent wrote (its `eval` answer), copied here; the device's copy removed."""
    remote = info["file"]
    try:
        if info.get("bytes", 0) > MAX_FETCH_BYTES:
            raise DeviceError(f"device {t.device.name}: evaluation outputs {remote} are {info['bytes'] / 1e6:.1f} MB, "
                              f"more than the {MAX_FETCH_BYTES >> 20} MB edgepack fetches",
                              "ship fewer evaluation samples (device_eval_samples in the build config)")
        with tempfile.TemporaryDirectory(prefix="edgepack-eval-") as d:
            local = Path(d) / "outputs.npz"
            t.get(remote, local)
            with np.load(local, allow_pickle=False) as z:
                outs = [z[f"o{i}"] for i in range(len(info["outputs"]))]
    finally:
        try:
            device_op(t, "discard", {"path": remote})
        except DeviceError:
            pass  # a dead connection: the agent removes outputs left for 10 minutes
    if any(len(o) != info["samples"] for o in outs):
        raise DeviceError(f"device {t.device.name}: evaluation outputs {remote} do not hold {info['samples']} samples",
                          "run the bench again; check the device's storage")
    return outs


_HOST: dict[tuple, tuple[list[np.ndarray], dict]] = {}  # (build, artifact sha, subset sha) -> outputs
_HOST_LOCKS: dict[tuple, threading.Lock] = {}
_GUARD = threading.Lock()
_KEEP = 4  # bounded: each holds at most 64 MB


def host_outputs(build_dir: Path, manifest: Manifest, artifact: Artifact) -> tuple[list[np.ndarray], dict]:
    """This machine's outputs of `artifact` on the evaluation subset, by the same agent code the
    device runs (once per build, artifact and subset: a fleet shares them). Raises EdgepackError
    when this machine cannot run it (e.g. no TFLite runtime here)."""
    key = (str(Path(build_dir).resolve()), artifact.sha256, manifest.eval_subset.sha256)
    with _GUARD:
        lock = _HOST_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key in _HOST:
            return _HOST[key]
        with tempfile.TemporaryDirectory(prefix="edgepack-host-eval-") as d:
            out = Path(d) / EVAL_OUTPUTS / "outputs.npz"
            p = subprocess.run([sys.executable, str(AGENT_FILES["agent.py"]), "--manifest",
                                str(Path(build_dir) / MANIFEST), "--artifact", artifact.path,
                                "--threads", str(HOST_THREADS), "--eval-only", "--eval-out", str(out)],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
            lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
            answer = json.loads(lines[-1]) if lines else {"ok": False, "error": p.stderr.strip()[-500:]}
            if not answer.get("ok"):
                raise EdgepackError(f"this machine cannot evaluate {artifact.path}: {answer.get('error')}",
                                    "install its runtime here (onnxruntime / ai-edge-litert) to compare with the device")
            info = answer["eval"]
            if "skipped" in info:
                raise EdgepackError(f"evaluation of {artifact.path} here was skipped: {info['skipped']}")
            with np.load(out, allow_pickle=False) as z:
                outs = [z[f"o{i}"] for i in range(len(info["outputs"]))]
        with _GUARD:
            while len(_HOST) >= _KEEP:
                _HOST.pop(next(iter(_HOST)))
            _HOST[key] = (outs, answer)
        return outs, answer


def reference_artifact(manifest: Manifest, artifact: Artifact) -> list[Artifact]:
    """Float artifacts to judge `artifact` against, best first: the fp32 file of its own format
    (what the build judges with), then any other fp32 (the same float model, another runtime)."""
    fp32 = [a for a in manifest.artifacts if a.precision == "fp32"]
    return sorted(fp32, key=lambda a: a.format != artifact.format)


def labels(build_dir: Path, manifest: Manifest) -> np.ndarray | None:
    subset = manifest.eval_subset
    if not subset.labelled:
        return None
    with np.load(Path(build_dir) / subset.path, allow_pickle=False) as z:
        return z["y"] if "y" in z.files else None


def _figures(q: dict) -> dict:
    keep = ("accuracy", "metric", "agreement", "sqnr_db", "max_abs_diff")
    return {k: (round(v, 6) if isinstance(v, float) and np.isfinite(v) else v) for k, v in q.items() if k in keep}


def vs_host(device: list[np.ndarray], host: list[np.ndarray], names: list[str]) -> dict:
    """How far the device's outputs are from this machine's for the same artifact and samples."""
    q = measure(device, names, None, host)
    rel = 0.0
    for d, h in zip(device, host):
        scale = float(np.max(np.abs(h.astype(np.float64)))) if h.size else 0.0
        diff = float(np.max(np.abs(d.astype(np.float64) - h.astype(np.float64)))) if h.size else 0.0
        rel = max(rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    agreement = q.get("agreement")
    why = []
    if agreement is not None and agreement < MIN_TOP1_AGREEMENT:
        why.append(f"top-1 agreement {agreement:.2f}% < {MIN_TOP1_AGREEMENT:g}%")
    if rel > MAX_RELATIVE_DIFF:
        why.append(f"max abs diff {q['max_abs_diff']:.4g} is {100 * rel:.1f}% of the largest output "
                   f"(> {100 * MAX_RELATIVE_DIFF:g}%)")
    return {"top1_agreement": agreement, "max_abs_diff": q["max_abs_diff"], "relative_max_abs_diff": round(rel, 6),
            "sqnr_db": q["sqnr_db"], "consistent": not why, "why": "; ".join(why) or None}


def score(build_dir: Path, manifest: Manifest, artifact: Artifact, info: dict, device_outs: list[np.ndarray],
          metric=None, timed: bool = True) -> dict:
    """The device's figure, this machine's figure for the same artifact and samples, the drop
    against the host's fp32 figure on them (what `max_accuracy_drop` judges on the device), and
    how close the two sets of outputs are."""
    names = info["outputs"]
    y = labels(build_dir, manifest)
    host, _ = host_outputs(build_dir, manifest, artifact)
    if [h.shape for h in host] != [d.shape for d in device_outs]:
        raise EdgepackError(f"{artifact.path}: device outputs {[list(d.shape) for d in device_outs]} differ in "
                            f"shape from this machine's {[list(h.shape) for h in host]}")
    ref, ref_path, notes = None, None, []
    for cand in reference_artifact(manifest, artifact):
        try:
            ref, ref_path = host_outputs(build_dir, manifest, cand)[0], cand.path
            break
        except EdgepackError as e:
            notes.append(e.message)
    dev_q = measure(device_outs, names, y, ref, metric)
    host_q = measure(host, names, y, ref, metric)
    ref_q = measure(ref, names, y, None, metric) if ref is not None else {}
    value, unit = drop(ref_q, dev_q) if ref is not None else (None, "not measurable: no fp32 artifact ran here")
    host_value, _ = drop(ref_q, host_q) if ref is not None else (None, None)
    return {
        "artifact": artifact.path, "format": artifact.format, "precision": artifact.precision,
        "timed": timed, "samples": info["samples"], "labelled": y is not None,
        "metric": metric[0] if metric else None, "reference": ref_path,
        "device": _figures(dev_q), "host": _figures(host_q), "reference_figures": _figures(ref_q),
        "drop": None if value is None else round(value, 4), "host_drop": None if host_value is None else round(host_value, 4),
        "drop_unit": unit, "vs_host": vs_host(device_outs, host, names), "seconds": info.get("seconds"),
        "notes": notes,
    }
