"""Deploy and bench on an emulated Raspberry Pi (aarch64 python under qemu, a wrapper script as
the device's `python`), as registered by `edgepack devices emulate rpi`. Skipped unless that
emulator environment is already prepared (preparing it takes minutes and the network)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest_devices import make_build  # noqa: E402

from edgepack.devices import DeviceError, bench, get_device  # noqa: E402

pytestmark = [pytest.mark.emulate, pytest.mark.slow]


@pytest.fixture(scope="module")
def emulated_device(tmp_path_factory):
    emulate = pytest.importorskip("edgepack.emulate")
    env = emulate.find_emulator("rpi")
    if env is None:
        pytest.skip("no prepared rpi emulator (run `edgepack devices emulate rpi` once)")
    d = tmp_path_factory.mktemp("emu")
    emulate.register_emulated_device("pi-emu-test", "rpi", emulator=env, config_dir=d / "devices")
    dev = get_device("pi-emu-test", [d / "devices"])
    dev.workdir = str(d / "work")
    return dev


def test_bench_on_emulated_pi(tmp_path, emulated_device):
    b = make_build(tmp_path / "build", target="rpi", budgets={"latency_p50_ms": 1e-6, "peak_memory_mb": 4096})
    r = bench(b, emulated_device, threads=1, runs=5, warmup=1)
    assert r["env"]["machine"] == "aarch64" and r["emulated"] and r["runtime"]["name"] == "onnxruntime"
    lat = [v for v in r["verdicts"] if v["budget"].startswith("latency")]
    assert lat and all(v["ok"] is None for v in lat) and r["passed"]  # an impossible latency budget: not judged
    assert Path(r["deploy"]["path"]).is_symlink()


def test_emulated_pi_is_not_an_x86_device(tmp_path, emulated_device):
    wrong = emulated_device.model_copy(update={"name": "pi-as-x86", "target": "x86"})
    with pytest.raises(DeviceError, match=r"(?s)device pi-as-x86 .*architecture is aarch64 but target 'x86' is x86_64"):
        bench(make_build(tmp_path / "build"), wrong, runs=1, warmup=0)
