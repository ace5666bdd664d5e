"""Dataset and the array sources: .npz/.npy with named inputs, Python functions, conform rules."""
import textwrap

import numpy as np
import pytest

from edgepack.data import Dataset, conform, load_dataset, stratified_allocation
from edgepack.errors import EdgepackError
from edgepack.manifest import TensorSpec

TEXT_SPECS = [TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64"),
              TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="bool"),
              TensorSpec(name="features", shape=[1, 4], dtype="float32")]


def _text_arrays(n=30, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"features": rng.standard_normal((n, 4)),  # float64 in the file, float32 in the model
            "attention_mask": (rng.random((n, seq)) > 0.3).astype(np.int64),
            "input_ids": rng.integers(0, 30000, (n, seq), dtype=np.int64),
            "y": rng.integers(0, 3, n)}


def _write_py(tmp_path, body: str) -> str:
    (tmp_path / "userdata.py").write_text("import numpy as np\n" + textwrap.dedent(body))
    return str(tmp_path / "userdata.py")


def test_npz_multi_input_int64_and_float(tmp_path):
    arrays = _text_arrays()
    np.savez(tmp_path / "text.npz", **arrays)
    ds = load_dataset(tmp_path / "text.npz", TEXT_SPECS, what="calibration data")
    assert ds.names == ["input_ids", "attention_mask", "features"]  # the model's order, not the file's
    assert [np.dtype(a.dtype).name for a in ds.inputs.values()] == ["int64", "bool", "float32"]
    np.testing.assert_array_equal(ds.inputs["input_ids"], arrays["input_ids"])
    np.testing.assert_array_equal(ds.inputs["attention_mask"], arrays["attention_mask"] == 1)
    np.testing.assert_allclose(ds.inputs["features"], arrays["features"], rtol=1e-6)
    assert ds.class_labels and ds.y.dtype == np.int64
    seen = 0
    for xs, y in ds.batches(8):
        assert [a.dtype.name for a in xs] == ["int64", "bool", "float32"] and len(xs[0]) == len(y)
        np.testing.assert_array_equal(xs[0], arrays["input_ids"][seen:seen + len(y)])
        seen += len(y)
    assert seen == 30
    with pytest.raises(ValueError, match="3 inputs"):
        ds.x
    own = load_dataset(tmp_path / "text.npz", None)  # no specs: the file's own names and dtypes
    assert own.names == ["features", "attention_mask", "input_ids"] and own.inputs["features"].dtype == np.float64


def test_missing_input_name_lists_what_the_file_has(tmp_path):
    arrays = _text_arrays()
    del arrays["attention_mask"]
    np.savez(tmp_path / "text.npz", **arrays)
    with pytest.raises(EdgepackError, match="no input named 'attention_mask'") as e:
        load_dataset(tmp_path / "text.npz", TEXT_SPECS, what="evaluation data")
    assert "the data has: features, input_ids" in str(e.value) and "evaluation data" in str(e.value)


@pytest.mark.parametrize("given, dtype, message", [
    (np.full((4, 6), 0.5), "int64", "is float64 but the model takes int64"),
    (np.full((4, 6), 2, np.int64), "bool", "values other than 0 and 1"),
    (np.full((4, 6), 2 ** 40, np.int64), "int32", "do not fit the model's int32"),
])
def test_dtype_errors_name_the_input(tmp_path, given, dtype, message):
    np.savez(tmp_path / "d.npz", tokens=given)
    with pytest.raises(EdgepackError, match=message) as e:
        load_dataset(tmp_path / "d.npz", [TensorSpec(name="tokens", shape=["b", 6], dtype=dtype)])
    assert "'tokens'" in str(e.value) and "d.npz" in str(e.value)


def test_allowed_casts(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.arange(12, dtype=np.int32).reshape(4, 3), b=np.ones((4, 3), np.float32))
    ds = load_dataset(tmp_path / "d.npz", [TensorSpec(name="a", shape=[1, 3], dtype="float32"),
                                           TensorSpec(name="b", shape=[1, 3], dtype="float16")])
    assert ds.inputs["a"].dtype == np.float32 and ds.inputs["a"][3].tolist() == [9.0, 10.0, 11.0]
    assert ds.inputs["b"].dtype == np.float16
    wide = load_dataset(tmp_path / "d.npz", [TensorSpec(name="a", shape=[1, 3], dtype="int64"),
                                             TensorSpec(name="b", shape=[1, 3], dtype="float32")])
    assert wide.inputs["a"].dtype == np.int64


