"""Low-rank factorization (edgepack.compress.lowrank) and the `factorize` build stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import edgepack
from edgepack.compress.lowrank import factorize
from edgepack.errors import EdgepackError
from edgepack.manifest import read_manifest
from edgepack.onnx_tools.export import to_onnx
from edgepack.prune.measure import count_macs_params
from edgepack.runtime import open_model


class Mixed(nn.Module):
    """Every conv geometry the splits must keep exact, a grouped and a depthwise conv, a Linear
    applied to a (batch, tokens, features) tensor and a classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 32, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1), bias=False)
        self.c = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
        self.d = nn.Conv2d(32, 48, 3, stride=2, padding="valid")
        self.grouped = nn.Conv2d(48, 48, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.pw = nn.Conv2d(48, 40, 1)
        self.tokens = nn.Linear(40, 36)
        self.fc = nn.Linear(36, 10)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        x = self.pw(self.depthwise(self.grouped(self.d(x))))
        t = self.tokens(x.flatten(2).transpose(1, 2))  # (N, H*W, 36)
        return self.fc(t.mean(1))


def _model():
    torch.manual_seed(0)
    return Mixed().eval()


X = torch.randn(2, 3, 20, 18, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_full_rank_reproduces_the_outputs(form):
    model = _model()
    new, rec = factorize(model, (X[:1],), energy=1.0, form=form, only_if_cheaper=False)
    names = {layer["name"]: layer for layer in rec["layers"]}
    assert set(names) == {"a", "b", "c", "d", "pw", "tokens", "fc"}
    assert {names[n]["form"] for n in "abcd"} == {form} and names["pw"]["form"] == "channel"
    assert all(layer["rank"] == layer["full_rank"] for layer in rec["layers"])
    assert isinstance(new.b, nn.Sequential) and isinstance(model.b, nn.Conv2d)  # the input model is untouched
    with torch.no_grad():
        ref, out = model(X), new(X)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()


def test_grouped_and_depthwise_convs_are_skipped_with_the_reason():
    _, rec = factorize(_model(), (X[:1],), energy=0.5)
    reasons = {s["name"]: s["reason"] for s in rec["skipped"]}
    assert reasons["grouped"].startswith("grouped convolution (groups=4)")
    assert reasons["depthwise"].startswith("depthwise convolution (groups=48)")
    assert {"grouped", "depthwise"}.isdisjoint(layer["name"] for layer in rec["layers"])


def test_truncated_ranks_cut_macs_and_params_as_recorded():
    model = _model()
    new, rec = factorize(model, (X[:1],), macs_target=0.5, rank_multiple=4, skip=["fc"])
    macs, params = count_macs_params(new, (X[:1],))
    assert (rec["macs_before"], rec["params_before"]) == count_macs_params(model, (X[:1],))
    assert (rec["macs_after"], rec["params_after"]) == (macs, params)
    assert macs <= 0.5 * rec["macs_before"] and params < rec["params_before"]
    # the per-layer figures add up to the whole-model count
    saved = sum(layer["macs_before"] - layer["macs_after"] for layer in rec["layers"])
    assert rec["macs_before"] - saved == macs
    assert all(layer["rank"] % 4 == 0 or layer["rank"] == layer["full_rank"] for layer in rec["layers"])
    assert all(layer["rank"] < layer["full_rank"] and 0 < layer["energy_kept"] < 1 for layer in rec["layers"])
    assert {"name": "fc", "reason": "listed in skip"} in rec["skipped"]
    layer = rec["layers"][0]
    first = new.get_submodule(layer["name"])[0]
    assert (first.out_features if isinstance(first, nn.Linear) else first.out_channels) == layer["rank"]
    # each allocation reaches the target; one global threshold keeps one energy floor for all layers
    _, glob = factorize(model, (X[:1],), macs_target=0.5, allocation="global_energy")
    assert glob["macs_after"] <= 0.5 * glob["macs_before"]
    assert min(layer["energy_kept"] for layer in glob["layers"]) >= glob["energy_threshold"] - 1e-9


def test_an_energy_threshold_sets_each_rank():
    model = _model()
    _, rec = factorize(model, (X[:1],), energy=0.6, only_if_cheaper=False)
    for layer in rec["layers"]:
        w = model.get_submodule(layer["name"]).weight.detach().double()
        m = w.reshape(w.shape[0], -1) if layer["form"] in ("channel", "linear") else \
            w.permute(1, 2, 0, 3).reshape(w.shape[1] * w.shape[2], -1)
        energy = np.cumsum(torch.linalg.svdvals(m).numpy() ** 2)
        energy /= energy[-1]
        assert energy[layer["rank"] - 1] >= 0.6 - 1e-9 and (layer["rank"] == 1 or energy[layer["rank"] - 2] < 0.6)


def test_the_factorized_model_exports_and_runs_in_onnx_runtime(tmp_path):
    new, rec = factorize(_model(), (X[:1],), macs_target=0.5)
    path = to_onnx(new, (X[:1],), tmp_path / "lowrank.onnx")
    out = open_model(path, 1).run([X.numpy()])[0]
    with torch.no_grad():
        ref = new(X).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    full = to_onnx(_model(), (X[:1],), tmp_path / "full.onnx")
    assert path.stat().st_size < full.stat().st_size


@pytest.mark.parametrize("kwargs, message", [
    ({"energy": 0.0}, "energy must be in (0, 1]"),
    ({"energy": 1.5}, "energy must be in (0, 1]"),
    ({"macs_target": 1.0}, "macs_target must be strictly between 0 and 1"),
    ({"energy": 0.9, "macs_target": 0.5}, "give energy or macs_target, not both"),
    ({}, "no goal"),
    ({"energy": 0.9, "min_rank": 0}, "min_rank and rank_multiple must be integers >= 1"),
    ({"energy": 0.9, "allocation": "greedy"}, "allocation must be one of"),
    ({"energy": 0.9, "skip": ["nope"]}, "skip names 'nope'"),
    ({"macs_target": 0.01}, "macs_target 0.01 is out of reach"),
])
def test_bad_options_are_errors(kwargs, message):
    with pytest.raises(EdgepackError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        factorize(_model(), (X[:1],), **kwargs)


def test_bad_build_options_are_errors(tmp_path):
    with pytest.raises(EdgepackError, match="compress.lowrank.*energy"):
        edgepack.build(out=str(tmp_path), compress={"lowrank": {"energy": 2}})
    with pytest.raises(EdgepackError, match=r"(?s)invalid \[compress.lowrank\].*ratio: unknown option"):
        edgepack.build(out=str(tmp_path), compress={"lowrank": {"ratio": 0.5}})


def test_onnx_input_is_refused(tmp_path):
    path = to_onnx(_model(), (X[:1],), tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 20, 18)).astype(np.float32))
    with pytest.raises(EdgepackError, match="low-rank factorization needs the PyTorch model"):
        edgepack.build(model=str(path), calib=str(calib), out=str(tmp_path / "out"),
                       compress={"lowrank": {"energy": 0.9}})


@pytest.mark.slow
def test_build_with_lowrank_writes_a_smaller_model(tmp_path):
    from edgepack import example
    result = edgepack.build(out=str(tmp_path), latency_runs=5, budgets={"max_accuracy_drop": 100},
                            compress={"lowrank": {"macs_target": 0.5, "rank_multiple": 8, "epochs": 1}})
    rec = read_manifest(result.path).stages["factorize"]
    assert rec["macs_after"] <= 0.5 * rec["macs_before"] and rec["layers"]
    assert rec["finetune"]["epochs_run"] == 1 and rec["finetune"]["distill"] is True
    assert rec["accuracy"]["finetuned"] is not None
    full = to_onnx(example.digits_cnn().eval(), (torch.zeros(1, 1, example.SIZE, example.SIZE),), tmp_path / "f.onnx")
    assert (result.path / "model.fp32.onnx").stat().st_size < 0.75 * full.stat().st_size
    assert "## Low-rank factorization" in (result.path / "report.md").read_text()


def test_composes_with_channel_pruning():
    """Pruned layers are plain (narrower) Conv2d/Linear: they factorize like any other, exactly at full rank."""
    from edgepack.prune import PruneConfig, prune_model
    from fixtures.zoo import convnet
    torch.manual_seed(0)
    model = convnet(10, 3, width=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    pruned, prec = prune_model(model, x[:1], PruneConfig(ratio=0.5, round_to=1))
    new, rec = factorize(pruned, (x[:1],), energy=1.0, only_if_cheaper=False)
    convs = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert rec["macs_before"] == prec.macs_after and [layer["name"] for layer in rec["layers"]] == convs
    with torch.no_grad():
        torch.testing.assert_close(new(x), pruned(x), atol=1e-5, rtol=1e-4)
