"""Run code on the emulated device, and compare an artifact's aarch64 outputs with x86 ones (through
the on-device agent's evaluation, the same code `edgepack bench` runs on every device)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import EdgepackError
from ..hashing import sha256_file
from .prepare import EmulatorEnv, find_emulator, prepare_emulator
from .wrappers import find_qemu

# The on-device agent and the modules it imports beside it (the emulated interpreter has no edgepack).
_AGENT_FILES = [Path(__file__).resolve().parent.parent / name for name in ("agent.py", "runtime.py", "cpuinfo.py")]


def _resolve(emulator: EmulatorEnv | None, kind: str, prepare: bool, progress=None) -> EmulatorEnv:
    if emulator is not None:
        return emulator
    env = find_emulator(kind)
    if env is None:
        if not prepare:
            raise EdgepackError(f"the emulated {kind!r} device is not prepared",
                                f"edgepack devices emulate {kind}   (or prepare_emulator({kind!r}))")
        env = prepare_emulator(kind, progress=progress)
    return env


def run_emulated(args: list[str], *, kind: str = "rpi", emulator: EmulatorEnv | None = None,
                 prepare: bool = False, cwd: str | os.PathLike | None = None, env: dict | None = None,
                 input: str | bytes | None = None, timeout: float | None = None,
                 capture_output: bool = True, text: bool = True, check: bool = False,
                 qemu: str | None = None) -> subprocess.CompletedProcess:
    """Run the emulated aarch64 `python3 *args` (e.g. ["-c", CODE] or ["script.py", ...]).

    Returns the CompletedProcess (returncode, stdout, stderr as text by default). With
    check=True a non-zero exit raises EdgepackError carrying the stderr tail. `prepare=True`
    prepares the environment when it is missing (minutes, downloads); otherwise a missing
    environment raises EdgepackError with the command that prepares it. `qemu` names another
    qemu binary (also settable with $EDGEPACK_QEMU); a missing one raises EdgepackError.
    """
    qemu_path = find_qemu(qemu)
    em = _resolve(emulator, kind, prepare)
    full_env = dict(os.environ if env is None else env)
    full_env["EDGEPACK_QEMU"] = qemu_path
    try:
        p = subprocess.run([str(em.python), *map(str, args)], cwd=cwd, env=full_env, input=input,
                           timeout=timeout, capture_output=capture_output, text=text)
    except subprocess.TimeoutExpired as e:
        raise EdgepackError(f"emulated python {' '.join(map(str, args))[:120]} timed out after "
                            f"{timeout} s", "emulation is 10-50x slower than native: use fewer "
                            "samples or a longer timeout") from e
    if check and p.returncode != 0:
        err = p.stderr if isinstance(p.stderr, str) else (p.stderr or b"").decode(errors="replace")
        tail = "\n".join((err or "").strip().splitlines()[-15:])
        raise EdgepackError(f"emulated python exited with {p.returncode}:\n{tail}")
    return p


def _as_list(a) -> list[np.ndarray]:
    if isinstance(a, np.ndarray):
        return [a]
    return [np.asarray(x) for x in a]


def compare_on_emulator(artifact_path: str | os.PathLike, inputs, x86_outputs, *, kind: str = "rpi",
                        threads: int = 1, limit: int | None = None,
                        emulator: EmulatorEnv | None = None, prepare: bool = False,
                        timeout: float | None = 1800) -> dict:
    """Run `artifact_path` (.onnx or .tflite) on the emulated aarch64 runtime over `inputs`
    (an (N, ...) array, or a list of them for multi-input models) and compare with
    `x86_outputs` (the first output, (N, ...), or a list matching the model's outputs).

    Returns {"artifact", "format", "samples", "top1_agreement" (0..1, argmax over the last axis
    of the first output), "max_abs_diff", "mean_abs_diff", "outputs_shape", "machine"
    (platform.machine() inside: "aarch64"), "python", "backend", "backend_version",
    "runtimes" (aarch64 runtime versions), "cpu" (the emulated board), "int8_flags" (its int8
    ISA extensions, edgepack.cpuinfo.INT8_FLAGS), "qemu_cpu", "emulated": True,
    "emulated_seconds"}. Raises EdgepackError when the artifact cannot be run there.
    """
    em = _resolve(emulator, kind, prepare)
    artifact = Path(artifact_path).resolve()
    if not artifact.is_file():
        raise EdgepackError(f"artifact {artifact} not found")
    fmt = artifact.suffix.lower().lstrip(".")
    if fmt not in ("onnx", "tflite"):
        raise EdgepackError(f"{artifact}: unknown model format (expected .onnx or .tflite)")
    xs = _as_list(inputs)
    refs = _as_list(x86_outputs)
    n = xs[0].shape[0]
    if limit is not None and limit < n:
        xs = [x[:limit] for x in xs]
        refs = [r[:limit] for r in refs]
        n = limit
    if refs[0].shape[0] != n:
        raise EdgepackError(f"x86_outputs has {refs[0].shape[0]} samples but inputs have {n}")
    work = Path(tempfile.mkdtemp(prefix="edgepack-emu-compare-"))
    try:
        # A one-artifact deployment, run by the on-device agent exactly as `edgepack bench` runs
        # a deployed build's evaluation subset: one evaluation path for devices and this helper.
        for sibling in _AGENT_FILES:
            shutil.copy(sibling, work / sibling.name)
        model = work / f"model.{fmt}"
        shutil.copy(artifact, model)
        (work / "eval").mkdir()
        names = [f"input{i}" for i in range(len(xs))]
        np.savez(work / "eval" / "subset.npz", **{k: np.ascontiguousarray(x) for k, x in zip(names, xs)})
        digest = sha256_file(model)
        (work / "manifest.json").write_text(json.dumps({
            "name": "compare", "inputs": [], "outputs": [],
            "artifacts": [{"path": model.name, "format": fmt, "sha256": digest, "layout": None}],
            "eval_subset": {"path": "eval/subset.npz", "sha256": sha256_file(work / "eval" / "subset.npz"),
                            "inputs": names, "samples": n, "labelled": False}}))
        t0 = time.perf_counter()
        p = run_emulated([str(work / "agent.py"), "--manifest", str(work / "manifest.json"), "--artifact", model.name,
                          "--threads", str(threads), "--eval-only", "--eval-out", str(work / "out" / "outputs.npz")],
                         emulator=em, cwd=work, timeout=timeout)
        seconds = time.perf_counter() - t0
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        info = json.loads(lines[-1]) if lines else {"ok": False, "error": ""}
        if p.returncode != 0 or not info.get("ok"):
            tail = "\n".join([info.get("error") or ""] + p.stderr.strip().splitlines()[-15:]).strip()
            raise EdgepackError(f"{artifact.name} failed on the emulated aarch64 {fmt} runtime "
                                f"(exit {p.returncode}):\n{tail}",
                                "the model may use an op the aarch64 runtime lacks; run "
                                "`edgepack devices emulate rpi --rebuild` if the environment is damaged")
        if "skipped" in info["eval"]:
            raise EdgepackError(f"{artifact.name} was not evaluated on the emulator: {info['eval']['skipped']}")
        with np.load(info["eval"]["file"], allow_pickle=False) as z:
            outs = [z[f"o{i}"] for i in range(len(info["eval"]["outputs"]))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a = outs[0].astype(np.float64).reshape(n, -1)
    b = refs[0].astype(np.float64).reshape(n, -1)
    if a.shape != b.shape:
        raise EdgepackError(f"output shape differs: aarch64 {outs[0].shape} vs x86 {refs[0].shape}")
    diffs = [float(np.max(np.abs(o.astype(np.float64).reshape(-1) - r.astype(np.float64).reshape(-1))))
             for o, r in zip(outs, refs) if o.size == r.size]
    return {
        "artifact": str(artifact), "format": fmt, "samples": int(n),
        "top1_agreement": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
        "max_abs_diff": max(diffs) if diffs else float("nan"),
        "mean_abs_diff": float(np.mean(np.abs(a - b))),
        "outputs_shape": list(outs[0].shape),
        "machine": info["env"]["machine"], "python": info["env"]["python"],
        "backend": info["runtime"]["name"], "backend_version": info["runtime"]["version"],
        "runtimes": info["runtimes"], "cpu": info["env"]["cpu_model"] or "", "int8_flags": info["env"]["int8_flags"],
        "qemu_cpu": em.qemu_cpu,
        "kind": em.kind, "threads": threads, "emulated": True,
        "emulated_seconds": round(seconds, 2),
    }
