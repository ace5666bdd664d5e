"""A build from a folder of 50,000 images stays within a memory cap: folders are read lazily,
calibration draws a seeded, stratified sample, evaluation streams in chunks.

At 3x64x64 the decoded folder would be 50,000 x 49 KB = 2.5 GB; the cap below is far under that."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

PEAK_CAP_MB = 1200  # the build process whole: Python, torch, ONNX Runtime, and the data in flight
IMAGES, CLASSES = 50_000, 10

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 10))
''')

BUILD = textwrap.dedent('''
    import json, sys
    from edgepack.pipeline import build
    from edgepack.runtime import peak_rss_mb
    r = build(model=sys.argv[1], calib=sys.argv[2], eval=sys.argv[2], input_shape=[1, 3, 64, 64], out=sys.argv[3],
              latency_runs=5, budgets_off=["max_accuracy_drop"], cache=False)
    print(json.dumps({"peak_mb": peak_rss_mb(), "stages": r.manifest.stages["data"],
                      "int8": r.manifest.artifact("model.int8.onnx").metrics.model_dump()}))
''')


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Class sub-folders in class order (c0/..., c1/...), 8x8 PNGs whose brightness encodes the class."""
    root = tmp_path_factory.mktemp("folder50k")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        d = root / f"c{c}"
        d.mkdir()
        for i in range(IMAGES // CLASSES):
            px = np.clip(rng.normal(20 + 23 * c, 8, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i:05d}.png", compress_level=1)
    return root


@pytest.mark.slow
def test_build_from_50k_images_stays_under_the_cap(folder, tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    proc = subprocess.run([sys.executable, "-c", BUILD, f"{tmp_path / 'net.py'}:build", str(folder), str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS {out['peak_mb']:.0f} MB for {IMAGES} images (cap {PEAK_CAP_MB} MB)")
    assert out["peak_mb"] < PEAK_CAP_MB
    data = out["stages"]
    assert data["choose_samples"] + data["report_samples"] == IMAGES and out["int8"]["samples"] == data["report_samples"]
    assert data["classes_in_calibration"] == CLASSES  # a class-ordered folder, sampled across every class
