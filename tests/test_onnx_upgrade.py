"""ONNX files as other frameworks write them (old opsets, external data, fp16) made quantizable, on real files."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.onnx_tools import upgrade
from edgepack.onnx_tools.inspect import dynamic_dims, float_nodes
from edgepack.onnx_tools.upgrade import prepare_onnx


class Reader(CalibrationDataReader):
    def __init__(self, name, shape, n=8, seed=0):
        rng = np.random.default_rng(seed)
        self.batches = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]
        self.rewind()

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def quantize(src, dst, name, shape, **kw):
    """Static int8 the way edgepack's targets ask for it: QDQ, per-channel int8 weights."""
    quantize_static(str(src), str(dst), Reader(name, shape), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **kw)
    return dst


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def export(module, example, path, opset, dynamic_hw=False):
    axes = {"input": {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["output"], dynamic_axes=axes)
    return path


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


class ConvNet(nn.Module):
    """Conv-BN-ReLU twice, a softmax over channels (rewritten between opsets 11 and 13), global pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.softmax(self.body(x), dim=1).mean((2, 3)))


def test_opset11_dynamic_hw_quantizes_per_channel_after_prepare(tmp_path):
    raw = export(ConvNet(), torch.randn(1, 3, 32, 32), tmp_path / "net11.onnx", opset=11, dynamic_hw=True)
    assert onnx.load(str(raw)).opset_import[0].version == 11
    # The bug: ORT writes per-channel DequantizeLinear(axis=) into an opset-11 model it cannot load.
    with pytest.raises(Exception, match="axis"):
        run(quantize(raw, tmp_path / "raw_int8.onnx", "input", (4, 3, 32, 32)),
            {"input": np.zeros((1, 3, 32, 32), np.float32)})

    prepared = tmp_path / "net13.onnx"
    rec = prepare_onnx(raw, prepared)
    assert (rec["original_opset"], rec["opset"], rec["converted"]) == (11, 13, True)
    assert rec["ir_version"] >= 7 and rec["producer"].startswith("pytorch")
    assert not rec["fp16_to_fp32"] and not rec["external_data"]
    assert rec["check"]["relative_diff"] <= upgrade.OPSET_TOLERANCE
    assert dynamic_dims(prepared) == {"input": ["batch", 3, "height", "width"]}

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(prepared), str(pre))
    int8 = quantize(pre, tmp_path / "int8.onnx", "input", (4, 3, 32, 32))
    q = onnx.load(str(int8))
    assert any(a.name == "axis" for n in q.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 32, 32), (2, 3, 48, 40)]:  # two different H, W on the one int8 file
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = run(prepared, {"input": x})[0], run(int8, {"input": x})[0]
        assert got.shape == want.shape == (shape[0], 10)
        assert rel_err(want, got) < 0.05
    assert not [r for r in float_nodes(int8) if r["op"] in ("Conv", "Gemm")]  # QLinearConv / QGemm in ORT


def _old_model(opset, ir_version=4, initializers_as_inputs=False):
    """Conv-Relu-MaxPool-Upsample-Flatten-Gemm-Softmax as an opset-9 era converter wrote it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal((5, 4 * 8 * 8)).astype(np.float32) / 16, "G"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "GB")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Upsample", ["p", "scales"], ["u"], mode="nearest", name="up"),
             helper.make_node("Flatten", ["u"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "G", "GB"], ["y"], transB=1, name="fc"),
             helper.make_node("Softmax", ["y"], ["out"], axis=1, name="softmax")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                             producer_name="handmade", producer_version="0.9")


@pytest.mark.parametrize("initializers_as_inputs", [False, True])
def test_opset9_helper_model_converts_and_quantizes(tmp_path, initializers_as_inputs):
    src = tmp_path / "old9.onnx"
    onnx.save(_old_model(9, ir_version=3 if initializers_as_inputs else 4,
                         initializers_as_inputs=initializers_as_inputs), str(src))
    dst = tmp_path / "old13.onnx"
    rec = prepare_onnx(src, dst)
    assert (rec["original_opset"], rec["opset"], rec["converted"]) == (9, 13, True)
    assert rec["producer"] == "handmade 0.9" and rec["ir_version"] >= 7
    assert rec["initializer_inputs_removed"] == (5 if initializers_as_inputs else 0)
    assert dynamic_dims(dst) == {"x": ["N", 3, 8, 8]}
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "Resize" in ops and "Upsample" not in ops
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(dst, {"x": x})[0], run(src, {"x": x})[0], rtol=1e-5, atol=1e-6)
    int8 = quantize(dst, tmp_path / "old_int8.onnx", "x", (4, 3, 8, 8))
    assert run(int8, {"x": x})[0].shape == (3, 5)


