"""The bounded calibrator against ONNX Runtime's stock calibrators, on small real models."""
import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
from torch import nn

from edgepack.data import Dataset
from edgepack.onnx_tools.calibrate import DatasetReader, calibrate, quantizable_op_types
from edgepack.onnx_tools.export import to_onnx
from edgepack.onnx_tools.quantize import calibration_ranges, preprocess, quantize_onnx
from edgepack.targets import Quantization


class SmallNet(nn.Module):
    """Conv/ReLU, a residual add, pooling, concat and a Gemm: the tensors calibration meets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = a + torch.relu(self.c2(a))
        b = nn.functional.max_pool2d(b, 2)
        c = torch.cat([b, self.c3(b)], 1)
        return self.fc(c.flatten(1))


class TwoInputs(nn.Module):
    """An image and a vector of side features, joined before the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.side = nn.Linear(7, 6)
        self.head = nn.Linear(6 * 4 * 4 + 6, 3)

    def forward(self, image, features):
        a = torch.relu(self.conv(image)).flatten(1)
        return self.head(torch.cat([a, torch.relu(self.side(features))], 1))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    fp32 = to_onnx(SmallNet(), (torch.zeros(1, 3, 8, 8),), d / "small.onnx")
    pre = preprocess(fp32, d / "small.pre.onnx")
    # 40 samples = 5 full batches of 8: ORT's histogram calibrators stack all batches into one
    # array, so the stock side of the comparison needs equal batches
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    x[:, 0] *= 3.0  # uneven channel scales so the methods' ranges differ
    return fp32, pre, Dataset(x)


def stock_ranges(pre: Path, data: Dataset, method: str, **options):
    """ORT's own calibrator as quantize_static builds it, fed 5 batches of 8."""
    with redirect_stdout(io.StringIO()):
        cal = create_calibrator(pre, quantizable_op_types(), str(pre.with_name(f"aug-{method}.onnx")),
                                getattr(CalibrationMethod, method), extra_options=options)
        cal.collect_data(DatasetReader.for_model(pre, data, 8))
        return cal.compute_data()


def test_minmax_equals_stock_exactly(small):
    _, pre, data = small
    ref = stock_ranges(pre, data, "MinMax", symmetric=False)
    got = calibrate(pre, data, "MinMax")
    assert set(got.keys()) == set(ref.keys()) and len(ref.keys()) >= 10
    for name in ref.keys():
        for mine, theirs in zip(got[name].range_value, ref[name].range_value):
            assert np.asarray(mine).dtype == np.asarray(theirs).dtype
            np.testing.assert_array_equal(mine, theirs, err_msg=name)


@pytest.mark.parametrize("method,options,kwargs", [
    # ORT's default 128 bins leave Entropy one candidate threshold (the full range): take 1024
    ("Entropy", {"symmetric": False, "num_bins": 1024}, {"num_bins": 1024}),
    ("Percentile", {"symmetric": False, "percentile": 99.9}, {"percentile": 99.9}),
    ("Percentile", {"symmetric": True, "percentile": 99.9}, {"symmetric": True, "percentile": 99.9}),
])
def test_histogram_methods_equal_stock(small, method, options, kwargs):
    _, pre, data = small
    ref = stock_ranges(pre, data, method, **options)
    with redirect_stdout(io.StringIO()):
        got = calibrate(pre, data, method, **kwargs)
    assert got.calibration_method == ref.calibration_method
    assert set(got.keys()) == set(ref.keys())
    minmax = stock_ranges(pre, data, "MinMax")
    clipped = 0
    for name in ref.keys():
        (lo, hi), (rlo, rhi) = got[name].range_value, ref[name].range_value
        np.testing.assert_allclose([lo, hi], [rlo, rhi], rtol=1e-6, atol=1e-7, err_msg=name)
        # the same histogram, counted batch by batch on the grid ORT built from all the data
        np.testing.assert_array_equal(got[name].hist, ref[name].hist, err_msg=name)
        np.testing.assert_array_equal(got[name].bins, ref[name].bins, err_msg=name)
        clipped += float(hi) < float(minmax[name].range_value[1][0]) - 1e-6
    assert clipped >= 3, f"{method} clipped {clipped} ranges: the test would not tell it from MinMax"


def test_batch_size_does_not_change_ranges(small):
    """The budget only changes how many samples share a batch, never the result."""
    _, pre, data = small
    with redirect_stdout(io.StringIO()):
        one_batch = calibrate(pre, data, "Entropy", budget_mb=1024)
        per_sample = calibrate(pre, data, "Entropy", budget_mb=1e-6)
        minmax_per_sample = calibrate(pre, data, "MinMax", budget_mb=1e-6)
    for name in one_batch.keys():
        np.testing.assert_array_equal(one_batch[name].hist, per_sample[name].hist)
        np.testing.assert_array_equal(one_batch[name].range_value, per_sample[name].range_value)
    ref = stock_ranges(pre, data, "MinMax")
    for name in ref.keys():
        np.testing.assert_array_equal(minmax_per_sample[name].range_value, ref[name].range_value)


