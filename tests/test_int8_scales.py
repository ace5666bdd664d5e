"""edgepack.compress.int8_scales: per-channel weight scales rounded to a few mantissa bits."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgepack.compress.cluster import cluster, int8_distinct_per_tensor
from edgepack.compress.int8_scales import max_logit_change, round_mantissa, round_weight_scales
from edgepack.compress.size import compressed_bytes
from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import to_onnx
from edgepack.onnx_tools.quantize import quantize_onnx
from edgepack.scheme import scheme_for_build
from edgepack.targets import load_profile
from fixtures.zoo import mobilenet_v2


def test_round_mantissa():
    x = np.array([1.0, 1.03, 1.0 + 2 ** -5, 0.7, -3.3e-5, 0.0], np.float32)
    r = round_mantissa(x, 4)
    assert r[0] == 1.0 and r[1] == 1.0 and r[2] == 1.0 + 2 ** -4 and r[5] == 0.0  # a tie goes away from zero
    assert np.all(np.abs(r / np.where(x == 0, 1, x) - 1)[x != 0] <= 2 ** -5)
    assert len(np.unique(round_mantissa(np.linspace(1, 2, 1000, dtype=np.float32), 4))) == 17
    assert np.array_equal(round_mantissa(x, 23), x)
    with pytest.raises(EdgepackError, match="mantissa bits"):
        round_mantissa(x, 24)


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scales")
    torch.manual_seed(0)
    model = mobilenet_v2(10, 1, width=0.35, small_input=True).eval()
    rng = np.random.default_rng(0)
    calib = Dataset(rng.standard_normal((64, 1, 32, 32)).astype(np.float32), np.zeros(64, np.int64), "random",
                    [str(i) for i in range(10)])
    scheme, _ = scheme_for_build(load_profile("x86"))
    out = {}
    for label, m in (("plain", model), ("clustered", cluster(copy.deepcopy(model), 16, scaled=True)[0])):
        fp32 = to_onnx(m, (torch.zeros(1, 1, 32, 32),), tmp / f"{label}.onnx")
        quantize_onnx(fp32, tmp / f"{label}.int8.onnx", calib, scheme)
        out[label] = tmp / f"{label}.int8.onnx"
    return out, calib


def scales(path) -> dict:
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[1]].size > 1}


def test_rounded_scales_shrink_the_file_and_keep_the_outputs(int8_files, tmp_path):
    files, calib = int8_files
    for label in ("plain", "clustered"):
        dst = tmp_path / f"{label}.r4.onnx"
        rec = round_weight_scales(files[label], dst, 4)
        weights = int8_distinct_per_tensor(files[label])
        # all but the classifier: random init gives it an int32 bias the rounding would overflow
        assert rec["tensors"] == len(weights) - 1 == 52 and rec["max_rel_change"] <= 2 ** -5
        assert rec["skipped"] == [{"node": rec["skipped"][0]["node"], "reason": "the re-quantized bias would overflow int32"}]
        before, after = scales(files[label]), scales(dst)
        changed = [n for n in weights if not np.array_equal(before[n], after[n])]
        assert len(changed) == 52
        for name in changed:
            ratio = after[name].astype(np.float64) / before[name]
            assert np.all(np.abs(ratio - 1) <= 2 ** -5) and len(np.unique(after[name])) <= 2 * 17 * 8
        assert compressed_bytes(dst) < compressed_bytes(files[label]) - 20_000  # ~4 of 6700 scales' bytes saved
        change = max_logit_change(files[label], dst, calib.x[:32])  # ONNX Runtime runs both
        assert change["n"] == 32 and change["max_abs_change"] < 0.1 * change["max_abs_output"]


def test_biases_are_requantized_with_the_new_scales(int8_files, tmp_path):
    files, _ = int8_files
    dst = tmp_path / "c.r3.onnx"
    round_weight_scales(files["clustered"], dst, 3)
    model = onnx.load(str(dst))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2:
            x, w, b = (producer[i] for i in node.input)
            if b.op_type == "DequantizeLinear" and w.op_type == "DequantizeLinear":
                np.testing.assert_allclose(inits[b.input[1]], inits[x.input[1]] * inits[w.input[1]], rtol=1e-6)
                checked += 1
    assert checked > 40
    assert round_weight_scales(files["clustered"], tmp_path / "none.onnx", 4, max_codes=2)["tensors"] == 0
