"""Quantization-aware training: the simulation matches ONNX Runtime's quantizer, QAT recovers what
per-tensor PTQ loses on a CNN with planted outlier channels, and the `qat` stage's choices; for TFLite,
litert-torch's PT2E QAT makes an int8 `.tflite` that computes the trained model and beats PT2E PTQ."""
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
from edgepack.compress.qat_tflite import convert_trained, simulated_outputs, train_qat_tflite
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


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
        simulated = WeightFakeQuant(q, 0)(conv.weight.detach()).detach().numpy()
        np.testing.assert_allclose(simulated, w, rtol=0, atol=1e-6 * np.abs(w).max())


@pytest.mark.parametrize("per_channel,reduce_range", [(False, False), (True, False), (True, True)])
def test_learned_weight_ranges_are_what_onnx_runtime_quantizes_after_export(untrained, tmp_path, per_channel,
                                                                           reduce_range):
    """With clip ratios below 1 (as training leaves them), the weights the simulation used are the
    int8 weights ORT's quantizer writes for the exported model: the export clips to the ratios."""
    q = Quantization(per_channel=per_channel, reduce_range=reduce_range)
    folded, _ = fold_batchnorm(untrained["model"])
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    with fake_quantized(folded, q):
        simulated = []
        for i, conv in enumerate(convs):
            fq = conv.parametrizations.weight[0]
            with torch.no_grad():
                fq.ratio.copy_(torch.linspace(0.2, 0.9, fq.ratio.numel()).reshape(fq.ratio.shape) if per_channel
                               else torch.tensor(0.3 + 0.4 * i))
                simulated.append(conv.weight.numpy().copy())
        unclipped = WeightFakeQuant(q, 0)(convs[0].parametrizations.weight.original.detach()).detach().numpy()
        assert not np.allclose(simulated[0], unclipped)  # the ratios changed the codes
    fp32 = to_onnx(folded, (torch.zeros(1, 1, 8, 8),), tmp_path / "clipped.onnx")
    quantize_onnx(fp32, tmp_path / "q.onnx", untrained["train"], q, 1)
    ort_weights = qdq_weights(tmp_path / "q.onnx")
    assert len(ort_weights) == len(simulated) == 2
    for sim, w in zip(simulated, ort_weights):
        np.testing.assert_allclose(sim, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_trained_ranges_move_stay_in_range_and_are_the_exported_weights(planted, tmp_path):
    """fit on the planted outliers (per-tensor, as train_qat runs it): the ratios move below 1 and
    stay in [0.01, 1], and ORT's QDQ file of the exported model holds exactly the weights the
    trained simulation used (fit -> projection -> best epoch -> clip at exit -> ORT)."""
    from edgepack.compress.qat import calibrate, clip_ratios, fit
    q = Quantization(per_channel=False)
    data, teacher = planted["train"], planted["model"]
    student, _ = fold_batchnorm(teacher)
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    with fake_quantized(student, q):
        calibrate(student, data)
        summary = fit(student, teacher, data, planted["choose"],
                      FinetuneConfig(epochs=2, lr=1e-4, patience=None, threads=1))
        r = clip_ratios(student)
        with torch.no_grad():
            simulated = [c.weight.numpy().copy() for c in convs]
    assert summary["epochs_run"] == 2 and summary["best_epoch"] >= 1  # a trained epoch was kept
    assert r["ratios"] == 3 and r["below_0.99"] >= 1 and 0.01 <= r["min"] <= r["median"] <= 1.0, r
    fp32 = to_onnx(student, (torch.zeros(1, 1, 8, 8),), tmp_path / "trained.onnx")
    quantize_onnx(fp32, tmp_path / "q.onnx", data, q, 1)
    ort_weights = qdq_weights(tmp_path / "q.onnx")
    assert len(ort_weights) == len(simulated) == 2
    for sim, w in zip(simulated, ort_weights):
        np.testing.assert_allclose(sim, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_learned_ratio_gets_a_gradient_and_stays_in_range(untrained):
    q = Quantization(per_channel=False)
    folded, _ = fold_batchnorm(untrained["model"])
    conv = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
    with fake_quantized(folded, q):
        fq = conv.parametrizations.weight[0]
        conv.weight.square().sum().backward()
        assert fq.ratio.grad is not None and float(fq.ratio.grad) != 0
        with torch.no_grad():
            fq.ratio.fill_(3.0)
        fq.project_()
        assert float(fq.ratio.detach()) == 1.0
    with fake_quantized(folded, q, learn_ranges=False):
        assert not conv.parametrizations.weight[0].ratio.requires_grad


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


def _build(planted, tmp_path, name, budget, qat, model=None, tflite=False):
    import edgepack
    targets = tmp_path / "targets"
    targets.mkdir(exist_ok=True)
    (targets / "x86-pt.toml").write_text(textwrap.dedent(f'''
        name = "x86-pt"
        arch = "x86_64"
        runtime = "{'tflite' if tflite else 'onnxruntime'}"
        formats = {'["onnx", "tflite"]' if tflite else '["onnx"]'}
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


# --- TFLite: litert-torch's PT2E QAT

EXAMPLE = (torch.zeros(1, 1, 8, 8),)


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(str(path))
    it.allocate_tensors()
    return it


def _tflite_top1(path, data) -> float:
    from edgepack.tflite import run_tflite
    return 100 * float((run_tflite(path, [data.x])[0].argmax(1) == data.y).mean())


@pytest.fixture(scope="module")
def qat_tflite(planted, tmp_path_factory):
    torch.set_num_threads(1)
    student, quant, example, rec = train_qat_tflite(planted["model"], EXAMPLE, planted["train"], planted["choose"],
                                                    planted["train"], FinetuneConfig(epochs=3, lr=1e-4, patience=None,
                                                                                     threads=1), num_calib=128)
    path = tmp_path_factory.mktemp("qat-tflite") / "qat.int8.tflite"
    art, converted = convert_trained(student, quant, example, path)
    return {"path": path, "record": rec, "artifact": art, "converted": converted}


def test_pt2e_qat_tflite_is_int8_and_computes_the_trained_model(planted, qat_tflite):
    rec, art, path = qat_tflite["record"], qat_tflite["artifact"], qat_tflite["path"]
    assert rec["calibration_samples"] == 128 and rec["fake_quantizers"] >= 3 and "prepare_qat_pt2e" in rec["route"]
    assert rec["simulated_top1_after"] >= rec["simulated_top1_before"]
    it = _interpreter(path)  # ai-edge-litert loads it
    assert [d["dtype"] for d in it.get_input_details()] == [np.int8]
    assert [d["dtype"] for d in it.get_output_details()] == [np.int8]
    weights = [d for d in it.get_tensor_details() if len(d["shape"]) == 4 and d["dtype"] == np.int8
               and len(d["quantization_parameters"]["scales"]) > 1]  # per-channel int8 filters
    assert len(weights) >= 2
    assert art["float_ops"] == [] and {"CONV_2D", "FULLY_CONNECTED"} <= set(art["ops"])
    # The file computes the trained model (int8 simulated in PyTorch) on real digits.
    from edgepack.tflite import run_tflite
    x = planted["test"].x
    got, sim = run_tflite(path, [x])[0], simulated_outputs(qat_tflite["converted"], [x])[0]
    assert got.shape == sim.shape == (len(x), 10)
    assert np.linalg.norm(got - sim) / np.linalg.norm(sim) < 0.05
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.97


@pytest.mark.slow
def test_pt2e_qat_tflite_beats_pt2e_ptq_on_the_planted_outliers(planted, qat_tflite, tmp_path):
    from edgepack.tflite import convert_int8
    convert_int8(planted["model"], EXAMPLE, planted["train"], tmp_path / "ptq.tflite", num_calib=128)
    with torch.no_grad():
        fp32 = 100 * float((planted["model"](torch.from_numpy(planted["test"].x)).argmax(1).numpy()
                            == planted["test"].y).mean())
    ptq, qat = _tflite_top1(tmp_path / "ptq.tflite", planted["test"]), _tflite_top1(qat_tflite["path"], planted["test"])
    # measured: float 64.0, PT2E PTQ 51.9, PT2E QAT 66.0 (497 test digits)
    assert fp32 - ptq >= 5 and qat >= ptq + 5, (fp32, ptq, qat)


def test_pt2e_qat_refuses_a_model_torch_export_cannot_trace(planted):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x).flatten(1) if float(x.sum()) > 0 else -self.conv(x).flatten(1)
    with pytest.raises(EdgepackError, match="cannot export the model with torch.export") as e:
        train_qat_tflite(Branchy().eval(), EXAMPLE, planted["train"], planted["choose"], planted["train"],
                         FinetuneConfig(epochs=1, threads=1))
    assert "traceable by torch.export" in e.value.hint


@pytest.mark.slow
def test_stage_makes_the_tflite_int8_artifact_by_qat(planted, tmp_path):
    from edgepack import pipeline
    from edgepack.stages import qat as qat_stage, tflite as tflite_stage
    assert pipeline.BUILD_STAGES.index(qat_stage) > pipeline.BUILD_STAGES.index(tflite_stage)  # it needs both files
    result = _build(planted, tmp_path, "tfl", 1.0, {"always": True, "epochs": 3}, tflite=True)
    rec = result.manifest.stages["qat"]["tflite"]
    assert "prepare_qat_pt2e" in rec["route"] and rec["ptq_drop"] > 1.0 and rec["qat_drop"] < rec["ptq_drop"]
    assert rec["replaced"] and result.manifest.stages["tflite"]["int8_route"] == "qat"
    assert rec["vs_simulated"]["top1_agreement"] >= 0.97
    path = result.path / "model.int8.tflite"
    it = _interpreter(path)
    assert it.get_input_details()[0]["dtype"] == np.int8
    scale, zero = it.get_input_details()[0]["quantization"]
    spec = result.manifest.artifact("model.int8.tflite").inputs[0]  # the manifest describes the QAT file's IO
    assert spec.quantization["zero_point"] == zero and spec.quantization["scale"] == pytest.approx(scale)
    report = (result.path / "report.md").read_text()
    assert "litert-torch PT2E QAT" in report and "`model.int8.tflite` is the QAT artifact" in report
    again = _build(planted, tmp_path, "tfl2", 1.0, {"always": True, "epochs": 3}, tflite=True)
    assert "qat (TFLite)" in again.reused and again.manifest.stages["qat"]["tflite"]["replaced"]
    other = _build(planted, tmp_path, "tfl3", 1.0, {"always": True, "epochs": 2}, tflite=True)
    assert "qat (TFLite)" not in other.reused and other.manifest.stages["qat"]["tflite"]["epochs_run"] == 2


def test_vs_simulated_judges_every_output():
    # A two-output model whose second output (boxes, say) is off while its scores agree: the
    # record's top figures are the worst output's, not the first's.
    from edgepack.stages.qat import vs_simulated
    rng = np.random.default_rng(0)
    scores, boxes = rng.standard_normal((32, 10)), rng.standard_normal((32, 4))
    rec = vs_simulated([scores, boxes + 0.5], [scores, boxes], ["scores", "boxes"])
    assert rec["max_abs_diff"] == pytest.approx(0.5) and rec["outputs"][0]["max_abs_diff"] == 0.0
    assert rec["relative_error"] == rec["outputs"][1]["relative_error"] > 0.1
    assert rec["top1_agreement"] == 1.0 and "top1_agreement" not in rec["outputs"][1]
    assert rec["samples"] == 32 and [o["output"] for o in rec["outputs"]] == ["scores", "boxes"]
