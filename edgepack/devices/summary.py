"""Rich tables for device lists, checks and fleet results (the CLI prints them)."""
from __future__ import annotations

from rich.table import Table

from .results import headline


def _verdict_text(r: dict) -> str:
    if not r.get("ok", True):
        return "[red]FAILED[/]"
    if any(v["ok"] is False for v in r.get("verdicts", [])):
        bad = ", ".join(v["budget"] for v in r["verdicts"] if v["ok"] is False)
        return f"[red]over budget[/] ({bad})"
    if not r.get("consistent", True):
        return "[red]outputs differ from this machine's[/]"
    if r.get("emulated"):
        return "[yellow]emulated[/] (latency not judged)"
    return "[green]pass[/]"


def disagreeing(results: list[dict]) -> list[dict]:
    """Devices whose outputs of some artifact are not this machine's, within the tolerance of
    devices/evaluate.py: [{device, artifact, why}]."""
    return [{"device": r["device"], "artifact": e["artifact"], "why": e["vs_host"]["why"]}
            for r in results if r.get("ok", True) for e in r.get("eval", []) if not e["vs_host"]["consistent"]]


def accuracy_text(r: dict) -> str:
    """'97.27 / 97.27 top-1 %': the timed artifact on the device / on this machine."""
    e = next((e for e in r.get("eval", []) if e["timed"]), None)
    if e is None:
        return "-"
    label, dev = headline(e["device"])
    _, host = headline(e["host"])
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")
    return f"{fmt(dev)} / {fmt(host)} {label}"


def fleet_table(fleet: dict) -> Table:
    bad = disagreeing(fleet["results"])
    caption = ("outputs differ from this machine's on: " + "; ".join(f"{d['device']} ({d['artifact']}: {d['why']})"
                                                                    for d in bad)) if bad else None
    table = Table(title=f"bench: {fleet['ok']} ok, {fleet['failed']} failed, {fleet['wall_s']:.1f} s",
                  caption=caption, caption_style="red")
    for col in ("device", "verdict", "p50 ms", "p90 ms", "peak MB", "device / host", "runtime", "details"):
        table.add_column(col, justify="right" if "ms" in col or "MB" in col else "left")
    for r in fleet["results"]:
        if r["ok"]:
            lat = r["latency_ms"]
            table.add_row(r["device"], _verdict_text(r), f"{lat['p50']:.2f}", f"{lat['p90']:.2f}",
                          f"{r['memory_mb']['peak_rss']:.0f}", accuracy_text(r),
                          f"{r['runtime']['name']} {r['runtime']['version']}", r["result_file"])
        else:
            table.add_row(r["device"], _verdict_text(r), "-", "-", "-", "-", "-", r["error"])
    return table


def devices_table(devices: dict) -> Table:
    table = Table(title="devices")
    for col in ("name", "target", "transport", "where", "python", "emulated", "file"):
        table.add_column(col)
    for d in devices.values():
        table.add_row(d.name, d.target, d.transport, d.where(), d.python_cmd, "yes" if d.emulated else "",
                      d.source or "")
    return table
