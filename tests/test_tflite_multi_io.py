"""TFLite with several inputs and outputs: image + vector, token ids + features + mask, and a
streaming recurrent cell (chunk, state) -> (out, new_state).

Each model is converted once to fp32 and once to int8 (module-scoped fixtures: a conversion
costs 5-20 s). The fp32 artifact must give PyTorch's answers on every output, in PyTorch's
order; the int8 one must keep integer inputs integer and stay close to PyTorch on every output.
The models are randomly initialised: their int8 fidelity was measured good enough (cosine
> 0.99) without training, and the data they see is the distribution they were calibrated on.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.data import Dataset
from edgepack.errors import EdgepackError
from edgepack.onnx_tools.export import FlatOutputs
from edgepack.runtime import open_model
from edgepack.tflite import convert_fp32, convert_int8, run_tflite

pytestmark = pytest.mark.tflite
pytest.importorskip("litert_torch", reason="needs the tflite extra: pip install 'edgepack[tflite]'")

N = 64  # calibration samples; the evaluation uses another N from the same distribution


class ImageAndSide(nn.Module):
    """An image and a vector of side features -> (class scores (B, 5), feature map (B, 8, 4, 4))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.side = nn.Linear(6, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, image, side):
        fmap = self.conv(image)
        z = torch.cat([fmap.mean((2, 3)), torch.relu(self.side(side))], 1)
        return self.head(z), fmap


class TokensAndFeatures(nn.Module):
    """int64 token ids, float features and a bool mask -> a dict; "pooled" and "gate" share a
    shape, so only the values tell them apart."""

    def __init__(self, vocab: int = 100, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.feat = nn.Linear(4, dim)
        self.cls = nn.Linear(dim, 3)

    def forward(self, ids, feats, mask):
        m = mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1) + torch.tanh(self.feat(feats))
        return {"logits": self.cls(pooled), "pooled": pooled, "gate": torch.sigmoid(self.feat(feats))}


class StreamingGRU(nn.Module):
    """A GRU cell with nn.Linear gates, unrolled over a chunk of 5 steps: the state goes in and
    comes out, as a streaming model on a device carries it from one chunk to the next.
    (nn.GRUCell itself converts, but PT2E leaves its matmuls and its inputs in float.)"""

    def __init__(self, feat: int = 8, hidden: int = 16):
        super().__init__()
        self.gates = nn.Linear(feat + hidden, 2 * hidden)
        self.cand_x, self.cand_h = nn.Linear(feat, hidden), nn.Linear(hidden, hidden, bias=False)
        self.proj = nn.Linear(hidden, 4)

    def forward(self, chunk, state):
        outs = []
        for t in range(chunk.shape[1]):
            x = chunk[:, t]
            z, r = torch.sigmoid(self.gates(torch.cat([x, state], 1))).chunk(2, 1)
            n = torch.tanh(self.cand_x(x) + self.cand_h(r * state))
            state = (1 - z) * n + z * state
            outs.append(self.proj(state))
        return torch.stack(outs, 1), state


def _image_data(rng, n):
    return [rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
            rng.standard_normal((n, 6)).astype(np.float32)]


def _token_data(rng, n):
    return [rng.integers(0, 100, (n, 6)), rng.standard_normal((n, 4)).astype(np.float32),
            rng.random((n, 6)) > 0.3]


def _stream_data(rng, n):
    return [rng.standard_normal((n, 5, 8)).astype(np.float32),
            np.tanh(rng.standard_normal((n, 16))).astype(np.float32)]


CASES = {  # name: (model class, input names, data maker, layout, int8 in a child process)
    "image": (ImageAndSide, ["image", "side"], _image_data, "NHWC", False),
    "tokens": (TokensAndFeatures, ["ids", "feats", "mask"], _token_data, "NCHW", True),
    "stream": (StreamingGRU, ["chunk", "state"], _stream_data, "NCHW", False),
}


class _Inputs:
    """Several named input arrays with the Dataset calls convert_int8 makes (take, arrays,
    names): the stand-in until edgepack.data.Dataset takes `inputs=`."""

    def __init__(self, inputs: dict, source: str = "synthetic"):
        self.inputs, self.source = inputs, source

    names = property(lambda self: list(self.inputs))
    __len__ = lambda self: len(next(iter(self.inputs.values())))  # noqa: E731
    take = lambda self, n: _Inputs({k: v[:n] for k, v in self.inputs.items()}, self.source)  # noqa: E731
    arrays = lambda self: list(self.inputs.values())  # noqa: E731


