"""Device inventory, local-transport deploy/bench and the on-device agent (no SSH here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # sshd.py / conftest_devices.py live next to us
from conftest_devices import (VENV_PYTHON, age_tree, build_dir, isolated_inventory, local_device, make_build,  # noqa: E402,F401
                              replace_model_with_big_matmul, write_device)

from edgepack.devices import DeviceError, bench, deploy, get_device, load_inventory, raise_if_failed  # noqa: E402
from edgepack.cpuinfo import INT8_FLAGS  # noqa: E402
from edgepack.devices.inventory import load_device_file  # noqa: E402
from edgepack.errors import BudgetNotMet, EdgepackError  # noqa: E402
from edgepack.manifest import read_manifest, sha256_file  # noqa: E402


# --- inventory -------------------------------------------------------------------------------

def test_builtin_local_device_and_search_order(tmp_path, monkeypatch):
    xdg, env_dir, cli_dir = tmp_path / "xdg", tmp_path / "env", tmp_path / "cli"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("EDGEPACK_DEVICES_DIR", str(env_dir))
    write_device(xdg / "edgepack" / "devices", "pi", target="rpi", transport="local", emulated=True,
                 python="/opt/qemu-python")
    write_device(env_dir, "pi", target="x86", transport="local")  # shadows the XDG one
    write_device(cli_dir, "box", target="x86", transport="local")
    inv = load_inventory([cli_dir])
    assert inv["local"].transport == "local" and inv["local"].python_cmd == sys.executable
    assert inv["pi"].target == "x86" and inv["pi"].source == str(env_dir / "pi.toml")
    assert inv["box"].source == str(cli_dir / "box.toml")
    monkeypatch.delenv("EDGEPACK_DEVICES_DIR")
    pi = get_device("pi")
    assert pi.emulated and pi.python_cmd == "/opt/qemu-python" and pi.target == "rpi"
    with pytest.raises(EdgepackError, match="unknown device 'nope'.*known devices: local, pi"):
        get_device("nope")


@pytest.mark.parametrize("fields, expect", [
    (dict(target="x86", transport="local", colour="red"), r"colour: unknown key"),
    (dict(target="x86", transport="ssh", ssh=dict(host="h", user="u", port="twenty-two")), r"ssh\.port: "),
    (dict(target="toaster", transport="local"), r"target: unknown target 'toaster'"),
    (dict(target="x86", transport="ssh"), r"needs an \[ssh\] table"),
    (dict(target="x86", transport="carrier-pigeon"), r"transport: "),
])
def test_bad_inventory_entry_names_file_and_field(tmp_path, fields, expect):
    path = write_device(tmp_path, "bad", **fields)
    with pytest.raises(EdgepackError, match=expect) as e:
        load_inventory([tmp_path])
    assert str(path) in str(e.value)


def test_one_broken_device_file_breaks_only_that_device(tmp_path, build_dir, capsys):
    from edgepack.cli import main
    from edgepack.devices import bench_fleet

    d = tmp_path / "devs"
    local_device(d, name="good")
    (d / "typo.toml").write_text('target = "x86"\ntransport = "local\n')  # unterminated string
    with pytest.raises(EdgepackError, match="typo.toml is not valid TOML"):
        load_inventory([d])  # the strict API still raises
    assert get_device("good", [d]).name == "good"
    with pytest.raises(EdgepackError, match=r"device file .*typo.toml is not valid TOML"):
        get_device("typo", [d])
    assert main(["devices", "list", "--devices-dir", str(d)]) == 0
    captured = capsys.readouterr()
    assert "good" in captured.out and "skipped" in captured.err and "typo.toml" in captured.err
    # "all": the broken file is one failure; the good device is still benchmarked.
    fleet = bench_fleet(build_dir, "all", dirs=[d], threads=1, runs=3, warmup=0)
    by_name = {r["device"]: r for r in fleet["results"]}
    assert by_name["good"]["ok"] and not by_name["typo"]["ok"] and "not valid TOML" in by_name["typo"]["error"]
    assert fleet["failed"] == 1 and not fleet["passed"]


# --- local deploy and bench ------------------------------------------------------------------

def test_local_deploy_and_bench_end_to_end(tmp_path, build_dir):
    dev = local_device(tmp_path / "devices")
    r = bench(build_dir, dev, threads=1, runs=20, warmup=2)
    assert r["ok"] and r["passed"] and r["device"] == "loc" and not r["emulated"]
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["runs"] == 20
    assert r["runtime"]["name"] == "onnxruntime" and r["env"]["machine"] == "x86_64" and r["env"]["threads"] == 1
    host_flags = set(Path("/proc/cpuinfo").read_text().split())
    assert r["env"]["int8_flags"] == [f for f in INT8_FLAGS if f in host_flags]  # the host's, in order
    assert r["memory_mb"]["peak_rss"] > 10 and r["load_ms"] > 0 and r["first_ms"] > 0
    assert {v["budget"] for v in r["verdicts"]} == {"latency_p50_ms", "latency_p90_ms", "peak_memory_mb"}
    assert all(v["ok"] for v in r["verdicts"])
    deployed = Path(r["deploy"]["path"])
    assert sorted(p.name for p in deployed.iterdir()) == ["agent.py", "cpuinfo.py", "manifest.json",
                                                          "model.fp32.onnx", "runtime.py"]
    saved = json.loads((build_dir / r["result_file"]).read_text())
    assert saved["latency_ms"]["p50"] == lat["p50"]
    m = read_manifest(build_dir)
    assert m.bench[-1]["device"] == "loc" and m.bench[-1]["result_file"] == r["result_file"]
    report = (build_dir / "report.md").read_text()
    assert report.startswith("# edgepack report: tiny\n\nbuild section") and "## On-device benchmark: loc" in report
    assert f"int8 ISA extensions {' '.join(r['env']['int8_flags']) or 'none'}," in report
    # A second bench adds a new result file and a second manifest entry; nothing is overwritten.
    r2 = bench(build_dir, dev, threads=1, runs=5, warmup=0, profile=True)
    assert r2["result_file"] != r["result_file"] and (build_dir / r["result_file"]).exists()
    ops = {o["op"]: o for o in r2["op_profile"]}
    assert {"Conv", "Gemm"} <= set(ops) and ops["Conv"]["calls"] >= 5
    assert "operators (ONNX Runtime profile" in (build_dir / "report.md").read_text()
    assert len(read_manifest(build_dir).bench) == 2 and report in (build_dir / "report.md").read_text()
    assert r2["deploy"]["sent"] == ["manifest.json"]  # only the manifest changed (its bench list)


def test_redeploy_skips_unchanged_files(tmp_path, build_dir):
    dev = local_device(tmp_path / "devices")
    first = deploy(build_dir, dev)
    assert sorted(first["sent"]) == ["agent.py", "cpuinfo.py", "manifest.json", "model.fp32.onnx", "runtime.py"]
    again = deploy(build_dir, dev)
    assert again["sent"] == [] and again["bytes_sent"] == 0 and len(again["reused"]) == 5
    # A new model: only it and the manifest travel.
    make_build(build_dir, channels=16)
    third = deploy(build_dir, dev)
    assert sorted(third["sent"]) == ["manifest.json", "model.fp32.onnx"]
    assert sha256_file(Path(third["path"]) / "model.fp32.onnx") == sha256_file(build_dir / "model.fp32.onnx")


class Interrupted(Exception):
    pass


def test_interrupted_deploy_keeps_previous_deployment(tmp_path, build_dir):
    dev = local_device(tmp_path / "devices")
    first = deploy(build_dir, dev)
    old_sha = sha256_file(Path(first["path"]) / "model.fp32.onnx")
    make_build(build_dir, channels=16)  # a new build of the same name

    def die_on_second_upload(msg, seen=[]):
        if "uploading" in msg:
            seen.append(msg)
            if len(seen) == 2:
                raise Interrupted(msg)

    with pytest.raises(Interrupted):
        deploy(build_dir, dev, progress=die_on_second_upload)
    live = Path(first["path"])
    assert sha256_file(live / "model.fp32.onnx") == old_sha
    assert json.loads((live / "manifest.json").read_text())["artifacts"][0]["sha256"] == old_sha
    releases = live.parent / ".releases" / "tiny"
    assert any(p.name.endswith(".partial") for p in releases.iterdir())
    # The previous deployment still benchmarks (the agent checks it against its own manifest).
    r = bench(build_dir, dev, runs=3, warmup=0, redeploy=False)
    assert r["sha256"] == old_sha
    # A fresh partial may be a concurrent deploy still uploading: kept. Untouched for 10 min: removed.
    leftover = [p for p in releases.iterdir() if p.name.endswith(".partial")]
    done = deploy(build_dir, dev)
    assert sha256_file(Path(done["path"]) / "model.fp32.onnx") == sha256_file(build_dir / "model.fp32.onnx")
    assert all(p.exists() for p in leftover)
    age_tree(leftover[0], 11 * 60)
    deploy(build_dir, dev)
    assert [p.name for p in releases.iterdir() if p.name.endswith(".partial")] == []


def test_concurrent_deploy_of_the_same_build_is_not_disturbed(tmp_path, build_dir):
    """A second deploy's clean-up must not delete the staging directory of one still uploading."""
    from edgepack.devices import device_ops
    dev = local_device(tmp_path / "devices")
    deploy(build_dir, dev)
    make_build(build_dir, channels=16)
    root = deploy(build_dir, dev)["workdir"]
    spec = {"model.fp32.onnx": sha256_file(build_dir / "model.fp32.onnx")}
    uploading = device_ops.prepare({"root": root, "name": "tiny", "files": spec})
    other = deploy(build_dir, dev)  # runs prepare + commit while the first is mid-upload
    assert Path(uploading["staging"]).is_dir() and Path(other["path"]).is_dir()
    (Path(uploading["staging"]) / "model.fp32.onnx").write_bytes((build_dir / "model.fp32.onnx").read_bytes())
    assert device_ops.commit({"root": root, "name": "tiny", "staging": uploading["staging"], "files": spec})["ok"]


