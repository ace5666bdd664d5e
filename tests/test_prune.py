"""Structured pruning: configuration, what gets pruned, exactness, records, save/load."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.prune import (PruneConfig, UnprunableModel, count_macs_params, load_pruned, make_config,
                            prune_model, save_pruned)
from fixtures.zoo import ZOO, convnet, vit

torch.set_num_threads(1)
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small(name, width=0.5):
    torch.manual_seed(0)
    return ZOO[name](10, 3, width).eval()


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval_is_an_edgepack_error(bad):
    with pytest.raises(EdgepackError, match="ratio must be strictly between 0 and 1"):
        make_config(ratio=bad)
    with pytest.raises(EdgepackError, match="strictly between 0 and 1"):
        prune_model(small("convnet"), X, PruneConfig(), ratio=bad)


def test_config_rejects_two_goals_and_unknown_options():
    with pytest.raises(EdgepackError, match="only one of"):
        make_config(ratio=0.5, to_latency=True)
    with pytest.raises(EdgepackError, match="unknown option"):
        make_config(ratio=0.5, sparsity=0.3)
    assert not PruneConfig().enabled and make_config(ratio=0.4).enabled


def test_unknown_ignored_layer_lists_close_matches():
    with pytest.raises(EdgepackError) as e:
        prune_model(small("convnet"), X, PruneConfig(ratio=0.5, ignore_layers=["features.0.O"]))
    assert "features.0.O" in e.value.message and "close matches" in e.value.message
    assert "features.0.0" in e.value.message


def test_head_and_user_layers_keep_their_width_and_io_shapes_hold():
    model = small("convnet")
    pruned, record = prune_model(model, X, PruneConfig(ratio=0.5, ignore_layers=["features.3.0"]))
    assert pruned.fc.out_features == 10 and pruned(X).shape == (1, 10)
    assert pruned.features[3][0].out_channels == model.features[3][0].out_channels
    assert pruned.features[0][0].out_channels == model.features[0][0].out_channels // 2
    assert pruned.features[0][0].in_channels == 3  # the input is never pruned
    assert record.ignored_layers[:1] == ["fc"] and "features.3.0" in record.ignored_layers
    assert model.features[0][0].out_channels == 16  # the caller's model is untouched


def test_pruning_only_dead_channels_leaves_outputs_unchanged():
    """With BN scale importance and half of the channels zeroed by BN, pruning must remove
    exactly those and nothing else: outputs equal the unpruned model's to float precision."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, width in [("convnet", .5), ("resnet18", .25), ("densenet", 1.0), ("inception", .5),
                        ("mobilenet_v2", .5), ("mobilenet_v3", .5), ("shufflenet_v2", .5)]:
        model = small(name, width)
        with torch.no_grad():
            for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.uniform_(-.5, .5), bn.running_var.uniform_(.5, 2)
                bn.weight.uniform_(.5, 1.5), bn.bias.uniform_(-.1, .1)
                bn.weight[1::2] = 0
                bn.bias[1::2] = 0
            reference = model(x)
        pruned, record = prune_model(model, x[:1], PruneConfig(ratio=0.5, importance="bn_scale"))
        assert record.macs_after < 0.6 * record.macs_before, name
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), reference, atol=1e-5, rtol=1e-4, msg=name)


def test_macs_and_params_are_measured_and_reduced():
    model = small("resnet18", 0.25)
    macs, params = count_macs_params(model, (X,))
    assert params == sum(p.numel() for p in model.parameters())
    assert 30e6 < macs < 40e6  # ResNet-18 at 32x32 is 557M MACs; a quarter width is ~1/16 of it
    pruned, record = prune_model(model, X, PruneConfig(ratio=0.5))
    assert (record.macs_before, record.params_before) == (macs, params)
    assert record.macs_after == count_macs_params(pruned, (X,))[0]
    assert 3.5 < record.macs_reduction < 4.5  # half the channels on both sides of each conv


def test_round_to_keeps_channel_multiples():
    pruned, record = prune_model(small("convnet", 1.0), X, PruneConfig(ratio=0.3, round_to=8))
    changed = [c for c in record.layers if c.name != "fc"]
    assert all(c.out_after % 8 == 0 for c in changed)
    assert pruned.features[0][0].out_channels == 24  # 32 * 0.7 = 22.4 -> nearest multiple of 8


