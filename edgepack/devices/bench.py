"""Benchmark a build on a device: deploy (only what changed), run the agent, judge, record."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BudgetNotMet
from ..manifest import read_manifest
from .deploy import deployed_path, deploy_with
from .errors import DeviceError
from .inventory import Device, get_device
from .judge import budgets_for, judge
from .results import record, save_result, utc_stamp
from .transport import connect


AGENT_GRACE_S = 20


def resolve(device: Device | str, dirs=None) -> Device:
    return device if isinstance(device, Device) else get_device(device, dirs)


def bench(build_dir: Path | str, device: Device | str, threads: int | None = None, runs: int = 100,
          warmup: int = 10, artifact: str | None = None, accept_new_host_key: bool = False,
          timeout_s: float | None = 600, profile: bool = False, dirs=None, progress=None,
          redeploy: bool = True) -> dict:
    """Deploy `build_dir` to `device`, benchmark one artifact there and record the result.

    Returns the full result: latency_ms (min/p50/p90/p99/max/mean/std/throughput), load_ms,
    first_ms, memory_mb, env, runtime, deploy, verdicts (list of Verdict dicts), passed, and
    result_file. Budget failures do not raise (see `raise_if_failed`); device problems raise
    DeviceError / DeviceUnreachable naming the device. redeploy=False benchmarks what is already
    deployed on the device (the agent still refuses files that differ from their manifest)."""
    build_dir = Path(build_dir)
    device = resolve(device, dirs)
    if runs < 1 or warmup < 0:
        raise DeviceError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    manifest = read_manifest(build_dir)
    artifact = artifact or manifest.primary
    try:
        entry = manifest.artifact(artifact)
    except KeyError:
        known = ", ".join(a.path for a in manifest.artifacts)
        raise DeviceError(f"artifact {artifact!r} is not in {build_dir}/manifest.json (known: {known})",
                          "pass one of those to --artifact") from None
    profile_obj = device.profile()
    threads = threads or profile_obj.threads
    with connect(device, accept_new_host_key) as t:
        if redeploy:
            dep = deploy_with(t, build_dir, manifest, progress, formats={entry.format})
        else:
            dep = deployed_path(t, manifest)
        if progress:
            progress(f"{device.name}: benchmarking {artifact} ({runs} runs, {threads} threads)")
        started = datetime.now(timezone.utc)
        argv = t.python(f"{dep['path']}/agent.py", "--manifest", f"{dep['path']}/manifest.json",
                        "--artifact", artifact, "--threads", str(threads), "--runs", str(runs),
                        "--warmup", str(warmup)) + (["--profile"] if profile else [])
        if timeout_s:
            argv += ["--timeout", str(timeout_s)]
        t0 = time.monotonic()
        # The agent stops itself at timeout_s and reports; the grace covers a device too stuck to.
        r = t.run(argv, timeout=timeout_s + AGENT_GRACE_S if timeout_s else None)
        wall = time.monotonic() - t0
    out = _parse_agent(device, r)
    result = {
        "device": device.name, "where": device.where(), "target": device.target, "emulated": device.emulated,
        "build": manifest.name, "timestamp": started.isoformat(timespec="seconds"),
        "timestamp_stamp": utc_stamp(started), **out, "agent_wall_s": round(wall, 3), "deploy": dep,
    }
    budgets, source = budgets_for(manifest.target, profile_obj)
    target_arch = manifest.target.get("arch") if isinstance(manifest.target, dict) else None
    verdicts = judge(out, budgets, device.name, device.emulated, target_arch)
    result["budgets_from"] = source
    result["verdicts"] = [v.model_dump() for v in verdicts]
    result["passed"] = all(v.ok is not False for v in verdicts)
    path = save_result(build_dir, device.name, result)
    result["result_file"] = str(path.relative_to(build_dir))
    record(build_dir, result)
    return result


def _parse_agent(device: Device, r) -> dict:
    lines = [line for line in r.stdout.strip().splitlines() if line.startswith("{")]
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        if r.rc in (137, -9):  # SIGKILL: on a small board almost always the kernel's OOM killer
            raise DeviceError(f"device {device.name}: the agent was killed (SIGKILL) before it could report, "
                              "most likely out of memory", "check `dmesg` on the device; try the int8 "
                              "artifact (--artifact) or a smaller model") from None
        raise DeviceError(f"device {device.name}: the agent crashed (exit {r.rc}) without a result: "
                          f"{(r.stderr or r.stdout).strip()[-800:]}",
                          "run `edgepack devices check` for the device; the output above is the agent's") from None
    if not out.get("ok"):
        hints = {"integrity": "a deployed file no longer matches the build: deploy again "
                              "(`edgepack deploy BUILD --device NAME`) and check the device's storage",
                 "runtime": f"install the runtime for {device.python_cmd} on the device",
                 "timeout": "use fewer --runs or a larger --timeout"}
        raise DeviceError(f"device {device.name}: the agent refused: {out.get('error')}",
                          hints.get(out.get("kind"), "see the message above"))
    return out


def raise_if_failed(results: dict | list[dict]) -> None:
    """Raise BudgetNotMet (exit 1) naming every failed budget of one or many bench results."""
    results = [results] if isinstance(results, dict) else results
    failed = [f"{r['device']}: {v['budget']} {v['value']} > {v['limit']}"
              for r in results if r.get("ok", True) and "verdicts" in r
              for v in r["verdicts"] if v["ok"] is False]
    if failed:
        raise BudgetNotMet("budget not met on the device: " + "; ".join(failed),
                           "see the bench section of report.md; prune harder or pick a faster target")
