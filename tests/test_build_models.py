"""`edgepack build` on models that are not one image in, class scores out: several named inputs
(float and int64), dict outputs, a regression head, a dynamic-shape ONNX file at opset 11;
quality budgets that fail closed; the stage cache; build names and config-file safety."""
from __future__ import annotations

import textwrap

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from edgepack.manifest import read_manifest

MODELS = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    class TwoInputs(nn.Module):
        """An image and int64 token ids in; a dict of class scores and an embedding out."""
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(16, 3)

        def forward(self, image, ids):
            z = torch.cat([self.conv(image), self.embed(ids).mean(1)], 1)
            return {"scores": self.head(z), "embedding": z}

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

        def forward(self, x):
            return self.net(x)

    def two_inputs():
        torch.manual_seed(0)
        return TwoInputs()

    def regressor():
        torch.manual_seed(0)
        return Regressor()

    def neg_mse(outputs, labels):
        return -float(((outputs["output"][:, 0] - labels) ** 2).mean())
''')


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "models.py").write_text(MODELS)
    ns: dict = {}
    exec(MODELS, ns)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((120, 3, 8, 8)).astype(np.float32)
    ids = rng.integers(0, 20, (120, 5)).astype(np.int64)
    with torch.no_grad():
        y = ns["two_inputs"]()(torch.from_numpy(image), torch.from_numpy(ids))["scores"].argmax(1).numpy()
    np.savez(root / "two.npz", image=image, ids=ids, y=y)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    with torch.no_grad():
        target = ns["regressor"]()(torch.from_numpy(x))[:, 0].numpy()
    np.savez(root / "reg.npz", x=x, y=target)
    return root


def _build(*args):
    return run_cli("build", "-q", "--latency-runs", "5", *args)


def test_two_named_inputs_and_dict_outputs(files, tmp_path):
    code, _, err = _build("--model", f"{files / 'models.py'}:two_inputs", "--calib", str(files / "two.npz"),
                          "--input-shape", "image=1x3x8x8", "--input-shape", "ids=1x5", "--input-dtype", "ids=int64",
                          "--out", str(tmp_path))
    assert code == 0, err
    m = read_manifest(tmp_path / "models-x86")
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("image", "float32", [1, 3, 8, 8]), ("ids", "int64", [1, 5])]
    assert [o.name for o in m.outputs] == ["scores", "embedding"]
    int8 = m.artifact("model.int8.onnx")
    assert set(int8.metrics.outputs) == {"scores", "embedding"} and int8.metrics.sqnr_db > 15
    assert int8.metrics.accuracy is not None  # labels are class ids and "scores" holds class scores
    assert int8.metrics.latency_ms.input_shapes == {"image": [1, 3, 8, 8], "ids": [1, 5]}
    data = m.stages["data"]
    assert data["choose_samples"] + data["report_samples"] == 120 and int8.metrics.samples == data["report_samples"]


def test_regression_without_a_metric_fails_closed(files, tmp_path):
    model = f"{files / 'models.py'}:regressor"
    code, _, err = _build("--model", model, "--calib", str(files / "reg.npz"), "--out", str(tmp_path))
    assert code == 1, err
    v = {x.budget: x for x in read_manifest(tmp_path / "models-x86").verdicts}
    assert v["max_accuracy_drop"].ok is False and "--metric" in v["max_accuracy_drop"].note
    code, _, err = _build("--model", model, "--calib", str(files / "reg.npz"), "--out", str(tmp_path),
                          "--metric", f"{files / 'models.py'}:neg_mse")
    m = read_manifest(tmp_path / "models-x86")
    v = {x.budget: x for x in m.verdicts}
    assert v["max_accuracy_drop"].value is not None and "metric" in v["max_accuracy_drop"].note
    fp32, int8 = m.artifact("model.fp32.onnx").metrics, m.artifact("model.int8.onnx").metrics
    assert fp32.metric > -1e-6 and int8.metric <= fp32.metric  # fp32 is the reference the labels came from
    assert code == (0 if v["max_accuracy_drop"].ok else 1), err
    code, _, err = _build("--model", model, "--calib", str(files / "reg.npz"), "--out", str(tmp_path),
                          "--budget", "max_accuracy_drop=off", "--budget", "min_sqnr_db=200")
    v = {x.budget: x for x in read_manifest(tmp_path / "models-x86").verdicts}
    assert code == 1 and v["min_sqnr_db"].ok is False and v["max_accuracy_drop"].limit is None, err


class Dense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    torch.manual_seed(0)
    path = root / "dense.onnx"
    torch.onnx.export(Dense().eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=11,
                      input_names=["pixels"], output_names=["mask"],
                      dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"}, "mask": {0: "n", 2: "h", 3: "w"}})
    np.savez(root / "calib.npz", pixels=np.random.default_rng(0).standard_normal((40, 3, 24, 20)).astype(np.float32))
    return root


def test_dynamic_onnx_is_timed_at_the_shape_in_the_manifest(dynamic_onnx, tmp_path):
    assert onnx.load(str(dynamic_onnx / "dense.onnx")).opset_import[0].version == 11
    code, _, err = _build("--model", str(dynamic_onnx / "dense.onnx"), "--calib", str(dynamic_onnx / "calib.npz"),
                          "--input-shape", "pixels=1x3x40x36", "--budget", "max_accuracy_drop=off",
                          "--budget", "min_sqnr_db=20", "--out", str(tmp_path), "--data-layout", "NCHW")
    assert code == 2 and "pixels" in err and "(3, 24, 20)" in err  # the data disagree with the given shape
    code, _, err = _build("--model", str(dynamic_onnx / "dense.onnx"), "--calib", str(dynamic_onnx / "calib.npz"),
                          "--budget", "max_accuracy_drop=off", "--budget", "min_sqnr_db=20", "--out", str(tmp_path))
    assert code == 0, err
    m = read_manifest(tmp_path / "dense-x86")
    assert m.inputs[0].shape == [1, 3, 24, 20]  # from the data: the only shape anybody gave
    for a in m.artifacts:
        assert a.metrics.latency_ms.input_shapes == {"pixels": [1, 3, 24, 20]}
        assert a.inputs[0].shape[2:] == ["h", "w"]  # the artifact keeps its dynamic dimensions
    assert m.stages["export"]["prepared"]["original_opset"] == 11 and m.stages["export"]["prepared"]["opset"] >= 13


def test_dynamic_onnx_without_any_shape_is_refused(dynamic_onnx, tmp_path):
    calib = tmp_path / "unlabelled.npy"
    np.save(calib, np.zeros((4, 3, 5), np.float32))  # the wrong rank: no shape can come from it
    code, _, err = _build("--model", str(dynamic_onnx / "dense.onnx"), "--calib", str(calib), "--out", str(tmp_path))
    assert code == 2 and "dynamic dimensions" in err and "--input-shape pixels=" in err, err


def test_a_budget_only_rebuild_reuses_the_cached_stages(user_model, tmp_path):
    args = ("--model", user_model["model"], "--weights", user_model["weights"], "--calib", user_model["calib"],
            "--eval", user_model["eval"], "--out", str(tmp_path))
    assert _build(*args)[0] == 0
    first = read_manifest(tmp_path / "mynet-x86")
    code, _, err = run_cli("build", "--latency-runs", "5", *args, "--budget", "size_mb=1")
    assert code == 0 and "reused from the cache" in err, err
    again = read_manifest(tmp_path / "mynet-x86")
    assert again.stages["cache"]["reused"] == ["export", "quantize"]
    assert [a.sha256 for a in again.artifacts] == [a.sha256 for a in first.artifacts]
    assert _build(*args, "--no-cache")[0] == 0
    assert read_manifest(tmp_path / "mynet-x86").stages["cache"]["reused"] == []


def test_build_name_cannot_leave_the_output_directory(user_model, tmp_path):
    code, _, err = _build("--model", user_model["model"], "--weights", user_model["weights"],
                          "--calib", user_model["calib"], "--out", str(tmp_path / "dist"), "--name", "../escape")
    assert code == 2 and "name" in err and not (tmp_path / "escape-x86").exists()


def test_trust_pickle_is_refused_from_a_config_file(user_model, tmp_path):
    cfg = tmp_path / "edgepack.toml"
    cfg.write_text(f'model = "{user_model["model"]}"\ncalib = "{user_model["calib"]}"\ntrust_pickle = true\n')
    code, _, err = _build("--config", str(cfg), "--out", str(tmp_path))
    assert code == 2 and "trust_pickle can only be given on the command line" in err
