"""Deploy a build directory to a device: check, upload only what changed, verify, swap.

On the device: `<workdir>/<build name>/` holds the artifacts, manifest.json, agent.py and the
two modules it imports beside it, runtime.py and cpuinfo.py. It is a symlink to a complete,
verified release that is swapped in one rename, so an interrupted deploy leaves the previous
deployment exactly as it was (see device_ops.py).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from ..cpuinfo import parse_cpuinfo
from ..manifest import MANIFEST, Manifest, read_manifest, sha256_file
from ..names import PLAIN_NAME_RULE, is_plain_name
from . import device_ops
from .errors import DeviceError, DeviceUnreachable
from .inventory import Device, get_device
from .transport import Transport, connect

_PACKAGE = Path(__file__).resolve().parent.parent
# The agent and the standard-library-only modules it imports as siblings (never edgepack itself).
AGENT_FILES = {name: _PACKAGE / name for name in ("agent.py", "runtime.py", "cpuinfo.py")}
_OPS_SOURCE = Path(device_ops.__file__).read_text()
DISK_MARGIN = 64 * 1024  # directory entries, the symlink, filesystem rounding
# Read on the device by the probe (an emulated Pi's sysroot carries its own, which qemu serves).
CPUINFO_PATH = "/proc/cpuinfo"

# What must import on the device to run an artifact format, and how to install it there.
RUNTIME_MODULES = {
    "onnx": [["numpy"], ["onnxruntime"]],
    "tflite": [["numpy"], ["ai_edge_litert.interpreter", "tflite_runtime.interpreter"]],
}
INSTALL = {"numpy": "numpy", "onnxruntime": "onnxruntime",
           "ai_edge_litert.interpreter": "ai-edge-litert  (numpy 2; or tflite-runtime on numpy<2 images)",
           "tflite_runtime.interpreter": "tflite-runtime"}
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv7": "armv7l", "armhf": "armv7l"}

Progress = Callable[[str], None]


def device_op(t: Transport, op: str, args: dict, timeout: float | None = 300) -> dict:
    """Run one device_ops operation with the device's python and return its JSON answer."""
    r = t.run(t.python("-c", _OPS_SOURCE, op, json.dumps(args)), timeout=timeout)
    dev = t.device
    if r.rc == 127 or "No such file or directory" in r.stderr and not r.stdout.strip():
        raise DeviceError(f"device {dev.name}: python {dev.python_cmd!r} was not found on the device "
                          f"({r.stderr.strip()[-200:]})",
                          f"install python3 there, or set python = \"/path/to/python3\" in {dev.source}")
    try:
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeviceError(f"device {dev.name}: `{op}` with {dev.python_cmd} failed (exit {r.rc}): "
                          f"{(r.stderr or r.stdout).strip()[-500:]}",
                          "the device's python must be Python 3.8 or newer") from None
    if r.rc != 0 or answer.get("ok") is False and "error" in answer:
        raise DeviceError(f"device {dev.name}: `{op}` failed on the device: {answer.get('error', answer)}",
                          "check the workdir's permissions and free space on the device")
    return answer


def normalize_arch(machine: str) -> str:
    return _ARCH_ALIASES.get(machine.lower(), machine.lower())


def required_modules(formats: set[str]) -> list[list[str]]:
    """Alternatives per requirement: each inner list needs one importable module."""
    reqs: list[list[str]] = []
    for fmt in sorted(formats):
        for alt in RUNTIME_MODULES.get(fmt, []):
            if alt not in reqs:
                reqs.append(alt)
    return reqs


def probe(t: Transport, formats: set[str] | None = None) -> dict:
    formats = formats if formats is not None else set(RUNTIME_MODULES)
    modules = sorted({m for alt in required_modules(formats) for m in alt})
    # Importing a runtime under emulation takes a while; allow for it.
    info = device_op(t, "probe", {"workdir": t.device.workdir, "modules": modules, "cpuinfo_path": CPUINFO_PATH},
                     timeout=600)
    info.update(cpu_of(info))
    return info


