"""`--json`: every verb prints exactly one JSON document on stdout (progress and notes go to
stderr), so scripts can pipe it; and the root `-q` silences stderr but never an error."""
from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from conftest import run_cli
from conftest_devices import isolated_inventory, local_device, make_build  # noqa: F401 (autouse fixture)
from test_report_html import synthetic_build


def one_document(stdout: str):
    """The whole of stdout is one JSON value (json.loads fails on anything before or after it)."""
    return json.loads(stdout)


def test_targets(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "nuc.toml").write_text('arch = "x86_64"\nruntime = "onnxruntime"\nthreads = 3\n')
    code, out, err = run_cli("targets", "--targets-dir", str(tmp_path / "t"), "--json")
    assert code == 0, err
    profiles = {p["name"]: p for p in one_document(out)}
    assert {"x86", "rpi", "nuc"} <= set(profiles)
    assert profiles["nuc"]["threads"] == 3 and profiles["nuc"]["source"] == str(tmp_path / "t" / "nuc.toml")
    assert profiles["x86"]["quantization"]["activation_type"] == "QUInt8"


def test_targets_show():
    code, out, err = run_cli("targets", "show", "rpi", "--json")
    assert code == 0, err
    p = one_document(out)
    assert p["name"] == "rpi" and p["arch"] == "aarch64" and p["source"].endswith("rpi.toml")
    code, out, _ = run_cli("targets", "show", "no-such-target", "--json")
    assert code == 2 and out == ""  # an error is a message on stderr, never half a document


def test_cache_info_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE_DIR", str(tmp_path / "stage-cache"))  # not the session's cache
    from edgepack.cache import StageCache
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    StageCache().put("ab" * 32, {"f.bin": src}, {"stage": "test"})
    code, out, err = run_cli("cache", "info", "--json")
    assert code == 0, err
    info = one_document(out)
    assert info["root"] == str(tmp_path / "stage-cache") and info["entries"] == 1 and info["bytes"] >= 1000
    code, out, err = run_cli("cache", "clear", "--json")
    assert code == 0, err
    cleared = one_document(out)
    assert cleared["entries"] == 1 and cleared["root"] == str(tmp_path / "stage-cache")
    assert one_document(run_cli("cache", "info", "--json")[1])["entries"] == 0


def test_emulate_remove(tmp_path, monkeypatch):
    """Removing a registered emulated device (a fake one: no qemu or download needed here)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env_dir = tmp_path / "cache" / "edgepack" / "emulate" / "rpi-test"
    (env_dir / "bin").mkdir(parents=True)
    devices = tmp_path / "config" / "edgepack" / "devices"
    devices.mkdir(parents=True)
    (devices / "fake-emu.toml").write_text(tomli_w.dumps({
        "name": "fake-emu", "target": "rpi", "transport": "local", "workdir": str(tmp_path / "w"),
        "python": str(env_dir / "bin" / "python3"), "emulated": True}))
    code, out, err = run_cli("emulate", "--remove", "fake-emu", "--json")
    assert code == 0, err
    removed = one_document(out)
    assert removed["devices"] == [str(devices / "fake-emu.toml")] and removed["caches"] == [str(env_dir)]
    assert not env_dir.exists()


def test_report(tmp_path):
    b = synthetic_build(tmp_path / "b", devices={"pi": [2.0] * 10})
    code, out, err = run_cli("report", str(b), "--json")
    assert code == 0, err
    doc = one_document(out)
    assert doc["report_html"] == str(b / "report.html") and doc["device_results"] == 1 and doc["passed"] is False


def test_compare(tmp_path):
    a, b = synthetic_build(tmp_path / "a"), synthetic_build(tmp_path / "b", scale=0.5)
    code, out, err = run_cli("compare", str(a), str(b), "--json", "--out", str(tmp_path / "c.md"))
    assert code == 0, err
    doc = one_document(out)
    assert [x["label"] for x in doc["builds"]] == ["a", "b"] and doc["written"] == str(tmp_path / "c.md")


def test_prune(user_model, tmp_path):
    code, out, err = run_cli("prune", "--model", user_model["model"], "--weights", user_model["weights"],
                             "--input-shape", user_model["shape"], "--ratio", "0.5", "--epochs", "0",
                             "--out", str(tmp_path / "p.safetensors"), "--json")
    assert code == 0, err
    doc = one_document(out)
    assert doc["written"] == str(tmp_path / "p.safetensors") and (tmp_path / "p.safetensors").exists()
    rec = doc["record"]
    assert rec["ratio"] == 0.5 and rec["macs_after"] < rec["macs_before"]
    assert {c["name"] for c in rec["layers"]} >= {"body.0", "body.3"}
    assert "prune" in err  # the progress went to stderr


def test_quiet_silences_progress_but_not_errors(user_model, tmp_path):
    args = ["prune", "--model", user_model["model"], "--weights", user_model["weights"], "--input-shape",
            user_model["shape"], "--ratio", "0.5", "--epochs", "0", "--out", str(tmp_path / "p.safetensors")]
    code, out, err = run_cli("-q", *args)
    assert code == 0 and err == "" and "wrote" in out  # results still on stdout
    code, _, err = run_cli("-q", "report", str(tmp_path))
    assert code == 2 and "not an edgepack build directory" in err
    code, _, err = run_cli(*args)  # `-q` was for that one invocation only
    assert code == 0 and "prune" in err


def progress_events(stderr: str) -> list[dict]:
    """With --json, progress on stderr is JSON lines too (anything else there is a note or warning)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith('{"t":')]


