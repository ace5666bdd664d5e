"""`build --device X` chooses the x86 int8 scheme from the device's own CPU flags.

The device probe reads the device's cpuinfo (a fake file here: the loopback SSH and local devices
share this machine's filesystem, so `deploy.CPUINFO_PATH` points them at a Haswell's or a
Cascade Lake's cpuinfo) and check_device reports the flags. Through a whole build, a device
without VNNI gets U8S8 with reduce_range (7-bit weights: every int8 weight within [-64, 64]) and a
VNNI one plain U8S8 (the full int8 range), with the scheme and the reason in the manifest.
"""
from __future__ import annotations

import sys
from pathlib import Path

import importlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent))
from conftest_devices import (client_key, isolated_inventory, local_device, ssh_device, ssh_servers,  # noqa: E402,F401
                              write_device)
from edgepack.devices import check_device  # noqa: E402
from edgepack.devices.deploy import cpu_probe, device_cpu  # noqa: E402
from edgepack.devices.inventory import load_device_file  # noqa: E402
from edgepack.manifest import read_manifest  # noqa: E402
from test_scheme import HASWELL_NUC, XEON_VNNI  # noqa: E402

deploy_module = importlib.import_module("edgepack.devices.deploy")  # the package also exports a deploy() function


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    """fake(text) -> the path the device probe now reads as its cpuinfo."""
    def fake(text: str) -> Path:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(deploy_module, "CPUINFO_PATH", str(path))
        return path
    return fake


def test_check_device_reports_the_int8_flags(tmp_path, fake_cpuinfo):
    dev = local_device(tmp_path / "devices", "nuc")
    fake_cpuinfo(HASWELL_NUC)
    info = check_device(dev)
    assert info["int8_flags"] == ["avx2"] and info["cpu_model"].startswith("Intel(R) Core(TM) i5-4250U")
    fake_cpuinfo(XEON_VNNI)
    assert check_device(dev)["int8_flags"] == ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
    assert device_cpu(dev) == {"device": "nuc", "machine": "x86_64", "cpu_model": "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz",
                               "cpu_core": None, "int8_flags": ["avx2", "avx512f", "avx512bw", "avx512_vnni"]}


def test_a_device_without_cpuinfo_reports_unknown_flags(tmp_path, monkeypatch):
    dev = local_device(tmp_path / "devices", "mac")
    monkeypatch.setattr(deploy_module, "CPUINFO_PATH", str(tmp_path / "no-such-cpuinfo"))
    info = check_device(dev)
    assert info["int8_flags"] is None and info["cpu_model"] is None  # unknown, not "no flags"


def test_an_unreachable_device_leaves_the_default_and_says_why(tmp_path):
    path = write_device(tmp_path / "devices", "gone", target="x86", transport="ssh",
                        ssh={"host": "127.0.0.1", "port": 1, "user": "nobody", "connect_timeout_s": 2})
    report = cpu_probe(load_device_file(path))("gone")
    assert report["int8_flags"] is None and "gone" in report["error"]


def test_check_device_over_ssh_reads_the_device_side_cpuinfo(ssh_device, fake_cpuinfo):
    dev, _ = ssh_device("nuc-ssh")
    fake_cpuinfo(HASWELL_NUC)
    assert check_device(dev)["int8_flags"] == ["avx2"]


def int8_weight_extremes(path: Path) -> int:
    """The largest |value| of the int8 weight initializers of a QDQ model."""
    m = onnx.load(str(path))
    return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
               for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1)


@pytest.mark.slow
@pytest.mark.parametrize("cpu, scheme, reduce_range", [(HASWELL_NUC, "U8S8 reduce_range", True),
                                                        (XEON_VNNI, "U8S8", False)], ids=["no-vnni", "vnni"])
def test_build_on_a_device_chooses_the_scheme_from_its_flags(tmp_path, fake_cpuinfo, cpu, scheme, reduce_range):
    local_device(tmp_path / "devices", "box")
    fake_cpuinfo(cpu)
    code, out, err = run_cli("build", "--target", "x86", "--device", "box", "--devices-dir", str(tmp_path / "devices"),
                             "--out", str(tmp_path / "dist"), "--latency-runs", "5", "--no-cache")
    assert code in (0, 1), err
    m = read_manifest(tmp_path / "dist" / "digits-cnn-x86")
    choice = m.stages["quantize"]["int8_scheme"]
    assert choice["scheme"] == scheme and choice["flags_from"] == "device box (reported by the device)", choice
    assert ("without VNNI" in choice["reason"]) == reduce_range and ("with VNNI" in choice["reason"]) != reduce_range
    assert choice["flags"] == (["avx2"] if reduce_range else ["avx2", "avx512f", "avx512bw", "avx512_vnni"])
    assert f"quantizing to int8 ({scheme}:" in err
    # The artifact itself: 7-bit weights with reduce_range, the full int8 range without.
    peak = int8_weight_extremes(tmp_path / "dist" / "digits-cnn-x86" / "model.int8.onnx")
    assert peak <= 64 if reduce_range else peak > 64, peak
    assert m.bench and m.bench[0]["device"] == "box"