def cpu_of(info: dict) -> dict:
    """{"cpu_model", "cpu_core", "int8_flags"} (the agent's names) from a probe's cpuinfo text,
    parsed here with the agent's parser (edgepack.cpuinfo). `int8_flags` is None when the device has no cpuinfo (or an older probe
    sent none): unknown, which is not the same as "no int8 flags"."""
    text = info.get("cpuinfo")
    if not text:
        return {"cpu_model": None, "cpu_core": None, "int8_flags": None}
    parsed = parse_cpuinfo(text, info.get("machine") or None)
    known = bool(parsed["flags"])
    return {"cpu_model": parsed["model"], "cpu_core": parsed["core"],
            "int8_flags": parsed["int8_flags"] if known else None}


def problems(device: Device, info: dict, formats: set[str]) -> list[tuple[str, str]]:
    """(problem, how to fix) pairs found by a probe: wrong arch, missing runtime modules."""
    found = []
    want = device.profile().arch
    got = normalize_arch(info["machine"])
    if got != want:
        found.append((f"architecture is {info['machine']} but target {device.target!r} is {want}",
                      f"set target in {device.source} to a profile with arch = \"{got}\" (this device is {got})"))
    py = device.python_cmd
    for alt in required_modules(formats):
        if not any(info["modules"].get(m, {}).get("ok") for m in alt):
            errs = "; ".join(f"{m}: {info['modules'].get(m, {}).get('error', 'not checked')}" for m in alt)
            pkg = INSTALL[alt[0]]
            found.append((f"{' or '.join(alt)} cannot be imported by {py} ({errs})",
                          f"on the device run: {py} -m pip install {pkg}"))
    if not info.get("writable", True):
        found.append((f"workdir {info['workdir']} is not writable", f"fix workdir in {device.source}"))
    return found


def _raise_problems(device: Device, found: list[tuple[str, str]]) -> None:
    if found:
        msg = "\n".join(f"  - {p}" for p, _ in found)
        hint = "; ".join(h for _, h in found)
        raise DeviceError(f"device {device.name} ({device.where()}) cannot run this build:\n{msg}", hint)