def test_devices_list_and_check(tmp_path):
    local_device(tmp_path / "devs", name="json-dev")
    for args in (["devices", "--devices-dir", str(tmp_path / "devs"), "--json"],
                 ["devices", "list", "--devices-dir", str(tmp_path / "devs"), "--json"]):
        code, out, err = run_cli(*args)
        assert code == 0, err
        listed = {d["name"]: d for d in one_document(out)}
        assert {"local", "json-dev"} <= set(listed) and listed["json-dev"]["transport"] == "local"
    code, out, err = run_cli("devices", "check", "json-dev", "--devices-dir", str(tmp_path / "devs"), "--json")
    assert code == 0, err
    report = one_document(out)
    assert report["device"] == "json-dev" and report["ok"] is True and "onnxruntime" in report["runtimes"]
    assert [e["event"] for e in progress_events(err)] == ["start", "end"]


def test_deploy_and_bench(tmp_path):
    build, devs = make_build(tmp_path / "build"), tmp_path / "devs"
    local_device(devs, name="json-dev")
    code, out, err = run_cli("deploy", str(build), "--device", "json-dev", "--devices-dir", str(devs), "--json")
    assert code == 0, err
    deployed = one_document(out)
    assert deployed["device"] == "json-dev" and "model.fp32.onnx" in deployed["sent"]
    events = progress_events(err)
    assert events[0]["event"] == "start" and events[-1]["event"] == "end" and events[-1]["ok"] is True
    code, out, err = run_cli("bench", str(build), "--devices", "json-dev", "--devices-dir", str(devs), "--runs", "3",
                             "--warmup", "0", "--threads", "1", "--json")
    assert code == 0, err
    fleet = one_document(out)
    assert fleet["ok"] == 1 and fleet["results"][0]["device"] == "json-dev" and fleet["results"][0]["latency_ms"]["p50"] > 0
    ends = [e for e in progress_events(err) if e["event"] == "end"]
    assert len(ends) == 1 and ends[0]["task"].startswith("json-dev: ")  # one line per device


def test_build(user_model, tmp_path):
    code, out, err = run_cli("build", "--model", user_model["model"], "--weights", user_model["weights"],
                             "--input-shape", user_model["shape"], "--calib", user_model["calib"],
                             "--out", str(tmp_path), "--latency-runs", "5", "--no-cache", "--json")
    assert code == 0, err
    doc = one_document(out)
    assert Path(doc["path"]).name == "mynet-x86" and doc["manifest"]["name"] == "mynet"
    events = progress_events(err)
    assert any(e["event"] == "message" and e["message"].startswith("loading ") for e in events)
    calib = [e for e in events if e["event"] == "end" and e["task"].startswith("calibrating (MinMax")]
    assert calib and calib[0]["ok"] and calib[0]["completed"] == calib[0]["total"] > 0
