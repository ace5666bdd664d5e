"""Export parity failures and the accuracy-aware fallback, on real models."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import check_parity, to_onnx
from edgepack.runtime import open_model


class DataDependent(nn.Module):
    """Tracing records one branch; real inputs take the other: export parity must catch it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_parity_failure_is_reported(tmp_path):
    path = to_onnx(DataDependent(), (torch.zeros(1, 4),), tmp_path / "dd.onnx")
    x = np.abs(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    with pytest.raises(EdgepackError, match="disagrees with PyTorch"):
        check_parity(DataDependent()(torch.from_numpy(x)).numpy(), open_model(path).run([x])[0])


class Outliers(nn.Module):
    """A conv with one huge channel: per-tensor activation ranges then crush the useful channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16 * 8 * 8, 10, bias=False)
        with torch.no_grad():
            self.c1.weight[0] *= 400.0
            self.c2.weight[:, 0] /= 400.0

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(x.flatten(1))


def test_fallback_leaves_sensitive_nodes_in_float(tmp_path):
    from safetensors.torch import save_file
    import edgepack
    model = Outliers().eval()
    (tmp_path / "outliers.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_quantize import Outliers\ndef build():\n    return Outliers()\n"
        % str(__import__("pathlib").Path(__file__).parent))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = edgepack.build(model=f"{tmp_path / 'outliers.py'}:build", weights=str(tmp_path / "w.safetensors"),
                            input_shape=[1, 3, 8, 8], calib=str(tmp_path / "calib.npz"), out=str(tmp_path / "d"),
                            budgets={"max_accuracy_drop": 0.0}, latency_runs=5)
    fb = result.manifest.stages["fallback"]
    assert fb["initial_drop"] > 0 and fb["float_nodes"]
    assert fb["final_drop"] < fb["initial_drop"]
    graph = onnx.load(str(result.path / "model.int8.onnx")).graph
    float_convs = {n.name for n in graph.node if n.op_type in ("Conv", "Gemm")
                   and all(not i.endswith("DequantizeLinear_Output") for i in n.input)}
    assert set(fb["float_nodes"]) <= float_convs  # excluded nodes really stayed float
    report = (result.path / "report.md").read_text()
    assert "Accuracy-aware fallback" in report and fb["float_nodes"][0] in report


class OneSensitiveLayer(nn.Module):
    """Four convs; the second makes one channel 400x larger and the third undoes it, so int8's
    per-tensor range on the second's output crushes the channels the third depends on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.convs = nn.ModuleList([nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1),
                                    nn.Conv2d(12, 12, 3, padding=1), nn.Conv2d(12, 8, 3, padding=1)])
        self.head = nn.Linear(8 * 8 * 8, 10)
        with torch.no_grad():
            self.convs[1].weight[0] *= 400.0
            self.convs[1].bias[0] *= 400.0
            self.convs[2].weight[:, 0] /= 400.0

    def forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        return self.head(x.flatten(1))


def qdq_loss_debug_sqnr(fp32, int8, data, samples=32) -> dict:
    """ORT's qdq_loss_debug as the old node_sensitivity ran it: every activation of every sample
    of both models kept, then compared."""
    import io
    from contextlib import redirect_stdout
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)
    from edgepack.onnx_tools.calibrate import DatasetReader
    data = data.sample(samples, seed=0)
    aug_f, aug_q = fp32.with_name("ref_f.onnx"), fp32.with_name("ref_q.onnx")
    with redirect_stdout(io.StringIO()):
        modify_model_output_intermediate_tensors(str(fp32), str(aug_f))
        modify_model_output_intermediate_tensors(str(int8), str(aug_q))
        acts_f = collect_activations(str(aug_f), DatasetReader.for_model(fp32, data, 8))
        acts_q = collect_activations(str(aug_q), DatasetReader.for_model(fp32, data, 8))
    errors = compute_activation_error(create_activation_matching(acts_q, acts_f))
    return {name: e["xmodel_err"] for name, e in errors.items() if "xmodel_err" in e}


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    from edgepack.data import Dataset
    from edgepack.onnx_tools.quantize import preprocess, quantize_onnx
    from edgepack.targets import Quantization
    d = tmp_path_factory.mktemp("sens")
    fp32 = to_onnx(OneSensitiveLayer(), (torch.zeros(1, 3, 8, 8),), d / "sens.onnx")
    pre = preprocess(fp32, d / "sens.pre.onnx")
    data = Dataset(np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    quantize_onnx(fp32, d / "sens.int8.onnx", data, Quantization(calibration_samples=48), preprocessed=pre)
    return pre, d / "sens.int8.onnx", data


def test_bounded_sensitivity_matches_qdq_loss_debug(sensitive):
    from edgepack.onnx_tools.sensitivity import matched_tensors, node_sensitivity, tensor_sqnr
    pre, int8, data = sensitive
    ref = qdq_loss_debug_sqnr(pre, int8, data)
    matched = matched_tensors(pre, int8)
    assert set(matched) == set(ref)  # the same float/int8 tensor pairs
    mine = tensor_sqnr(pre, int8, data, matched, samples=32)
    for name, db in ref.items():
        assert mine[name] == pytest.approx(db, abs=0.01), name
    ranking = node_sensitivity(pre, int8, data)
    assert [set(r) for r in ranking] == [{"node", "op", "sqnr_db", "lost_db"}] * len(ranking)
    assert len(ranking) == 5 and ranking == sorted(ranking, key=lambda r: -r["lost_db"])
    graph = onnx.load(str(pre)).graph
    third_conv = [n for n in graph.node if n.op_type == "Conv"][2]
    assert ranking[0]["node"] == third_conv.name  # where the crushed channels come back into play
    assert ranking[0]["lost_db"] > ranking[1]["lost_db"] + 3
    # the old ranking, from ORT's numbers with the same rule, has the same top node
    consumers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    relu_out = consumers[third_conv.output[0]][0].output[0]
    in_db = min(ref[i] for i in third_conv.input if i in ref)
    assert ranking[0]["lost_db"] == pytest.approx(in_db - ref[relu_out], abs=0.02)


def test_sensitivity_batches_do_not_change_it(sensitive):
    from edgepack.onnx_tools.sensitivity import node_sensitivity
    pre, int8, data = sensitive
    per_sample = node_sensitivity(pre, int8, data, budget_mb=1e-6)
    one_batch = node_sensitivity(pre, int8, data, budget_mb=1024)
    assert [r["node"] for r in per_sample] == [r["node"] for r in one_batch]
    for a, b in zip(per_sample, one_batch):
        assert a["lost_db"] == pytest.approx(b["lost_db"], abs=0.02)
