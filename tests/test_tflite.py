"""TFLite artifacts: conversion with litert-torch, run in ai-edge-litert through edgepack.runtime.

The task is real and offline: scikit-learn's digits (8x8 grey images, 10 classes) with a small
CNN trained for a few seconds. Converted models are module-scoped fixtures because each
conversion costs 5-20 s (most of it the child interpreter importing torch and litert-torch).
"""
from __future__ import annotations

import os
import stat
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.data import Dataset
from edgepack.errors import EdgepackError, MissingExtra
from edgepack.manifest import sha256_file
from edgepack.runtime import open_model
from edgepack.onnx_tools.export import compare_outputs, torch_predict
from edgepack.runtime import measure_file
from edgepack.tflite import (INSTALL_HINT, convert_fp32, convert_int8, inspect_tflite, require_litert_torch,
                             require_torch_model, run_tflite)

pytestmark = pytest.mark.tflite


def parity_vs_torch(model, path, data, layout="NCHW", n=200) -> dict:
    x = data.take(n).x
    return compare_outputs(torch_predict(model, x), run_tflite(path, [x], layout)[0])


def int8_vs_fp32(int8_path, fp32_path, data, layout="NCHW") -> dict:
    q, f = run_tflite(int8_path, [data.x], layout)[0], run_tflite(fp32_path, [data.x], layout)[0]
    return {**compare_outputs(f, q), "accuracy": 100 * np.mean(q.argmax(1) == data.y),
            "accuracy_fp32": 100 * np.mean(f.argmax(1) == data.y)}
pytest.importorskip("litert_torch", reason="needs the tflite extra: pip install 'edgepack[tflite]'")