def local_files(build_dir: Path, manifest: Manifest) -> dict[str, dict]:
    """Everything to deploy: rel path -> {source (Path or bytes), sha256, size}."""
    files: dict[str, dict] = {}
    # The evaluation subset travels and is verified like an artifact (the agent checks it again).
    shipped = [(a.path, a.sha256, "artifact") for a in manifest.artifacts]
    if manifest.eval_subset is not None:
        shipped.append((manifest.eval_subset.path, manifest.eval_subset.sha256, "evaluation subset"))
    for path, sha, what in shipped:
        rel = Path(path)
        if rel.is_absolute() or ".." in rel.parts or path in (MANIFEST, *AGENT_FILES):
            # Deploy writes these paths under the device's workdir: never outside it, never over ours.
            raise DeviceError(f"{what} path {path!r} in {build_dir / MANIFEST} is not a plain relative path",
                              "rebuild with `edgepack build`")
        src = build_dir / path
        if not src.is_file():
            raise DeviceError(f"{what} {path} listed in {build_dir / MANIFEST} is missing",
                              "rebuild with `edgepack build`")
        digest = sha256_file(src)
        if digest != sha:
            raise DeviceError(f"{what} {src} does not match its sha256 in {build_dir / MANIFEST}: "
                              "it was modified after the build", "rebuild with `edgepack build`")
        files[path] = {"source": src, "sha256": digest, "size": src.stat().st_size}
    # The manifest changes while benchmarks append to it: send the exact bytes we hashed.
    data = (build_dir / MANIFEST).read_bytes()
    files[MANIFEST] = {"source": data, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for rel, src in AGENT_FILES.items():
        files[rel] = {"source": src, "sha256": sha256_file(src), "size": src.stat().st_size}
    return files


def check_name(name: str) -> str:
    if not is_plain_name(name):
        raise DeviceError(f"build name {name!r} cannot be used as a directory name on the device",
                          f"rebuild with a name of {PLAIN_NAME_RULE} characters")
    return name


def deploy_with(t: Transport, build_dir: Path, manifest: Manifest, progress: Progress | None = None,
                formats: set[str] | None = None, optional_formats: set[str] = frozenset()) -> dict:
    """Deploy over an open transport. `formats`: runtimes that must be present (default: the
    primary artifact's format); `optional_formats`: probed too, reported in `runnable`."""
    device = t.device
    started = time.monotonic()
    name = check_name(manifest.name)
    files = local_files(build_dir, manifest)
    if formats is None:
        formats = {manifest.artifact(manifest.primary).format}
    say = progress or (lambda msg: None)
    say(f"{device.name}: checking {device.where()}")
    info = probe(t, formats | set(optional_formats))
    _raise_problems(device, problems(device, info, formats))
    root = info["workdir"]
    total = sum(f["size"] for f in files.values())
    if info["free_bytes"] < DISK_MARGIN:
        _disk_full(device, root, total, info["free_bytes"])
    spec = {rel: f["sha256"] for rel, f in files.items()}
    prep = device_op(t, "prepare", {"root": root, "name": name, "files": spec})
    staging = prep["staging"]
    to_send = prep["missing"]
    need = sum(files[rel]["size"] for rel in to_send) + DISK_MARGIN
    if need > info["free_bytes"]:
        device_op(t, "abort", {"staging": staging})
        _disk_full(device, root, need, info["free_bytes"])
    sent_bytes = 0
    for i, rel in enumerate(to_send, 1):
        f = files[rel]
        say(f"{device.name}: uploading {rel} ({f['size'] / 1e6:.2f} MB) [{i}/{len(to_send)}]")
        try:
            t.put(f["source"], f"{staging}/{rel}")
        except DeviceUnreachable:
            raise  # nothing more can be done over a dead connection; the next deploy cleans up
        except DeviceError as e:
            # Typically a full disk (SFTP only says "Failure"): free the partial upload, keep the
            # previous deployment, and say how much space there was.
            device_op(t, "abort", {"staging": staging})
            likely = " (the disk is full)" if sent_bytes + f["size"] > info["free_bytes"] else ""
            raise DeviceError(f"{e.message}{likely}; {rel} is {f['size'] / 1e6:.2f} MB and the device had "
                              f"{info['free_bytes'] / 1e6:.2f} MB free in {root} before the upload. "
                              "The previous deployment is unchanged", e.hint) from e
        sent_bytes += f["size"]
    say(f"{device.name}: verifying {len(files)} files on the device")
    done = device_op(t, "commit", {"root": root, "name": name, "staging": staging, "files": spec})
    if not done.get("ok"):
        bad = ", ".join(f"{b['file']} ({b['problem']})" for b in done["bad"])
        raise DeviceError(f"device {device.name}: files arrived corrupted, deploy abandoned "
                          f"(the previous deployment is unchanged): {bad}",
                          "check the device's storage and network, then deploy again")
    return {
        "device": device.name, "where": device.where(), "path": done["path"], "workdir": root,
        "sent": to_send, "reused": prep["reused"], "bytes_sent": sent_bytes, "bytes_total": total,
        "seconds": round(time.monotonic() - started, 3), "machine": info["machine"],
        "python": info["python"],
        "runtimes": {m: v.get("version") for m, v in info["modules"].items() if v.get("ok")},
        "runnable": runnable_formats(info),
    }


def runnable_formats(info: dict) -> list[str]:
    """The artifact formats whose runtime imported in a probe."""
    return sorted(f for f, reqs in RUNTIME_MODULES.items()
                  if all(any(info["modules"].get(m, {}).get("ok") for m in alt) for alt in reqs))


def deployed_path(t: Transport, manifest: Manifest) -> dict:
    """The existing deployment of this build on the device, without changing it."""
    info = device_op(t, "probe", {"workdir": t.device.workdir, "modules": []})
    path = f"{info['workdir']}/{check_name(manifest.name)}"
    return {"device": t.device.name, "where": t.device.where(), "path": path, "workdir": info["workdir"],
            "sent": [], "reused": [], "bytes_sent": 0, "machine": info["machine"], "python": info["python"],
            "runnable": None}  # not probed: nothing is imported on the device


def _disk_full(device: Device, root: str, need: int, free: int):
    raise DeviceError(f"device {device.name}: not enough disk space in {root}: the deploy needs "
                      f"{need / 1e6:.2f} MB, {free / 1e6:.2f} MB are free",
                      f"free space on the device or point workdir in {device.source} at a larger disk")


def deploy(build_dir: Path | str, device: Device | str, accept_new_host_key: bool = False,
           progress: Progress | None = None, dirs=None) -> dict:
    """Deploy `build_dir` to `device` (a Device or an inventory name). Returns {device, where,
    path, workdir, sent, reused, bytes_sent, bytes_total, seconds, machine, python, runtimes}.
    Raises DeviceError (DeviceUnreachable for connection problems) with the device's name."""
    device = device if isinstance(device, Device) else get_device(device, dirs)
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    with connect(device, accept_new_host_key) as t:
        return deploy_with(t, build_dir, manifest, progress)


def check_device(device: Device | str, accept_new_host_key: bool = False, dirs=None) -> dict:
    """Connect and probe: arch, python, runtimes, free disk, the CPU and its int8 flags (`int8_flags`,
    None when the device has no cpuinfo). Raises DeviceUnreachable /
    DeviceError when the device cannot be reached; other findings are in `problems`."""
    device = device if isinstance(device, Device) else get_device(device, dirs)
    started = time.monotonic()
    with connect(device, accept_new_host_key) as t:
        info = probe(t)
    profile = device.profile()
    # The profile's runtime is required; the other one is reported under `runtimes` only.
    found = problems(device, info, {"onnx" if profile.runtime == "onnxruntime" else "tflite"})
    return {
        "device": device.name, "where": device.where(), "target": device.target, "emulated": device.emulated,
        "ok": not found, "problems": [{"problem": p, "fix": h} for p, h in found],
        "machine": info["machine"], "arch_expected": profile.arch, "python": info["python"],
        "executable": info["executable"], "workdir": info["workdir"], "free_mb": round(info["free_bytes"] / 1e6, 1),
        "cpu_count": info["cpu_count"], "cpu_model": info["cpu_model"], "cpu_core": info["cpu_core"],
        "int8_flags": info["int8_flags"],
        "runtimes": {m: (v.get("version") if v.get("ok") else None) for m, v in info["modules"].items()},
        "seconds": round(time.monotonic() - started, 3),
    }


def device_cpu(device: Device | str, accept_new_host_key: bool = False, dirs=None) -> dict:
    """{"device", "machine", "cpu_model", "cpu_core", "int8_flags"} of the device's CPU: a probe that imports
    nothing (fast under emulation too), for choosing the int8 scheme before building
    (edgepack.scheme.flags_for_build's `device_info`). Raises DeviceUnreachable / DeviceError."""
    device = device if isinstance(device, Device) else get_device(device, dirs)
    with connect(device, accept_new_host_key) as t:
        info = probe(t, set())
    return {"device": device.name, "machine": info["machine"], "cpu_model": info["cpu_model"],
            "cpu_core": info["cpu_core"], "int8_flags": info["int8_flags"]}


def cpu_probe(device: Device | None, accept_new_host_key: bool = False) -> Callable[[str], dict]:
    """A `probe` for edgepack.scheme.scheme_for_build: the device's CPU report (device_cpu). A
    device that cannot be reached then reports no flags, with the error (the scheme falls back to
    the profile's default and says why; the deploy stage reports the connection itself)."""
    def run(_name: str) -> dict:
        try:
            return device_cpu(device, accept_new_host_key)
        except DeviceError as e:
            return {"device": device.name, "machine": None, "int8_flags": None, "error": e.message}
    return run
