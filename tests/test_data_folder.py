"""Image folders: lazy decoding with bounded memory, preprocessing, stratified sampling, fingerprints."""
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepack.data import ImageFolderArray, Preprocess, load_dataset
from edgepack.errors import EdgepackError
from edgepack.manifest import TensorSpec

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _image_spec(*shape, name="image", dtype="float32"):
    return [TensorSpec(name=name, shape=[1, *shape], dtype=dtype)]


def _class_folders(root: Path, sizes: list[int], hw=(6, 6)) -> Path:
    """Class k (folder c0..c9) holds sizes[k] gray images of value 20 * k."""
    for k, n in enumerate(sizes):
        (root / f"c{k}").mkdir(parents=True)
        png = io.BytesIO()
        Image.fromarray(np.full(hw, 20 * k, np.uint8)).save(png, "PNG")
        for i in range(n):
            (root / f"c{k}" / f"{i:05d}.png").write_bytes(png.getvalue())
    return root


def test_image_folder_with_classes(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "._0.png").write_bytes(b"macOS resource fork, not an image")  # hidden: skipped
    ds = load_dataset(tmp_path, (3, 8, 8), Preprocess(mean=[0.5], std=[0.5]))
    assert isinstance(ds.x, ImageFolderArray) and ds.x.shape == (6, 3, 8, 8) and ds.classes == ["cat", "dog"]
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(ds.x[0], -1.0)  # black -> (0 - .5) / .5
    np.testing.assert_allclose(ds.x[-1], 1.0)
    np.testing.assert_allclose(ds.x[np.array([5, 0])][:, 0, 0, 0], [1.0, -1.0])
    assert ds.x[1:4].shape == (3, 3, 8, 8) and ds.x[2, 1].shape == (8, 8)