def test_vit_prunes_heads_and_mlp_but_not_the_embedding():
    model = vit(10, 3, 1.0)
    for steps in (1, 2):
        pruned, record = prune_model(model, X, PruneConfig(ratio=0.5, iterative_steps=steps))
        attn = pruned.blocks[0].attn
        assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 16
        assert pruned.blocks[0].mlp.fc1.out_features == 128
        assert pruned.patch_embed.out_channels == 64 and pruned.pos_embed.shape[-1] == 64
        assert record.heads["blocks.0.attn"] == [4, 2]
        assert pruned(X).shape == (1, 10)


def test_iterative_steps_reach_the_same_widths():
    model = small("resnet18", 0.25)
    one, r1 = prune_model(model, X, PruneConfig(ratio=0.5))
    three, r3 = prune_model(model, X, PruneConfig(ratio=0.5, iterative_steps=3))
    widths = lambda rec: [(c.in_after, c.out_after) for c in rec.layers]  # noqa: E731
    assert widths(r1) == widths(r3) and r3.iterative_steps == 3
    calls = []
    prune_model(model, X, PruneConfig(ratio=0.5, iterative_steps=3), between_steps=lambda s, m: calls.append(s))
    assert calls == [0, 1]  # fine-tuning happens between steps; the caller tunes after the last


def test_macs_target_is_met_with_the_smallest_ratio():
    model = small("convnet", 1.0)
    pruned, record = prune_model(model, X, PruneConfig(macs_target=0.5))
    assert record.requested == {"macs_target": 0.5}
    assert record.macs_after <= 0.5 * record.macs_before
    assert record.macs_after > 0.4 * record.macs_before  # not pruned much further than asked
    with pytest.raises(EdgepackError, match="cannot reach"):
        prune_model(model, X, PruneConfig(macs_target=0.001))


def test_importances_and_global_pruning():
    model = small("convnet", 1.0)
    data = Dataset(np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32),
                   np.arange(32) % 10)
    for importance in ("l1", "l2", "bn_scale", "random", "taylor"):
        pruned, _ = prune_model(model, X, PruneConfig(ratio=0.5, importance=importance), train=data)
        assert pruned.features[0][0].out_channels == 16, importance
    a, _ = prune_model(model, X, PruneConfig(ratio=0.5, importance="random"))
    b, _ = prune_model(model, X, PruneConfig(ratio=0.5, importance="random"))
    assert torch.equal(a.features[0][0].weight, b.features[0][0].weight)  # seeded
    g, rec = prune_model(model, X, PruneConfig(ratio=0.5, global_pruning=True))
    widths = {c.out_after for c in rec.layers if c.name != "fc"}
    assert len(widths) > 1 and 0.2 < rec.macs_after / rec.macs_before < 0.5  # uneven, same budget
    with pytest.raises(EdgepackError, match="taylor"):
        prune_model(model, X, PruneConfig(ratio=0.5, importance="taylor"))


def test_unprunable_model_names_why():
    only_head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(UnprunableModel, match="no prunable channel group"):
        prune_model(only_head, X, PruneConfig(ratio=0.5))
    assert issubclass(UnprunableModel, EdgepackError)  # shuffles: tests/test_prune_models.py


def test_record_is_json_and_markdown():
    _, record = prune_model(small("resnet18", 0.25), X, PruneConfig(ratio=0.5))
    data = json.loads(json.dumps(record.to_dict()))
    assert data["macs_after"] == record.macs_after and data["layers"][0]["name"] == "stem.0"
    md = record.markdown()
    assert md.startswith("## Pruning") and "| `stem.0` | Conv2d | 3 | 16 → 8 |" in md
    assert f"{record.macs_reduction:.2f}x fewer" in md


def test_save_and_load_rebuild_the_pruned_architecture(tmp_path):
    for name in ("resnet18", "shufflenet_v2", "vit"):
        model = small(name, 0.25 if name == "resnet18" else 0.5)
        pruned, record = prune_model(model, X, PruneConfig(ratio=0.4, iterative_steps=2))
        path = save_pruned(pruned, tmp_path / f"{name}.safetensors", record)
        fresh = load_pruned(ZOO[name](10, 3, 0.25 if name == "resnet18" else 0.5), path)
        with torch.no_grad():
            assert torch.equal(fresh(X), pruned(X)), name
    with pytest.raises(EdgepackError, match="same model factory"):
        load_pruned(convnet(10, 3, 1.0), tmp_path / "vit.safetensors")
    (tmp_path / "plain.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EdgepackError, match="not a safetensors file"):
        load_pruned(convnet(), tmp_path / "plain.safetensors")