def test_tampered_artifact_is_refused_by_agent(tmp_path, build_dir):
    dev = local_device(tmp_path / "devices")
    dep = deploy(build_dir, dev)
    model = Path(dep["path"]) / "model.fp32.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DeviceError, match=r"device loc: the agent refused: artifact model.fp32.onnx has sha256 "
                                          r"[0-9a-f]{64} but the manifest says") as e:
        bench(build_dir, dev, runs=3, warmup=0, redeploy=False)
    assert "deploy again" in e.value.hint
    # The agent itself: exit code 3 and a JSON error on stdout.
    p = subprocess.run([VENV_PYTHON, str(Path(dep["path"]) / "agent.py"), "--manifest",
                        str(Path(dep["path"]) / "manifest.json"), "--artifact", "model.fp32.onnx"],
                       capture_output=True, text=True)
    out = json.loads(p.stdout)
    assert p.returncode == 3 and out["ok"] is False and out["kind"] == "integrity"
    # Deploying again repairs it (the changed file is detected and sent again).
    assert "model.fp32.onnx" in deploy(build_dir, dev)["sent"]


def test_budget_failure_and_emulated_device(tmp_path):
    b = make_build(tmp_path / "build", budgets={"latency_p50_ms": 1e-6, "peak_memory_mb": 4096})
    r = bench(b, local_device(tmp_path / "d"), runs=3, warmup=0)
    p50 = next(v for v in r["verdicts"] if v["budget"] == "latency_p50_ms")
    assert p50["ok"] is False and not r["passed"]
    with pytest.raises(BudgetNotMet, match=r"loc: latency_p50_ms .* > 1e-06"):
        raise_if_failed(r)
    # Emulated (here: a wrapper script as python, like the qemu one): latency never judged.
    wrapper = tmp_path / "py-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\nexec "{VENV_PYTHON}" "$@"\n')
    wrapper.chmod(0o755)
    emu = local_device(tmp_path / "d", name="emu", python=str(wrapper), emulated=True)
    r = bench(b, emu, runs=3, warmup=0)
    lat = [v for v in r["verdicts"] if v["budget"].startswith("latency")]
    assert lat and all(v["ok"] is None and "emulated" in v["note"] for v in lat) and r["passed"]
    assert "(emulated: latency not judged)" in (b / "report.md").read_text()
    raise_if_failed(r)


