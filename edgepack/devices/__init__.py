"""Devices: inventory, deploy over SSH (or locally), on-device benchmarks, fleets.

    load_inventory(dirs=None) -> {name: Device}
    get_device(name, dirs=None) -> Device
    check_device(device) -> dict
    deploy(build_dir, device, accept_new_host_key=False, progress=None) -> dict
    bench(build_dir, device, threads=None, runs=100, warmup=10, artifact=None, ...) -> dict
        (with the build's evaluation subset: accuracy on the device beside this machine's, `eval`)
    bench_fleet(build_dir, devices="all", ...) -> dict
"""
from .bench import bench, raise_if_failed
from .deploy import check_device, deploy
from .errors import DeviceError, DeviceUnreachable
from .fleet import bench_fleet
from .inventory import Device, SshConfig, get_device, load_inventory

__all__ = ["Device", "SshConfig", "DeviceError", "DeviceUnreachable", "load_inventory", "get_device",
           "check_device", "deploy", "bench", "bench_fleet", "raise_if_failed"]
