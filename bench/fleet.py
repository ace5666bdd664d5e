"""A fleet of 8 SSH devices on loopback (real sshd servers): deploy+bench all in parallel, one
device killed mid-run, then the same fleet without faults in parallel and one after another.

    .venv/bin/python bench/fleet.py [--devices 8] [--runs 200]     (root; needs openssh-server)
Writes bench/results/fleet.json: 7 results + 1 clear failure, and wall times parallel vs
sequential. On this 2-core box the devices share the CPUs, so parallel speed-up is bounded by
the cores for the benchmark itself; the SSH/deploy/startup part overlaps fully.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from common import make_onnx_build  # noqa: E402

import sshd as sshd_mod  # noqa: E402  (tests/sshd.py: the real-sshd helper)
from fixtures import zoo  # noqa: E402
from edgepack.devices import bench_fleet  # noqa: E402
from edgepack.devices.inventory import Device, SshConfig  # noqa: E402


def make_build(build: Path) -> Path:
    """A small ResNet-18 (width 0.25, 32x32 input, ~0.7 MB): a few ms per inference."""
    torch.manual_seed(0)
    return make_onnx_build(build, zoo.resnet18(num_classes=10, small_input=True, width=0.25), (1, 3, 32, 32), "fleet")

def brief(fleet: dict) -> dict:
    return {"wall_s": fleet["wall_s"], "ok": fleet["ok"], "failed": fleet["failed"],
            "devices": [{"device": r["device"], "ok": r["ok"],
                         **({"p50_ms": round(r["latency_ms"]["p50"], 3), "deploy_s": r["deploy"]["seconds"],
                             "agent_wall_s": r["agent_wall_s"]} if r["ok"] else {"error": r["error"]})}
                        for r in fleet["results"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.json"))
    args = ap.parse_args()
    servers = []
    with tempfile.TemporaryDirectory(prefix="edgepack-fleet-") as tmp:
        tmp = Path(tmp)
        try:
            key = sshd_mod.keygen(tmp / "id_ed25519")
            known = tmp / "known_hosts"
            for i in range(args.devices):
                servers.append(sshd_mod.Sshd(tmp / f"sshd-{i}", Path(f"{key}.pub")).start())
            known.write_text("".join(s.known_hosts_line() for s in servers))
            build = make_build(tmp / "build")

            def fleet_devices(phase: str) -> list[Device]:
                # A fresh workdir per phase: every phase pays for a full deploy.
                return [Device(name=f"dev{i}", target="x86", transport="ssh", python=sys.executable,
                               workdir=str(tmp / phase / f"dev{i}"), source="bench/fleet.py",
                               ssh=SshConfig(host="127.0.0.1", port=s.port, user="root", key_file=str(key),
                                             known_hosts=str(known), connect_timeout_s=5))
                        for i, s in enumerate(servers)]

            common = dict(threads=1, runs=args.runs, warmup=5, retries=1, timeout_s=300)
            # 1. all in parallel; dev3 dies while it benchmarks
            devs = fleet_devices("faulty")
            victim = min(3, len(devs) - 1)

            def kill_victim():
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not sshd_mod.agent_running(devs[victim].workdir):
                    time.sleep(0.05)
                servers[victim].kill()

            killer = threading.Thread(target=kill_victim)
            killer.start()
            faulty = bench_fleet(build, devs, **common)
            killer.join()
            print(f"parallel with a dying device: {faulty['ok']} ok, {faulty['failed']} failed, "
                  f"{faulty['wall_s']:.1f} s", flush=True)
            for r in faulty["results"]:
                if not r["ok"]:
                    print(f"  {r['device']}: {r['error']}")
            servers[victim] = sshd_mod.Sshd(servers[victim].root, Path(f"{key}.pub"),
                                            port=servers[victim].port).start()
            # 2. the whole fleet, healthy, in parallel; 3. one device after another
            parallel = bench_fleet(build, fleet_devices("parallel"), **common)
            print(f"parallel, healthy: {parallel['ok']} ok in {parallel['wall_s']:.1f} s", flush=True)
            t0 = time.monotonic()
            seq = [bench_fleet(build, [d], **common) for d in fleet_devices("sequential")]
            seq_wall = time.monotonic() - t0
            print(f"sequential, healthy: {sum(f['ok'] for f in seq)} ok in {seq_wall:.1f} s", flush=True)
        finally:
            for s in servers:
                s.kill()
    result = {
        "devices": args.devices, "runs_per_device": args.runs, "model": "ResNet-18 w0.25 32x32 fp32 ONNX",
        "cpu_count": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
        "parallel_with_kill": brief(faulty),
        "parallel_healthy": brief(parallel),
        "sequential_healthy": {"wall_s": round(seq_wall, 3), "ok": sum(f["ok"] for f in seq),
                               "devices": [brief(f)["devices"][0] for f in seq]},
        "speedup_parallel_vs_sequential": round(seq_wall / parallel["wall_s"], 2),
        "kill_result": f"{faulty['ok']} results, {faulty['failed']} failure(s)",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"parallel {parallel['wall_s']:.1f} s vs sequential {seq_wall:.1f} s "
          f"({result['speedup_parallel_vs_sequential']}x) -> {args.out}")


if __name__ == "__main__":
    main()