def test_wrong_arch_and_missing_runtime_are_explained(tmp_path, build_dir):
    path = write_device(tmp_path / "d", "pi", target="rpi", transport="local", workdir=str(tmp_path / "w"),
                        python=VENV_PYTHON)
    with pytest.raises(DeviceError, match=r"(?s)device pi .*architecture is x86_64 but target 'rpi' is aarch64"):
        deploy(build_dir, load_device_file(path))
    bare = local_device(tmp_path / "d", name="bare", python="/usr/bin/python3")
    with pytest.raises(DeviceError) as e:
        deploy(build_dir, bare)
    msg = str(e.value)
    assert "onnxruntime cannot be imported by /usr/bin/python3" in msg and "No module named" in msg
    assert "/usr/bin/python3 -m pip install onnxruntime" in msg
    assert not (tmp_path / "d" / "bare-work" / "tiny").exists()
    ghost = local_device(tmp_path / "d", name="ghost", python=str(tmp_path / "no-such-python"))
    with pytest.raises(DeviceError, match=r"device ghost: cannot run .*no-such-python.*not found"):
        deploy(build_dir, ghost)


def test_cli_devices_list_and_bench_json(tmp_path, build_dir, capsys):
    from edgepack.cli import main

    d = tmp_path / "devs"
    local_device(d, name="cli-dev")
    assert main(["devices", "list", "--devices-dir", str(d)]) == 0
    listed = capsys.readouterr().out
    assert "cli-dev" in listed and "local" in listed
    code = main(["bench", str(build_dir), "--device", "cli-dev", "--devices-dir", str(d), "--runs", "3",
                 "--warmup", "0", "--threads", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["results"][0]["device"] == "cli-dev" and out["results"][0]["ok"]
    assert main(["bench", str(build_dir), "--device", "nope", "--devices-dir", str(d)]) == 2


def test_bench_timeout_is_reported_by_the_agent(tmp_path, build_dir):
    dev = local_device(tmp_path / "devices")
    t0 = __import__("time").monotonic()
    with pytest.raises(DeviceError, match=r"device loc: the agent refused: benchmark did not finish within 1 s "
                                          r"\(10000000 runs requested\)") as e:
        bench(build_dir, dev, runs=10_000_000, warmup=0, timeout_s=1)
    assert __import__("time").monotonic() - t0 < 15 and "--runs" in e.value.hint


def test_latency_measured_off_target_is_not_judged(tmp_path):
    """A build for the Pi benchmarked on this x86 machine: latency says nothing about the Pi."""
    b = make_build(tmp_path / "build", target="rpi", budgets={"latency_p50_ms": 1e-6, "peak_memory_mb": 4096})
    r = bench(b, local_device(tmp_path / "d"), runs=3, warmup=0)
    p50 = next(v for v in r["verdicts"] if v["budget"] == "latency_p50_ms")
    assert p50["ok"] is None and "measured on x86_64, the build targets aarch64" in p50["note"]
    assert r["passed"] and next(v for v in r["verdicts"] if v["budget"] == "peak_memory_mb")["ok"]


@pytest.fixture
def memory_cgroup(tmp_path):
    """A cgroup-v1 memory cgroup of 48 MB (root only), removed afterwards."""
    base = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (base / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup v1 memory controller")
    cg = base / f"edgepack-test-{os.getpid()}-{tmp_path.name}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(48 << 20))
        yield cg
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:  # still has a dying process in it
                __import__("time").sleep(0.1)


def test_agent_killed_out_of_memory_is_explained(tmp_path, build_dir, memory_cgroup):
    # A device with little memory: the agent (not the deploy checks) runs inside a 48 MB cgroup,
    # and the kernel kills it while it loads numpy, onnxruntime and the model.
    wrapper = tmp_path / "small-board-python"
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in */agent.py) echo $$ > {memory_cgroup}/cgroup.procs;; esac\n'
                       f'exec "{VENV_PYTHON}" "$@"\n')
    wrapper.chmod(0o755)
    replace_model_with_big_matmul(build_dir, n=3072)  # 36 MB of weights: more than the board has
    dev = local_device(tmp_path / "d", name="tiny-board", python=str(wrapper))
    with pytest.raises(DeviceError, match=r"device tiny-board: the agent was killed \(SIGKILL\) before it could "
                                          r"report, most likely out of memory") as e:
        bench(build_dir, dev, runs=3, warmup=0)
    assert "dmesg" in e.value.hint


def test_shipped_ssh_example_is_a_valid_device_file(tmp_path):
    example = Path(__file__).parent.parent / "devices" / "ssh-example.toml.example"
    copy = tmp_path / "pi-kitchen.toml"
    copy.write_text(example.read_text())
    dev = load_device_file(copy)
    assert dev.transport == "ssh" and dev.ssh.host == "192.168.1.20" and dev.target == "rpi"
    assert "pi-kitchen" not in load_inventory()  # the .example itself is never loaded


def test_artifact_paths_cannot_escape_the_deployment(tmp_path, build_dir):
    m = read_manifest(build_dir)
    m.artifacts[0].path = "../../etc/evil.onnx"
    from edgepack.manifest import write_json_atomic
    write_json_atomic(build_dir / "manifest.json", m)
    with pytest.raises(DeviceError, match=r"artifact path '../../etc/evil.onnx' .* is not a plain relative path"):
        deploy(build_dir, local_device(tmp_path / "d"))


def test_fleet_runs_devices_on_this_machine_one_at_a_time(tmp_path, build_dir):
    from edgepack.devices import bench_fleet
    devs = [local_device(tmp_path / "d", name=f"here-{i}") for i in range(2)]
    broken = local_device(tmp_path / "d", name="broken", python="/usr/bin/python3")
    fleet = bench_fleet(build_dir, [*devs, broken], threads=1, runs=3, warmup=0)
    assert [r["device"] for r in fleet["results"]] == ["here-0", "here-1", "broken"]
    assert fleet["ok"] == 2 and fleet["failed"] == 1 and "onnxruntime cannot be imported" in fleet["results"][2]["error"]
    a, b = (json.loads((build_dir / r["result_file"]).read_text()) for r in fleet["results"][:2])
    # Sequential: the second local agent started after the first had finished.
    from datetime import datetime
    start = [datetime.strptime(r["timestamp_stamp"], "%Y%m%dT%H%M%S.%fZ").timestamp() for r in (a, b)]
    assert start[1] >= start[0] + a["agent_wall_s"] - 0.01
    assert fleet["results"][2]["attempts"] == [fleet["results"][2]["error"]]  # permanent: not retried


@pytest.mark.tflite
@pytest.mark.slow
def test_tflite_nhwc_artifact_benchmarks_with_litert(tmp_path, build_dir):
    """A TFLite artifact in NHWC next to NCHW manifest inputs: the agent feeds the model's own shape."""
    pytest.importorskip("litert_torch")
    import torch
    from torch import nn

    from edgepack.manifest import Artifact, write_json_atomic
    from edgepack.tflite.convert import convert_fp32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    out = build_dir / "model.fp32.tflite"
    convert_fp32(model, (torch.randn(1, 3, 16, 16),), out, layout="NHWC")
    m = read_manifest(build_dir)
    m.artifacts.append(Artifact(path=out.name, format="tflite", precision="fp32", sha256=sha256_file(out),
                                size_bytes=out.stat().st_size, layout="NHWC"))
    write_json_atomic(build_dir / "manifest.json", m)
    r = bench(build_dir, local_device(tmp_path / "d"), artifact=out.name, threads=1, runs=5, warmup=1, profile=True)
    assert r["runtime"]["name"] in ("ai-edge-litert", "tflite-runtime") and r["format"] == "tflite"
    assert r["inputs"] == [{"shape": [1, 16, 16, 3], "dtype": "float32"}]
    assert "only available for ONNX Runtime" in r["op_profile_note"]