def multi_input_dataset(names, arrays):
    try:
        return Dataset(inputs=dict(zip(names, arrays)), source="synthetic")
    except TypeError:  # edgepack.data without multi-input support yet
        return _Inputs(dict(zip(names, arrays)))


def torch_outputs(model, arrays) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model(*(torch.from_numpy(np.asarray(a)) for a in arrays))]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sqnr_db(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


def _convert_case(name, tmp_path_factory):
    """(case name, flat model, input names, eval arrays, fp32 record, int8 record)."""
    cls, names, make, layout, isolate8 = CASES[name]
    torch.manual_seed(0)
    model = FlatOutputs(cls()).eval()
    rng = np.random.default_rng(0)
    calib, evals = make(rng, N), make(rng, N)
    example = tuple(torch.from_numpy(np.asarray(a[:1])) for a in calib)
    d = tmp_path_factory.mktemp(name)
    rec32 = convert_fp32(model, example, d / "fp32.tflite", layout, isolate=False, input_names=names)
    rec8 = convert_int8(model, example, multi_input_dataset(names, calib), d / "int8.tflite", layout,
                        num_calib=N, isolate=isolate8, input_names=names)
    return name, model, names, evals, rec32, rec8


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return _convert_case("image", tmp_path_factory)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return _convert_case("tokens", tmp_path_factory)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return _convert_case("stream", tmp_path_factory)


@pytest.fixture(params=list(CASES))
def converted(request):
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_fp32_matches_pytorch_on_every_output_in_order(converted):
    name, model, names, evals, rec32, _ = converted
    ref = torch_outputs(model, evals)
    got = run_tflite(rec32["path"], evals, rec32["layout"])
    assert [s["name"] for s in rec32["inputs"]] == names
    assert rec32["output_order_source"] == "signature"
    assert [s["shape"] for s in rec32["outputs"]] == [[1, *r.shape[1:]] for r in ref]
    assert len(got) == len(ref)
    for k, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, (name, k)
        assert np.abs(g - r).max() < 1e-4, (name, k, float(np.abs(g - r).max()))


@pytest.mark.slow
def test_int8_runs_keeps_integer_inputs_and_tracks_pytorch(converted):
    name, model, names, evals, rec32, rec8 = converted
    ref = torch_outputs(model, evals)
    got = run_tflite(rec8["path"], evals, rec8["layout"])
    fidelity = [(cosine(g, r), sqnr_db(r, g)) for g, r in zip(got, ref)]
    print(f"\n{name} int8 vs PyTorch, per output (cosine, SQNR dB): "
          + ", ".join(f"({c:.5f}, {s:.1f})" for c, s in fidelity))
    assert len(got) == len(ref) and [g.shape for g in got] == [r.shape for r in ref]
    for k, (c, s) in enumerate(fidelity):
        assert c > 0.97 and s > 12, (name, k, c, s)
    # Every output is closer to its own PyTorch output than to any other one of its shape.
    for k, g in enumerate(got):
        same = [j for j, r in enumerate(ref) if r.shape == g.shape]
        assert max(same, key=lambda j: cosine(g, ref[j])) == k, (name, k)
    # What the artifact takes, as the device's runtime sees it.
    dtypes = dict(zip(names, open_model(rec8["path"]).input_dtypes))
    if name == "tokens":
        assert dtypes == {"ids": "int32", "feats": "int8", "mask": "bool"}
        assert [s["dtype"] for s in rec8["inputs"]] == ["int32", "int8", "bool"]
        assert "quantization" not in rec8["inputs"][0] and "quantization" not in rec8["inputs"][2]
        assert any("ids are int32" in n for n in rec8["notes"]), rec8["notes"]
    else:  # float inputs: full-integer IO, with the scale and zero point a caller needs
        assert set(dtypes.values()) == {"int8"}
        assert all(s["quantization"]["scale"] > 0 for s in rec8["inputs"])
        assert rec8["float_ops"] == [], rec8["float_op_counts"]
    assert all(s["dtype"] == "int8" for s in rec8["outputs"])


@pytest.mark.slow
def test_nhwc_transposes_only_the_float_image_input(image):
    name, model, names, evals, rec32, rec8 = image
    for rec in (rec32, rec8):
        assert [s["shape"] for s in rec["inputs"]] == [[1, 8, 8, 3], [1, 6]]
        assert [s["layout"] for s in rec["inputs"]] == ["NHWC", None]
        # Outputs come back as PyTorch computes them: the feature map stays channels first.
        assert rec["outputs"][1]["shape"] == [1, 8, 4, 4] and rec["outputs"][1]["layout"] == "NCHW"
    with pytest.raises(Exception):  # NCHW data fed straight to the NHWC file is refused
        open_model(rec32["path"]).run([evals[0][:1], evals[1][:1]])


@pytest.mark.slow
def test_int64_ids_are_cast_with_a_range_check(tokens):
    name, model, names, evals, rec32, _ = tokens
    ids, feats, mask = evals
    as32 = run_tflite(rec32["path"], [ids.astype(np.int32), feats, mask])
    as64 = run_tflite(rec32["path"], [ids.astype(np.int64), feats, mask])
    for a, b in zip(as32, as64):
        np.testing.assert_array_equal(a, b)
    big = ids.astype(np.int64).copy()
    big[0, 0] = 2 ** 31
    with pytest.raises(EdgepackError, match=r"int32, but the data holds values 0\.\.2147483648"):
        run_tflite(rec32["path"], [big, feats, mask])
    with pytest.raises(EdgepackError, match="takes int32 .* given float32"):
        run_tflite(rec32["path"], [ids.astype(np.float32), feats, mask])
    with pytest.raises(EdgepackError, match="takes 3 input"):
        run_tflite(rec32["path"], [ids, feats])


class _ReorderingRunner:
    """A runner whose outputs come in reverse order (as a runtime that reorders by itself
    would give them): run_tflite maps by tensor name, so the result must not change."""

    def __init__(self, runner):
        self.inner, self.input_names, self.input_shapes = runner, runner.input_names, runner.input_shapes
        self.output_names = runner.output_names[::-1]

    def run(self, inputs):
        return self.inner.run(inputs)[::-1]


@pytest.mark.slow
def test_output_order_survives_a_reordering_runner_and_a_wrong_record(tokens):
    """The token model has two outputs of one shape: only values tell them apart."""
    from edgepack.tflite.convert import _check_outputs
    name, model, names, evals, rec32, _ = tokens
    plain = run_tflite(rec32["path"], evals)
    reordered = run_tflite(rec32["path"], evals, runner=_ReorderingRunner(open_model(rec32["path"])))
    for a, b in zip(plain, reordered):
        np.testing.assert_array_equal(a, b)
    # A record claiming "pooled" and "gate" the other way round is corrected by their values
    # (same shape) on the example input, and run_tflite follows the record's order.
    wrong = {**rec32, "output_order": [0, 2, 1], "outputs": [rec32["outputs"][i] for i in (0, 2, 1)],
             "tflite_names": {**rec32["tflite_names"],
                              "outputs": [rec32["tflite_names"]["outputs"][i] for i in (0, 2, 1)]}}
    example = tuple(torch.from_numpy(np.asarray(a[:1])) for a in evals)
    _check_outputs(model, example, wrong)
    assert wrong["output_order"] == [0, 1, 2] and wrong["output_order_source"].startswith("matched")
    assert wrong["outputs"] == rec32["outputs"]
    swapped = run_tflite(rec32["path"], evals, output_order=[0, 2, 1])
    np.testing.assert_array_equal(swapped[1], plain[2])


def test_calibration_data_must_fit_each_input(tmp_path):
    model = FlatOutputs(TokensAndFeatures()).eval()
    rng = np.random.default_rng(0)
    ids, feats, mask = _token_data(rng, 8)
    example = tuple(torch.from_numpy(np.asarray(a[:1])) for a in (ids, feats, mask))
    names = ["ids", "feats", "mask"]
    floats = multi_input_dataset(names, [ids.astype(np.float32), feats, mask])
    with pytest.raises(EdgepackError, match="input 'ids' are float32 but the model input is int64"):
        convert_int8(model, example, floats, tmp_path / "m.tflite", num_calib=8, isolate=False)
    two = multi_input_dataset(names[:2], [ids, feats])
    with pytest.raises(EdgepackError, match=r"has 2 input\(s\) \(ids, feats\) but the model takes 3"):
        convert_int8(model, example, two, tmp_path / "m.tflite", num_calib=8, isolate=False)
    assert list(tmp_path.iterdir()) == []
