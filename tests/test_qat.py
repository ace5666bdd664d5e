"""Quantization-aware training: the simulation matches ONNX Runtime's quantizer, QAT recovers what
per-tensor PTQ loses on a CNN with planted outlier channels, and the `qat` stage's choices."""
from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgepack.compress.qat import WeightFakeQuant, fake_quantized, fold_batchnorm, train_qat
from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import to_onnx
from edgepack.onnx_tools.quantize import quantize_onnx
from edgepack.prune import FinetuneConfig, finetune
from edgepack.runtime import open_model
from edgepack.targets import Quantization

NET = textwrap.dedent('''
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
''')
CLASSES = [str(i) for i in range(10)]
OUTLIER = 100.0  # channels 0-1 of the first conv times this, the second conv's inputs from them divided


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_net() -> nn.Module:
    ns: dict = {}
    exec(NET, ns)
    return ns["build"]()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A small CNN trained on scikit-learn's 8x8 digits, then given two outlier channels that leave
    the float function unchanged (ReLU is positively homogeneous): per-tensor int8 loses clearly."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = (d.images[:, None].astype(np.float32) / 8 - 1), d.target.astype(np.int64)
    train, choose, test = (Dataset(x[:1000], y[:1000], "train", CLASSES), Dataset(x[1000:1300], y[1000:1300], "choose", CLASSES),
                           Dataset(x[1300:], y[1300:], "test", CLASSES))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_net()
    finetune(model, None, train, choose, FinetuneConfig(epochs=3, lr=0.05, distill=False, patience=None, threads=1))
    model.eval()
    probe = torch.from_numpy(test.x[:64])
    with torch.no_grad():
        before = model(probe)
        model[1].weight[:2] *= OUTLIER
        model[1].bias[:2] *= OUTLIER
        model[3].weight[:, :2] /= OUTLIER
        assert torch.allclose(model(probe), before, atol=1e-3)
    root = tmp_path_factory.mktemp("qat")
    (root / "net.py").write_text(NET)
    save_file(model.state_dict(), str(root / "net.safetensors"))
    np.savez(root / "calib.npz", x=x[:256])
    np.savez(root / "train.npz", x=x[:1000], y=y[:1000])
    np.savez(root / "eval.npz", x=x[1000:], y=y[1000:])
    fp32 = to_onnx(model, (torch.zeros(1, 1, 8, 8),), root / "net.onnx")
    return {"model": model, "train": train, "choose": choose, "test": test, "root": root, "fp32": fp32}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """The same CNN with the same outliers, untrained (BatchNorm statistics made up): for the fast tests."""
    torch.manual_seed(0)
    model = build_net().eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
        model[1].weight[:2] *= OUTLIER
        model[1].bias[:2] *= OUTLIER
        model[3].weight[:, :2] /= OUTLIER
    x = np.random.default_rng(0).standard_normal((128, 1, 8, 8)).astype(np.float32)
    data = Dataset(x, np.zeros(128, dtype=np.int64), "random", CLASSES)
    fp32 = to_onnx(model, (torch.zeros(1, 1, 8, 8),), tmp_path_factory.mktemp("qat-fast") / "net.onnx")
    return {"model": model, "train": data, "test": data, "fp32": fp32}


def top1(path, data) -> float:
    return 100 * float((np.asarray(open_model(path, 1).run([data.x])[0]).argmax(1) == data.y).mean())


def qdq_weights(path) -> list[np.ndarray]:
    """The int8 weights of a QDQ file, dequantized (scale, zero point per axis 0)."""
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out = []
    for n in g.node:
        w = inits.get(n.input[0])
        if n.op_type == "DequantizeLinear" and w is not None and w.dtype in (np.int8, np.uint8) and w.ndim == 4:
            shape = (-1,) + (1,) * (w.ndim - 1)
            zero = inits[n.input[2]].reshape(shape).astype(np.float32) if len(n.input) > 2 else 0
            out.append((w.astype(np.float32) - zero) * inits[n.input[1]].reshape(shape))
    return out


