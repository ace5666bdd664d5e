"""`edgepack build --device`: build, deploy, benchmark on the device and judge, in one command."""
from __future__ import annotations

import json


from conftest import run_cli
from edgepack.manifest import read_manifest


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
