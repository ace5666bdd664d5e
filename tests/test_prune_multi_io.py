"""Several inputs (float image, int64 token ids, bool mask) and nested dict/tuple outputs:
pruning, Taylor importance, fine-tuning by distillation, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgepack.data import Dataset
from edgepack.prune import (FinetuneConfig, PruneConfig, evaluate, finetune, load_pruned, prune_model,
                            save_pruned)
from edgepack.prune.finetune import Objective
from edgepack.prune.measure import flat_tensors
from fixtures.zoo_more import ImageTextNet

torch.set_num_threads(1)


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 50, (n, 7), generator=g),
            torch.rand(n, 7, generator=g) > 0.3)


def dataset(n, seed=0, y="classes"):
    image, tokens, mask = inputs(n, seed)
    labels = {"classes": np.arange(n) % 5, "none": None,
              "boxes": np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)}[y]
    return Dataset({"image": image.numpy(), "tokens": tokens.numpy(), "mask": mask.numpy()}, labels)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ImageTextNet().eval()


def test_pruning_traces_every_input_and_keeps_the_nested_outputs(model, tmp_path):
    example = inputs(1)
    pruned, record = prune_model(model, example, PruneConfig(ratio=0.5))
    assert record.input_dtypes == ["float32", "int64", "bool"]
    assert record.input_shapes == [[1, 3, 16, 16], [1, 7], [1, 7]]
    assert record.output_shapes == [[1, 5], [1, 4], [1, 32]]
    assert {"classifier", "box"} <= set(record.ignored_layers)
    kept = {n: p["reason"] for p in record.protected for n in p["layers"]}
    assert "output shapes changed" in kept["image.1.0"]  # its channels are the `feats` output
    assert pruned.image[1][0].out_channels == 32 and pruned.image[0][0].out_channels == 8
    assert pruned.text[0].out_features == 32 and pruned.fuse.out_features == 32
    assert record.macs_after < 0.7 * record.macs_before
    batch = inputs(4, seed=1)
    with torch.no_grad():
        out = pruned(*batch)
    assert list(out) == ["logits", "extra"] and [t.shape for t in out["extra"]] == [(4, 4), (4, 32)]
    fresh = load_pruned(ImageTextNet(), save_pruned(pruned, tmp_path / "m.safetensors", record))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(flat_tensors(fresh(*batch)), flat_tensors(out)))


def test_taylor_importance_uses_the_class_output_and_no_integer_gradients(model):
    example = inputs(1)
    pruned, record = prune_model(model, example, PruneConfig(ratio=0.5, importance="taylor"),
                                 train=dataset(32))
    assert record.importance == "taylor" and pruned.fuse.out_features == 32
    assert not any(t.requires_grad for t in example) and all(t.grad is None for t in example)
    with pytest.raises(Exception, match="taylor"):
        prune_model(model, example, PruneConfig(ratio=0.5, importance="taylor"), train=dataset(32, y="boxes"))


def test_objective_picks_class_scores_and_distils_the_rest():
    torch.manual_seed(0)
    outs = [torch.randn(6, 5), torch.randn(6, 4), torch.randn(6, 32), torch.zeros(6, 2, dtype=torch.int64)]
    classes = Objective(outs, dataset(6))
    assert (classes.kd, classes.ce, classes.mse) == ([0], 0, [1, 2])  # box (N, 4) cannot hold label 4
    named = dataset(6)
    named.classes = ["a", "b", "c", "d"]
    assert Objective(outs, named).kd == [1]  # four class names: the (N, 4) output
    for kind in ("none", "boxes"):
        o = Objective(outs, dataset(6, y=kind))
        assert (o.kd, o.ce, o.mse) == ([], None, [0, 1, 2])
    assert Objective(outs[:1], dataset(6, y="none")).kd == [0]  # a lone classifier output: KD
    cfg = FinetuneConfig(alpha=0.7, temperature=4.0)
    labels = torch.arange(6) % 5
    same = classes.loss(outs, outs, labels, cfg)
    assert float(same) == pytest.approx(0.3 * float(F.cross_entropy(outs[0], labels)), rel=1e-5)
    teacher = [t + 1 for t in outs]
    o = Objective(outs, dataset(6, y="none"))
    assert float(o.loss(outs, teacher, None, cfg)) == pytest.approx(3.0, rel=1e-5)  # MSE 1 on each


@pytest.mark.parametrize("labels", ["classes", "none", "boxes"])
def test_distillation_fine_tunes_a_multi_input_model(model, labels):
    pruned, _ = prune_model(model, inputs(1), PruneConfig(ratio=0.5, importance="random"))
    train, val = dataset(128, 1, labels), dataset(32, 2, labels)
    summary = finetune(pruned, model, train, val, FinetuneConfig(epochs=3, lr=0.02, batch_size=32, patience=None))
    assert summary["distill"] and summary["epochs_run"] == 3 and not summary["warnings"]
    assert summary["train_loss"][-1] < summary["train_loss"][0]
    acc = evaluate(pruned, val, teacher=model)
    assert (acc is not None) == (labels == "classes")
    if labels == "classes":
        assert 0 <= acc <= 1
    plain = finetune(pruned, None, train, val, FinetuneConfig(epochs=1, distill=False))
    assert bool(plain["warnings"]) == (labels != "classes")
