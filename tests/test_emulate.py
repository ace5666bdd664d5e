"""Emulated Raspberry Pi: real aarch64 CPython, onnxruntime and ai-edge-litert under qemu-user.

The prepared environment is cached in ${XDG_CACHE_HOME:-~/.cache}/edgepack/emulate and shared by
all tests (and by later runs): the first run on a fresh machine prepares it (about 25-60 s with
network access to deb.debian.org and PyPI), later runs reuse it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edgepack.emulate import (WHEELS, EmulatorEnv, cache_base, compare_on_emulator, device_toml, env_root,
                              find_emulator, prepare_emulator, register_emulated_device, remove_emulator,
                              run_emulated)
from edgepack.errors import EdgepackError

REPO = Path(__file__).resolve().parent.parent
needs_qemu = pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None and shutil.which("qemu-aarch64") is None,
                                reason="needs qemu-user-static (apt-get install qemu-user-static)")
emulated = [pytest.mark.emulate, pytest.mark.slow, needs_qemu]
RESULTS: dict = {}


@pytest.fixture(scope="session")
def emu():
    env = prepare_emulator("rpi", progress=False)
    RESULTS["prepare"] = {"cached": env.cached, "prepare_seconds": env.prepare_seconds,
                          "size_mb": round(env.size_bytes / 1e6, 1)}
    return env


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny CNN (conv-bn-relu x2, pool, linear; 10 classes), its fp32 ONNX and an eval batch."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    root = tmp_path_factory.mktemp("emu model")  # a space in the path on purpose
    onnx_path = root / "model.fp32.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(onnx_path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, opset_version=17)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    evals = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    return {"model": model, "root": root, "onnx": onnx_path, "calib": calib, "eval": evals}


def _x86(path: Path, x: np.ndarray) -> np.ndarray:
    from edgepack.runtime import open_model
    r = open_model(path, 1)
    fixed = isinstance(r.input_shapes[0][0], int)
    if fixed:
        return np.concatenate([r.run([x[i:i + 1]])[0] for i in range(len(x))])
    return r.run([x])[0]


# --- always-on (no qemu needed) ----------------------------------------------------------------

def test_incomplete_preparation_is_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = env_root("rpi")
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python3").write_text("#!/bin/sh\n")
    assert find_emulator("rpi") is None            # no COMPLETE marker
    (root / "COMPLETE").write_text(json.dumps({"versions": {"numpy": "x"}, "size_bytes": 5}))
    env = find_emulator("rpi")
    assert env is not None and env.python == root / "bin" / "python3" and env.size_bytes == 5
    assert "ort" + WHEELS["onnxruntime"] in root.name and root.name.startswith("rpi-")


def test_missing_qemu_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))       # nothing on PATH: no qemu
    monkeypatch.delenv("EDGEPACK_QEMU", raising=False)
    with pytest.raises(EdgepackError) as e:
        prepare_emulator("rpi", progress=False)
    assert "qemu-aarch64-static not found" in e.value.message
    assert "apt-get install qemu-user-static" in e.value.hint
    with pytest.raises(EdgepackError) as e:
        run_emulated(["-c", "pass"], qemu="no-such-qemu-aarch64")
    assert "apt-get install qemu-user-static" in e.value.hint


def test_unknown_kind_is_explained():
    with pytest.raises(EdgepackError) as e:
        prepare_emulator("jetson", progress=False)
    assert "rpi" in e.value.hint


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_unavailable_wheel_fails_cleanly_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(EdgepackError) as e:
        prepare_emulator("rpi", progress=False, wheels={"numpy": "1.0.0"})
    assert "not available for aarch64" in e.value.message and "numpy" in e.value.message
    base = tmp_path / "edgepack" / "emulate"
    assert [p.name for p in base.iterdir() if not p.name.endswith(".lock")] == []  # no half environment


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_unreachable_debian_mirror_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    monkeypatch.setenv("EDGEPACK_DEBIAN_SECURITY_MIRROR", "http://127.0.0.1:9/debian-security")
    with pytest.raises(EdgepackError) as e:
        prepare_emulator("rpi", progress=False, rebuild=True)
    assert "apt-get" in e.value.message and "EDGEPACK_DEBIAN_MIRROR" in e.value.hint
    assert find_emulator("rpi") is None


# --- the emulated interpreter -----------------------------------------------------------------

@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_emulated_python_is_aarch64_with_runtimes(emu):
    code = ("import json, platform, sys, onnxruntime, numpy\n"
            "from importlib.metadata import version\n"
            "from ai_edge_litert.interpreter import Interpreter\n"
            "print(json.dumps({'machine': platform.machine(), 'exe': sys.executable,\n"
            "  'ort': onnxruntime.__version__, 'np': numpy.__version__, 'litert': version('ai-edge-litert'),\n"
            "  'cpuinfo': open('/proc/cpuinfo').read(), 'path': sys.path}))")
    p = run_emulated(["-c", code], emulator=emu, check=True)
    info = json.loads(p.stdout)
    assert info["machine"] == "aarch64"
    assert (info["ort"], info["np"], info["litert"]) == (WHEELS["onnxruntime"], WHEELS["numpy"],
                                                         WHEELS["ai-edge-litert"])
    assert "CPU part\t: 0xd08" in info["cpuinfo"] and "Raspberry Pi 4" in info["cpuinfo"]
    assert info["exe"] == str(emu.python)   # the emulated python can start itself again
    assert not any("/.venv/" in s for s in info["path"])  # nothing from the x86 host
    # a child process of the emulated interpreter (sys.executable) is emulated too
    p = run_emulated(["-c", "import subprocess, sys; print(subprocess.run([sys.executable, '-c', "
                            "'import platform; print(platform.machine())'], capture_output=True, "
                            "text=True).stdout.strip())"], emulator=emu, check=True)
    assert p.stdout.strip() == "aarch64"
    assert emu.versions["python"].startswith("3.11.")


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_wrapper_passes_args_cwd_stdio_and_exit_code(emu, tmp_path):
    args = ["a b", "it's", '"double"', "$HOME", "`x`", "", "ünï", "-c", "\\n", "*"]
    work = tmp_path / "dir with space"
    work.mkdir()
    script = work / "echo args.py"
    script.write_text("import json, os, sys\n"
                      "data = sys.stdin.read()\n"
                      "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'stdin': data}))\n"
                      "print('to stderr', file=sys.stderr)\n"
                      "sys.exit(42)\n")
    # through the wrapper file exactly as the local transport runs it
    p = subprocess.run([str(emu.python), str(script), *args], cwd=work, input="piped in\n",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 42, p.stderr
    out = json.loads(p.stdout)
    assert out["argv"] == args
    assert out["cwd"] == str(work)
    assert out["stdin"] == "piped in\n"
    assert p.stderr.strip() == "to stderr"
    # -c CODE with the code given as one argument, and a relative script path from the cwd
    p = subprocess.run([str(emu.python), "-c", "import sys; print(repr(sys.argv[1:]))", "x y", "'z'"],
                       capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == repr(["x y", "'z'"]) and p.returncode == 0
    p = subprocess.run([str(emu.python), "echo args.py"], cwd=work, input="", capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 42 and json.loads(p.stdout.splitlines()[0])["argv"] == []


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_host_paths_are_readable_and_writable(emu, tmp_path):
    f = tmp_path / "note.txt"
    f.write_text("from the host")
    code = ("import sys, pathlib\n"
            "print(pathlib.Path(sys.argv[1]).read_text())\n"
            "print(pathlib.Path(sys.argv[2]).read_text().splitlines()[0])\n"
            "pathlib.Path(sys.argv[3]).write_text('from aarch64')\n")
    p = run_emulated(["-c", code, str(f), str(REPO / "edgepack" / "runtime.py"), str(tmp_path / "out.txt")],
                     emulator=emu, check=True)
    lines = p.stdout.splitlines()
    assert lines[0] == "from the host" and lines[1].startswith('"""Run ONNX and TFLite')
    assert (tmp_path / "out.txt").read_text() == "from aarch64"


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_wrapper_without_qemu_exits_127_with_fix(emu, tmp_path):
    env = {"PATH": "/bin:/usr/bin:" + str(tmp_path), "HOME": os.environ.get("HOME", "/root"),
           "EDGEPACK_QEMU": "no-such-qemu"}
    p = subprocess.run([str(emu.python), "-c", "pass"], env=env, capture_output=True, text=True)
    assert p.returncode == 127 and "apt-get install qemu-user-static" in p.stderr


