"""--debug-quant: every weighted node's int8 SQNR in the manifest and quant_debug.md; without it
the manifest and report keep the 10 worst and no table file is written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edgepack
from conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = f"{FIXTURES / 'zoo_more.py'}:mobilenet_digits"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file
    sys.path.insert(0, str(FIXTURES))
    try:
        from zoo_more import mobilenet_digits
    finally:
        sys.path.remove(str(FIXTURES))
    d = tmp_path_factory.mktemp("debug-quant")
    torch.manual_seed(0)
    save_file(mobilenet_digits().eval().state_dict(), str(d / "w.safetensors"))
    x = np.random.default_rng(0).standard_normal((48, 1, 32, 32)).astype(np.float32)
    np.savez(d / "calib.npz", x=x[:32])
    np.savez(d / "eval.npz", x=x[32:])
    return d


def build(d: Path, name: str, **kw):
    return edgepack.build(target="x86", model=MODEL, weights=str(d / "w.safetensors"), input_shape=[1, 1, 32, 32],
                          calib=str(d / "calib.npz"), eval=str(d / "eval.npz"), out=str(d / "dist"), name=name,
                          latency_runs=5, cache=False, **kw)


@pytest.mark.slow
def test_debug_quant_lists_every_weighted_node(files):
    code, _, err = run_cli("build", "--target", "x86", "--model", MODEL, "--weights", str(files / "w.safetensors"),
                           "--input-shape", "1x1x32x32", "--calib", str(files / "calib.npz"),
                           "--eval", str(files / "eval.npz"), "--out", str(files / "dist"), "--name", "full",
                           "--latency-runs", "5", "--no-cache", "--debug-quant", "-q")
    assert code in (0, 1), err  # 1: a budget missed (random weights); the tables are written either way
    (full,) = (files / "dist").glob("full*")
    rows = json.loads((full / "manifest.json").read_text())["stages"]["quantize"]["sensitivity"]
    assert len(rows) > 10, rows  # the MobileNet-style net has more weighted nodes than the report's 10
    assert [r["lost_db"] for r in rows] == sorted((r["lost_db"] for r in rows), reverse=True)
    text = (full / "quant_debug.md").read_text()
    assert text.startswith("# int8 SQNR per node and op")
    assert f"## model.int8.onnx: {len(rows)} weighted nodes" in text
    assert all(f"| {r['node']} | {r['op']} |" in text for r in rows)

    top = build(files, "top")
    assert len(top.manifest.stages["quantize"]["sensitivity"]) == 10
    assert top.manifest.stages["quantize"]["sensitivity"] == rows[:10]  # the same ranking, cut at 10
    assert not (top.path / "quant_debug.md").exists()
