"""The compression stages on models that are not one float image in, class scores out.

Kinds (tests/fixtures/kinds, seeded and untrained here: these tests compare numbers, not skill):
the detector (one image in, three outputs in a dict, a user metric), image + token ids (float and
int64 inputs, an nn.Embedding), the regressor (ten features in, one value out, R^2) and the
stateful streaming VAD (chunk/state/sr in, prob/new_state out) as PyTorch and as ONNX.

Each method (low-rank, magnitude sparsity, clustering, QAT, fp16, entropy pruning, network
slimming) runs a whole `edgepack.build` on them; the model the build exported is captured at the
export stage, and every artifact is run by its runtime and compared with it:
- model.fp32.onnx: |ONNX - torch| <= FP32_ATOL * (1 + max|torch|) on every output;
- model.int8.onnx: SQNR against torch >= INT8_MIN_SQNR_DB per output, and the manifest's
  per-output SQNR is the one the file scores (within SQNR_TOLERANCE_DB);
- model.fp16.onnx / .tflite: |fp16 - torch| <= FP16_ATOL * (1 + max|torch|);
and the stage's record in manifest.json says what it did (ranks, zeros, distinct values, MACs),
checked against the artifacts themselves. Inputs a method cannot handle (an ONNX file, a layer
name that does not exist, a target out of reach) stop the build with an EdgepackError naming it and
what to do: exit 2 from the CLI, no traceback.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fixtures.compress_kinds import (FP16_ATOL, INT8_MIN_SQNR_DB, KINDS, METHODS, N_TRAIN, STAGE, TFLITE_ATOL,
                                     artifact, assert_close, check_onnx_artifacts, make_files, ort_run, run_build,
                                     sqnr_db, torch_run, weights_of)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict]:
    return make_files(tmp_path_factory.mktemp("compress-kinds"))


@pytest.fixture(scope="module")
def built(files, tmp_path_factory):
    """built(kind, method, target="x86") -> {"path", "manifest", "module", "outputs"}, once per triple."""
    cache: dict = {}

    def get(kind: str, method: str, target: str = "x86") -> dict:
        if (kind, method, target) not in cache:
            out = tmp_path_factory.mktemp(f"{kind}-{method}-{target}")
            cache[kind, method, target] = run_build(files, kind, METHODS[method], out, target)
        return cache[kind, method, target]
    return get


# ---------------------------------------------------------------- every method, every kind

PAIRS = [pytest.param(k, m, id=f"{m}-{k}") for m in METHODS for k in KINDS]


@pytest.mark.parametrize("kind,method", PAIRS)
def test_artifacts_run_and_match_the_compressed_model(built, files, kind, method):
    b = built(kind, method)
    assert b["manifest"]["stages"].get(STAGE[method]), f"manifest has no stages.{STAGE[method]}"
    assert [o["name"] for o in b["manifest"]["outputs"]] == b["outputs"]
    assert [i["name"] for i in b["manifest"]["inputs"]] == [n for n, _, _ in files[kind]["mod"].INPUTS]
    check_onnx_artifacts(b, files)
    parity = b["manifest"]["stages"]["export"]["parity"]
    assert parity["ok"] and set(parity.get("outputs") or b["outputs"]) == set(b["outputs"])


@pytest.mark.parametrize("kind", KINDS)
def test_lowrank_factorizes_what_it_records(built, files, kind):
    b = built(kind, "lowrank")
    rec, module = b["manifest"]["stages"]["factorize"], b["module"]
    assert rec["layers"], rec["skipped"]
    assert rec["macs_after"] < rec["macs_before"] and rec["params_after"] < rec["params_before"]
    for layer in rec["layers"]:
        pair = module.get_submodule(layer["name"])
        assert isinstance(pair, nn.Sequential) and len(pair) == 2, layer["name"]
        first = pair[0]
        width = first.out_features if isinstance(first, nn.Linear) else first.out_channels
        assert width == layer["rank"] < layer["full_rank"], layer
        assert layer["rank"] % rec["rank_multiple"] == 0 or layer["rank"] == layer["full_rank"]
    reasons = {s["name"]: s["reason"] for s in rec["skipped"]}
    if kind == "vad":  # Conv1d is not factorized, and says so
        assert "only Linear and Conv2d" in reasons["front.0"]
    assert "## Low-rank factorization" in (b["path"] / "report.md").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_sparsity_zeros_survive_into_the_onnx_file(built, files, kind):
    from edgepack.compress.sparsity import onnx_zero_fraction
    b = built(kind, "sparsity")
    rec = b["manifest"]["stages"]["sparsify"]
    assert rec["layers"] and rec["sparsity"] == pytest.approx(0.5, abs=0.01)
    for name, w in weights_of(b["module"]).items():
        layer = next((x for x in rec["layers"] if x["name"] == name), None)
        if layer is not None:
            assert float((w == 0).float().mean()) == pytest.approx(layer["sparsity"], abs=1e-3), name
    zeros = onnx_zero_fraction(b["path"] / "model.fp32.onnx")
    assert zeros["sparsity"] >= 0.4, zeros  # BatchNorm folding keeps zeros; unsparsified small tensors dilute
    fp32 = artifact(b, "model.fp32.onnx")
    assert fp32["compressed_bytes"] < fp32["size_bytes"]


def _distinct_per_slice(a: np.ndarray) -> int:
    """The most distinct values in one output channel (axis 0 or, for MatMul weights, the last axis)."""
    rows = max(len(np.unique(r)) for r in a.reshape(a.shape[0], -1))
    cols = max(len(np.unique(c)) for c in np.moveaxis(a, -1, 0).reshape(a.shape[-1], -1))
    return min(rows, cols)


@pytest.mark.parametrize("kind", KINDS)
def test_clustered_layers_hold_k_values_in_torch_and_in_onnx(built, files, kind):
    """K values per layer (per output channel when the codebook is per channel or scaled per
    channel), in the exported module and, BatchNorm folded in, in every weight of the fp32 file."""
    b = built(kind, "cluster")
    rec = b["manifest"]["stages"]["cluster"]
    k, per_layer = rec["clusters"], not (rec["per_channel"] or rec.get("scaled"))
    assert rec["layers"], rec
    # entropy-constrained, each layer's rate weighted by its sensitivity on the training inputs
    assert rec["rate_by"] == "sensitivity" and rec["sensitivity_samples"] > 0, rec
    assert len({layer["rate"] for layer in rec["layers"]}) > 1 and all(0 <= layer["rate"] <= 1 for layer in rec["layers"])
    # in two groups, least sensitive first, fine-tuned after each
    assert len(rec["steps"]) == 2 and sum(s["weights"] for s in rec["steps"]) == rec["clustered_weights"], rec["steps"]
    assert all(s["finetune"]["epochs_run"] == 1 for s in rec["steps"])
    assert "clustered in 2 steps" in (b["path"] / "report.md").read_text()
    weights = weights_of(b["module"])
    for layer in rec["layers"]:
        w = weights[layer["name"]].numpy()
        assert (len(np.unique(w)) if per_layer else _distinct_per_slice(w)) <= k, layer
        assert layer["distinct_after_finetune"] <= k
    graph = onnx.load(str(b["path"] / "model.fp32.onnx")).graph
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather"}  # nn.Embedding: not clustered
    inits = [numpy_helper.to_array(t) for t in graph.initializer if t.name not in tables]
    big = [a for a in inits if a.dtype == np.float32 and a.ndim >= 2 and a.size >= 256]
    assert big and all(_distinct_per_slice(a) <= k for a in big), [(a.shape, _distinct_per_slice(a)) for a in big]


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_onnx_is_half_precision_and_matches(built, files, kind):
    b = built(kind, "fp16")
    info, rec = files[kind], b["manifest"]["stages"]["fp16"]
    path = b["path"] / "model.fp16.onnx"
    inits = onnx.load(str(path)).graph.initializer
    halves = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)
    assert halves >= 0.5 * len([t for t in inits if t.data_type in (1, 10)]), "most float initializers are fp16"
    assert rec["onnx"]["size_bytes"] == path.stat().st_size < 0.7 * rec["onnx"]["from_bytes"]
    want = torch_run(b["module"], info, info["inputs"])
    assert_close(ort_run(path, info["inputs"]), want, FP16_ATOL, b["outputs"], "model.fp16.onnx")
    art = artifact(b, "model.fp16.onnx")
    assert art["precision"] == "fp16" and list(art["metrics"]["outputs"]) == b["outputs"]
    assert b["manifest"]["primary"] == "model.int8.onnx"


@pytest.mark.parametrize("kind", KINDS)
def test_qat_trains_and_records_its_choice(built, files, kind):
    b = built(kind, "qat")
    rec = b["manifest"]["stages"]["qat"]
    assert rec["train_samples"] == N_TRAIN and rec["layers"] > 0, rec
    assert isinstance(rec["replaced"], bool) and "ptq_drop" in rec


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_pruning_narrows_the_model(built, files, kind):
    b = built(kind, "entropy")
    rec = b["manifest"]["stages"]["prune"]
    assert rec["importance"] == "entropy" and rec["macs_after"] < rec["macs_before"], rec
    narrowed = [x for x in rec["layers"] if x["out_after"] < x["out_before"]]
    assert narrowed
    widths = {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
              for n, m in b["module"].named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    assert all(widths[x["name"]] == x["out_after"] for x in rec["layers"])
    assert [list(s) for s in rec["output_shapes"]] == [[1, *o.shape[1:]] for o in
                                                       torch_run(b["module"], files[kind], files[kind]["inputs"])]



@pytest.mark.parametrize("method,figures", [("lowrank", ("before", "factorized", "finetuned")),
                                            ("cluster", ("before", "clustered", "finetuned")),
                                            ("entropy", ("before", "finetuned"))])
def test_fine_tuning_is_scored_by_the_builds_metric(built, files, method, figures):
    """The regressor has no class scores: top-1 cannot score its fine-tuning, its R^2 (--metric)
    does, and the stage's record says so in R^2's own units."""
    rec = built("regress", method)["manifest"]["stages"][STAGE[method]]
    acc = rec["accuracy"]
    assert acc["metric"] == files["regress"]["args"]["metric"], acc
    assert all(isinstance(acc[k], float) and acc[k] <= 1.0 for k in figures), acc
    summary = rec["finetune"][-1] if isinstance(rec["finetune"], list) else rec["finetune"]
    assert summary["eval_metric"] == acc["metric"] and summary["eval_acc_after"] == pytest.approx(acc["finetuned"])


# ---------------------------------------------------------------- TFLite: the methods composed, on rpi

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detector", "image_tokens", "vad"])
def test_composed_methods_on_tflite_run_in_the_interpreter(files, tmp_path, kind):
    """low-rank -> sparsity -> export -> int8 -> TFLite -> fp16 in one rpi build: every .tflite file
    runs in the TFLite interpreter and agrees with the model the build exported."""
    pytest.importorskip("litert_torch")
    from edgepack.tflite import run_tflite
    opts = {"compress": {"lowrank": METHODS["lowrank"]["compress"]["lowrank"],
                         "sparsity": METHODS["sparsity"]["compress"]["sparsity"], "fp16": {}}}
    b = run_build(files, kind, opts, tmp_path, target="rpi")
    stages, info = b["manifest"]["stages"], files[kind]
    assert stages["factorize"]["layers"] and stages["sparsify"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert b["manifest"]["primary"] == "model.int8.tflite"
    names = [n for n, _, _ in info["mod"].INPUTS]
    feeds = [info["inputs"][n] for n in names]
    want = torch_run(b["module"], info, info["inputs"])
    check_onnx_artifacts(b, files)
    assert_close(run_tflite(b["path"] / "model.fp32.tflite", feeds), want, TFLITE_ATOL, b["outputs"], "fp32 tflite")
    assert_close(run_tflite(b["path"] / "model.fp16.tflite", feeds), want, FP16_ATOL, b["outputs"], "fp16 tflite")
    got8 = run_tflite(b["path"] / "model.int8.tflite", feeds)
    for name, g, w in zip(b["outputs"], got8, want):
        assert sqnr_db(w, g) >= INT8_MIN_SQNR_DB, (name, sqnr_db(w, g))
    for path in ("model.fp32.tflite", "model.int8.tflite", "model.fp16.tflite"):
        art = artifact(b, path)
        assert [i["name"] for i in art["inputs"]] == names and [o["name"] for o in art["outputs"]] == b["outputs"]