def test_shape_rules(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 8, 8, 3), np.float32))
    with pytest.raises(EdgepackError, match="channels-last"):
        load_dataset(tmp_path / "d.npz", (3, 8, 8))  # an old caller's shape tuple still works
    with pytest.raises(EdgepackError, match=r"has samples of shape \(8, 8, 3\) for input 'image'"):
        load_dataset(tmp_path / "d.npz", [TensorSpec(name="image", shape=[1, 3, 8, 8])])
    # a str dim accepts any size; "x" feeds a single-input model whatever its input is called
    ds = load_dataset(tmp_path / "d.npz", [TensorSpec(name="image", shape=["n", "h", 8, 3])])
    assert ds.names == ["image"] and ds.x.shape == (5, 8, 8, 3)
    np.savez(tmp_path / "gray.npz", x=np.ones((5, 8, 8), np.uint8))
    gray = load_dataset(tmp_path / "gray.npz", [TensorSpec(name="image", shape=[1, 1, 8, 8])])
    assert gray.x.shape == (5, 1, 8, 8) and gray.x.dtype == np.float32  # channel axis added, cast


def test_labels_must_match(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 1, 4, 4), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(EdgepackError, match=r"labels must have one entry per sample \(5\)"):
        load_dataset(tmp_path / "d.npz", (1, 4, 4))


def test_npy_is_memory_mapped_and_cast_lazily(tmp_path):
    x = np.arange(6 * 2 * 3, dtype=np.int16).reshape(6, 2, 3)
    np.save(tmp_path / "d.npy", x)
    ds = load_dataset(tmp_path / "d.npy", [TensorSpec(name="input", shape=[1, 2, 3], dtype="float32")])
    assert not isinstance(ds.x, np.ndarray) and ds.x.dtype == np.float32  # read a batch at a time
    np.testing.assert_array_equal(ds.x[[5, 0]], x[[5, 0]].astype(np.float32))
    np.testing.assert_array_equal(ds.sample(3, seed=1).arrays()[0], x[ds.sample_indices(3, seed=1)])
    np.testing.assert_array_equal(np.concatenate([b[0] for b, _ in ds.batches(4)]), x)


def test_python_function_source(user_model):
    ds = load_dataset(f"{user_model['root'] / 'mynet.py'}:calib_data", (3, 16, 16))
    assert ds.x.shape == (40, 3, 16, 16) and ds.y is None


def test_dict_returning_function(tmp_path):
    path = _write_py(tmp_path, """
        def data():
            rng = np.random.default_rng(0)
            return {"attention_mask": np.ones((10, 5), np.int64), "features": rng.random((10, 4)),
                    "input_ids": np.arange(50).reshape(10, 5), "y": np.arange(10) % 2}
    """)
    ds = load_dataset(f"{path}:data", TEXT_SPECS)
    assert ds.names == ["input_ids", "attention_mask", "features"] and ds.y.tolist() == [0, 1] * 5
    assert ds.inputs["attention_mask"].dtype == bool and ds.inputs["input_ids"][2].tolist() == list(range(10, 15))