# --- artifacts on the aarch64 runtimes ----------------------------------------------------------

@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_fp32_onnx_matches_x86(emu, tiny):
    ref = _x86(tiny["onnx"], tiny["eval"])
    r = compare_on_emulator(tiny["onnx"], tiny["eval"], ref, emulator=emu)
    RESULTS["onnx_fp32"] = r
    assert r["machine"] == "aarch64" and r["emulated"] and r["format"] == "onnx"
    assert r["backend"] == "onnxruntime" and r["backend_version"] == WHEELS["onnxruntime"]
    assert r["runtimes"]["onnxruntime"] == WHEELS["onnxruntime"]
    assert r["samples"] == 64 and r["outputs_shape"] == [64, 10]
    assert r["top1_agreement"] == 1.0
    assert r["max_abs_diff"] < 1e-4
    # The Pi 4's cpuinfo, not the host's x86 one: NEON but no dot product.
    assert r["cpu"] == "Raspberry Pi 4 Model B Rev 1.4" and r["int8_flags"] == ["asimd"]


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_int8_qdq_onnx_agrees_with_x86(emu, tiny):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, x):
            self.it = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    # the rpi profile's scheme: signed activations and weights, per-channel
    int8 = tiny["root"] / "model.int8.onnx"
    quantize_static(str(tiny["onnx"]), str(int8), Reader(tiny["calib"]), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    ref = _x86(int8, tiny["eval"])
    r = compare_on_emulator(int8, tiny["eval"], ref, emulator=emu)
    RESULTS["onnx_int8"] = r
    assert r["machine"] == "aarch64" and r["samples"] == 64
    # different int8 kernels (x86 VNNI vs ARM NEON) may round differently, not disagree wildly
    assert r["top1_agreement"] >= 0.9, r
    fp32_logit_range = float(np.ptp(ref))
    assert r["max_abs_diff"] <= 0.1 * fp32_logit_range, r
    # a subset, with `limit`
    r8 = compare_on_emulator(int8, tiny["eval"], ref, emulator=emu, limit=8)
    assert r8["samples"] == 8


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_tflite_runs_on_aarch64_litert(emu, tiny):
    pytest.importorskip("litert_torch")
    import torch
    from edgepack.data import Dataset
    from edgepack.tflite import convert_fp32, convert_int8
    x0 = torch.from_numpy(tiny["calib"][:1])
    fp32 = tiny["root"] / "model.fp32.tflite"
    convert_fp32(tiny["model"], (x0,), fp32)
    ref = _x86(fp32, tiny["eval"])
    r = compare_on_emulator(fp32, tiny["eval"], ref, emulator=emu)
    RESULTS["tflite_fp32"] = r
    assert r["machine"] == "aarch64" and r["backend"] == "ai-edge-litert"
    assert r["backend_version"] == WHEELS["ai-edge-litert"]
    assert r["top1_agreement"] == 1.0 and r["max_abs_diff"] < 1e-3

    int8 = tiny["root"] / "model.int8.tflite"
    convert_int8(tiny["model"], (x0,), Dataset(x=tiny["calib"]), int8, num_calib=64)
    ref8 = _x86(int8, tiny["eval"])
    r8 = compare_on_emulator(int8, tiny["eval"], ref8, emulator=emu)
    RESULTS["tflite_int8"] = r8
    assert r8["machine"] == "aarch64"
    assert r8["top1_agreement"] >= 0.9, r8


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_broken_artifact_is_explained(emu, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgepackError) as e:
        compare_on_emulator(bad, np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), emulator=emu)
    assert "failed on the emulated aarch64 onnx runtime" in e.value.message


