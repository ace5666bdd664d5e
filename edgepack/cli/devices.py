"""`edgepack devices [list|check]`, `edgepack deploy`, `edgepack bench`: parse and call
edgepack.devices; nothing else lives here."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import EdgepackError
from . import console, emit_json, out, reporter

DevicesDir = typer.Option([], "--devices-dir", help="extra device directory (searched first)")
AcceptNew = typer.Option(False, "--accept-new-host-key",
                         help="trust and remember an SSH host key seen for the first time")


def register(app: typer.Typer) -> None:
    devices = typer.Typer(help="List the device inventory, or check one device.", invoke_without_command=True)

    def _list(devices_dir: list[Path], as_json: bool):
        # edgepack.devices is imported when a command runs: the CLI imports every command
        # module at start-up, and this one would cost each command about a second.
        from ..devices import load_inventory
        from ..devices.summary import devices_table
        broken = []
        inv = load_inventory(devices_dir, broken=broken)
        if as_json:
            emit_json([d.model_dump() | {"source": d.source} for d in inv.values()] +
                  [{"name": b.name, "source": str(b.path), "error": str(b.error)} for b in broken])
        else:
            out.print(devices_table(inv))
        for b in broken:  # listed, not fatal: the other devices stay usable
            console.print(f"[yellow]warning:[/] skipped {escape(str(b.path))}: {escape(str(b.error))}", highlight=False)

    @devices.callback()
    def devices_root(ctx: typer.Context, devices_dir: list[Path] = DevicesDir,
                     as_json: bool = typer.Option(False, "--json")):
        if not ctx.invoked_subcommand:
            _list(devices_dir, as_json)

    @devices.command("list", help="List the devices and the file each one comes from.")
    def list_cmd(devices_dir: list[Path] = DevicesDir, as_json: bool = typer.Option(False, "--json")):
        _list(devices_dir, as_json)

    @devices.command("check", help="Connect to a device and check arch, python, runtimes and free disk.")
    def check(name: str, devices_dir: list[Path] = DevicesDir, accept_new_host_key: bool = AcceptNew,
              as_json: bool = typer.Option(False, "--json")):
        from ..devices import DeviceError, check_device, get_device
        dev = get_device(name, devices_dir)
        with reporter(as_json=as_json).task(f"checking {dev.name} ({dev.where()})"):
            report = check_device(dev, accept_new_host_key)
        if as_json:
            emit_json(report)
        else:
            for k in ("device", "where", "target", "machine", "arch_expected", "python", "executable",
                      "workdir", "free_mb", "cpu_count", "runtimes", "seconds"):
                out.print(f"{k:>14}: {report[k]}", highlight=False)
        if not report["ok"]:
            raise DeviceError(f"device {name} is not ready:\n" +
                              "\n".join(f"  - {p['problem']}" for p in report["problems"]),
                              "; ".join(p["fix"] for p in report["problems"]))
        console.print(f"[green]device {name} is ready[/]")

    app.add_typer(devices, name="devices")

    @app.command("deploy", help="Copy a build to a device (only changed files; atomic; verified).")
    def deploy_cmd(build_dir: Path, device: str = typer.Option(..., "--device", help="device name"),
                   accept_new_host_key: bool = AcceptNew, devices_dir: list[Path] = DevicesDir,
                   as_json: bool = typer.Option(False, "--json")):
        from ..devices import deploy, get_device
        dev = get_device(device, devices_dir)
        with reporter(as_json=as_json).task(f"deploying to {dev.name}") as line:  # checking, uploading k/n, verifying
            result = deploy(build_dir, dev, accept_new_host_key, progress=line.say)
        if as_json:
            emit_json(result)
        else:
            out.print(f"deployed to {result['where']}:{result['path']}: sent {len(result['sent'])} files "
                      f"({result['bytes_sent'] / 1e6:.2f} MB), {len(result['reused'])} unchanged, "
                      f"{result['seconds']:.1f} s", highlight=False)

    @app.command("bench", help="Deploy and benchmark a build on one device or a fleet; judge the budgets.")
    def bench_cmd(build_dir: Path,
                  device: Optional[str] = typer.Option(None, "--device", help="one device"),
                  devices: Optional[str] = typer.Option(None, "--devices", help="'all' or a,b,c (in parallel)"),
                  threads: Optional[int] = typer.Option(None, "--threads", help="default: the target's"),
                  runs: int = typer.Option(100, "--runs", min=1),
                  warmup: int = typer.Option(10, "--warmup", min=0),
                  artifact: Optional[str] = typer.Option(None, "--artifact", help="default: the primary"),
                  profile: bool = typer.Option(False, "--profile", help="per-operator profile (ONNX Runtime)"),
                  metric: Optional[str] = typer.Option(None, "--metric", help="file.py:function scoring the "
                                                       "outputs on the device (default: top-1 / agreement)"),
                  timeout: float = typer.Option(600, "--timeout", help="seconds per device"),
                  retries: int = typer.Option(1, "--retries", min=0, help="retries after connection failures"),
                  accept_new_host_key: bool = AcceptNew, devices_dir: list[Path] = DevicesDir,
                  as_json: bool = typer.Option(False, "--json")):
        from ..devices import bench, bench_fleet, get_device, raise_if_failed
        from ..devices.summary import disagreeing, fleet_table
        from ..quality import load_metric
        if bool(device) == bool(devices):
            raise EdgepackError("pass exactly one of --device NAME or --devices all|a,b")
        say = reporter(as_json=as_json)  # a line per device
        scorer = (metric, load_metric(metric)) if metric else None
        if device:
            r = bench(build_dir, get_device(device, devices_dir), threads=threads, runs=runs, warmup=warmup,
                      artifact=artifact, accept_new_host_key=accept_new_host_key, timeout_s=timeout,
                      profile=profile, progress=say, metric=scorer)
            results = [{"ok": True, **r}]
            fleet = {"results": results, "ok": 1, "failed": 0, "passed": r["passed"],
                     "disagreeing": disagreeing(results), "wall_s": r["agent_wall_s"] + r["deploy"].get("seconds", 0)}
        else:
            fleet = bench_fleet(build_dir, devices, threads=threads, runs=runs, warmup=warmup, artifact=artifact,
                                timeout_s=timeout, retries=retries, accept_new_host_key=accept_new_host_key,
                                dirs=devices_dir, progress=say, profile=profile, metric=scorer)
        if as_json:
            emit_json(fleet)
        else:
            out.print(fleet_table(fleet))
            for r in fleet["results"]:
                if r["ok"] and r.get("op_profile"):
                    top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["op_profile"][:8])
                    out.print(f"{r['device']} operators: {top}", highlight=False)
        for d in fleet["disagreeing"]:  # named even when every budget passed: the kernels differ
            console.print(f"[red]warning:[/] {escape(d['device'])}: outputs of {escape(d['artifact'])} differ from "
                          f"this machine's: {escape(d['why'])}", highlight=False)
        failed = [r for r in fleet["results"] if not r["ok"]]
        if failed:
            raise EdgepackError(f"{len(failed)} of {len(fleet['results'])} devices failed:\n" +
                                "\n".join(f"  - {r['error']}" for r in failed))
        raise_if_failed([r for r in fleet["results"] if r["ok"]])
