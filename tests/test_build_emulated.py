"""`edgepack build --target rpi --device pi-emu`: the headline path without a Raspberry Pi.

Prepares the emulated aarch64 environment if it is not cached yet (minutes, from Debian's and
PyPI's packages), registers it as a device in a temporary inventory, builds the embedded example
with ONNX and TFLite artifacts, deploys and benchmarks it on the emulated Pi, and checks the
accuracy of both int8 artifacts measured there beside this machine's, and the budget judged on it."""
from __future__ import annotations

import pytest

from conftest import run_cli
from edgepack.manifest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.emulate, pytest.mark.tflite]


def test_build_rpi_on_emulated_pi(tmp_path, monkeypatch):
    pytest.importorskip("litert_torch")
    from edgepack.emulate import prepare_emulator, register_emulated_device
    env = prepare_emulator("rpi", progress=False)
    devices = tmp_path / "devices"
    register_emulated_device("pi-emu", "rpi", emulator=env, config_dir=devices)
    import os
    from pathlib import Path
    # The device's workdir lives under ~: point HOME at a temp dir, but keep the prepared cache.
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, out, err = run_cli("build", "--target", "rpi", "--device", "pi-emu", "--devices-dir", str(devices),
                             "--out", str(tmp_path / "dist"), "--latency-runs", "10")
    assert code == 0, err
    build = tmp_path / "dist" / "digits-cnn-rpi"
    m = read_manifest(build)
    assert m.primary == "model.int8.tflite"
    bench = m.bench[0]
    assert bench["device"] == "pi-emu" and bench["emulated"] is True
    # Accuracy measured on the emulated Pi (real aarch64 kernels) beside this machine's, for both
    # int8 artifacts: the judged TFLite one (timed) and the ONNX one (evaluated only).
    evals = {e["artifact"]: e for e in bench["eval"]}
    assert set(evals) == {"model.int8.tflite", "model.int8.onnx"} and evals["model.int8.tflite"]["timed"]
    for e in evals.values():
        assert e["machine"] == "aarch64" and e["samples"] == m.eval_subset.samples == 256
        assert e["device"]["accuracy"] is not None and e["host"]["accuracy"] is not None
        # ARM int8 kernels may round differently, not decide differently
        assert e["vs_host"]["top1_agreement"] >= 99 and e["vs_host"]["consistent"], e
        assert abs(e["device"]["accuracy"] - e["host"]["accuracy"]) <= 1.0
    assert evals["model.int8.onnx"]["runtime"].startswith("onnxruntime")
    assert evals["model.int8.tflite"]["reference"] == "model.fp32.tflite"
    # The accuracy budget is judged on the emulated device's own figure (its kernels are real).
    drop = next(v for v in bench["verdicts"] if v["budget"] == "max_accuracy_drop")
    assert drop["value"] == evals["model.int8.tflite"]["drop"] and drop["ok"] is True
    assert "on pi-emu (emulated: real aarch64 kernels)" in drop["note"]
    report = (build / "report.md").read_text()
    assert "the emulated aarch64 kernels (qemu)" in report and "emulated" in out
    assert "pi-emu: model.int8.tflite top-1 %" in err and "on the device" in err
    local_latency = next(v for v in m.verdicts if v.budget == "latency_p50_ms")
    assert local_latency.ok is None and "pi-emu is emulated" in local_latency.note