def test_converter_failure_names_the_op(tmp_path):
    """ImageScaler (an experimental op of opset 8) passes the checker and runs in ORT, but the
    version converter has no way to carry it forward."""
    graph = helper.make_graph(
        [helper.make_node("ImageScaler", ["x"], ["s"], scale=2.0, bias=[1.0, 2.0, 3.0], name="prep"),
         helper.make_node("Relu", ["s"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    src = tmp_path / "scaler8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=4), str(src))
    with pytest.raises(EdgepackError, match="op ImageScaler \\(node 'prep'\\)") as err:
        prepare_onnx(src, tmp_path / "out.onnx")
    assert "opset 8 to 13" in err.value.message and "opset_version" in err.value.hint
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("small_tensor", [upgrade.SMALL_TENSOR, 0])
def test_external_data_is_loaded_and_written_back_as_one_file(tmp_path, monkeypatch, small_tensor):
    # small_tensor 0: every weight stays a reference through the opset converter (as a 2 GB model's would)
    monkeypatch.setattr(upgrade, "SMALL_TENSOR", small_tensor)
    src_dir, out_dir = tmp_path / "from_framework", tmp_path / "prepared"
    src_dir.mkdir(), out_dir.mkdir()
    exported = export(ConvNet(), torch.randn(1, 3, 16, 16), tmp_path / "net.onnx", opset=11)
    src = src_dir / "net.onnx"
    onnx.save(onnx.load(str(exported)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (src_dir / "weights.bin").stat().st_size > 4 * 16 * 16 * 9  # the conv weights live there

    dst = out_dir / "net.onnx"
    rec = prepare_onnx(src, dst)
    assert rec["external_data"] and not rec["dst_external_data"] and rec["opset"] == 13
    on_disk = onnx.load(str(dst), load_external_data=False)
    assert not [t.name for t in on_disk.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert sorted(p.name for p in out_dir.iterdir()) == ["net.onnx"]
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run(dst, {"input": x})[0], run(src, {"input": x})[0], rtol=1e-5, atol=1e-6)

    (src_dir / "weights.bin").unlink()
    with pytest.raises(EdgepackError, match="weights.bin") as err:
        prepare_onnx(src, out_dir / "again.onnx")
    assert str(src_dir / "weights.bin") in err.value.message and "does not exist" in err.value.message
    assert "next to net.onnx" in err.value.hint


def test_model_past_the_protobuf_limit_keeps_external_data_beside_dst(tmp_path, monkeypatch):
    """A real 2 GB model would take minutes here; the limit is lowered so the same path runs."""
    src = tmp_path / "old9.onnx"
    onnx.save(_old_model(9), str(src))
    monkeypatch.setattr(upgrade, "PROTOBUF_LIMIT", 1024)
    dst = tmp_path / "out" / "big.onnx"
    dst.parent.mkdir()
    rec = prepare_onnx(src, dst)
    assert rec["dst_external_data"] and (dst.parent / "big.onnx.data").stat().st_size >= 4 * 5 * 256  # G
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(dst, {"x": x})[0], run(src, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_check_is_skipped_when_ort_cannot_run_the_original(tmp_path):
    """A custom-domain op: the file converts (its domain is left alone) but nothing can run it here."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Blur", ["r"], ["y"], domain="vendor.ops")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    src = tmp_path / "vendor11.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("vendor.ops", 1)]),
              str(src))
    rec = prepare_onnx(src, tmp_path / "vendor13.onnx")
    assert rec["opset"] == 13 and "cannot run the original" in rec["check"]["skipped"]
    assert [n.domain for n in onnx.load(str(tmp_path / "vendor13.onnx")).graph.node] == ["", "vendor.ops"]


def _float16_anywhere(model):
    tensors = list(upgrade._tensors(model.graph))
    infos = list(upgrade._value_infos(model.graph))
    casts = [a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    return (any(t.data_type == TensorProto.FLOAT16 for t in tensors)
            or any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in infos)
            or TensorProto.FLOAT16 in casts)


def test_fp16_torch_export_becomes_float32_and_quantizes(tmp_path):
    net = ConvNet().eval()
    src = export(net.half(), torch.randn(1, 3, 32, 32).half(), tmp_path / "half11.onnx", opset=11)
    assert onnx.load(str(src)).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    dst = tmp_path / "float.onnx"
    rec = prepare_onnx(src, dst)
    assert rec["fp16_to_fp32"] and rec["converted"] and rec["opset"] == 13
    assert (rec["fp16_inputs"], rec["fp16_outputs"]) == (["input"], ["output"])
    assert rec["check"]["relative_diff"] < upgrade.FP16_TOLERANCE
    model = onnx.load(str(dst))
    assert not _float16_anywhere(model)
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():  # same fp16-rounded weights, computed in float32 by PyTorch
        want = net.float()(torch.from_numpy(x)).numpy()
    got = run(dst, {"input": x})[0]
    assert got.dtype == np.float32 and rel_err(want, got) < 1e-4
    fp16_out = run(src, {"input": x.astype(np.float16)})[0].astype(np.float32)
    assert rel_err(want, fp16_out) < upgrade.FP16_TOLERANCE
    int8 = quantize(dst, tmp_path / "int8.onnx", "input", (4, 3, 32, 32))
    assert rel_err(want, run(int8, {"input": x})[0]) < 0.05


def test_fp16_casts_and_constants_become_float32(tmp_path):
    """A mixed-precision graph: fp16 weights and I/O, a float16 Constant, a float32 island between Casts."""
    rng = np.random.default_rng(6)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float16), "W")
    shift = helper.make_tensor("shift", TensorProto.FLOAT16, [1, 8, 1, 1],
                               rng.standard_normal(8).astype(np.float16).view(np.uint16).tolist())
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Constant", [], ["k"], value=shift, name="const"),
             helper.make_node("Add", ["c", "k"], ["a"], name="add"),
             helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT, name="up"),
             helper.make_node("Sigmoid", ["a32"], ["s32"], name="sigmoid"),
             helper.make_node("Cast", ["s32"], ["y"], to=TensorProto.FLOAT16, name="down")]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 8, 8])], [w],
                              value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT16, [1, 8, 8, 8])])
    src, dst = tmp_path / "mixed.onnx", tmp_path / "mixed32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(src))
    rec = prepare_onnx(src, dst)
    assert rec["fp16_to_fp32"] and not rec["converted"] and rec["fp16_outputs"] == ["y"]
    assert not _float16_anywhere(onnx.load(str(dst)))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = run(dst, {"x": x})[0]
    want = run(src, {"x": x.astype(np.float16)})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 5e-3
    assert run(quantize(dst, tmp_path / "mixed_int8.onnx", "x", (1, 3, 8, 8)), {"x": x})[0].shape == (1, 8, 8, 8)


class Unquantizable(nn.Module):
    """Convs and a Linear ORT quantizes, with Erf, Softplus and LayerNorm between them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        y = nn.functional.softplus(self.c2(torch.erf(self.c1(x))))
        return self.fc(self.ln(y.mean((2, 3))))


def test_float_nodes_names_ops_ort_leaves_in_float(tmp_path):
    src = export(Unquantizable(), torch.randn(1, 3, 16, 16), tmp_path / "u11.onnx", opset=11)
    fp32 = tmp_path / "u.onnx"
    prepare_onnx(src, fp32)
    rows = {r["node"]: r for r in float_nodes(quantize(fp32, tmp_path / "u_int8.onnx", "input", (4, 3, 16, 16)))}
    # Erf sits between two quantized convs (DequantizeLinear before, QuantizeLinear after) yet is float.
    assert rows["/Erf"]["op"] == "Erf" and "does not quantize Erf" in rows["/Erf"]["reason"]
    assert rows["/Softplus"]["op"] == "Softplus"
    # Opset 11 has no LayerNormalization op: the exporter spelled it out, and its Sqrt and Div stay float.
    assert {"Sqrt", "Div"} <= {r["op"] for r in rows.values()}
    assert not [r for r in rows.values() if r["op"] in ("Conv", "Gemm", "QuantizeLinear", "DequantizeLinear")]

    excluded = quantize(fp32, tmp_path / "u_excl.onnx", "input", (4, 3, 16, 16), nodes_to_exclude=["/c2/Conv"])
    rows = {r["node"]: r for r in float_nodes(excluded)}
    assert rows["/c2/Conv"]["op"] == "Conv" and "left in float" in rows["/c2/Conv"]["reason"]
    assert "/c1/Conv" not in rows


def test_float_nodes_layernorm_wrapped_in_qdq_still_runs_in_float(tmp_path):
    fp32 = export(Unquantizable(), torch.randn(1, 3, 16, 16), tmp_path / "u17.onnx", opset=17)
    int8 = quantize(fp32, tmp_path / "u17_int8.onnx", "input", (4, 3, 16, 16))
    ln = next(n for n in onnx.load(str(int8)).graph.node if n.op_type == "LayerNormalization")
    producers = {o: n.op_type for n in onnx.load(str(int8)).graph.node for o in n.output}
    assert producers[ln.input[0]] == "DequantizeLinear"  # the quantizer did wrap it
    rows = {r["node"]: r for r in float_nodes(int8)}
    assert "no int8 kernel for LayerNormalization" in rows[ln.name]["reason"]
    assert {"Erf", "Softplus", "LayerNormalization"} <= {r["op"] for r in rows.values()}


def test_dynamic_dims_unknown_and_initializer_inputs(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["tokens", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["out"])], "g",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", None, 4]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "dims.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert dynamic_dims(path) == {"tokens": ["batch", "?", 4], "bias": ["..."]}
    with pytest.raises(EdgepackError, match="does not exist"):
        dynamic_dims(tmp_path / "missing.onnx")
