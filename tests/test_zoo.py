"""Every zoo architecture prunes at ratio 0.5, keeps its output shape, exports to ONNX with
parity and quantizes to int8 that runs in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepack.data import Dataset
from edgepack.onnx_tools.export import to_onnx
from edgepack.prune import PruneConfig, count_macs_params, prune_model
from edgepack.onnx_tools.quantize import quantize_onnx
from edgepack.runtime import open_model
from edgepack.targets import load_profile
from fixtures.zoo import ZOO

torch.set_num_threads(1)
WIDTH = {"resnet18": 0.25, "mobilenet_v2": 0.25}  # the others are small at width 0.5


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_prunes_exports_and_quantizes(name, tmp_path):
    torch.manual_seed(0)
    model = ZOO[name](10, 3, WIDTH.get(name, 0.5)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pruned, record = prune_model(model, x, PruneConfig(ratio=0.5, round_to=4))
    assert pruned(x).shape == model(x).shape == (1, 10)
    assert record.macs_after == count_macs_params(pruned, (x,))[0] < 0.6 * record.macs_before
    assert record.params_after < record.params_before and record.groups_checked > 0

    fp32 = to_onnx(pruned, (x,), tmp_path / "m.onnx")
    batch = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = pruned(torch.from_numpy(batch)).numpy()
    got = open_model(fp32, 1).run([batch])[0]
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())

    calib = Dataset(np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype(np.float32))
    int8 = tmp_path / "m.int8.onnx"
    quantize_onnx(fp32, int8, calib, load_profile("x86").quantization)
    out = open_model(int8, 1).run([batch])[0]
    assert out.shape == (4, 10) and np.isfinite(out).all()
    # int8 noise stays well below the logits' spread (a broken graph would give garbage)
    assert np.corrcoef(out.ravel(), want.ravel())[0, 1] > 0.9
