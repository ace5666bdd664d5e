"""Where bench results go: `<build>/bench/<device>-<UTC stamp>.json` (never overwritten),
a summary appended to manifest.json's `bench` list and a section appended to report.md.

Fleet benches finish concurrently, so manifest/report updates take a lock (a thread lock plus
an flock on `<build>/bench/.lock` for other processes) and are written atomically.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from ..manifest import build_lock, read_manifest, write_json_atomic
from ..names import plain_name
# report.md's one number formatter ("-" for a missing value), so both sections read alike.
from ..report import append_section, fmt as _fmt


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")


def save_result(build_dir: Path, device: str, result: dict) -> Path:
    """Write the full result to a new file; an existing file is never replaced."""
    out = Path(build_dir) / "bench"
    out.mkdir(exist_ok=True)
    safe = plain_name(device)
    stamp = result.get("timestamp_stamp") or utc_stamp()
    tmp = out / f".{safe}-{stamp}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    try:
        for n in range(1000):
            path = out / (f"{safe}-{stamp}.json" if n == 0 else f"{safe}-{stamp}-{n}.json")
            try:
                os.link(tmp, path)  # fails if the name exists: no result is ever overwritten
                return path
            except FileExistsError:
                continue
        raise RuntimeError(f"cannot find a free result name in {out}")
    finally:
        tmp.unlink(missing_ok=True)


def summary(result: dict) -> dict:
    lat = result["latency_ms"]
    return {
        "device": result["device"], "emulated": result["emulated"], "timestamp": result["timestamp"],
        "artifact": result["artifact"], "runtime": result["runtime"], "threads": result["env"]["threads"],
        "machine": result["env"]["machine"], "p50_ms": round(lat["p50"], 3), "p90_ms": round(lat["p90"], 3),
        "p99_ms": round(lat["p99"], 3), "peak_rss_mb": round(result["memory_mb"]["peak_rss"] or 0, 1),
        "passed": result["passed"], "verdicts": result["verdicts"], "result_file": result["result_file"],
        "eval": [eval_summary(e) for e in result.get("eval", [])], "consistent": result.get("consistent", True),
    }


def eval_summary(e: dict) -> dict:
    """One artifact's accuracy on the device, for manifest.bench: figures side by side."""
    return {"artifact": e["artifact"], "timed": e["timed"], "samples": e["samples"], "machine": e.get("machine"),
            "runtime": e.get("runtime"), "device": e["device"], "host": e["host"], "reference": e["reference"],
            "reference_figures": e["reference_figures"], "drop": e["drop"], "host_drop": e["host_drop"],
            "drop_unit": e["drop_unit"], "vs_host": e["vs_host"]}


def headline(figures: dict) -> tuple[str, float | None]:
    """The figure a person reads first: the user metric, else top-1, else agreement with float."""
    for key, label in (("metric", "metric"), ("accuracy", "top-1 %"), ("agreement", "agreement with fp32 %")):
        if figures.get(key) is not None:
            return label, figures[key]
    return "-", None


def eval_lines(result: dict) -> list[str]:
    """report.md's table of accuracy on the device beside this machine's."""
    if not result.get("eval"):
        return [f"- {n}" for n in result.get("eval_notes", [])] + ([""] if result.get("eval_notes") else [])
    rows = []
    for e in result["eval"]:
        label, dev = headline(e["device"])
        _, host = headline(e["host"])
        _, ref = headline(e["reference_figures"])
        vs = e["vs_host"]
        rows.append(f"| {e['artifact']}{'' if e['timed'] else ' (not timed)'} | {e.get('runtime', '-')} | {e['samples']} "
                    f"| {label} | {_fmt(dev)} | {_fmt(host)} | {_fmt(ref)} | {_fmt(e['drop'], 3)} {e['drop_unit']} "
                    f"| {_fmt(vs['top1_agreement'])} | {_fmt(vs['max_abs_diff'], 4)} ({_fmt(100 * vs['relative_max_abs_diff'], 2)}%) "
                    f"| {'yes' if vs['consistent'] else '**NO**: ' + vs['why']} |")
    where = "the emulated aarch64 kernels (qemu)" if result["emulated"] else "the device's own kernels"
    lines = [f"Accuracy on the device: the build's evaluation subset run with {where}, beside this machine's "
             "outputs of the same artifact on the same samples (fp32 = this machine's float artifact, the "
             "reference the drop is measured from).", "",
             "| artifact | runtime | samples | figure | device | this machine | fp32 here | drop on the device "
             "| top-1 agreement device vs here % | max abs diff (of largest output) | outputs agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    return lines + [f"- {n}" for n in result.get("eval_notes", [])] + ([""] if result.get("eval_notes") else [])


def report_section(result: dict) -> str:
    lat, env = result["latency_ms"], result["env"]
    label = " (emulated: latency not judged)" if result["emulated"] else ""
    lines = [
        f"\n## On-device benchmark: {result['device']}{label}\n",
        f"- when: {result['timestamp']}; artifact `{result['artifact']}` ({result['format']}, {result['precision']})",
        f"- device: {env.get('machine')}, {env.get('cpu_model')}, {env.get('cpu_count')} cores, "
        f"int8 ISA extensions {' '.join(env.get('int8_flags') or ['none'])}, "
        f"governor {env.get('cpufreq_governor')}, load {env.get('loadavg')}",
        f"- runtime: {result['runtime']['name']} {result['runtime']['version']}, {env.get('threads')} threads, "
        f"python {env.get('python')}",
        f"- load {_fmt(result['load_ms'], 1)} ms, first inference {_fmt(result['first_ms'])} ms, "
        f"{lat['runs']} runs after {lat['warmup']} warm-up",
        "",
        "| min | p50 | p90 | p99 | max | std | throughput/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| {_fmt(lat['min'])} | {_fmt(lat['p50'])} | {_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} "
        f"| {_fmt(lat['std'])} | {_fmt(lat['throughput_per_s'], 1)} | {_fmt(result['memory_mb']['peak_rss'], 1)} |",
        "",
    ]
    lines += eval_lines(result)
    if result["verdicts"]:
        lines += ["| budget | limit | value | verdict | note |", "|---|---|---|---|---|"]
        for v in result["verdicts"]:
            verdict = "pass" if v["ok"] else "not judged" if v["ok"] is None else "**FAIL**"
            lines.append(f"| {v['budget']} | {v['limit']} | {v['value']} | {verdict} | {v['note'] or ''} |")
        lines.append("")
    if result.get("op_profile"):
        top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in result["op_profile"][:8])
        lines += [f"- operators (ONNX Runtime profile; timings above include the profiler): {top}", ""]
    lines.append(f"Full result: `{result['result_file']}`\n")
    return "\n".join(lines)


def record(build_dir: Path, result: dict) -> None:
    """Append the summary to manifest.bench and the section to report.md, atomically."""
    build_dir = Path(build_dir)
    with build_lock(build_dir):
        manifest = read_manifest(build_dir)
        manifest.bench.append(summary(result))
        write_json_atomic(build_dir / "manifest.json", manifest)
        append_section(build_dir, report_section(result))