@pytest.mark.parametrize("per_channel,reduce_range", [(True, False), (False, False), (True, True)])
def test_weight_simulation_is_what_onnx_runtime_quantizes(untrained, tmp_path, per_channel, reduce_range):
    planted = untrained
    q = Quantization(per_channel=per_channel, reduce_range=reduce_range)
    quantize_onnx(planted["fp32"], tmp_path / "q.onnx", planted["train"], q, 1)
    folded, ok = fold_batchnorm(planted["model"])
    assert ok and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    ort_weights = qdq_weights(tmp_path / "q.onnx")
    assert len(ort_weights) == len(convs) == 2
    for conv, w in zip(convs, ort_weights):
        simulated = WeightFakeQuant(q, 0)(conv.weight.detach()).numpy()
        np.testing.assert_allclose(simulated, w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_fake_quantization_is_stripped_on_exit(untrained):
    planted = untrained
    folded, _ = fold_batchnorm(planted["model"])
    x = torch.from_numpy(planted["test"].x[:32])
    with torch.no_grad():
        ref = folded(x)
    with fake_quantized(folded, Quantization(per_channel=False)) as layers:
        assert len(layers) == 3 and hasattr(folded, "_qat_inputs")
    assert not hasattr(folded, "_qat_inputs")
    with torch.no_grad():
        assert torch.equal(folded(x), ref)
    assert not any(k.startswith("parametrizations") for k in folded.state_dict())


@pytest.mark.slow
def test_qat_recovers_most_of_the_per_tensor_loss(planted, tmp_path):
    q = Quantization(per_channel=False)
    ptq = tmp_path / "ptq.onnx"
    quantize_onnx(planted["fp32"], ptq, planted["train"], q, 1)
    fp32_top1, ptq_top1 = top1(planted["fp32"], planted["test"]), top1(ptq, planted["test"])
    assert fp32_top1 - ptq_top1 >= 5  # the planted outliers cost per-tensor PTQ (19.9 points measured)
    trained, rec = train_qat(planted["model"], q, planted["train"], planted["choose"], planted["train"],
                             FinetuneConfig(epochs=4, lr=1e-4, alpha=1.0, patience=None, threads=1))
    assert rec["batchnorm_folded"] and rec["simulated_top1_after"] > rec["simulated_top1_before"] + 0.05
    qat = quantize_onnx(to_onnx(trained, (torch.zeros(1, 1, 8, 8),), tmp_path / "t.onnx"), tmp_path / "qat.onnx",
                        planted["train"], q, 1)
    assert not qat["per_channel"]
    qat_top1 = top1(tmp_path / "qat.onnx", planted["test"])
    assert fp32_top1 - qat_top1 <= 0.6 * (fp32_top1 - ptq_top1), (fp32_top1, ptq_top1, qat_top1)


def _build(planted, tmp_path, name, budget, qat, model=None):
    import edgepack
    targets = tmp_path / "targets"
    targets.mkdir(exist_ok=True)
    (targets / "x86-pt.toml").write_text(textwrap.dedent(f'''
        name = "x86-pt"
        arch = "x86_64"
        runtime = "onnxruntime"
        [quantization]
        per_channel = false
        [budgets]
        max_accuracy_drop = {budget}
    '''))
    root = planted["root"]
    spec = dict(model=f"{root / 'net.py'}:build", weights=str(root / "net.safetensors")) if model is None else dict(model=model)
    return edgepack.build(**spec, calib=str(root / "calib.npz"), eval=str(root / "eval.npz"), train=str(root / "train.npz"),
                          input_shape=[1, 1, 8, 8], target="x86-pt", targets_dir=[str(targets)], out=str(tmp_path / name),
                          latency_runs=5, fallback=False, compress={"qat": qat})


@pytest.mark.slow
def test_stage_replaces_the_int8_artifact_when_qat_is_better(planted, tmp_path):
    result = _build(planted, tmp_path, "qat", 1.0, {"epochs": 3})  # PTQ misses 1 point: QAT runs
    rec = result.manifest.stages["qat"]
    assert rec["ptq_drop"] > 1.0 and rec["replaced"] and rec["qat_drop"] < rec["ptq_drop"]
    int8 = result.path / "model.int8.onnx"
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: planted["test"].x[:4]})[0].shape == (4, 10)
    drop = result.manifest.artifact("model.fp32.onnx").metrics.accuracy - result.manifest.artifact("model.int8.onnx").metrics.accuracy
    assert drop < rec["ptq_drop"]  # the reporting samples agree with the choosing ones
    assert "## Quantization-aware training" in (result.path / "report.md").read_text()


@pytest.mark.slow
def test_stage_skips_when_ptq_meets_the_budget_unless_forced(planted, tmp_path):
    rec = _build(planted, tmp_path, "skip", 100.0, {}).manifest.stages["qat"]
    assert "PTQ met max_accuracy_drop" in rec["skipped"] and not rec["replaced"]
    forced = _build(planted, tmp_path, "forced", 100.0, {"always": True, "epochs": 1}).manifest.stages["qat"]
    assert "skipped" not in forced and forced["epochs_run"] == 1 and forced["qat_drop"] is not None


@pytest.mark.slow
def test_onnx_input_and_bad_options_are_refused(planted, tmp_path):
    with pytest.raises(EdgepackError, match="needs a PyTorch model"):
        _build(planted, tmp_path, "onnx", 1.0, {}, model=str(planted["fp32"]))
    with pytest.raises(EdgepackError, match=r"invalid \[compress.qat\] options:\n  - epoch: unknown"):
        _build(planted, tmp_path, "bad", 1.0, {"epoch": 3})
