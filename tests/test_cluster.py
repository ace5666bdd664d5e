"""Weight clustering (edgepack.compress.cluster) and the `cluster` build stage, on small real models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from edgepack.compress.cluster import (clusterable_layers, cluster, clusters_kept, distinct_values, int8_codes,
                                       int8_distinct_per_channel, int8_distinct_per_tensor, kmeans_1d)
from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import to_onnx
from edgepack.onnx_tools.quantize import quantize_onnx
from edgepack.prune import FinetuneConfig, finetune
from edgepack.scheme import scheme_for_build
from edgepack.targets import load_profile
from fixtures.zoo import mobilenet_v2, resnet18


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def small_net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)).eval()


def labelled(n: int = 96, classes: int = 4, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0].mean((1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1].mean((1, 2)) > 0)
    return Dataset(x, y, "random", [str(i) for i in range(classes)])


def test_kmeans_1d_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([-3.0, -1.0, 0.5, 2.0])
    x = torch.from_numpy(np.concatenate([c + 0.01 * rng.standard_normal(200) for c in centers]))
    for init in ("linear", "kmeans++"):
        c, a = kmeans_1d(x, 4, init, seed=1)
        assert np.allclose(c.numpy(), centers, atol=0.01)
        assert torch.equal(a, torch.arange(4).repeat_interleave(200))
    c, a = kmeans_1d(torch.tensor([1.0, 2.0, 1.0]), 16)  # fewer values than clusters: exact
    assert c.tolist() == [1.0, 2.0] and a.tolist() == [0, 1, 0]


@pytest.mark.parametrize("make", [lambda: resnet18(10, 1, small_input=True, width=0.125),
                                  lambda: mobilenet_v2(10, 1, width=0.35, small_input=True)])
def test_every_layer_holds_at_most_k_values(make):
    model = make().eval()
    clustered, rec = cluster(copy.deepcopy(model), 16)
    counts = distinct_values(clustered)
    assert len(rec.layers) + len(rec.skipped) == len(counts)
    assert all(counts[layer.name] <= 16 for layer in rec.layers)
    assert max(counts[layer.name] for layer in rec.layers) == 16
    assert all(0 < layer.rel_error < 0.2 for layer in rec.layers)
    assert distinct_values(model)[rec.layers[0].name] > 16  # the original was left alone


def test_small_and_skipped_layers_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 2), nn.Linear(2, 3))
    _, rec = cluster(model, 16, skip=["0"])
    assert [layer.name for layer in rec.layers] == ["3"]
    assert rec.skipped == [{"layer": "0", "reason": "skipped by the configuration"},
                           {"layer": "4", "reason": "too small: 6 weights, fewer than 16 clusters"}]


def test_finetuning_keeps_the_assignment():
    model = small_net()
    student, rec = cluster(copy.deepcopy(model), 8)
    before = {n: m.weight.detach().clone() for n, m in clusterable_layers(student).items()}
    with clusters_kept(student, rec):
        assert all(parametrize.is_parametrized(m, "weight") for m in clusterable_layers(student).values())
        summary = finetune(student, model, labelled(64), labelled(32, seed=1),
                           FinetuneConfig(epochs=2, lr=0.05, patience=None, batch_size=16))
    assert summary["epochs_run"] == 2
    layers = clusterable_layers(student)
    assert not any(parametrize.is_parametrized(m) for m in layers.values())  # plain weights for export
    assert set(student.state_dict()) == set(model.state_dict())
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert torch.unique(w).numel() <= 8
        # same partition of the weights as before fine-tuning: equal before => equal after
        old = before[name].reshape(-1)
        _, old_ids = torch.unique(old, return_inverse=True)
        _, new_ids = torch.unique(w.reshape(-1), return_inverse=True)
        pairs = torch.unique(torch.stack([old_ids, new_ids]), dim=1)
        assert pairs.shape[1] == torch.unique(old_ids).numel()
    if summary["best_epoch"]:
        assert any(not torch.equal(before[n], layers[n].weight) for n in layers)  # the centroids trained


def train_a_little(student, rec):
    """Three SGD steps with the clusters kept: the weights move, the codebooks must hold."""
    with clusters_kept(student, rec):
        opt = torch.optim.SGD(student.parameters(), lr=0.05)
        student.train()
        for _ in range(3):
            loss = student(torch.randn(8, 3, 16, 16)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_scaled_codebook_shares_int8_codes_across_channels():
    model = small_net()
    student, rec = cluster(copy.deepcopy(model), 16, scaled=True)
    train_a_little(student, rec)
    for layer in rec.layers:
        w = clusterable_layers(student)[layer.name].weight
        assert not torch.equal(w, clusterable_layers(model)[layer.name].weight)
        assert len(np.unique(int8_codes(w))) <= 16  # one set of codes for the whole layer
        assert len(np.unique(int8_codes(clusterable_layers(model)[layer.name].weight))) > 16
    with pytest.raises(EdgepackError, match="exclude each other"):
        cluster(copy.deepcopy(model), 16, scaled=True, per_channel=True)


def entropy(assignment: torch.Tensor) -> float:
    p = torch.bincount(assignment.reshape(-1)).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def test_entropy_constrained_kmeans_trades_error_for_bits():
    x = torch.from_numpy(np.random.default_rng(0).laplace(size=20_000))
    prev_h, prev_err = None, None
    for rate in (0.0, 0.02, 0.05, 0.1):
        c, a = kmeans_1d(x, 16, rate=rate)
        assert len(c) <= 16 and torch.all(c[1:] > c[:-1]) and int(a.max()) == len(c) - 1
        err, h = float((c[a] - x).square().mean()), entropy(a)
        if prev_h is not None:
            assert h < prev_h - 0.05 and err > prev_err  # fewer bits, more error
        prev_h, prev_err = h, err
    assert prev_h < 2.2 < 3.1 < entropy(kmeans_1d(x, 16)[1])  # Laplace: 3.18 bits at rate 0, 1.98 at 0.1
    assert torch.equal(kmeans_1d(x, 16, rate=0.0)[1], kmeans_1d(x, 16)[1])
    with pytest.raises(EdgepackError, match="rate must be a number from 0 to 1"):
        cluster(small_net(), 16, rate=-0.1)


def test_scaled_centroids_sit_on_the_int8_grid_through_finetuning():
    model = small_net()
    student, rec = cluster(copy.deepcopy(model), 16, scaled=True, rate=0.03)
    train_a_little(student, rec)
    for layer in rec.layers:
        w = clusterable_layers(student)[layer.name].weight.detach().double()
        m = w.abs().reshape(w.shape[0], -1).amax(1).reshape(-1, *[1] * (w.dim() - 1))
        steps = w / m * 127  # every weight is a whole number of 1/127 steps of its channel's max
        assert torch.allclose(steps, steps.round(), atol=1e-4)
        assert len(np.unique(int8_codes(w))) <= 16


def test_clustered_int8_file_has_k_codes_per_tensor_and_compresses(tmp_path):
    """ResNet-18 (width 0.25): every int8 weight tensor of the clustered file, classifier and first
    conv included, holds at most 16 codes; the file deflates to well under plain int8's; ONNX
    Runtime runs it and agrees with the clustered PyTorch model."""
    from edgepack.compress.size import compressed_bytes
    from edgepack.runtime import open_model
    torch.manual_seed(0)
    model = resnet18(10, 1, small_input=True, width=0.25).eval()
    rng = np.random.default_rng(0)
    calib = Dataset(rng.standard_normal((64, 1, 32, 32)).astype(np.float32), np.zeros(64, np.int64), "random",
                    [str(i) for i in range(10)])
    scheme, _ = scheme_for_build(load_profile("x86"))
    clustered, rec = cluster(copy.deepcopy(model), 16, scaled=True, rate=0.03)
    assert not rec.skipped and len(rec.layers) == len(clusterable_layers(model))
    sizes, files = {}, {}
    for label, m in (("plain", model), ("clustered", clustered)):
        fp32 = to_onnx(m, (torch.zeros(1, 1, 32, 32),), tmp_path / f"{label}.onnx")
        files[label] = tmp_path / f"{label}.int8.onnx"
        quantize_onnx(fp32, files[label], calib, scheme)
        sizes[label] = compressed_bytes(files[label])
    per_tensor = int8_distinct_per_tensor(files["clustered"])
    assert len(per_tensor) == len(rec.layers)
    assert max(per_tensor.values()) <= 16 < min(int8_distinct_per_tensor(files["plain"]).values())
    assert sizes["clustered"] < 0.6 * sizes["plain"], sizes
    x = calib.x[:16]
    got = np.asarray(open_model(files["clustered"], 1).run([x])[0])
    with torch.no_grad():
        ref = clustered(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (16, 10)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_outputs_stay_close_at_256_clusters():
    model = resnet18(10, 1, small_input=True, width=0.125).eval()
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = cluster(copy.deepcopy(model), 256)[0](x)
    assert float((out - ref).norm() / ref.norm()) < 0.01


def test_int8_onnx_keeps_at_most_k_values_per_channel(tmp_path):
    model = small_net()
    x = (torch.zeros(1, 3, 16, 16),)
    calib = labelled(64)
    scheme, _ = scheme_for_build(load_profile("x86"))
    clustered, rec = cluster(copy.deepcopy(model), 16)
    counts = {}
    for label, m in (("plain", model), ("clustered", clustered)):
        fp32 = to_onnx(m, x, tmp_path / f"{label}.onnx")
        quantize_onnx(fp32, tmp_path / f"{label}.int8.onnx", calib, scheme)
        counts[label] = int8_distinct_per_channel(tmp_path / f"{label}.int8.onnx")
    assert len(counts["clustered"]) == 3  # both convs (BatchNorm folded in) and the Linear
    assert all(v <= 16 for v in counts["clustered"].values())
    assert max(counts["plain"].values()) > 16


@pytest.mark.parametrize("k", [0, 1, 257, 2.5, True, "16"])
def test_bad_cluster_counts(k):
    with pytest.raises(EdgepackError, match="clusters must be a whole number from 2 to 256"):
        cluster(small_net(), k)


def test_bad_options():
    with pytest.raises(EdgepackError, match="names no Conv/Linear layer"):
        cluster(small_net(), 16, skip=["head"])
    with pytest.raises(EdgepackError, match="init must be one of"):
        cluster(small_net(), 16, init="random")
    with pytest.raises(EdgepackError, match="no Conv or Linear layer"):
        cluster(nn.Sequential(nn.ReLU()), 16)


def test_stage_options_are_checked(user_model, tmp_path):
    import edgepack
    fp32 = to_onnx(user_model["module"], (torch.zeros(1, 3, 16, 16),), tmp_path / "mynet.onnx")
    with pytest.raises(EdgepackError, match="needs a PyTorch model"):
        edgepack.build(model=str(fp32), calib=user_model["calib"], out=str(tmp_path / "a"),
                       compress={"cluster": {"clusters": 16}})
    with pytest.raises(EdgepackError, match=r"invalid \[compress.cluster\] options:\n  - cluster_count: unknown"):
        edgepack.build(model=user_model["model"], weights=user_model["weights"], calib=user_model["calib"],
                       out=str(tmp_path / "b"), compress={"cluster": {"cluster_count": 16}})
    with pytest.raises(EdgepackError, match="clusters must be a whole number"):
        edgepack.build(model=user_model["model"], weights=user_model["weights"], calib=user_model["calib"],
                       out=str(tmp_path / "c"), compress={"cluster": {"clusters": 1}})


@pytest.mark.slow
def test_build_with_clustering_compresses_better(tmp_path):
    import edgepack
    from edgepack.compress.size import compressed_bytes
    common = dict(target="x86", latency_runs=5)
    plain = edgepack.build(out=str(tmp_path / "plain"), **common)
    clustered = edgepack.build(out=str(tmp_path / "clustered"), **common,
                               compress={"cluster": {"clusters": 16, "finetune": {"epochs": 1, "threads": 1}}})
    rec = clustered.manifest.stages["cluster"]
    assert rec["clustered_layers"] == 6 and rec["finetune"]["epochs_run"] == 1
    assert all(layer["distinct_after_finetune"] <= 16 for layer in rec["layers"])
    assert rec["accuracy"]["finetuned"] >= rec["accuracy"]["before"] - 0.03
    assert "## Weight clustering" in (clustered.path / "report.md").read_text()
    for a in clustered.manifest.artifacts:
        assert compressed_bytes(clustered.path / a.path) < 0.8 * compressed_bytes(plain.path / a.path), a.path
    assert all(v <= 16 for v in int8_distinct_per_channel(clustered.path / "model.int8.onnx").values())
    assert clustered.manifest.artifact("model.int8.onnx").metrics.accuracy >= \
        plain.manifest.artifact("model.int8.onnx").metrics.accuracy - 3.0


def dequantized_weight_error(fp32_path, int8_path, tensors: int | None = 3) -> float:
    """Largest |dequantized int8 weight - float weight| over every weight tensor, relative to its
    channel's max |w|: 0 when the int8 file holds the (BatchNorm-folded) clustered weights exactly."""
    import onnx
    from onnx import numpy_helper
    floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32_path)).graph.initializer}
    model = onnx.load(str(int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    worst, seen = 0.0, 0
    for node in model.graph.node:
        name = node.input[0].removesuffix("_quantized")
        if node.op_type != "DequantizeLinear" or name not in floats or floats[name].ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * floats[name].ndim
        shape[axis] = -1
        w = inits[node.input[0]].astype(np.float64) * inits[node.input[1]].astype(np.float64).reshape(shape)
        top = np.abs(floats[name]).max(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True)
        worst, seen = max(worst, float((np.abs(w - floats[name]) / top).max())), seen + 1
    assert seen == tensors if tensors else seen > 0, seen  # small_net: both convs and the Linear
    return worst


def test_scaled_centroids_follow_the_schemes_grid(tmp_path):
    """Under reduce_range (7-bit weights, x86 without VNNI) ONNX Runtime quantizes to multiples of
    1/64 of a channel's max: centroids snapped to 1/127 are rounded a second time there, centroids
    snapped to 1/64 come through exactly; with 8-bit weights 1/127 comes through exactly."""
    from edgepack.targets import Quantization
    model = small_net()
    x, calib = (torch.zeros(1, 3, 16, 16),), labelled(64)
    errors = {}
    for reduce_range in (False, True):
        scheme = Quantization(scheme="fixed", activation_type="QUInt8", weight_type="QInt8", per_channel=True,
                              reduce_range=reduce_range)
        for qmax in (127, 64):
            student, rec = cluster(copy.deepcopy(model), 16, scaled=True, qmax=qmax)
            assert rec.to_dict()["qmax"] == qmax
            train_a_little(student, rec)
            fp32 = to_onnx(student, x, tmp_path / f"{reduce_range}-{qmax}.onnx")
            int8 = tmp_path / f"{reduce_range}-{qmax}.int8.onnx"
            quantize_onnx(fp32, int8, calib, scheme)
            errors[reduce_range, qmax] = dequantized_weight_error(fp32, int8)
            assert max(int8_distinct_per_tensor(int8).values()) <= 16
    assert errors[False, 127] < 1e-5 and errors[True, 64] < 1e-5, errors
    assert errors[True, 127] > 1e-3, errors  # re-rounded: up to half a 1/64 step
    with pytest.raises(EdgepackError, match="qmax must be an integer from 1 to 127"):
        cluster(small_net(), 16, scaled=True, qmax=128)


@pytest.mark.slow
def test_build_on_a_cpu_without_vnni_clusters_on_the_reduce_range_grid(tmp_path, monkeypatch):
    """An x86 build on a host without VNNI quantizes with reduce_range; the cluster stage then
    snaps to 1/64 and the int8 file holds the fine-tuned clustered weights exactly."""
    import edgepack
    import edgepack.scheme
    from test_scheme import HASWELL_NUC
    from edgepack.cpuinfo import parse_cpuinfo
    monkeypatch.setattr(edgepack.scheme, "read_cpuinfo", lambda: parse_cpuinfo(HASWELL_NUC, "x86_64"))
    result = edgepack.build(target="x86", latency_runs=5, out=str(tmp_path / "b"), fallback=False,
                            compress={"cluster": {"clusters": 16, "finetune": {"epochs": 1, "threads": 1}}})
    rec = result.manifest.stages["cluster"]
    assert rec["qmax"] == 64 and result.manifest.stages["quantize"]["int8_scheme"]["scheme"] == "U8S8 reduce_range"
    out = next((tmp_path / "b").rglob("model.int8.onnx")).parent
    # (no fallback: no layer is left in float; qdq_tidy renames the 1-channel first conv, left out here)
    assert dequantized_weight_error(out / "model.fp32.onnx", out / "model.int8.onnx", None) < 1e-5


@pytest.mark.slow
def test_a_grid_other_than_the_schemes_is_warned_and_recorded(tmp_path, monkeypatch):
    import edgepack
    import edgepack.scheme
    from test_scheme import XEON_VNNI
    from edgepack.cpuinfo import parse_cpuinfo
    monkeypatch.setattr(edgepack.scheme, "read_cpuinfo", lambda: parse_cpuinfo(XEON_VNNI, "x86_64"))
    lines = []
    result = edgepack.build(target="x86", latency_runs=5, out=str(tmp_path / "b"), fallback=False, progress=lines.append,
                            compress={"cluster": {"clusters": 16, "qmax": 64, "finetune": {"epochs": 0}}})
    assert result.manifest.stages["quantize"]["cluster_grid_mismatch"] == {"clustered": 64, "quantized": 127}
    assert any("clustered on the 1/64 grid" in line for line in lines), lines


@pytest.mark.slow
def test_the_int8_scheme_is_chosen_once_per_build(tmp_path, monkeypatch):
    """cluster and quantize both ask for the scheme: one choice (one device probe) serves both."""
    import edgepack
    import edgepack.stages.quantize as quantize_stage
    calls = []
    real = quantize_stage.scheme_for_build
    monkeypatch.setattr(quantize_stage, "scheme_for_build", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = edgepack.build(target="x86", latency_runs=5, out=str(tmp_path / "b"), fallback=False,
                            compress={"cluster": {"clusters": 16, "finetune": {"epochs": 0}}})
    assert len(calls) == 1
    assert result.manifest.stages["cluster"]["qmax"] == (64 if result.manifest.stages["quantize"]["int8_scheme"]
                                                         ["scheme"].endswith("reduce_range") else 127)
