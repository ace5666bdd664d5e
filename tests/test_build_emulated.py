"""`edgepack build --target rpi --device pi-emu`: the headline path without a Raspberry Pi.

Prepares the emulated aarch64 environment if it is not cached yet (minutes, from Debian's and
PyPI's packages), registers it as a device in a temporary inventory, builds the embedded example
with ONNX and TFLite artifacts, deploys and benchmarks it on the emulated Pi, and checks the
aarch64-vs-x86 comparison of both int8 artifacts in the report."""
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
    emu = {r["format"]: r for r in m.stages["emulation"]["results"]}
    assert set(emu) == {"onnx", "tflite"}
    for r in emu.values():
        assert r["machine"] == "aarch64" and r["samples"] == 256
        assert r["top1_agreement"] >= 0.99  # ARM int8 kernels may round differently, not decide differently
    report = (build / "report.md").read_text()
    assert "aarch64 (emulated on pi-emu) vs x86" in report and "emulated" in out
    local_latency = next(v for v in m.verdicts if v.budget == "latency_p50_ms")
    assert local_latency.ok is None and "pi-emu is emulated" in local_latency.note
