"""Benchmark one build on many devices in parallel. One failing device never stops the others."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import EdgepackError
from ..progress import as_progress
from .bench import bench
from .errors import DeviceUnreachable
from .inventory import BrokenDeviceFile, Device, load_inventory
from .summary import disagreeing


def select_devices(devices: str | list[str | Device], dirs=None,
                   broken: list[BrokenDeviceFile] | None = None) -> list[Device]:
    """"all", "a,b" or a list of names/Devices -> Devices. Unknown names and broken files of
    named devices are an error; with "all", broken files go to `broken` (if given) instead."""
    found: list[BrokenDeviceFile] = []
    inv = load_inventory(dirs, broken=found)
    everything = isinstance(devices, str) and devices.strip() == "all"
    if everything:
        devices = list(inv)
        if broken is not None:
            broken.extend(found)
        elif found:
            raise found[0].error
    elif isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    bad = {b.name: b for b in found}
    out = []
    for d in devices:
        if isinstance(d, Device):
            out.append(d)
        elif d in bad:
            raise bad[d].error
        elif d in inv:
            out.append(inv[d])
        else:
            raise EdgepackError(f"unknown device {d!r}; known devices: {', '.join(sorted(inv)) or '(none)'}",
                                "add it under ~/.config/edgepack/devices or pass --devices-dir DIR")
    # The same device twice would race on its own deployment directory.
    out = list({d.name: d for d in out}.values())
    if not out and found:
        raise found[0].error
    if not out:
        raise EdgepackError("no devices selected", "pass --devices all or --devices a,b")
    return out


def _one(build_dir, device: Device, retries: int, kwargs: dict) -> dict:
    attempts = []
    started = time.monotonic()
    for attempt in range(retries + 1):
        try:
            result = bench(build_dir, device, **kwargs)
            return {"ok": True, "attempts": attempts, **result}
        except DeviceUnreachable as e:  # transient: worth another try
            attempts.append(str(e))
            if attempt < retries:
                time.sleep(min(2.0 * (attempt + 1), 5.0))
        except EdgepackError as e:  # permanent: a retry cannot fix it
            attempts.append(str(e))
            break
        except Exception as e:  # a bug must not take the fleet down; report it with its type
            attempts.append(f"internal error: {type(e).__name__}: {e}")
            break
    error = attempts[-1] if len(attempts) == 1 else \
        f"failed {len(attempts)} times:\n" + "\n".join(f"  {i}. {a}" for i, a in enumerate(attempts, 1))
    return {"ok": False, "device": device.name, "where": device.where(), "emulated": device.emulated,
            "error": error, "attempts": attempts, "seconds": round(time.monotonic() - started, 2)}


def bench_fleet(build_dir: Path | str, devices: str | list[str | Device] = "all", threads: int | None = None,
                runs: int = 100, warmup: int = 10, artifact: str | None = None, timeout_s: float = 600,
                retries: int = 1, accept_new_host_key: bool = False, dirs=None, max_workers: int | None = None,
                progress=None, profile: bool = False, metric=None) -> dict:
    """Deploy and bench on every device at once (one thread per SSH device; devices on this
    machine one after another).

    Returns {"results": [per device, in the order given], "ok": n, "failed": n, "passed": bool,
    "disagreeing": [{device, artifact, why}: outputs not this machine's], "wall_s": s}. A success
    is the `bench()` dict plus ok=True; a failure is {ok: False, device,
    error, attempts}. Only DeviceUnreachable (connection/timeouts) is retried. `progress` (a
    Progress or a callable(str)) shows one line per device, each following its device's steps."""
    broken: list[BrokenDeviceFile] = []
    selected = select_devices(devices, dirs, broken)
    progress = as_progress(progress)  # one reporter (and lock) for every lane
    kwargs = dict(threads=threads, runs=runs, warmup=warmup, artifact=artifact, timeout_s=timeout_s,
                  accept_new_host_key=accept_new_host_key, progress=progress, profile=profile, metric=metric)
    # Local-transport devices (this machine, emulators on it) share its CPUs: benchmarked at the
    # same time they would slow each other down, so they take turns in one lane. Every SSH device
    # is its own hardware and gets its own lane.
    local = [i for i, d in enumerate(selected) if d.transport == "local"]
    lanes = ([local] if local else []) + [[i] for i, d in enumerate(selected) if d.transport != "local"]
    results: list[dict | None] = [None] * len(selected)
    progress(f"benchmarking on {len(selected)} device(s), {len(lanes)} at a time"
             + (f" ({len(local)} on this machine take turns)" if len(local) > 1 else ""))

    def run_lane(lane: list[int]) -> None:
        for i in lane:
            results[i] = _one(build_dir, selected[i], retries, kwargs)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max_workers or len(lanes), thread_name_prefix="edgepack-dev") as pool:
        for f in [pool.submit(run_lane, lane) for lane in lanes]:
            f.result()
    # "all" includes devices whose files are broken: each is a failure, the others still run.
    results += [{"ok": False, "device": b.name, "where": str(b.path), "emulated": False, "error": str(b.error),
                 "attempts": [str(b.error)], "seconds": 0.0} for b in broken]
    ok = sum(r["ok"] for r in results)
    return {"results": results, "ok": ok, "failed": len(results) - ok,
            "passed": ok == len(results) and all(r.get("passed", True) for r in results),
            "disagreeing": disagreeing(results), "wall_s": round(time.monotonic() - t0, 3)}
