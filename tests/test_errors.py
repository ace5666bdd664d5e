"""Every bad input named in the build issue: a clear message, exit code 2, nothing half-written."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli


def _build(user_model, out: Path, **over) -> tuple[int, str]:
    opts = {"--model": user_model["model"], "--weights": user_model["weights"],
            "--calib": user_model["calib"], "--eval": user_model["eval"], "--out": str(out),
            "--input-shape": user_model["shape"], "--latency-runs": "5"}
    opts.update(over)
    args = ["build", "--target", "x86", "-q"]
    for k, v in opts.items():
        if v is not None:
            args += [k, v]
    code, _, err = run_cli(*args)
    return code, err


def _assert_clean(out: Path):
    """No build directory and no temporary leftovers."""
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert leftovers == [], leftovers


CASES = {
    "missing model file": ({"--model": "nope/missing.py:build"}, "missing.py does not exist"),
    "missing factory": ({"--model": "{root}/mynet.py:nothere"}, "has no factory named 'nothere'"),
    "factory raises": ({"--model": "{root}/mynet.py:broken"}, "factory exploded on purpose"),
    "missing weights": ({"--weights": "{root}/gone.safetensors"}, "gone.safetensors does not exist"),
    "corrupt weights": ({"--weights": "{root}/corrupt.safetensors"}, "cannot read weights"),
    "weights do not fit": ({"--weights": "{root}/other.safetensors"}, "do not fit the model"),
    "wrong input shape": ({"--input-shape": "1x1x16x16"}, "rejects input shape 1x1x16x16"),
    "calib shape mismatch": ({"--input-shape": "1x3x32x32"}, "has samples of shape (3, 16, 16)"),
    "empty data folder": ({"--calib": "{root}/emptydir"}, "has no images"),
    "unreadable image": ({"--calib": "{root}/badimages"}, "cannot read image"),
    "NaN calibration": ({"--calib": "{root}/nan.npz"}, "NaN/Inf values in 3 of 20 samples"),
    "npz without x": ({"--calib": "{root}/nox.npz"}, "has no array named 'x'"),
    "unknown target": ({}, "unknown target 'marsrover'; known targets:"),
    "corrupt onnx": ({"--model": "{root}/corrupt.onnx", "--weights": None}, "is not a valid ONNX model"),
    "pickle without trust": ({"--model": "{root}/whole.pt", "--weights": None}, "--trust-pickle"),
    "no calibration data": ({"--calib": None}, "int8 calibration needs representative data"),
}


@pytest.fixture(scope="module")
def bad_inputs(user_model):
    import torch
    from safetensors.torch import save_file
    root = user_model["root"]
    (root / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    save_file({"w": torch.zeros(3)}, str(root / "other.safetensors"))
    (root / "emptydir").mkdir(exist_ok=True)
    bad = root / "badimages" / "cat"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "broken.png").write_bytes(b"not a png")
    x = np.random.default_rng(0).standard_normal((20, 3, 16, 16)).astype(np.float32)
    x[[1, 5, 7], 0, 0, 0] = np.nan
    np.savez(root / "nan.npz", x=x)
    np.savez(root / "nox.npz", inputs=x)
    (root / "corrupt.onnx").write_bytes(b"\x08\x07garbage-not-protobuf" * 4)
    from edgepack.example import DigitsCNN
    torch.save(DigitsCNN(), str(root / "whole.pt"))  # a whole pickled module of an importable class
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, bad_inputs, user_model, tmp_path):
    over, expected = CASES[case]
    over = {k: (v.format(root=bad_inputs) if isinstance(v, str) else v) for k, v in over.items()}
    out = tmp_path / "dist"
    if case == "unknown target":
        code, _, err = run_cli("build", "--target", "marsrover", "--out", str(out), "-q")
    else:
        code, err = _build(user_model, out, **over)
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    _assert_clean(out)


def test_unwritable_output_dir(user_model, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    code, err = _build(user_model, blocker / "dist")
    assert code == 2 and "is not writable" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; covered by the file-in-the-way case")
def test_read_only_output_dir(user_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = _build(user_model, ro)
    assert code == 2 and "not writable" in err


def test_failed_build_keeps_previous_good_build(user_model, tmp_path):
    out = tmp_path / "dist"
    code, err = _build(user_model, out, **{"--name": "keep"})
    assert code == 0, err
    manifest = (out / "keep-x86" / "manifest.json").read_text()
    code, err = _build(user_model, out, **{"--name": "keep", "--weights": str(user_model["root"] / "gone.safetensors")})
    assert code == 2
    assert (out / "keep-x86" / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in out.iterdir()) == ["keep-x86"]


def test_debug_shows_traceback(user_model, tmp_path):
    code, _, err = run_cli("--debug", "build", "--target", "marsrover", "--out", str(tmp_path), "-q")
    assert code == 2 and "Traceback" in err


def test_pickled_module_loads_only_with_trust(bad_inputs):
    from edgepack.stages.load import load_model
    loaded = load_model(str(bad_inputs / "whole.pt"), trust_pickle=True)
    assert loaded.input_shape == (1, 1, 32, 32) and loaded.module is not None
