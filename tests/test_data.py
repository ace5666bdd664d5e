import numpy as np
import pytest
from PIL import Image

from edgepack.data import Preprocess, load_dataset
from edgepack.errors import EdgepackError


def test_image_folder_with_classes(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(tmp_path, (3, 8, 8), Preprocess(mean=[0.5], std=[0.5]))
    assert ds.x.shape == (6, 3, 8, 8) and ds.classes == ["cat", "dog"]
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(ds.x[0], -1.0)  # black -> (0 - .5) / .5
    np.testing.assert_allclose(ds.x[-1], 1.0)


def test_unlabelled_image_folder_grayscale(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a.jpg")
    ds = load_dataset(tmp_path, (1, 4, 4))
    assert ds.y is None and ds.x.shape == (1, 1, 4, 4)


def test_npz_and_channel_last_hint(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 8, 8, 3), np.float32))
    with pytest.raises(EdgepackError, match="channels-last"):
        load_dataset(tmp_path / "d.npz", (3, 8, 8))


def test_labels_must_match(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 1, 4, 4), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(EdgepackError, match="labels must be 5 integers"):
        load_dataset(tmp_path / "d.npz", (1, 4, 4))


def test_python_function_source(user_model):
    ds = load_dataset(f"{user_model['root'] / 'mynet.py'}:calib_data", (3, 16, 16))
    assert ds.x.shape == (40, 3, 16, 16) and ds.y is None