# --- registration and the device layer -----------------------------------------------------------

@pytest.fixture
def user_dirs(tmp_path, monkeypatch):
    """The test's own ~ and ~/.config (device files, default workdirs); the shared emulator cache."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_base().parent.parent))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # removal also deletes the default workdir


def test_device_toml_round_trips_any_interpreter_path(tmp_path):
    python = tmp_path / 'a "quoted" \\ dir é' / "bin" / "python3"
    env = EmulatorEnv(kind="rpi5", root=python.parent.parent, python=python,
                      versions={"python": "3.11.2", "onnxruntime": "1.32.0", "numpy": "2.4.6"})
    text = device_toml("pi5-emu", env)
    assert text.startswith("# Emulated Raspberry Pi 5 (4x Cortex-A76)") and "-cpu cortex-a76" in text
    assert tomllib.loads(text) == {"name": "pi5-emu", "target": "rpi", "transport": "local",
                                   "workdir": "~/.local/share/edgepack/devices/pi5-emu",
                                   "python": str(python), "emulated": True}


def test_device_name_must_be_a_plain_file_name(tmp_path):
    env = EmulatorEnv(kind="rpi", root=tmp_path, python=tmp_path / "bin" / "python3")
    for bad in ("../evil", ".hidden", "a/b", "x" * 129, ""):
        with pytest.raises(EdgepackError, match="invalid device name") as e:
            register_emulated_device(bad, "rpi", emulator=env, config_dir=tmp_path / "devices")
        assert "letters, digits" in e.value.hint
    assert not (tmp_path / "devices").exists()


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_register_writes_a_valid_device_and_remove_deletes_it(emu, tmp_path, user_dirs):
    workdir = tmp_path / "home" / ".local" / "share" / "edgepack" / "devices" / "pi-emu"
    workdir.mkdir(parents=True)
    path = register_emulated_device("pi-emu", "rpi", emulator=emu)
    assert path == tmp_path / "config" / "edgepack" / "devices" / "pi-emu.toml"
    data = tomllib.loads(path.read_text())
    assert data == {"name": "pi-emu", "target": "rpi", "transport": "local",
                    "workdir": "~/.local/share/edgepack/devices/pi-emu", "python": str(emu.python),
                    "emulated": True}
    from edgepack.devices import get_device
    dev = get_device("pi-emu")
    assert dev.emulated and dev.python_cmd == str(emu.python) and dev.target == "rpi"
    # a real device of the same name is never overwritten or removed
    real = path.with_name("box.toml")
    real.write_text('name = "box"\ntarget = "rpi"\ntransport = "local"\n')
    with pytest.raises(EdgepackError):
        register_emulated_device("box", "rpi", emulator=emu)
    with pytest.raises(EdgepackError):
        remove_emulator("box")
    with pytest.raises(EdgepackError):
        register_emulated_device("../evil", "rpi", emulator=emu)
    removed = remove_emulator("pi-emu", keep_cache=True)  # keep the shared cache for other tests
    assert removed["devices"] == [str(path)] and not path.exists() and real.exists()
    assert removed["workdirs"] == [str(workdir)] and not workdir.exists()
    assert find_emulator("rpi") is not None


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_cli_emulate_registers_from_cache(emu, tmp_path, user_dirs):
    from conftest import run_cli
    code, out, err = run_cli("devices", "emulate", "rpi", "--name", "pi-test", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["device"] == "pi-test" and res["cached"] and res["python"] == str(emu.python)
    assert Path(res["device_file"]).is_file()
    code, out, err = run_cli("emulate", "--remove", "pi-test", "--keep-cache", "--json")  # top-level alias
    assert code == 0 and json.loads(out)["devices"] == [res["device_file"]]
    assert find_emulator("rpi") is not None
    code, out, err = run_cli("devices", "emulate", "jetson")
    assert code == 2 and "unknown emulated device kind" in err


@pytest.mark.emulate
@pytest.mark.slow
@needs_qemu
def test_deploy_and_bench_on_emulated_pi(emu, tmp_path, user_dirs):
    from edgepack import devices
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest_devices import make_build
    register_emulated_device("pi-emu", "rpi", emulator=emu)
    build = make_build(tmp_path / "build", target="rpi")
    r = devices.bench(build, "pi-emu", threads=1, runs=5, warmup=1, timeout_s=600)
    RESULTS["bench"] = {k: r.get(k) for k in ("device", "emulated", "passed")} | {"env": r.get("env")}
    assert r["emulated"] is True
    assert r["env"]["machine"] == "aarch64", r["env"]
    # The agent reads the sysroot's Pi 4 cpuinfo (via the deployed cpuinfo.py).
    assert r["env"]["cpu_model"] == "Raspberry Pi 4 Model B Rev 1.4" and r["env"]["cpu_core"] == "Cortex-A72"
    assert r["env"]["int8_flags"] == ["asimd"], r["env"]
    lat = [v for v in r["verdicts"] if v["budget"].startswith("latency")]
    assert lat and all(v["ok"] is None and "emulated" in v["note"] for v in lat), lat


def teardown_module(module):
    if RESULTS:
        out = Path(os.environ.get("EDGEPACK_EMULATE_RESULTS", "/tmp/edgepack-emulate-results.json"))
        try:
            old = json.loads(out.read_text()) if out.exists() else {}
            out.write_text(json.dumps(old | RESULTS, indent=2, default=str))
        except (OSError, ValueError):
            pass