EXAMPLE = (torch.zeros(1, 1, 8, 8),)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    """(trained model, calibration set, held-out evaluation set)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # (N, 1, 8, 8), roughly centred
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    train, test = idx[:1300], idx[1300:]
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: 1 thread trained in 3 s, 2 threads on a busy box in 17 s
    try:
        model.train()
        for _ in range(12):
            for i in range(0, len(xt), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    calib = Dataset(x[train[:128]], y[train[:128]], "digits-train")
    evald = Dataset(x[test], y[test], "digits-test")
    return model, calib, evald


@pytest.fixture(scope="module")
def fp32(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "model.tflite"
    return convert_fp32(digits[0], EXAMPLE, out)  # default: isolated in a child process


@pytest.fixture(scope="module")
def int8(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model_int8.tflite"
    return convert_int8(digits[0], EXAMPLE, digits[1], out, num_calib=64)


def _no_partials(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_fp32_matches_pytorch(digits, fp32):
    from pathlib import Path
    path = Path(fp32["path"])
    assert path.exists() and _no_partials(path.parent) == []
    assert fp32["size_bytes"] == path.stat().st_size and fp32["sha256"] == sha256_file(path)
    assert fp32["inputs"] == [{"name": fp32["inputs"][0]["name"], "shape": [1, 1, 8, 8],
                               "dtype": "float32", "layout": "NCHW"}]
    assert fp32["outputs"][0]["shape"] == [1, 10] and fp32["outputs"][0]["dtype"] == "float32"
    assert fp32["input_order"] == fp32["output_order"] == [0]
    assert fp32["output_order_source"] == "signature"
    # A lone array is still accepted as the only input; the result is a list all the same.
    x = digits[2].x[:3]
    single = run_tflite(path, x)
    assert isinstance(single, list) and len(single) == 1
    np.testing.assert_array_equal(single[0], run_tflite(path, [x])[0])
    assert fp32["ops"]["CONV_2D"] + fp32["ops"].get("DEPTHWISE_CONV_2D", 0) == 2
    assert "BATCH_NORM" not in str(fp32["ops"])  # folded into the convolutions
    p = parity_vs_torch(digits[0], path, digits[2], n=200)
    assert p["samples"] == 200
    assert p["max_abs_diff"] < 1e-4, p
    assert p["cosine"] > 0.99999, p


@pytest.mark.slow
def test_int8_is_full_integer_and_agrees_with_fp32(digits, fp32, int8):
    model, _, evald = digits
    assert int8["calibration_samples"] == 64 and int8["calibration_seconds"] > 0
    spec = int8["inputs"][0]
    assert spec["dtype"] == "int8" and spec["shape"] == [1, 1, 8, 8]
    assert spec["quantization"]["scale"] > 0
    # Full integer: no float compute and no (de)quantize steps inside the graph.
    assert int8["float_ops"] == [] and int8["quantize_ops"] == 0 and int8["dequantize_ops"] == 0
    assert int8["notes"] == []
    assert int8["size_bytes"] < 0.6 * fp32["size_bytes"]

    r = int8_vs_fp32(int8["path"], fp32["path"], evald)
    assert r["samples"] == len(evald) == 497
    assert r["accuracy_fp32"] > 90, r  # the task was learnt, so agreement means something
    assert r["top1_agreement"] >= 97, r
    assert r["accuracy"] >= r["accuracy_fp32"] - 2, r
    with torch.no_grad():
        torch_acc = 100 * np.mean(model(torch.from_numpy(evald.x)).argmax(1).numpy() == evald.y)
    assert abs(torch_acc - r["accuracy_fp32"]) < 0.5  # fp32 TFLite == PyTorch on every sample


@pytest.mark.slow
def test_int8_runs_with_profile_threads(int8):
    one, two = measure_file(int8["path"], threads=1, runs=20), measure_file(int8["path"], threads=2, runs=20)
    assert one["threads"] == 1 and two["threads"] == 2
    assert one["backend"].startswith("ai-edge-litert") and 0 < one["latency_ms"]["p50"] < 50


def test_inspect_counts_quantize_dequantize_and_float_ops(digits, tmp_path):
    """LayerNorm has no int8 kernel: it stays a float island between DEQUANTIZE and QUANTIZE."""
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()[:6]
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            x = self.body(x)
            return self.head(nn.functional.layer_norm(x, x.shape[1:]))

    rec = convert_int8(Normed().eval(), EXAMPLE, digits[1], tmp_path / "ln.tflite",
                       num_calib=16, isolate=False)
    info = inspect_tflite(tmp_path / "ln.tflite")
    assert info["ops"] == rec["ops"]
    assert info["quantize_ops"] == info["ops"]["QUANTIZE"] >= 1
    assert info["dequantize_ops"] == info["ops"]["DEQUANTIZE"] >= 1
    assert "RSQRT" in info["float_op_counts"], info["float_op_counts"]
    assert info["float_ops"].count("RSQRT") == info["float_op_counts"]["RSQRT"]
    assert not {"QUANTIZE", "DEQUANTIZE", "CONV_2D"} & set(info["float_ops"])  # convs are int8
    assert [d["op"] for d in info["float_op_details"]] == info["float_ops"]
    assert all(d["output"] for d in info["float_op_details"])  # each names its output tensor
    assert rec["notes"] and "compute in float" in rec["notes"][0] and "RSQRT" in rec["notes"][0]


@pytest.mark.slow
def test_nhwc_layout_fp32_and_int8(digits, tmp_path):
    model, calib, evald = digits
    rec = convert_fp32(model, EXAMPLE, tmp_path / "nhwc.tflite", layout="NHWC", isolate=False)
    assert rec["layout"] == "NHWC"
    assert rec["inputs"][0]["shape"] == [1, 8, 8, 1] and rec["inputs"][0]["layout"] == "NHWC"
    # The NHWC artifact fed channel-last data gives the PyTorch model's (NCHW) answers.
    p = parity_vs_torch(model, tmp_path / "nhwc.tflite", evald, layout="NHWC", n=100)
    assert p["max_abs_diff"] < 1e-4 and p["cosine"] > 0.99999
    runner = open_model(tmp_path / "nhwc.tflite")
    with pytest.raises(Exception):  # and NCHW data is refused, not silently misread
        runner.run([evald.x[:1]])

    # int8 takes NCHW calibration data like every other path and transposes it itself.
    rec8 = convert_int8(model, EXAMPLE, calib, tmp_path / "nhwc8.tflite", layout="NHWC",
                        num_calib=64, isolate=False)
    assert rec8["inputs"][0]["shape"] == [1, 8, 8, 1] and rec8["inputs"][0]["dtype"] == "int8"
    assert rec8["float_ops"] == []
    r = int8_vs_fp32(tmp_path / "nhwc8.tflite", tmp_path / "nhwc.tflite", evald, layout="NHWC")
    assert r["top1_agreement"] >= 97 and r["accuracy"] > 90, r


def test_missing_extra_names_install_command(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # makes `import litert_torch` fail
    with pytest.raises(MissingExtra) as e:
        require_litert_torch()
    assert e.value.hint == INSTALL_HINT == "pip install 'edgepack[tflite]'"
    with pytest.raises(MissingExtra):
        convert_fp32(digits[0], EXAMPLE, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_onnx_input_is_refused_with_the_fix():
    with pytest.raises(EdgepackError) as e:
        require_torch_model("model.onnx", source="model.onnx")
    assert "model.onnx" in e.value.message
    assert "--model file.py:factory" in e.value.hint


class _Spectral(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[1]


class _WithSvd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.spectral = _Spectral()

    def forward(self, x):
        return self.spectral(self.conv(x))


@pytest.mark.slow
def test_unconvertible_op_names_op_and_module(tmp_path):
    out = tmp_path / "svd.tflite"
    out.write_bytes(b"previous build")  # an existing artifact must survive a failed rebuild
    with pytest.raises(EdgepackError) as e:
        convert_fp32(_WithSvd().eval(), EXAMPLE, out)  # fails inside the child process
    msg = e.value.message
    assert "linalg_svd" in msg and "`spectral` (_Spectral)" in msg, msg
    assert "test_tflite.py" in msg  # the source line of the op
    assert e.value.hint and "ONNX" in e.value.hint
    assert out.read_bytes() == b"previous build" and _no_partials(tmp_path) == []


def test_time_limit_stops_the_child_and_leaves_nothing(digits, tmp_path):
    with pytest.raises(EdgepackError) as e:
        convert_fp32(digits[0], EXAMPLE, tmp_path / "m.tflite", timeout_s=0.5)
    assert "time limit of 0.5 s" in e.value.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, expect", [
    ("kill -9 $$", "out-of-memory killer"),  # what the kernel's OOM killer does to the child
    ("echo converter exploded >&2; exit 3", "crashed (exit code 3)"),
])
def test_child_killed_or_crashed_is_explained(digits, tmp_path, monkeypatch, script, expect):
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    out_dir = tmp_path / "out"
    with pytest.raises(EdgepackError) as e:
        convert_fp32(digits[0], EXAMPLE, out_dir / "m.tflite")
    assert expect in e.value.message, e.value.message
    if "exit code 3" in expect:
        assert "converter exploded" in e.value.message  # the child's last words are shown
    assert os.listdir(out_dir) == []


def test_bad_layout_and_calibration_shape(digits, tmp_path):
    with pytest.raises(EdgepackError, match="unknown layout"):
        convert_fp32(digits[0], EXAMPLE, tmp_path / "m.tflite", layout="CHW")
    wrong = Dataset(np.zeros((8, 3, 8, 8), np.float32), None, "wrong.npz")
    with pytest.raises(EdgepackError, match=r"calibration samples have shape \(3, 8, 8\)"):
        convert_int8(digits[0], EXAMPLE, wrong, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_inspect_rejects_truncated_and_foreign_files(digits, tmp_path):
    rec = convert_fp32(digits[0], EXAMPLE, tmp_path / "m.tflite", isolate=False)
    data = (tmp_path / "m.tflite").read_bytes()
    assert inspect_tflite(tmp_path / "m.tflite")["num_ops"] == rec["num_ops"] > 0
    (tmp_path / "onnx.tflite").write_bytes(b"\x08\x07\x12\x07pytorch" * 100)
    with pytest.raises(EdgepackError, match="not a valid TFLite model"):
        inspect_tflite(tmp_path / "onnx.tflite")
    (tmp_path / "cut.tflite").write_bytes(data[: len(data) // 3])
    with pytest.raises(EdgepackError, match="not a valid TFLite model"):
        inspect_tflite(tmp_path / "cut.tflite")


@pytest.mark.slow
def test_residual_adds_are_quantized(tmp_path):
    """MobileNetV2's residual ADDs (not followed by ReLU) stayed float after a non-strict
    export; strict export gives the quantizer the metadata it matches them by."""
    from fixtures.zoo import InvertedResidual, conv_bn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 16, 3, act=nn.ReLU6)
            self.blocks = nn.Sequential(InvertedResidual(16, 24, 1, 6),
                                        InvertedResidual(24, 24, 1, 6),
                                        InvertedResidual(24, 24, 1, 6))
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    calib = Dataset(np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    rec = convert_int8(Residual().eval(), (torch.zeros(1, 3, 16, 16),), calib,
                       tmp_path / "res.tflite", num_calib=16, isolate=False)
    assert rec["export_mode"] == "strict"
    assert rec["ops"]["ADD"] == 2
    assert rec["float_ops"] == [] and rec["quantize_ops"] == rec["dequantize_ops"] == 0
