"""`edgepack build --device`: build, deploy, benchmark on the device and judge, in one command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent))
from conftest_devices import local_device, noisy_python  # noqa: E402
from edgepack.manifest import read_manifest  # noqa: E402


def test_build_deploy_bench_local_in_one_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # only the shipped `local` device
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the local device's workdir lives under ~
    code, out, err = run_cli("build", "--target", "x86", "--device", "local", "--out", str(tmp_path / "dist"),
                             "--latency-runs", "10")
    assert code == 0, err
    build = tmp_path / "dist" / "digits-cnn-x86"
    m = read_manifest(build)
    assert len(m.bench) == 1 and m.bench[0]["device"] == "local"
    results = list((build / "bench").glob("local-*.json"))
    assert len(results) == 1
    r = json.loads(results[0].read_text())
    assert r["passed"] and r["latency_ms"]["p50"] > 0 and r["memory_mb"]["peak_rss"] > 0
    assert {v["budget"] for v in r["verdicts"]} >= {"latency_p50_ms", "peak_memory_mb"}
    assert "local" in (build / "report.md").read_text()
    assert "bench: 1 ok" in out
    # Accuracy on the device: the shipped subset through the int8 artifact with the device's kernels.
    (e,) = r["eval"]
    assert e["artifact"] == m.primary == "model.int8.onnx" and e["samples"] == m.eval_subset.samples
    assert e["device"]["accuracy"] == e["host"]["accuracy"] and e["vs_host"]["consistent"]  # same kernels
    assert e["reference"] == "model.fp32.onnx" and e["drop_unit"] == "top-1 points"
    drop = next(v for v in r["verdicts"] if v["budget"] == "max_accuracy_drop")
    assert drop["value"] == e["drop"] and drop["ok"] and "on local:" in drop["note"]
    assert m.bench[0]["eval"][0]["device"]["accuracy"] == e["device"]["accuracy"]
    assert "Accuracy on the device" in (build / "report.md").read_text()
    assert f"local: model.int8.onnx top-1 % {e['device']['accuracy']:.2f} on the device" in err


def test_build_fails_when_the_device_misses_the_accuracy_budget(tmp_path, monkeypatch):
    """A device whose runtime adds noise: the build passes here but not on the device (exit 1),
    and the device is named as one whose outputs differ from this machine's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    devices = tmp_path / "devices"
    local_device(devices, name="noisy", python=noisy_python(tmp_path))
    code, out, err = run_cli("build", "--target", "x86", "--device", "noisy", "--devices-dir", str(devices),
                             "--out", str(tmp_path / "dist"), "--latency-runs", "5")
    assert code == 1, err
    m = read_manifest(tmp_path / "dist" / "digits-cnn-x86")
    assert m.passed  # the host's own verdicts hold
    drop = next(v for v in m.bench[0]["verdicts"] if v["budget"] == "max_accuracy_drop")
    assert drop["ok"] is False and drop["value"] > 0.5
    assert "budget not met" in err and "noisy: max_accuracy_drop" in err
    assert "WARNING noisy: outputs of model.int8.onnx differ from this machine's" in err
    assert "outputs differ from this machine's on: noisy" in out.replace("\n", " ")


def test_build_with_unknown_device_fails_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code, _, err = run_cli("build", "--device", "no-such-pi", "--out", str(tmp_path / "dist"), "-q")
    assert code == 2 and "no-such-pi" in err
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_build_for_a_device_of_another_arch_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code, _, err = run_cli("build", "--target", "rpi", "--device", "local", "--out", str(tmp_path / "dist"), "-q")
    assert code == 2 and "device local is x86_64" in err and "--target x86" in err


def test_device_with_a_user_target_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "nuc.toml").write_text('arch = "x86_64"\nruntime = "onnxruntime"\nthreads = 1\n'
                                             '[budgets]\nlatency_p50_ms = 100\n')
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nuc1.toml").write_text('name = "nuc1"\ntarget = "nuc"\ntransport = "local"\n'
                                                f'workdir = "{tmp_path / "work"}"\n')
    code, _, err = run_cli("build", "--target", "nuc", "--targets-dir", str(tmp_path / "t"), "--device", "nuc1",
                           "--devices-dir", str(tmp_path / "dev"), "--out", str(tmp_path / "dist"), "-q",
                           "--latency-runs", "5")
    assert code == 0, err
    m = read_manifest(tmp_path / "dist" / "digits-cnn-nuc")
    assert m.bench[0]["device"] == "nuc1" and m.bench[0]["threads"] == 1