def test_unlabelled_image_folder_grayscale(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a.jpg")
    ds = load_dataset(tmp_path, (1, 4, 4))
    assert ds.y is None and ds.x.shape == (1, 1, 4, 4)


def test_stratified_sample_from_class_ordered_folder(tmp_path):
    sizes = [30, 5, 12, 8, 20, 6, 9, 14, 7, 11]  # 122 images, class-ordered on disk
    ds = load_dataset(_class_folders(tmp_path, sizes), _image_spec(1, 6, 6))
    first = ds.take(10)
    assert set(first.y.tolist()) == {0}  # what "the first N" would have calibrated on
    s = ds.sample(10, seed=0)
    assert sorted(s.y.tolist()) == list(range(10))  # every class drawn
    values = np.round(s.x[:, 0, 0, 0] * 255).astype(int)
    assert values.tolist() == (20 * s.y).tolist()  # the decoded rows are the labelled files
    big = ds.sample(61, seed=5)  # half: proportional per class
    assert (np.abs(np.bincount(big.y, minlength=10) - np.asarray(sizes) / 2) < 1).all()
    a, b = ds.split(20, seed=1)
    assert isinstance(a.x, ImageFolderArray) and isinstance(b.x, ImageFolderArray)  # still lazy
    paths = lambda d: {str(d.x.path(i)) for i in range(len(d))}  # noqa: E731
    assert len(a) == 20 and len(b) == 102 and not paths(a) & paths(b)
    assert set(a.y.tolist()) == set(range(10))


def test_imagenet_preset_shape_and_values(tmp_path):
    # 512 x 768: the shorter side to 256 halves it exactly (256 x 384); the 224 centre crop is rows
    # 16..240, cols 80..304 of that, i.e. rows 32..480, cols 160..608 of the original.
    img = np.full((512, 768, 3), 128, np.uint8)  # grey outside the crop: must not be seen
    img[32:480, 160:608] = (255, 0, 0)  # red inside
    img[32:96, 160:224] = (0, 0, 0)  # black marker: output rows/cols 0..32
    img[416:480, 544:608] = (0, 0, 255)  # blue marker: output rows/cols 192..224
    (tmp_path / "cls").mkdir()
    Image.fromarray(img).save(tmp_path / "cls" / "known.png")
    Image.fromarray(img[:, :600]).save(tmp_path / "cls" / "narrower.png")  # another aspect ratio
    ds = load_dataset(tmp_path, _image_spec(3, 224, 224), Preprocess(preset="imagenet"))
    x = ds.x[:]
    assert x.shape == (2, 3, 224, 224) and x.dtype == np.float32
    norm = lambda rgb: (np.asarray(rgb) / 255 - MEAN) / STD  # noqa: E731
    np.testing.assert_allclose(x[0, :, 2:29, 2:29].mean((1, 2)), norm((0, 0, 0)), atol=1e-5)
    np.testing.assert_allclose(x[0, :, 36:188, 36:188].reshape(3, -1).min(1), norm((255, 0, 0)), atol=1e-5)
    np.testing.assert_allclose(x[0, :, 36:188, 36:188].reshape(3, -1).max(1), norm((255, 0, 0)), atol=1e-5)
    np.testing.assert_allclose(x[0, :, 196:222, 196:222].mean((1, 2)), norm((0, 0, 255)), atol=1e-5)
    for edge in (x[0, :, 100, 2], x[0, :, 100, 221], x[0, :, 2, 100], x[0, :, 221, 100]):
        np.testing.assert_allclose(edge, norm((255, 0, 0)), atol=1e-5)  # the grey border was cropped off
    red, grey = norm((255, 0, 0))[0], norm((128, 128, 128))[0]
    assert grey < x[0, 0, 100, 0] < red  # ...except what resizing blended into the outermost pixel
    # explicit fields override the preset's
    ds = load_dataset(tmp_path, _image_spec(3, 100, 100), Preprocess(preset="imagenet", crop=100, mean=[0.0], std=[1.0]))
    np.testing.assert_allclose(ds.x[0, :, 50, 50], [1.0, 0.0, 0.0], atol=1e-6)
    with pytest.raises(EdgepackError, match="preprocessing makes 224x224 images but the model input 'image' takes 32x32"):
        load_dataset(tmp_path, _image_spec(3, 32, 32), Preprocess(preset="imagenet"))


def test_nhwc_layout_and_exact_resize(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    nchw = load_dataset(tmp_path, _image_spec(3, 10, 8), Preprocess(resize=[10, 8], mean=MEAN, std=STD))
    nhwc = load_dataset(tmp_path, _image_spec(10, 8, 3),
                        Preprocess(resize=[10, 8], mean=MEAN, std=STD, layout="NHWC"))
    assert nhwc.x.shape == (3, 10, 8, 3)
    np.testing.assert_array_equal(nhwc.x[:], nchw.x[:].transpose(0, 2, 3, 1))
    with pytest.raises(EdgepackError, match="set the preprocessing field 'layout' to NHWC"):
        load_dataset(tmp_path, _image_spec(10, 8, 3), Preprocess(resize=[10, 8]))
    half = load_dataset(tmp_path, _image_spec(3, 10, 8, dtype="float16"), Preprocess(resize=[10, 8]))
    assert half.x.dtype == np.float16 and half.x[0].dtype == np.float16


@pytest.mark.parametrize("kwargs, field", [
    ({"preset": "coco"}, "preset"), ({"resize": 0}, "resize"), ({"resize": [224, 224, 3]}, "resize"),
    ({"crop": "224"}, "crop"), ({"mean": "abc"}, "mean"), ({"std": [0.2, 0.0, 0.2]}, "std"),
    ({"layout": "CHW"}, "layout"), ({"scale": -1.0}, "scale"),
])
def test_bad_preprocessing_names_the_field(kwargs, field):
    with pytest.raises(EdgepackError, match=f"preprocessing field '{field}'"):
        Preprocess(**kwargs)


def test_mean_for_the_wrong_number_of_channels(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(EdgepackError, match="field 'mean' has 3 values but the model input 'image' has 1 channel"):
        load_dataset(tmp_path, _image_spec(1, 4, 4), Preprocess(mean=MEAN, std=STD))


def test_unreadable_image_fails_when_read_naming_the_file(tmp_path):
    _class_folders(tmp_path, [3, 3])
    (tmp_path / "c1" / "broken.png").write_bytes(b"not a png")
    ds = load_dataset(tmp_path, _image_spec(1, 6, 6))  # the scan does not decode anything
    assert len(ds) == 7 and ds.x[:3].shape == (3, 1, 6, 6)
    with pytest.raises(EdgepackError, match=r"cannot read image .*c1/broken\.png"):
        list(ds.batches(4))


def test_fingerprint_follows_files_not_the_folder_path(tmp_path):
    root = _class_folders(tmp_path / "a", [4, 4])
    fp = load_dataset(root, _image_spec(1, 6, 6)).fingerprint()
    copy = tmp_path / "b"
    shutil.copytree(root, copy)  # copy2 keeps sizes and mtimes
    assert load_dataset(copy, _image_spec(1, 6, 6)).fingerprint() == fp
    assert load_dataset(root, _image_spec(1, 6, 6), Preprocess(mean=[0.5])).fingerprint() != fp
    ds = load_dataset(root, _image_spec(1, 6, 6))
    assert ds.sample(3).fingerprint() != fp
    Image.fromarray(np.full((6, 6), 7, np.uint8)).save(root / "c1" / "00002.png")  # content changes
    os.utime(root / "c1" / "00002.png", ns=(1, 1))
    assert ds.fingerprint() != fp
    shutil.copy2(copy / "c1" / "00002.png", root / "c1" / "00002.png")  # back as it was
    assert ds.fingerprint() == fp
    os.utime(root / "c1" / "00002.png", ns=(10 ** 18, 10 ** 18))  # touched
    assert ds.fingerprint() != fp


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from edgepack.data import load_dataset
    from edgepack.manifest import TensorSpec

    def kb(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

    from PIL import Image, PngImagePlugin  # imports count before the baseline, not in the growth
    base = kb("VmRSS:")
    t0 = time.perf_counter()
    ds = load_dataset(sys.argv[1], [TensorSpec(name="image", shape=[1, 3, 48, 48])], None, "calibration data")
    calib = ds.sample(500, seed=0)
    counts = np.bincount(calib.y, minlength=10).tolist()
    checked = 0
    for xs, y in calib.batches(128):
        assert (np.round(xs[0][:, 0, 0, 0] * 255) == 20 * y).all()
    for xs, y in ds.batches(256, shuffle=True, seed=1):
        assert xs[0].shape[1:] == (3, 48, 48)
        assert (np.round(xs[0][:, 1, 5, 5] * 255) == 20 * y).all()
        checked += len(y)
    fingerprint = ds.fingerprint()
    print(json.dumps({"growth_mb": (kb("VmHWM:") - base) / 1024, "seconds": time.perf_counter() - t0,
                      "checked": checked, "counts": counts, "fingerprint": fingerprint,
                      "eager_mb": len(ds) * 3 * 48 * 48 * 4 / 2 ** 20}))
""")
PEAK_GROWTH_CAP_MB = 64  # batches of 256 x 3 x 48 x 48 float32 are 7 MB; all 50,000 decoded: 1,318 MB


@pytest.mark.slow
def test_50k_image_folder_bounded_memory(tmp_path):
    root = _class_folders(tmp_path / "big", [5000] * 10, hw=(8, 8))
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root)], capture_output=True, text=True,
                           timeout=900, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert probe.returncode == 0, probe.stderr
    r = json.loads(probe.stdout)
    print(f"50k folder: peak RSS growth {r['growth_mb']:.1f} MB (eager would be {r['eager_mb']:.0f} MB), "
          f"{r['seconds']:.1f} s")
    assert r["checked"] == 50_000 and r["counts"] == [50] * 10
    assert r["growth_mb"] < PEAK_GROWTH_CAP_MB < r["eager_mb"] / 10
