"""Models as people ship them: a view/transpose channel shuffle, a ViT that reshapes with a
stored width, stored widths in general, and windowed attention (Swin, MaxViT)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgepack.onnx_tools.export import to_onnx
from edgepack.prune import PruneConfig, UnprunableModel, count_macs_params, load_pruned, prune_model, save_pruned
from fixtures.zoo_more import maxvit_tiny, shufflenet_v2_view, swin_tiny, vit_hidden_dim

torch.set_num_threads(1)
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
BATCH = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def built(factory, **kw):
    torch.manual_seed(0)
    return factory(**kw).eval()


def test_view_transpose_shuffle_prunes_the_branches_and_protects_what_crosses_it(tmp_path):
    model = built(shufflenet_v2_view)
    pruned, record = prune_model(model, X, PruneConfig(ratio=0.5))
    assert record.macs_after < 0.6 * record.macs_before
    with torch.no_grad():
        out = pruned(BATCH)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    unit = pruned.stages[1]  # a stride-1 unit: its branch's inner convs never cross the shuffle
    assert unit.branch2[0][0].out_channels == model.stages[1].branch2[0][0].out_channels // 2
    assert unit.branch2[1][0].out_channels == unit.branch2[1][0].in_channels == unit.branch2[0][0].out_channels
    protected = {n for p in record.protected for n in p["layers"]}
    assert "stages.1.branch2.2.0" in protected  # its output is shuffled into the next unit
    assert unit.branch2[2][0].out_channels == model.stages[1].branch2[2][0].out_channels
    assert all(p["reason"] for p in record.protected)
    md = record.markdown()
    assert "Protected" in md and "`stages.1.branch2.2.0`" in md
    path = to_onnx(pruned, (X,), tmp_path / "shuffle.onnx")
    got = ort.InferenceSession(str(path)).run(None, {"input": BATCH.numpy()})[0]
    np.testing.assert_allclose(got, out.numpy(), rtol=1e-3, atol=1e-4)
    fresh = load_pruned(built(shufflenet_v2_view), save_pruned(pruned, tmp_path / "s.safetensors", record))
    with torch.no_grad():
        assert torch.equal(fresh(BATCH), out)


def test_layers_around_a_shuffle_are_protected_and_a_model_with_nothing_else_is_refused():
    class ViewShuffle(nn.Module):
        def __init__(self, tail=True):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1) if tail else nn.Identity()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.a(x)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.fc(self.b(x).mean((2, 3)))

    pruned, record = prune_model(ViewShuffle().eval(), X, PruneConfig(ratio=0.5))
    assert pruned.a.out_channels == 8 and pruned.b.out_channels == 4
    assert record.protected[0]["layers"] == ["a"] and "outputs moved" in record.protected[0]["reason"]
    with pytest.raises(UnprunableModel) as e:
        prune_model(ViewShuffle(tail=False).eval(), X, PruneConfig(ratio=0.5))
    assert "no channel group of ViewShuffle could be pruned exactly" in e.value.message
    assert "a:" in e.value.message and "--prune-ignore" in e.value.hint and "--allow-unpruned" in e.value.hint


def test_vit_storing_hidden_dim_prunes_without_an_internal_error():
    model = built(vit_hidden_dim)
    pruned, record = prune_model(model, X, PruneConfig(ratio=0.5))
    assert pruned.layers[0].mlp[0].out_features == 64 and pruned.layers[1].mlp[2].in_features == 64
    assert pruned.conv_proj.out_channels == pruned.hidden_dim == 64  # the residual stream is kept
    assert "layers.0.self_attention" in record.ignored_layers
    assert record.macs_after < 0.75 * record.macs_before
    with torch.no_grad():
        assert pruned(BATCH).shape == (4, 10)


class StoredWidth(nn.Module):
    """Keeps its feature width in an attribute and reshapes with it, as torchvision's ViT does."""

    def __init__(self, fixed=False):
        super().__init__()
        self.width, self.fixed = 32, fixed
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x.reshape(x.shape[0], self.width, -1).mean(-1)
        if self.fixed:  # code elsewhere that assumes the published width
            torch._assert(x.shape[1] == 32, "StoredWidth needs 32 features")
        return self.head(x)


def test_a_stored_width_follows_its_layer_and_is_redone_on_load(tmp_path):
    model = StoredWidth().eval()
    pruned, record = prune_model(model, X, PruneConfig(ratio=0.5))
    assert pruned.stem[0].out_channels == pruned.width == 16 and model.width == 32
    assert record.attributes == {"width": 16} and record.groups_checked == 1
    assert "`width` = 16" in record.markdown()
    fresh = load_pruned(StoredWidth(), save_pruned(pruned, tmp_path / "w.safetensors", record))
    assert fresh.width == 16
    with torch.no_grad():
        assert torch.equal(fresh(BATCH), pruned(BATCH))


def test_a_width_that_cannot_follow_is_a_clear_error_naming_the_layer():
    with pytest.raises(UnprunableModel) as e:
        prune_model(StoredWidth(fixed=True).eval(), X, PruneConfig(ratio=0.5))
    message = e.value.message
    assert "stem.0" in message and "no longer runs" in message and "mat1 and mat2 shapes" in message
    assert "with StoredWidth.width = 16 (the pruned width) it failed too" in message
    assert "--prune-ignore" in e.value.hint


@pytest.mark.parametrize("factory", [swin_tiny, maxvit_tiny])
def test_windowed_attention_prunes_heads_with_their_bias_tables(factory, tmp_path):
    model = built(factory)
    pruned, record = prune_model(model, X, PruneConfig(ratio=0.5))
    heads = {n: h for n, h in record.heads.items()}
    assert heads and all(after == before // 2 for before, after in heads.values())
    name = next(iter(heads))
    att = pruned.get_submodule(name)
    assert att.relative_position_bias_table.shape[1] == att.num_heads == heads[name][1]
    assert record.sliced and record.groups_checked >= len(heads) and not record.protected
    assert record.macs_after < 0.7 * record.macs_before
    with torch.no_grad():
        out = pruned(BATCH)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    fresh = load_pruned(built(factory), save_pruned(pruned, tmp_path / "w.safetensors", record))
    with torch.no_grad():
        assert torch.equal(fresh(BATCH), out)
    assert count_macs_params(fresh, (X,))[0] == record.macs_after


def test_nchw_flatten_into_a_linear_stays_exact():
    """The reshape mappings edgepack keeps from torch-pruning: NCHW flattens (N, C, H, W) ->
    (N, C*H*W) and back, proved by the traced shapes."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.fc1 = nn.Linear(16 * 8 * 8, 64)
            self.fc2 = nn.Linear(64, 8 * 4 * 4)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
            self.head = nn.Linear(4 * 16, 10)

        def forward(self, x):
            x = torch.relu(self.fc1(self.conv(x).flatten(1)))
            x = torch.relu(self.fc2(x)).view(-1, 8, 4, 4)
            return self.head(torch.relu(self.conv2(x)).reshape(x.shape[0], -1))

    torch.manual_seed(0)
    pruned, record = prune_model(Flat().eval(), torch.randn(1, 3, 8, 8), PruneConfig(ratio=0.5))
    assert (pruned.conv[0].out_channels, pruned.fc1.in_features) == (8, 8 * 64)
    assert (pruned.conv2.out_channels, pruned.head.in_features) == (2, 2 * 16)
    assert record.groups_checked == 3 and not record.protected
