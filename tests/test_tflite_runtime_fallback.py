"""`edgepack/runtime.py` runs `.tflite` through `tflite_runtime` where that is all there is.

What this covers: a separate virtual environment with numpy<2 and tflite-runtime 2.14.0 (its
last release) and *no* ai-edge-litert, edgepack or torch; `runtime.py` copied there alone (so
it must stay self-contained); `open_model` picking the tflite-runtime backend; fp32 and
full-integer int8 models converted here giving the same outputs as ai-edge-litert 2.x in the
main environment, at 1 and 2 threads.

What it does not cover: other CPU architectures (an aarch64 Raspberry Pi image runs different
kernels; the emulation tests do that for ONNX), tflite-runtime versions other than 2.14.0,
or Python versions other than 3.11.

The environment is cached under ~/.cache/edgepack/test-envs (EDGEPACK_TEST_ENVS overrides)
and built once in about 15 s. If PyPI cannot be reached to build it, the test is skipped.
"""
from __future__ import annotations

import json
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgepack.runtime as runtime
from edgepack.data import Dataset
from edgepack.runtime import open_model

pytestmark = [pytest.mark.tflite, pytest.mark.slow]
pytest.importorskip("litert_torch", reason="needs the tflite extra: pip install 'edgepack[tflite]'")

REQUIREMENTS = ["numpy<2", "tflite-runtime==2.14.0"]
ENV_ROOT = Path(os.environ.get("EDGEPACK_TEST_ENVS", Path.home() / ".cache/edgepack/test-envs"))

PROBE = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import runtime  # the copied edgepack/runtime.py, nothing else from edgepack
try:
    import ai_edge_litert  # noqa: F401
    sys.exit("ai_edge_litert must not be importable in this environment")
except ImportError:
    pass
data = np.load(sys.argv[2])
out = {"numpy": np.__version__, "available": runtime.available_runtimes()}
for name in ("fp32", "int8"):
    for threads in (1, 2):
        r = runtime.open_model(sys.argv[1] + "/" + name + ".tflite", threads=threads)
        out["backend"] = r.backend + " " + r.backend_version
        ys = [r.run([x[None]])[0][0] for x in data["x"]]
        np.save(f"{sys.argv[1]}/{name}_{threads}.npy", np.stack(ys))
print(json.dumps(out))
"""


def _python311() -> str:
    if sys.version_info[:2] == (3, 11):
        return getattr(sys, "_base_executable", sys.executable)
    found = shutil.which("python3.11")
    if not found:
        pytest.skip("python3.11 is needed: tflite-runtime 2.14.0 has no wheel for this Python")
    return found


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/tflite-runtime/", timeout=10).close()
        return True
    except OSError:
        return False


def _env_dir() -> Path:
    """Keyed by the base interpreter too: a venv made from another (or a since-removed) Python
    must not be reused."""
    base = os.path.realpath(_python311())
    key = hashlib.sha1("\n".join([base, *REQUIREMENTS]).encode()).hexdigest()[:10]
    return ENV_ROOT / f"tflite-runtime-2.14.0-numpy1-py311-{key}"


def _fallback_env() -> Path:
    """The cached venv's python; built into a temporary directory and renamed when complete."""
    ENV = _env_dir()
    python = ENV / "bin" / "python"
    if (ENV / ".complete").exists():
        return python
    ENV_ROOT.mkdir(parents=True, exist_ok=True)
    building = ENV.with_name(f"{ENV.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        subprocess.run([_python311(), "-m", "venv", str(building)], check=True,
                       capture_output=True)
        pip = subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--only-binary=:all:", *REQUIREMENTS],
                             capture_output=True, text=True, timeout=600)
        if pip.returncode != 0:
            if not _pypi_reachable():
                pytest.skip("PyPI is unreachable: cannot build the numpy<2 + tflite-runtime env")
            pytest.fail(f"pip install {' '.join(REQUIREMENTS)} failed:\n{pip.stderr[-2000:]}")
        (building / ".complete").write_text("\n".join(REQUIREMENTS) + "\n")
        # Publishing by rename keeps a half-built env from ever looking complete. A venv's
        # bin/python finds its site-packages through pyvenv.cfg next to it, so it survives the
        # move (only pip's console scripts keep the old path; the test uses `python -m`).
        if not ENV.exists():
            building.rename(ENV)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return python


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(16, 16, 1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_runtime_py_runs_tflite_under_tflite_runtime_with_numpy1(tmp_path):
    from edgepack.tflite import convert_fp32, convert_int8
    python = _fallback_env()

    model = _tiny_cnn()
    rng = np.random.default_rng(0)
    calib = Dataset(rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    example = (torch.zeros(1, 3, 16, 16),)
    convert_fp32(model, example, tmp_path / "fp32.tflite", isolate=False)
    int8 = convert_int8(model, example, calib, tmp_path / "int8.tflite", num_calib=32,
                        isolate=False)
    x = rng.standard_normal((20, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    shutil.copy(Path(runtime.__file__), tmp_path / "runtime.py")
    (tmp_path / "probe.py").write_text(PROBE)

    done = subprocess.run([str(python), str(tmp_path / "probe.py"), str(tmp_path),
                           str(tmp_path / "data.npz")], capture_output=True, text=True,
                          timeout=300, env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["numpy"].startswith("1.")
    assert info["backend"] == "tflite-runtime 2.14.0"
    assert "tflite-runtime" in info["available"] and "ai-edge-litert" not in info["available"]

    out_scale = int8["outputs"][0]["quantization"]["scale"]
    for name in ("fp32", "int8"):
        runner = open_model(tmp_path / f"{name}.tflite", threads=1)
        assert runner.backend == "ai-edge-litert"
        ref = np.stack([runner.run([s[None]])[0][0] for s in x])
        for threads in (1, 2):
            got = np.load(tmp_path / f"{name}_{threads}.npy")
            assert got.shape == ref.shape == (20, 5)
            if name == "fp32":
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
            else:
                # Different int8 kernels (2.14 vs 2.x XNNPACK) may round one step apart.
                assert np.max(np.abs(got - ref)) <= 1.01 * out_scale
                assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
