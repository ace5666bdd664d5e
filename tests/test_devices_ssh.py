"""Deploy and bench over real SSH: sshd servers on 127.0.0.1, each with its own host key,
port and authorised key. No mocks: every fault below is the real thing."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd as sshd_mod  # noqa: E402
from conftest_devices import (add_eval_subset, add_int8, age_tree, build_dir, client_key, isolated_inventory,  # noqa: E402,F401
                              make_build, ssh_device, ssh_servers, replace_model_with_big_matmul)

from edgepack.devices import DeviceError, DeviceUnreachable, bench, bench_fleet, check_device, deploy  # noqa: E402
from edgepack.devices.summary import fleet_table  # noqa: E402
from edgepack.manifest import read_manifest  # noqa: E402

pytestmark = pytest.mark.ssh


def test_ssh_deploy_and_bench(build_dir, ssh_device):
    dev, _ = ssh_device("pi-a")
    info = check_device(dev)
    assert info["ok"] and info["machine"] == "x86_64" and info["runtimes"]["onnxruntime"]
    first = deploy(build_dir, dev)
    assert sorted(first["sent"]) == ["agent.py", "cpuinfo.py", "manifest.json", "model.fp32.onnx", "runtime.py"]
    assert Path(first["path"], "model.fp32.onnx").is_file()
    r = bench(build_dir, dev, threads=1, runs=10, warmup=1)
    assert r["passed"] and r["where"].startswith("root@127.0.0.1:") and r["deploy"]["sent"] == []
    assert read_manifest(build_dir).bench[-1]["device"] == "pi-a"


def test_unreachable_host(build_dir, ssh_device):
    dev, server = ssh_device("gone")
    server.kill()  # nothing listens on that port any more
    with pytest.raises(DeviceUnreachable, match=rf"device gone: cannot connect to root@127.0.0.1:{server.port} "
                                                r"\(connection refused\)"):
        deploy(build_dir, dev)


def test_refused_client_key(build_dir, ssh_device, tmp_path):
    stranger = sshd_mod.keygen(tmp_path / "stranger")
    dev, _ = ssh_device("locked", key_file=stranger)
    with pytest.raises(DeviceError, match=rf"device locked: root@127.0.0.1:\d+ refused the key {stranger}") as e:
        deploy(build_dir, dev)
    assert not isinstance(e.value, DeviceUnreachable) and "ssh-copy-id" in e.value.hint


def test_changed_host_key_is_always_refused(build_dir, ssh_device, tmp_path, client_key, ssh_servers):
    other = ssh_servers("impostor", Path(f"{client_key}.pub"))
    dev, real = ssh_device("moved")
    # known_hosts remembers the real device's key, but the impostor answers on that address.
    known = Path(dev.ssh.known_hosts)
    known.write_text(real.known_hosts_line().replace(f":{real.port}", f":{other.port}"))
    dev.ssh.port = other.port
    before = known.read_text()
    for accept in (False, True):
        with pytest.raises(DeviceError, match=r"host key of .* has CHANGED: it offered ssh-ed25519 "
                                              + other.fingerprint().replace("+", r"\+")) as e:
            deploy(build_dir, dev, accept_new_host_key=accept)
        assert real.fingerprint() in str(e.value) and "ssh-keygen -R" in e.value.hint
    assert known.read_text() == before


def test_unknown_host_key_needs_accept_flag(build_dir, ssh_device):
    dev, server = ssh_device("new", trusted=False)
    with pytest.raises(DeviceError, match=r"host \[127.0.0.1\]:\d+ is not in .*known_hosts-new.*"
                                          + server.fingerprint().replace("+", r"\+")) as e:
        deploy(build_dir, dev)
    assert "--accept-new-host-key" in e.value.hint
    assert Path(dev.ssh.known_hosts).read_text() == ""
    deploy(build_dir, dev, accept_new_host_key=True)
    assert f"[127.0.0.1]:{server.port} ssh-ed25519 " in Path(dev.ssh.known_hosts).read_text()
    assert deploy(build_dir, dev)["sent"] == []  # remembered: no flag needed any more


def test_missing_runtime_on_device(build_dir, ssh_device):
    dev, _ = ssh_device("bare", python="/usr/bin/python3")
    with pytest.raises(DeviceError) as e:
        deploy(build_dir, dev)
    msg = str(e.value)
    assert "device bare (root@127.0.0.1:" in msg
    assert "numpy cannot be imported by /usr/bin/python3" in msg and "onnxruntime cannot be imported" in msg
    assert "/usr/bin/python3 -m pip install onnxruntime" in msg


def test_tampered_artifact_on_device(build_dir, ssh_device):
    dev, _ = ssh_device("tamper")
    dep = deploy(build_dir, dev)
    with open(Path(dep["path"]) / "model.fp32.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff" * 8)
    with pytest.raises(DeviceError, match=r"device tamper: the agent refused: artifact model.fp32.onnx has "
                                          r"sha256 \w+ but the manifest says"):
        bench(build_dir, dev, runs=3, warmup=0, redeploy=False)
    assert bench(build_dir, dev, runs=3, warmup=0)["deploy"]["sent"] == ["model.fp32.onnx"]  # repaired


def test_accuracy_on_an_ssh_device_equals_the_hosts(tmp_path, ssh_device):
    """Loopback x86 over SSH: the same kernels as here, so the device's figure is the host's."""
    b = make_build(tmp_path / "build", budgets={"max_accuracy_drop": 5.0})
    add_int8(b)
    add_eval_subset(b)
    dev, _ = ssh_device("pi-eval")
    r = bench(b, dev, threads=1, runs=3, warmup=0, also_evaluate=["model.fp32.onnx"])
    assert "eval/subset.npz" in r["deploy"]["sent"]
    timed, fp32 = r["eval"]
    assert timed["artifact"] == "model.int8.onnx" and fp32["artifact"] == "model.fp32.onnx"
    for e in r["eval"]:
        assert e["device"]["accuracy"] == e["host"]["accuracy"] and e["samples"] == 64
        assert e["vs_host"]["max_abs_diff"] == 0.0 and e["vs_host"]["consistent"]
    assert fp32["device"]["accuracy"] == 100.0 and fp32["drop"] == 0.0
    drop = next(v for v in r["verdicts"] if v["budget"] == "max_accuracy_drop")
    assert drop["value"] == timed["drop"] == timed["host_drop"] and drop["ok"] is (timed["drop"] <= 5.0)
    # Fetched over SFTP, then removed from the device.
    assert not list(Path(r["deploy"]["workdir"], ".edgepack-eval").glob("*.npz"))


def test_tampered_subset_on_an_ssh_device_is_refused(tmp_path, ssh_device):
    b = make_build(tmp_path / "build")
    add_eval_subset(b)
    dev, _ = ssh_device("tamper-eval")
    dep = deploy(b, dev)
    with open(Path(dep["path"]) / "eval" / "subset.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\xff" * 8)
    with pytest.raises(DeviceError, match=r"device tamper-eval: the agent refused: evaluation subset "
                                          r"eval/subset.npz has sha256 \w+ but the manifest says"):
        bench(b, dev, runs=2, warmup=0, redeploy=False)
    r = bench(b, dev, runs=2, warmup=0)  # a deploy repairs it
    assert r["deploy"]["sent"] == ["eval/subset.npz"] and r["eval"][0]["device"]["accuracy"] == 100.0


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_on_device(tmp_path, ssh_device, tiny_disk):
    b = make_build(tmp_path / "build", channels=8)
    (tiny_disk / "filler").write_bytes(b"x" * 150_000)  # leave ~50 kB: less than the deploy needs
    dev, _ = ssh_device("full", workdir=str(tiny_disk / "edgepack"))
    with pytest.raises(DeviceError, match=r"device full: not enough disk space in .*tiny-disk/edgepack: the "
                                          r"deploy needs 0.\d+ MB, 0.0\d MB are free") as e:
        deploy(b, dev)
    assert "workdir" in e.value.hint
    assert not list(tiny_disk.rglob("*.partial"))  # nothing half-uploaded left to fill the disk
    (tiny_disk / "filler").unlink()
    assert len(deploy(b, dev)["sent"]) == 5  # the model, the manifest, the agent and its two modules


def test_fleet_survives_a_device_dying_mid_benchmark(build_dir, ssh_device):
    devs = [ssh_device(f"fleet-{i}") for i in range(3)]
    victim_dev, victim = devs[1]

    def kill_when_benchmarking():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not sshd_mod.agent_running(victim_dev.workdir):
            time.sleep(0.02)
        victim.kill()  # at once: on an idle machine 8000 runs of this model took less than 0.3 s

    killer = threading.Thread(target=kill_when_benchmarking)
    killer.start()
    fleet = bench_fleet(build_dir, [d for d, _ in devs], threads=1, runs=40000, warmup=0, retries=1, timeout_s=120)
    killer.join()
    by_name = {r["device"]: r for r in fleet["results"]}
    assert fleet["ok"] == 2 and fleet["failed"] == 1 and not fleet["passed"]
    assert by_name["fleet-0"]["ok"] and by_name["fleet-2"]["ok"]
    lost = by_name["fleet-1"]
    assert not lost["ok"] and len(lost["attempts"]) == 2
    assert "device fleet-1: connection to root@127.0.0.1" in lost["attempts"][0] and "lost after" in lost["attempts"][0]
    assert "connection refused" in lost["attempts"][1] and "failed 2 times" in lost["error"]
    # The survivors' results were recorded; the table shows every device.
    assert sorted(b["device"] for b in read_manifest(build_dir).bench) == ["fleet-0", "fleet-2"]
    from rich.console import Console
    console = Console(record=True, width=200)
    console.print(fleet_table(fleet))
    text = console.export_text()
    assert all(f"fleet-{i}" in text for i in range(3)) and "FAILED" in text


def test_disk_full_during_upload(tmp_path, ssh_device, tiny_disk, monkeypatch):
    """The free-space check is disabled to hit the real ENOSPC of the SFTP upload."""
    deploy_mod = sys.modules["edgepack.devices.deploy"]  # the module, not the function of that name
    small = make_build(tmp_path / "small")
    dev, _ = ssh_device("fills", workdir=str(tiny_disk / "edgepack"))
    previous = deploy(small, dev)
    big = make_build(tmp_path / "big", channels=1200)  # a ~130 kB model: more than is left
    (tiny_disk / "filler").write_bytes(b"x" * 120_000)
    monkeypatch.setattr(deploy_mod, "DISK_MARGIN", -(1 << 30))
    with pytest.raises(DeviceError, match=r"device fills: upload of .*model.fp32.onnx failed: .* \(the disk is full\); model.fp32.onnx "
                                          r"is 0.\d+ MB and the device had 0.\d+ MB free in .*The previous "
                                          r"deployment is unchanged"):
        deploy(big, dev)
    assert not list(tiny_disk.rglob("*.partial"))
    live = Path(previous["path"]) / "model.fp32.onnx"
    from edgepack.manifest import sha256_file
    assert sha256_file(live) == sha256_file(small / "model.fp32.onnx")


def test_cli_check_deploy_bench_over_ssh(tmp_path, build_dir, ssh_device, capsys):
    from edgepack.cli import main
    dev, server = ssh_device("cli-pi", trusted=False)
    d = Path(dev.source).parent
    assert main(["devices", "check", "cli-pi", "--devices-dir", str(d)]) == 2
    assert server.fingerprint() in capsys.readouterr().err.replace("\n", "")
    assert main(["devices", "check", "cli-pi", "--devices-dir", str(d), "--accept-new-host-key"]) == 0
    assert "x86_64" in capsys.readouterr().out
    assert main(["deploy", str(build_dir), "--device", "cli-pi", "--devices-dir", str(d)]) == 0
    assert "sent 5 files" in capsys.readouterr().out
    code = main(["bench", str(build_dir), "--devices", "cli-pi,local", "--devices-dir", str(d), "--runs", "3",
                 "--warmup", "0", "--threads", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "cli-pi" in text and "local" in text and "2 ok, 0 failed" in text


def test_device_that_hangs_silently_times_out(build_dir, ssh_device, monkeypatch):
    """Power loss leaves TCP half-open: no FIN, no data. SIGSTOP on the device's sshd and agent
    is exactly that; the per-device timeout (plus grace) must end the wait."""
    import signal
    monkeypatch.setattr(sys.modules["edgepack.devices.bench"], "AGENT_GRACE_S", 1)
    dev, server = ssh_device("frozen")
    stopped = []

    def freeze():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not sshd_mod.agent_running(dev.workdir):
            time.sleep(0.05)
        for pid in [server.proc.pid, *sshd_mod.descendants(server.proc.pid)]:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    t = threading.Thread(target=freeze)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(DeviceUnreachable, match=r"device frozen: command timed out after 3 s: .*agent.py"):
            bench(build_dir, dev, runs=10_000_000, warmup=0, timeout_s=2)
        assert time.monotonic() - t0 < 20
    finally:
        t.join()
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def test_connection_lost_mid_upload_keeps_previous_deployment(build_dir, ssh_device, client_key):
    dev, server = ssh_device("flaky")
    first = deploy(build_dir, dev)
    old = (Path(first["path"]) / "model.fp32.onnx").read_bytes()
    replace_model_with_big_matmul(build_dir, n=2048)  # 16 MB: the upload takes a moment
    staging_root = Path(first["workdir"]) / ".releases" / "tiny"

    def kill_during_upload():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = list(staging_root.glob("*.partial/model.fp32.onnx"))
            if parts and parts[0].stat().st_size > 0:
                server.kill()
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_during_upload)
    killer.start()
    # Almost always "connection lost while uploading ...model.fp32.onnx"; on a very slow machine
    # the kill can land just after the upload, during the verification step: same guarantee.
    with pytest.raises(DeviceUnreachable, match=r"device flaky: connection (to \S+ )?lost"):
        deploy(build_dir, dev)
    killer.join()
    assert (Path(first["path"]) / "model.fp32.onnx").read_bytes() == old
    # The device comes back: the new build goes in whole, and the leftover (untouched for more
    # than 10 minutes, so not a concurrent upload) is cleaned.
    for leftover in staging_root.glob("*.partial"):
        age_tree(leftover, 11 * 60)
    revived = sshd_mod.Sshd(server.root, Path(f"{client_key}.pub"), port=server.port).start()  # same host key
    try:
        done = deploy(build_dir, dev)
        assert "model.fp32.onnx" in done["sent"] and not list(staging_root.glob("*.partial"))
    finally:
        revived.kill()


def test_encrypted_key_file_is_explained(build_dir, ssh_device, tmp_path):
    locked = tmp_path / "locked_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    dev, _ = ssh_device("enc", key_file=locked)
    with pytest.raises(DeviceError, match=rf"device enc: key {locked} is encrypted and needs a passphrase") as e:
        deploy(build_dir, dev)
    assert "ssh-agent" in e.value.hint


def test_closing_a_dead_connection_keeps_the_original_error(build_dir, ssh_device):
    # Closing sends a packet; when the device has just died that raises EOFError, which used to
    # replace "connection lost while uploading ..." (seen once in CI). Made deterministic here.
    from edgepack.devices.transport import connect

    dev, server = ssh_device("dying")
    t = connect(dev)
    Path(dev.workdir).mkdir(parents=True, exist_ok=True)
    t.put(b"x", f"{dev.workdir}/probe.bin")

    class DeadSftp:
        def close(self):
            raise EOFError()

    t._sftp = DeadSftp()
    server.kill()
    t.close()  # must not raise
