"""Benchmark a build on a device: deploy (only what changed), run the agent (timing, then the
evaluation subset with the device's kernels), score, judge, record."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BudgetNotMet, EdgepackError
from ..manifest import read_manifest
from ..progress import as_progress
from . import evaluate as ev
from .deploy import deployed_path, deploy_with
from .errors import DeviceError, DeviceUnreachable
from .inventory import Device, get_device
from .judge import budgets_for, judge, judge_quality
from .results import record, save_result, utc_stamp
from .transport import connect


AGENT_GRACE_S = 20


def resolve(device: Device | str, dirs=None) -> Device:
    return device if isinstance(device, Device) else get_device(device, dirs)


def bench(build_dir: Path | str, device: Device | str, threads: int | None = None, runs: int = 100,
          warmup: int = 10, artifact: str | None = None, accept_new_host_key: bool = False,
          timeout_s: float | None = 600, profile: bool = False, dirs=None, progress=None,
          redeploy: bool = True, metric=None, evaluate: bool = True, also_evaluate=()) -> dict:
    """Deploy `build_dir` to `device`, benchmark one artifact there and record the result.

    Returns the full result: latency_ms (min/p50/p90/p99/max/mean/std/throughput), load_ms,
    first_ms, memory_mb, env, runtime, deploy, verdicts (list of Verdict dicts), passed, and
    result_file. With an evaluation subset in the build (and `evaluate`), `eval` lists, for the
    timed artifact and then each of `also_evaluate` (evaluated, not timed), the device's figure
    and this machine's on the same samples (evaluate.score); `metric` is (spec, function) as the
    build's --metric. Budget failures do not raise (see `raise_if_failed`); device problems raise
    DeviceError / DeviceUnreachable naming the device. redeploy=False benchmarks what is already
    deployed on the device (the agent still refuses files that differ from their manifest).
    `progress` (a Progress or a callable(str)) gets one task for the device, whose text follows
    the steps (checking, uploading k/n, benchmarking, evaluating), so a fleet shows a line each."""
    build_dir = Path(build_dir)
    device = resolve(device, dirs)
    if runs < 1 or warmup < 0:
        raise DeviceError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    with as_progress(progress).task(f"{device.name}: connecting to {device.where()}") as line:
        result = _bench(build_dir, device, threads, runs, warmup, artifact, accept_new_host_key, timeout_s, profile,
                        line.say, redeploy, metric, evaluate, also_evaluate)
        p50 = result.get("latency_ms", {}).get("p50", float("nan"))
        line.update(description=f"{device.name}: p50 {p50:.3f} ms, {'pass' if result['passed'] else 'FAIL'}")
    return result


def _bench(build_dir: Path, device: Device, threads, runs, warmup, artifact, accept_new_host_key, timeout_s,
           profile, progress, redeploy, metric, evaluate, also_evaluate) -> dict:
    manifest = read_manifest(build_dir)
    artifact = artifact or manifest.primary
    entry = _entry(build_dir, manifest, artifact)
    subset = manifest.eval_subset if evaluate else None
    also = [_entry(build_dir, manifest, a) for a in dict.fromkeys(also_evaluate) if a != artifact] if subset else []
    profile_obj = device.profile()
    threads = threads or profile_obj.threads
    grace = timeout_s + AGENT_GRACE_S if timeout_s else None
    notes: list[str] = [] if subset or not evaluate else [
        "the build ships no evaluation subset (built before on-device evaluation, or with device_eval_samples = 0): "
        "accuracy not measured on the device"]
    with connect(device, accept_new_host_key) as t:
        if redeploy:
            dep = deploy_with(t, build_dir, manifest, progress, formats={entry.format},
                              optional_formats={a.format for a in also})
        else:
            dep = deployed_path(t, manifest)
        progress(f"{device.name}: benchmarking {artifact} ({runs} runs, {threads} threads)"
                 + (f", then {subset.samples} evaluation samples" if subset else ""))
        started = datetime.now(timezone.utc)
        argv = t.python(f"{dep['path']}/agent.py", "--manifest", f"{dep['path']}/manifest.json",
                        "--artifact", artifact, "--threads", str(threads), "--runs", str(runs),
                        "--warmup", str(warmup)) + (["--profile"] if profile else [])
        if subset:
            argv += ["--eval-out", ev.remote_outputs(dep, manifest, artifact)]
        if timeout_s:
            argv += ["--timeout", str(timeout_s)]
        t0 = time.monotonic()
        # The agent stops itself at timeout_s and reports; the grace covers a device too stuck to.
        r = t.run(argv, timeout=grace)
        wall = time.monotonic() - t0
        out = _parse_agent(device, r)
        collected = [(entry, out.pop("eval"), out, True)] if subset else []
        for a in also:
            if dep.get("runnable") is not None and a.format not in dep["runnable"]:
                notes.append(f"{a.path} not evaluated: no {a.format} runtime on the device")
                continue
            progress(f"{device.name}: evaluating {a.path} ({subset.samples} samples)")
            argv = ev.agent_argv(t, dep, a.path, threads, ev.remote_outputs(dep, manifest, a.path), timeout_s)
            try:
                o = _parse_agent(device, t.run(argv, timeout=grace))
            except DeviceUnreachable:
                raise
            except DeviceError as e:  # the timed artifact's figures stand without this one
                notes.append(f"{a.path} not evaluated on the device: {e.message}")
                continue
            collected.append((a, o.pop("eval"), o, False))
        if collected:
            progress(f"{device.name}: fetching the outputs of {len(collected)} artifact(s)")
        fetched = [(a, info, agent, timed, None if "skipped" in info else ev.fetch(t, info))
                   for a, info, agent, timed in collected]
    result = {
        "device": device.name, "where": device.where(), "target": device.target, "emulated": device.emulated,
        "build": manifest.name, "timestamp": started.isoformat(timespec="seconds"),
        "timestamp_stamp": utc_stamp(started), **out, "agent_wall_s": round(wall, 3), "deploy": dep,
    }
    result["eval"] = _score(build_dir, manifest, fetched, metric, notes)
    result["eval_notes"] = notes
    budgets, source = budgets_for(manifest.target, profile_obj)
    target_arch = manifest.target.get("arch") if isinstance(manifest.target, dict) else None
    verdicts = judge(out, budgets, device.name, device.emulated, target_arch)
    timed = next((e for e in result["eval"] if e["timed"]), None)
    verdicts += judge_quality(timed, budgets, device.name, device.emulated)
    result["budgets_from"] = source
    result["verdicts"] = [v.model_dump() for v in verdicts]
    result["passed"] = all(v.ok is not False for v in verdicts)
    result["consistent"] = all(e["vs_host"]["consistent"] for e in result["eval"])
    path = save_result(build_dir, device.name, result)
    result["result_file"] = str(path.relative_to(build_dir))
    record(build_dir, result)
    return result


def _entry(build_dir: Path, manifest, artifact: str):
    try:
        return manifest.artifact(artifact)
    except KeyError:
        known = ", ".join(a.path for a in manifest.artifacts)
        raise DeviceError(f"artifact {artifact!r} is not in {build_dir}/manifest.json (known: {known})",
                          "pass one of those to --artifact") from None


def _score(build_dir: Path, manifest, fetched, metric, notes: list[str]) -> list[dict]:
    """Score each artifact's device outputs against this machine's (see evaluate.score)."""
    scored = []
    for a, info, agent, timed, outputs in fetched:
        if outputs is None:
            notes.append(f"{a.path} not evaluated on the device: {info['skipped']}")
            continue
        try:
            rec = ev.score(build_dir, manifest, a, info, outputs, metric, timed)
        except EdgepackError as e:
            notes.append(f"{a.path}: accuracy on the device not compared with this machine: {e.message}")
            continue
        rec["machine"] = agent["env"]["machine"]
        rec["runtime"] = f"{agent['runtime']['name']} {agent['runtime']['version']}"
        scored.append(rec)
    return scored


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
                 "shape": "rebuild with --input-shape giving every dimension: manifest.inputs must be concrete",
                 "runtime": f"install the runtime for {device.python_cmd} on the device",
                 "timeout": "use fewer --runs or a larger --timeout"}
        raise DeviceError(f"device {device.name}: the agent refused: {out.get('error')}",
                          hints.get(out.get("kind"), "see the message above"))
    return out


def raise_if_failed(results: dict | list[dict]) -> None:
    """Raise BudgetNotMet (exit 1) naming every failed budget of one or many bench results."""
    results = [results] if isinstance(results, dict) else results
    failed = [f"{r['device']}: {v['budget']} {v['value']} {'<' if v['budget'].startswith('min_') else '>'} {v['limit']}"
              for r in results if r.get("ok", True) and "verdicts" in r
              for v in r["verdicts"] if v["ok"] is False]
    if failed:
        raise BudgetNotMet("budget not met on the device: " + "; ".join(failed),
                           "see the bench section of report.md; prune harder or pick a faster target")
