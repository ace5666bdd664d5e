"""Fixtures for device tests (imported by tests/test_devices*.py; not a conftest on purpose).

`build_dir`: a tiny CNN exported to ONNX with a manifest, like `edgepack build` makes.
`ssh_device`: a factory for real sshd servers on 127.0.0.1 plus a device toml pointing at one.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import tomli_w

import sshd as sshd_mod
from edgepack.devices.inventory import load_device_file
from edgepack.manifest import (Artifact, DataFile, Manifest, TensorSpec, read_manifest, sha256_file,
                               write_json_atomic)
from edgepack.targets import load_profile

VENV_PYTHON = sys.executable
_CACHE: dict[int, bytes] = {}


def _export_tiny(path: Path, channels: int = 8) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(channels, 10)).eval()
    torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(path), input_names=["input"],
                      output_names=["logits"], dynamo=False, opset_version=17)


def make_build(dirpath: Path, name: str = "tiny", target: str = "x86", budgets: dict | None = None,
               channels: int = 8) -> Path:
    """A build directory with model.fp32.onnx and a valid manifest (export cached per session)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    model = dirpath / "model.fp32.onnx"
    if channels not in _CACHE:  # export once per session, keep the bytes (no files left behind)
        _export_tiny(model, channels)
        _CACHE[channels] = model.read_bytes()
    model.write_bytes(_CACHE[channels])
    profile = load_profile(target).model_dump()
    if budgets is not None:
        profile["budgets"] = budgets
    spec = TensorSpec(name="input", shape=[1, 3, 16, 16], dtype="float32", layout="NCHW")
    manifest = Manifest(
        edgepack_version="0.1.0", name=name, created=datetime.now(timezone.utc).isoformat(), target=profile,
        inputs=[spec], outputs=[TensorSpec(name="logits", shape=[1, 10])],
        artifacts=[Artifact(path="model.fp32.onnx", format="onnx", precision="fp32", sha256=sha256_file(model),
                            size_bytes=model.stat().st_size, inputs=[spec])],
        primary="model.fp32.onnx")
    write_json_atomic(dirpath / "manifest.json", manifest)
    (dirpath / "report.md").write_text(f"# edgepack report: {name}\n\nbuild section\n")
    return dirpath


def add_eval_subset(build: Path, n: int = 64, seed: int = 1, shape=(3, 16, 16)) -> np.ndarray:
    """Ship an evaluation subset as `edgepack build` does: n samples, labelled with the fp32
    model's own decisions (so fp32 scores 100% top-1 on them). Returns the labels."""
    import onnxruntime as ort
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    sess = ort.InferenceSession(str(build / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    y = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(n)]).argmax(1)
    (build / "eval").mkdir(exist_ok=True)
    np.savez(build / "eval" / "subset.npz", input=x, y=y)
    m = read_manifest(build)
    path = build / "eval" / "subset.npz"
    m.eval_subset = DataFile(path="eval/subset.npz", sha256=sha256_file(path), size_bytes=path.stat().st_size,
                             samples=n, labelled=True, inputs=["input"])
    write_json_atomic(build / "manifest.json", m)
    return y


def add_int8(build: Path) -> str:
    """Quantize the build's fp32 model (static QDQ, U8S8 per-channel as the x86 target) and make
    the int8 file the primary artifact."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            x = np.random.default_rng(7).standard_normal((32, 3, 16, 16)).astype(np.float32)
            self.it = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    out = build / "model.int8.onnx"
    quantize_static(str(build / "model.fp32.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    m = read_manifest(build)
    fp32 = m.artifacts[0]
    m.artifacts.append(fp32.model_copy(update={"path": out.name, "precision": "int8", "sha256": sha256_file(out),
                                               "size_bytes": out.stat().st_size}))
    m.primary = out.name
    write_json_atomic(build / "manifest.json", m)
    return out.name


NOISY_SITE = """
import numpy as np
import onnxruntime

