"""The int8 graph tidy (edgepack/onnx_tools/qdq_tidy.py) on small real conv nets: it keeps the
int8 model's outputs, removes Q/DQ nodes, and ONNX Runtime loads and runs what it writes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import to_onnx
from edgepack.onnx_tools.qdq_tidy import qdq_node_count, tidy_qdq
from edgepack.onnx_tools.quantize import quantize_onnx
from edgepack.runtime import OnnxRunner
from edgepack.targets import load_profile
from fixtures import zoo

# name -> (factory, input shape): residual Adds, max/avg pooling, Concat, image stems, a gray input.
MODELS = {
    "inception": (lambda: zoo.inception(10, 3, 0.5), (1, 3, 32, 32)),       # Concat of 4 branches, MaxPool
    "densenet": (lambda: zoo.densenet(10, 3, 0.5), (1, 3, 32, 32)),         # Concat, AvgPool, odd channel counts
    "resnet18_stem": (lambda: zoo.resnet18(10, 3, width=0.25), (1, 3, 64, 64)),  # 7x7/2 stem, MaxPool, residual Add
    "mobilenet_v2": (lambda: zoo.mobilenet_v2(10, 3, 0.35), (1, 3, 64, 64)),  # 3x3/2 stem, depthwise, residual Add
    "convnet_gray": (lambda: zoo.convnet(10, 1, 0.5), (1, 1, 32, 32)),     # 1-channel input, MaxPool, Flatten
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tidied(request, tmp_path_factory):
    factory, shape = MODELS[request.param]
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    x = np.random.default_rng(0).standard_normal((48, *shape[1:])).astype(np.float32)
    fp32 = to_onnx(factory().eval(), (torch.zeros(shape),), d / "fp32.onnx")
    q = load_profile("x86").quantization.model_copy(update={"calibration_samples": 32})
    quantize_onnx(fp32, d / "int8.onnx", Dataset(x[:32]), q)
    record = tidy_qdq(d / "int8.onnx", d / "tidy.onnx")
    return request.param, d, record, x[32:]


def _output_scale(path) -> float:
    g = onnx.load(str(path)).graph
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == g.output[0].name)
    return float(onnx.numpy_helper.to_array(next(i for i in g.initializer if i.name == dq.input[1])))


def test_outputs_equal_the_untidied_model_within_int8_tolerance(tidied):
    name, d, record, x = tidied
    before = OnnxRunner(d / "int8.onnx").run([x])[0]
    after = OnnxRunner(d / "tidy.onnx").run([x])[0]
    step = _output_scale(d / "int8.onnx")
    # The convolution rewrites compute the same integer sums; the Concat scale sharing rounds once
    # where ONNX Runtime's QLinearConcat requantized, which may move an output by a step.
    assert np.abs(after - before).max() <= 1.01 * step, (name, np.abs(after - before).max(), step)
    assert np.array_equal(after.argmax(1), before.argmax(1))
    if not record["shared_concat_scales"]:
        assert np.array_equal(after, before), name


def test_fewer_qdq_nodes_and_onnxruntime_loads_it(tidied):
    name, d, record, x = tidied
    before, after = onnx.load(str(d / "int8.onnx")), onnx.load(str(d / "tidy.onnx"))
    onnx.checker.check_model(after)
    assert record["qdq_nodes_before"] == qdq_node_count(before)
    assert record["qdq_nodes_after"] == qdq_node_count(after) < qdq_node_count(before), record
    runner = OnnxRunner(d / "tidy.onnx", threads=1)
    assert runner.run([x[:1]])[0].shape == (1, 10)


def test_each_rewrite_fires_where_it_should(tidied):
    name, d, record, _ = tidied
    g = onnx.load(str(d / "tidy.onnx")).graph
    ops = [n.op_type for n in g.node]
    if name in ("resnet18_stem", "mobilenet_v2"):  # 3-channel strided stems become SpaceToDepth + stride-1 conv
        assert len(record["space_to_depth_convs"]) == 1 and ops.count("SpaceToDepth") == 1
        conv = next(n for n in g.node if n.name == record["space_to_depth_convs"][0])
        strides = next(a.ints for a in conv.attribute if a.name == "strides")
        assert list(strides) == [1, 1]
    if name == "convnet_gray":  # a 1-channel stride-1 stem is padded to 4 channels instead
        assert len(record["channel_padded_convs"]) == 1 and "Pad" in ops
    if name == "inception":  # both inception blocks' Concats now join uint8 tensors directly
        assert record["shared_concat_scales"] == 2 and record["folded_concats"] == 2
        producers = {o: n for n in g.node for o in n.output}
        for cat in (n for n in g.node if n.op_type == "Concat"):
            assert all(producers[i].op_type == "QuantizeLinear" for i in cat.input)
    # every weighted conv input channel count is now a multiple of the int8 kernels' alignment
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    for conv in (n for n in g.node if n.op_type == "Conv"):
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        w = inits[producers[conv.input[1]].input[0]]
        assert group > 1 or w.dims[1] % 4 == 0, (name, conv.name, list(w.dims))


def test_maxpool_and_flatten_run_on_uint8(tidied):
    name, d, _, _ = tidied
    g = onnx.load(str(d / "tidy.onnx")).graph
    producers = {o: n for n in g.node for o in n.output}
    for node in (n for n in g.node if n.op_type in ("MaxPool", "Flatten")):
        src = producers.get(node.input[0])
        assert src is None or src.op_type != "DequantizeLinear", (name, node.name)


def test_in_place_and_bad_input(tmp_path, tidied):
    _, d, _, x = tidied
    copy = tmp_path / "m.onnx"
    copy.write_bytes((d / "int8.onnx").read_bytes())
    tidy_qdq(copy)  # in place
    assert np.array_equal(OnnxRunner(copy).run([x])[0], OnnxRunner(d / "tidy.onnx").run([x])[0])
    again = tidy_qdq(copy)  # idempotent: nothing left to do
    assert again["qdq_nodes_after"] == again["qdq_nodes_before"] and not again["space_to_depth_convs"]
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    with pytest.raises(EdgepackError, match="bad.onnx"):
        tidy_qdq(bad)
