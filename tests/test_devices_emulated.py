"""Deploy and bench on an emulated Raspberry Pi (aarch64 python under qemu, a wrapper script as
the device's `python`), as registered by `edgepack devices emulate rpi`. Prepares the emulator
environment when it is not cached yet (a minute or two, from Debian's and PyPI's packages)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest_devices import add_eval_subset, add_int8, make_build  # noqa: E402

from edgepack.devices import DeviceError, bench, get_device  # noqa: E402

pytestmark = [pytest.mark.emulate, pytest.mark.slow]


@pytest.fixture(scope="module")
def emulated_device(tmp_path_factory):
    from edgepack import emulate
    env = emulate.prepare_emulator("rpi", progress=False)
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


def test_accuracy_on_emulated_pi_beside_the_hosts(tmp_path, emulated_device):
    """The subset through the int8 file on aarch64 ONNX Runtime under qemu: its ARM kernels are
    real, so the figure is the Pi's, and the accuracy budget is judged on it."""
    b = make_build(tmp_path / "build", target="rpi", budgets={"max_accuracy_drop": 5.0})
    add_int8(b)
    add_eval_subset(b)
    r = bench(b, emulated_device, threads=1, runs=2, warmup=0, also_evaluate=["model.fp32.onnx"])
    timed, fp32 = r["eval"]
    assert timed["machine"] == fp32["machine"] == "aarch64" and timed["samples"] == 64
    assert fp32["device"]["accuracy"] == fp32["host"]["accuracy"] == 100.0 and fp32["vs_host"]["max_abs_diff"] < 1e-4
    assert timed["vs_host"]["consistent"] and timed["vs_host"]["top1_agreement"] >= 99, timed
    assert abs(timed["device"]["accuracy"] - timed["host"]["accuracy"]) <= 100 / 64 + 1e-9  # at most one sample
    drop = next(v for v in r["verdicts"] if v["budget"] == "max_accuracy_drop")
    assert drop["value"] == timed["drop"] and "emulated: real aarch64 kernels" in drop["note"]
