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
