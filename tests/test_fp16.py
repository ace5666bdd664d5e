"""fp16 artifacts: ONNX with ONNX Runtime's converter, TFLite with ai-edge-quantizer's fp16
weights; both loaded and run by the runtimes, outputs compared with fp32, and the build stage
that makes them when asked or when the profile lists fp16."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import edgepack
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import to_onnx
from edgepack.onnx_tools.fp16 import to_fp16
from edgepack.runtime import open_model
from fixtures.zoo import convnet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return convnet(num_classes=10, in_ch=3, width=0.5).eval()


def test_onnx_fp16_halves_the_weights_and_keeps_outputs(tmp_path, small_net):
    x = torch.randn(4, 3, 32, 32)
    src = to_onnx(small_net, (x[:1],), tmp_path / "m.onnx")
    rec = to_fp16(src, tmp_path / "m16.onnx")
    half = onnx.load(str(tmp_path / "m16.onnx"))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # same feeds as fp32
    dtypes = {i.data_type for i in half.graph.initializer if len(i.dims) > 1}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    assert rec["size_bytes"] < 0.6 * src.stat().st_size
    ref = open_model(src).run([x.numpy()])[0]
    got = open_model(tmp_path / "m16.onnx").run([x.numpy()])[0]
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_onnx_fp16_of_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgepackError, match="not an ONNX model"):
        to_fp16(bad, tmp_path / "m16.onnx")
    assert not (tmp_path / "m16.onnx").exists()


@pytest.mark.slow
def test_build_makes_fp16_when_asked_or_when_the_profile_lists_it(tmp_path):
    from types import SimpleNamespace

    from edgepack.config import BuildConfig
    from edgepack.stages import fp16
    from edgepack.targets import load_profile

    plain = SimpleNamespace(cfg=BuildConfig(), profile=load_profile("x86"), records={})
    assert fp16.config(plain) is None  # neither asked nor listed: no fp16 artifacts
    asked = edgepack.build(target="x86", out=str(tmp_path / "b"), latency_runs=5, compress={"fp16": {}})
    arts = {a.path: a for a in asked.manifest.artifacts}
    half, fp32 = arts["model.fp16.onnx"], arts["model.fp32.onnx"]
    assert half.precision == "fp16" and half.format == "onnx"
    assert half.size_bytes < 0.6 * fp32.size_bytes
    assert abs(half.metrics.accuracy - fp32.metrics.accuracy) <= 1.0
    assert half.metrics.latency_ms is not None  # timed like every artifact
    assert asked.manifest.primary == "model.int8.onnx"  # int8 stays the judged artifact
    assert "## fp16" in (asked.path / "report.md").read_text()
    # The same from a profile that lists fp16 (a copy of x86 with `precisions`).
    targets = tmp_path / "targets"
    targets.mkdir()
    text = (ROOT / "targets" / "x86.toml").read_text().replace('name = "x86"', 'name = "x86-fp16"')
    (targets / "x86-fp16.toml").write_text(text.replace("\n[quantization]", 'precisions = ["fp32", "int8", "fp16"]\n\n[quantization]', 1))
    listed = edgepack.build(target="x86-fp16", targets_dir=[str(targets)], out=str(tmp_path / "c"), latency_runs=5)
    assert "model.fp16.onnx" in [a.path for a in listed.manifest.artifacts]
    assert json.loads((listed.path / "manifest.json").read_text())["stages"]["fp16"]["onnx"]["size_bytes"] > 0


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_fp16_weights_with_dequantize_ops(tmp_path, small_net):
    pytest.importorskip("litert_torch")
    from edgepack.tflite import convert_fp32, inspect_tflite, run_tflite
    from edgepack.tflite.fp16 import convert_fp16

    x = torch.randn(8, 3, 32, 32)
    convert_fp32(small_net, (x[:1],), tmp_path / "m.tflite")
    rec = convert_fp16(tmp_path / "m.tflite", tmp_path / "m16.tflite")
    info = inspect_tflite(tmp_path / "m16.tflite")
    assert info["dequantize_ops"] > 0 and info["quantize_ops"] == 0
    assert rec["size_bytes"] < 0.6 * (tmp_path / "m.tflite").stat().st_size
    ref = run_tflite(tmp_path / "m.tflite", [x.numpy()])[0]
    got = run_tflite(tmp_path / "m16.tflite", [x.numpy()])[0]
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