def _int8_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("method", ["MinMax", "Entropy", "Percentile"])
def test_quantized_model_matches_stock_path(small, tmp_path, method):
    fp32, pre, data = small
    q = Quantization(calibration_method=method, calibration_samples=40, percentile=99.9)
    rec_b = quantize_onnx(fp32, tmp_path / "bounded.onnx", data, q, preprocessed=pre)
    rec_s = quantize_onnx(fp32, tmp_path / "stock.onnx", data, q, preprocessed=pre, calibrator="onnxruntime")
    assert rec_b["calibrator"] == "bounded" and rec_s["calibrator"] == "onnxruntime"
    init = lambda p: {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}  # noqa: E731
    bounded, stock = init(tmp_path / "bounded.onnx"), init(tmp_path / "stock.onnx")
    assert bounded.keys() == stock.keys()
    scales = [n for n in stock if n.endswith("_scale")]
    assert len(scales) >= 10
    for name in stock:  # the same scales and zero points, so the same int8 model
        np.testing.assert_allclose(bounded[name], stock[name], rtol=1e-6, err_msg=name)
    x = data.arrays()[0]
    np.testing.assert_allclose(_int8_outputs(tmp_path / "bounded.onnx", x),
                               _int8_outputs(tmp_path / "stock.onnx", x), rtol=1e-5, atol=1e-5)


def test_precomputed_ranges_give_the_same_model(small, tmp_path):
    """The fallback calibrates once and passes the ranges to every try."""
    fp32, pre, data = small
    q = Quantization(calibration_method="Entropy", calibration_samples=24)
    ranges = calibration_ranges(pre, data, q)
    quantize_onnx(fp32, tmp_path / "a.onnx", data, q, preprocessed=pre)
    quantize_onnx(fp32, tmp_path / "b.onnx", data, q, preprocessed=pre, ranges=ranges)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_sample_count_off_the_batch_grid(small, tmp_path):
    """ORT's histogram calibrators stack all batches into one array and fail on a short last
    batch; the bounded one folds each batch alone (37 samples, batches of 16 -> 5 left over)."""
    fp32, pre, data = small
    sub = data.subset(slice(0, 37))
    q = Quantization(calibration_method="Percentile", calibration_samples=37, percentile=99.9)
    rec = quantize_onnx(fp32, tmp_path / "p.onnx", sub, q, preprocessed=pre)
    assert rec["calibration_samples"] == 37
    x = data.arrays()[0]
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    out = _int8_outputs(tmp_path / "p.onnx", x)
    cos = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.99


def test_multi_input_model(tmp_path):
    fp32 = to_onnx(TwoInputs(), (torch.zeros(1, 3, 8, 8), torch.zeros(1, 7)), tmp_path / "two.onnx",
                   input_names=["image", "features"])
    pre = preprocess(fp32, tmp_path / "two.pre.onnx")
    rng = np.random.default_rng(2)
    # the data names its inputs in another order than the model: they are matched by name
    data = Dataset({"features": rng.standard_normal((30, 7)).astype(np.float32),
                    "image": rng.standard_normal((30, 3, 8, 8)).astype(np.float32)})
    got = calibrate(pre, data, "MinMax")
    ref = stock_ranges(pre, data, "MinMax")
    assert {"image", "features"} <= set(got.keys())
    for name in ref.keys():
        np.testing.assert_array_equal(got[name].range_value, ref[name].range_value, err_msg=name)
    for method in ("MinMax", "Entropy"):
        quantize_onnx(fp32, tmp_path / f"two.{method}.onnx", data,
                      # reduce_range: plain U8S8 saturates on x86 without VNNI (the CI hosts are such)
                      Quantization(calibration_method=method, calibration_samples=30, reduce_range=True),
                      preprocessed=pre)
        feeds = {"image": data.inputs["image"], "features": data.inputs["features"]}
        ref_out = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        out = ort.InferenceSession(str(tmp_path / f"two.{method}.onnx"),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        cos = float((ref_out * out).sum() / np.linalg.norm(ref_out) / np.linalg.norm(out))
        assert cos > 0.99, (method, cos)


def test_missing_input_is_named(tmp_path):
    from edgepack.errors import EdgepackError
    fp32 = to_onnx(TwoInputs(), (torch.zeros(1, 3, 8, 8), torch.zeros(1, 7)), tmp_path / "two.onnx",
                   input_names=["image", "features"])
    data = Dataset({"image": np.zeros((4, 3, 8, 8), np.float32), "extra": np.zeros((4, 7), np.float32)})
    with pytest.raises(EdgepackError, match="no input named features"):
        calibrate(fp32, data, "MinMax")


class RecordedReads:
    """A numpy-like input that records which rows each read asks for."""

    finite = True  # nothing to scan for NaN: the reads below are calibration's alone

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        rows = np.arange(len(self.x))[idx]
        self.reads.append(np.atleast_1d(rows))
        return self.x[idx]


def test_calibration_reads_only_sampled_rows_a_batch_at_a_time(small, tmp_path):
    fp32, pre, data = small
    x = np.concatenate([data.arrays()[0]] * 5)  # 200 rows, 60 sampled
    lazy = RecordedReads(x)
    q = Quantization(calibration_method="Entropy", calibration_samples=60)
    quantize_onnx(fp32, tmp_path / "e.onnx", Dataset(lazy), q, preprocessed=pre)
    sampled = set(Dataset(x).sample_indices(60, seed=0).tolist())
    read = np.concatenate(lazy.reads)
    assert set(read.tolist()) == sampled  # every sampled row, nothing else
    assert max(len(r) for r in lazy.reads) <= 32  # a batch at a time, never the whole sample
    assert len(read) == 2 * 60 + 1  # two passes and the one row that sizes the batches