def test_iterable_of_batches_function(tmp_path):
    path = _write_py(tmp_path, """
        def dict_batches():
            for i in range(3):
                yield {"input_ids": np.full((4, 5), i), "attention_mask": np.ones((4, 5), np.int64),
                       "features": np.full((4, 4), float(i)), "y": np.full(4, i)}

        def list_batches():  # (inputs in the model's order, labels)
            return [([np.full((2, 5), i), np.ones((2, 5), bool), np.zeros((2, 4), np.float32)], np.full(2, i))
                    for i in range(4)]

        def tensor_batches():  # old style: batches of one array
            return (np.full((3, 2), i, np.float32) for i in range(2))

        def ragged():
            yield {"a": np.zeros((2, 3))}
            yield {"b": np.zeros((2, 3))}
    """)
    ds = load_dataset(f"{path}:dict_batches", TEXT_SPECS)
    assert len(ds) == 12 and ds.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.inputs["features"][:, 0].tolist() == ds.y.astype(float).tolist()
    ds = load_dataset(f"{path}:list_batches", TEXT_SPECS)  # positional inputs take the model's names
    assert ds.names == [s.name for s in TEXT_SPECS] and len(ds) == 8 and ds.inputs["input_ids"][7, 0] == 3
    ds = load_dataset(f"{path}:tensor_batches", None)
    assert ds.x.shape == (6, 2) and ds.y is None
    with pytest.raises(EdgepackError, match="batch 1 .* has inputs \\['b'\\], batch 0 had \\['a'\\]"):
        load_dataset(f"{path}:ragged", None)


def test_function_returning_x_y_with_list_of_inputs(tmp_path):
    path = _write_py(tmp_path, """
        def data():
            return [np.arange(20).reshape(4, 5), np.ones((4, 5), np.int64), np.zeros((4, 4))], np.arange(4)
    """)
    ds = load_dataset(f"{path}:data", TEXT_SPECS)
    assert ds.names == ["input_ids", "attention_mask", "features"] and ds.y.tolist() == [0, 1, 2, 3]


def test_single_input_compatibility():
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    ds = Dataset(x, np.arange(10) % 2, "mem")
    assert ds.names == ["input"] and ds.x is x and ds.take(4).x.shape == (4, 3)
    assert Dataset(x=x).x is x and not Dataset(x).labelled
    (xb, yb), = list(Dataset(x[:4], np.arange(4)).batches(8))
    assert isinstance(xb, list) and xb[0].shape == (4, 3) and yb.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="different numbers of samples"):
        Dataset({"a": x, "b": x[:3]})


def test_sample_is_seeded_stratified_and_not_the_first_n():
    y = np.repeat(np.arange(4), [40, 30, 20, 10])  # class-ordered, imbalanced
    ds = Dataset(np.arange(100.0)[:, None], y)
    s = ds.sample(10, seed=3)
    assert np.bincount(s.y, minlength=4).tolist() == [4, 3, 2, 1]
    assert s.x[:, 0].tolist() == ds.sample(10, seed=3).x[:, 0].tolist()  # the seed fixes it
    assert sorted(s.x[:, 0]) != sorted(ds.sample(10, seed=4).x[:, 0])
    np.testing.assert_array_equal(y[s.x[:, 0].astype(int)], s.y)  # rows and labels stay together
    assert set(np.bincount(ds.sample(4).y, minlength=4)) == {1}  # n >= classes: every class drawn
    everything = ds.sample(500, seed=1)
    assert len(everything) == 100 and sorted(everything.x[:, 0]) == list(range(100))
    assert everything.x[:, 0].tolist() != list(range(100))  # a seeded order, not the file's


def test_sample_without_class_labels():
    ds = Dataset({"a": np.arange(50), "b": np.arange(50) * 2}, np.linspace(0, 1, 50))  # a regression target
    assert not ds.class_labels
    s = ds.sample(7, seed=2)
    assert len(set(s.inputs["a"].tolist())) == 7 and (s.inputs["b"] == 2 * s.inputs["a"]).all()
    assert s.inputs["a"].tolist() != list(range(7))


def test_split_is_disjoint_and_stratified():
    y = np.repeat(np.arange(5), 20)
    ds = Dataset(np.arange(100), y)
    a, b = ds.split(25, seed=0)
    assert len(a) == 25 and len(b) == 75 and not set(a.x.tolist()) & set(b.x.tolist())
    assert sorted(a.x.tolist() + b.x.tolist()) == list(range(100))
    assert np.bincount(a.y).tolist() == [5] * 5
    assert ds.split(25, seed=0)[0].x.tolist() == a.x.tolist()


@pytest.mark.parametrize("counts, n", [([40, 30, 20, 10], 10), ([1000, 1, 1], 3), ([1000, 1, 1], 5),
                                       ([3, 3, 3], 2), ([7, 5, 1, 1, 9], 11)])
