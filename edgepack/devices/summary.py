"""Rich tables for device lists, checks and fleet results (the CLI prints them)."""
from __future__ import annotations

from rich.table import Table


def _verdict_text(r: dict) -> str:
    if not r.get("ok", True):
        return "[red]FAILED[/]"
    if any(v["ok"] is False for v in r.get("verdicts", [])):
        bad = ", ".join(v["budget"] for v in r["verdicts"] if v["ok"] is False)
        return f"[red]over budget[/] ({bad})"
    if r.get("emulated"):
        return "[yellow]emulated[/] (latency not judged)"
    return "[green]pass[/]"


def fleet_table(fleet: dict) -> Table:
    table = Table(title=f"bench: {fleet['ok']} ok, {fleet['failed']} failed, {fleet['wall_s']:.1f} s")
    for col in ("device", "verdict", "p50 ms", "p90 ms", "peak MB", "runtime", "details"):
        table.add_column(col, justify="right" if "ms" in col or "MB" in col else "left")
    for r in fleet["results"]:
        if r["ok"]:
            lat = r["latency_ms"]
            table.add_row(r["device"], _verdict_text(r), f"{lat['p50']:.2f}", f"{lat['p90']:.2f}",
                          f"{r['memory_mb']['peak_rss']:.0f}", f"{r['runtime']['name']} {r['runtime']['version']}",
                          r["result_file"])
        else:
            table.add_row(r["device"], _verdict_text(r), "-", "-", "-", "-", r["error"])
    return table


def devices_table(devices: dict) -> Table:
    table = Table(title="devices")
    for col in ("name", "target", "transport", "where", "python", "emulated", "file"):
        table.add_column(col)
    for d in devices.values():
        table.add_row(d.name, d.target, d.transport, d.where(), d.python_cmd, "yes" if d.emulated else "",
                      d.source or "")
    return table