_run = onnxruntime.InferenceSession.run
_rng = np.random.default_rng(0)


def run(self, *args, **kwargs):  # a device whose kernels are broken: outputs off by their own spread
    outs = _run(self, *args, **kwargs)
    return [o + _rng.standard_normal(o.shape).astype(o.dtype) * (float(np.std(o)) + 1.0)
            if o.dtype.kind == "f" else o for o in outs]


onnxruntime.InferenceSession.run = run
"""


def noisy_python(dirpath: Path) -> str:
    """An interpreter whose onnxruntime adds noise to every output (a wrapper script setting
    PYTHONPATH to a sitecustomize that patches it): the fake device of disagreement tests."""
    site = dirpath / "noisy-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(NOISY_SITE)
    wrapper = dirpath / "noisy-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {VENV_PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def replace_model_with_big_matmul(build: Path, n: int) -> None:
    """Swap the build's model for one n x n MatMul (4*n*n bytes of weights), manifest updated."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    model = build / "model.fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    m = read_manifest(build)
    spec = TensorSpec(name="x", shape=[1, n])
    m.inputs = m.artifacts[0].inputs = [spec]
    m.artifacts[0].sha256, m.artifacts[0].size_bytes = sha256_file(model), model.stat().st_size
    write_json_atomic(build / "manifest.json", m)


@pytest.fixture(autouse=True)
def isolated_inventory(tmp_path, monkeypatch):
    """Only the built-in devices and the test's own: never the user's ~/.config inventory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.delenv("EDGEPACK_DEVICES_DIR", raising=False)


@pytest.fixture
def build_dir(tmp_path):
    return make_build(tmp_path / "build")


def write_device(dirpath: Path, name: str, **fields) -> Path:
    """Write a device toml; nested dict values become tables."""
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / f"{name}.toml"
    path.write_text(tomli_w.dumps({"name": name, **fields}))
    return path


def age_tree(path: Path, seconds: float) -> None:
    """Make every entry under `path` look untouched for `seconds`."""
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then), follow_symlinks=False)


def local_device(dirpath: Path, name: str = "loc", python: str = VENV_PYTHON, **extra):
    path = write_device(dirpath, name, target="x86", transport="local", workdir=str(dirpath / f"{name}-work"),
                        python=python, **extra)
    return load_device_file(path)


@pytest.fixture(scope="session")
def client_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    return sshd_mod.keygen(d / "id_ed25519")


@pytest.fixture
def ssh_servers(tmp_path):
    """Factory: start_server(name) -> Sshd; every server is killed at teardown."""
    if not sshd_mod.available():
        pytest.skip("needs root, sshd and ssh-keygen (apt-get install openssh-server)")
    started = []

    def start(name: str, pubkey: Path) -> sshd_mod.Sshd:
        s = sshd_mod.Sshd(tmp_path / f"sshd-{name}", pubkey).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def ssh_device(tmp_path, client_key, ssh_servers):
    """Factory: (name, trusted=True, **overrides) -> (Device, Sshd). Host key pre-trusted unless told."""

    def make(name: str = "dev", trusted: bool = True, key_file: Path | None = None, python: str = VENV_PYTHON,
             workdir: str | None = None, server: sshd_mod.Sshd | None = None, **ssh_overrides):
        s = server or ssh_servers(name, Path(f"{client_key}.pub"))
        known = tmp_path / f"known_hosts-{name}"
        known.write_text(s.known_hosts_line() if trusted else "")
        ssh = dict(host="127.0.0.1", port=s.port, user="root", key_file=str(key_file or client_key),
                   known_hosts=str(known), connect_timeout_s=5)
        ssh.update(ssh_overrides)
        path = write_device(tmp_path / "devices", name, target="x86", transport="ssh",
                            workdir=workdir or str(tmp_path / f"work-{name}"), python=python, ssh=ssh)
        return load_device_file(path), s

    return make