def test_stratified_allocation(counts, n):
    take = stratified_allocation(np.asarray(counts), n)
    assert take.sum() == n and (take <= counts).all()
    if n >= len(counts):
        assert (take >= 1).all()
    quota = np.asarray(counts) * n / sum(counts)
    floored = int((quota < 1).sum()) if n >= len(counts) else 0  # classes raised to one, paid by the rest
    assert (np.abs(take - quota)[take > 1] < 1 + floored).all()


def test_fingerprint_is_content_not_path(tmp_path):
    arrays = _text_arrays()
    np.savez(tmp_path / "one.npz", **arrays)
    np.savez(tmp_path / "two.npz", **arrays)
    fp = load_dataset(tmp_path / "one.npz", TEXT_SPECS).fingerprint()
    assert load_dataset(tmp_path / "two.npz", TEXT_SPECS).fingerprint() == fp
    arrays["input_ids"][3, 4] += 1
    np.savez(tmp_path / "two.npz", **arrays)
    assert load_dataset(tmp_path / "two.npz", TEXT_SPECS).fingerprint() != fp


def test_nonfinite_count(tmp_path):
    x = np.zeros((20, 3, 4, 4), np.float32)
    x[[1, 5, 7], 0, 0, 0] = np.nan
    x[5, 1, 1, 1] = np.inf
    ids = np.zeros((20, 3), np.int64)
    assert Dataset({"img": x, "ids": ids}).nonfinite_count() == 3
    np.save(tmp_path / "x.npy", x)
    assert load_dataset(tmp_path / "x.npy", None).nonfinite_count() == 3  # memory-mapped, scanned in chunks
    conformed = conform(Dataset(x), [TensorSpec(name="img", shape=[1, 3, 4, 4])], "calibration data")
    assert conformed.names == ["img"] and conformed.nonfinite_count() == 3


def test_empty_and_unknown_sources(tmp_path):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3), np.float32))
    with pytest.raises(EdgepackError, match="is empty"):
        load_dataset(tmp_path / "empty.npz", None)
    with pytest.raises(EdgepackError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz", None)
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(EdgepackError, match="unsupported kind of file"):
        load_dataset(tmp_path / "d.csv", None)


def test_function_returning_a_dataset_of_a_user_lazy_array(tmp_path):
    path = _write_py(tmp_path, """
        from edgepack.data import Dataset

        class Rows:  # numpy-like: len, shape, dtype, rows by int / slice / index array
            reads = []
            shape, dtype = (1000, 4), np.dtype(np.int32)
            def __len__(self):
                return 1000
            def __getitem__(self, key):
                idx = np.arange(1000)[key]
                Rows.reads.append(np.size(idx))
                return (np.asarray(idx)[..., None] * np.ones(4, np.int32)).astype(np.int32)

        def data():
            return Dataset({"ids": Rows(), "extra": np.zeros((1000, 2))}, np.arange(1000) % 4)
    """)
    ds = load_dataset(f"{path}:data", [TensorSpec(name="ids", shape=["b", 4], dtype="int64")])
    assert ds.source.endswith("userdata.py:data") and ds.names == ["ids"]  # unused inputs dropped
    reads = ds.x.base.reads  # the int32 -> int64 cast wraps the user's array, still lazily
    s = ds.sample(8, seed=0)
    assert np.bincount(s.y).tolist() == [2, 2, 2, 2]
    (batch,), y = next(s.batches(8))
    assert batch.dtype == np.int64 and (batch[:, 0] % 4 == y).all() and (batch[:, 0] == batch[:, 3]).all()
    assert reads and max(reads) <= 8  # only the sampled rows were read, never all 1000


def test_npz_x_feeds_a_single_input_model_beside_other_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2), np.float32), meta=np.zeros((3, 7)), y=np.arange(3))
    ds = load_dataset(tmp_path / "d.npz", [TensorSpec(name="pixels", shape=[1, 2])])
    assert ds.names == ["pixels"] and ds.x.shape == (3, 2) and ds.y.tolist() == [0, 1, 2]
