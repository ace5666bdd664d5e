"""TFLite accuracy-aware fallback: ops ranked by the SQNR int8 costs them, the worst kept in float
with ai-edge-quantizer until the quality budget holds; and quiet native logs.

The model is MobileNet-style (inverted residuals, depthwise convolutions) trained for a few
seconds on scikit-learn's digits, then made deliberately sensitive in a way float cannot see:
one expansion layer (an unclipped ReLU) has one channel scaled up 1000x and the depthwise conv
reading it scaled down by as much, so the float function is unchanged but that tensor's int8
range is set by the outlier channel and every other channel rounds to almost nothing. PT2E
full-integer int8 then misses a 1-point accuracy budget by far; keeping that layer and the one
reading it in float brings it back.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.errors import EdgepackError, MissingExtra
from edgepack.manifest import sha256_file
from edgepack.runtime import measure_file
from edgepack.tflite import (fallback, inspect_tflite, int8_report, quantize_tflite, rank_ops,
                             require_litert_torch, run_tflite)
from fixtures.zoo import InvertedResidual, conv_bn

pytestmark = [pytest.mark.tflite, pytest.mark.slow]
try:
    require_litert_torch()  # imported the way the build does: its native log lines captured
except MissingExtra:
    pytest.skip("needs the tflite extra: pip install 'edgepack[tflite]'", allow_module_level=True)
pytest.importorskip("ai_edge_quantizer", reason="needs ai-edge-quantizer (a litert-torch dependency)")

BUDGET = 1.0  # accuracy points the int8 model may lose against TFLite fp32
SENSITIVE = "features.2.block.0.0 (Conv2d)"  # the expansion conv planted with the outlier
READER = "features.2.block.1.0 (Conv2d)"     # the depthwise conv that reads its output
TESTS = Path(__file__).parent
NATIVE_NOISE = ("INFO:", "XNNPACK", "I0000", "WARNING: All log messages", "oneDNN", "Failed to load")


class TinyMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        blocks = [InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 16, 1, 4),
                  InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4)]
        blocks[1].block[0][2] = nn.ReLU()  # unclipped, so a scaled channel passes unchanged
        self.features = nn.Sequential(conv_bn(1, 16, 3, 1, act=nn.ReLU6), *blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def plant_outlier(model: TinyMobileNet, k: float = 1000.0, channel: int = 0) -> None:
    """Channel `channel` of features.2's expansion output becomes k times larger; the depthwise
    conv reading it divides by k again: the same function in float."""
    expand, depthwise = model.features[2].block[0], model.features[2].block[1]
    with torch.no_grad():
        expand[1].weight[channel] *= k
        expand[1].bias[channel] *= k
        depthwise[0].weight[channel] /= k


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    train, held = idx[:1300], idx[1300:]
    torch.manual_seed(0)
    model = TinyMobileNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared machine
    try:
        model.train()
        for _ in range(10):
            for i in range(0, len(xt), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        before = model(torch.from_numpy(x[held])).numpy()
        plant_outlier(model)
        after = model(torch.from_numpy(x[held])).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3)  # float cannot tell
    weights = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), weights)
    # Held-out digits: the first half chooses (the build's --choose-samples), the rest reports.
    return {"x": x, "y": y, "calib": x[train[:128]], "choose": held[:250], "report": held[250:],
            "weights": weights}


# fp32 through the isolated child (the build's path), int8 in this process (isolate=False: the
# in-process path, and one child start-up less on a loaded machine). Both run the artifact.
CONVERT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_tflite_fallback import TinyMobileNet
from edgepack.data import Dataset
from edgepack.tflite import convert_fp32, convert_int8, run_tflite
import numpy as np
model = TinyMobileNet()
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
model.eval()
calib = np.load(sys.argv[3])
example = (torch.zeros(1, 1, 8, 8),)
convert_fp32(model, example, sys.argv[4])
convert_int8(model, example, Dataset(calib), sys.argv[5], num_calib=64, isolate=False)
run_tflite(sys.argv[5], [calib[:4]])
print("converted")
"""


@pytest.fixture(scope="module")
def converted(task, tmp_path_factory):
    """fp32 and PT2E int8 `.tflite`, converted in a fresh process whose stderr is kept."""
    d = tmp_path_factory.mktemp("tiny")
    np.save(d / "calib.npy", task["calib"])
    fp32, int8 = d / "model.fp32.tflite", d / "model.int8.tflite"
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DEBUG"}
    p = subprocess.run([sys.executable, "-c", CONVERT, str(TESTS), str(task["weights"]),
                        str(d / "calib.npy"), str(fp32), str(int8)],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0 and "converted" in p.stdout, p.stderr[-3000:]
    return {"fp32": fp32, "int8": int8, "stderr": p.stderr}


def accuracy(path, x, y) -> float:
    return 100.0 * float(np.mean(run_tflite(path, [x])[0].argmax(1) == y))


def budget_check(task, converted, idx):
    """The build's `misses`: accuracy drop against TFLite fp32 on the samples `idx`."""
    x, y = task["x"][idx], task["y"][idx]
    ref = accuracy(converted["fp32"], x, y)
    calls = []

    def misses(path: Path):
        drop = ref - accuracy(path, x, y)
        calls.append(Path(path).name)
        return drop > BUDGET, drop
    return misses, calls


def test_conversion_and_interpreters_print_no_native_log_lines(converted):
    noisy = [line for line in converted["stderr"].splitlines()
             if any(n in line for n in NATIVE_NOISE)]
    assert noisy == [], noisy


def test_debug_lets_native_lines_through(converted):
    script = ("import sys, numpy as np\nfrom edgepack.tflite import run_tflite\n"
              "run_tflite(sys.argv[1], [np.zeros((2, 1, 8, 8), np.float32)])\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DEBUG"}
    quiet = subprocess.run([sys.executable, "-c", script, str(converted["fp32"])],
                           capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run([sys.executable, "-c", script, str(converted["fp32"])],
                          capture_output=True, text=True, env={**env, "EDGEPACK_DEBUG": "1"},
                          timeout=300)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "XNNPACK" not in quiet.stderr, quiet.stderr
    assert "XNNPACK" in loud.stderr, loud.stderr  # the interpreter did print: it was captured


def test_int8_report_names_the_sensitive_layer(task, converted):
    rep = int8_report(converted["fp32"], converted["int8"], [task["calib"]], top=10, samples=16)
    assert rep["samples"] == 16 and rep["match"] == "op order"  # PT2E renames tensors
    assert 1 <= len(rep["ops"]) <= 10
    worst = rep["ops"][0]
    assert worst["module"] == SENSITIVE and worst["op"] == "CONV_2D", rep["ops"][:3]
    assert worst["lost_db"] > 15 and worst["output_limited"], worst
    assert worst["lost_db"] > 2 * rep["ops"][1]["lost_db"]
    assert rep["output_sqnr_db"] < 20
    assert [r["lost_db"] for r in rep["ops"]] == sorted((r["lost_db"] for r in rep["ops"]), reverse=True)


def test_quantize_tflite_keeps_the_named_ops_in_float(task, converted, tmp_path):
    full = quantize_tflite(converted["fp32"], tmp_path / "full.tflite", [task["calib"]])
    assert full["kept_in_float"] == full["float_ops"] == full["float_op_details"] == []
    assert full["quantize_ops"] == full["dequantize_ops"] == 0  # full integer, int8 IO
    assert full["inputs"][0]["dtype"] == "int8" and full["converter"].startswith("ai-edge-quantizer")
    assert full["calibration_samples"] == 128 and "min/max" in full["activation_ranges"]

    ranking = rank_ops(converted["fp32"], tmp_path / "full.tflite", [task["calib"]])
    assert ranking[0]["module"] == SENSITIVE  # names match exactly between float and AEQ int8
    keep = [ranking[0]["name"], next(r["index"] for r in ranking if r["module"] == READER)]
    out = tmp_path / "two.tflite"
    rec = quantize_tflite(converted["fp32"], out, [task["calib"]], float_ops=keep)
    assert [f["module"] for f in rec["kept_in_float"]] == [SENSITIVE, READER]
    assert sorted(rec["float_ops"]) == ["CONV_2D", "DEPTHWISE_CONV_2D"] and len(rec["notes"]) == 1
    info = inspect_tflite(out)
    assert sorted(f["op"] for f in info["float_op_details"]) == ["CONV_2D", "DEPTHWISE_CONV_2D"]
    assert rec["quantize_ops"] == rec["dequantize_ops"] == 1  # one float island
    x, y = task["x"][task["report"]], task["y"][task["report"]]
    assert accuracy(out, x, y) >= accuracy(converted["fp32"], x, y) - BUDGET
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []

    with pytest.raises(EdgepackError, match="no op 'no-such-tensor'"):
        quantize_tflite(converted["fp32"], tmp_path / "bad.tflite", [task["calib"]],
                        float_ops=["no-such-tensor"])
    assert not (tmp_path / "bad.tflite").exists()


def test_fallback_meets_the_budget_that_pt2e_int8_misses(task, converted, tmp_path):
    int8 = tmp_path / "model.int8.tflite"
    shutil.copy(converted["int8"], int8)
    misses, calls = budget_check(task, converted, task["choose"])
    initial_missed, initial_drop = misses(int8)
    assert initial_missed and initial_drop > 3 * BUDGET, initial_drop  # fails without fallback
    pt2e_sha = sha256_file(int8)

    said = []
    rec = fallback(converted["fp32"], int8, [task["calib"]], misses, max_float_ops=8,
                   say=said.append)
    assert rec is not None and rec["met_budget"] and rec["replaced"], rec
    assert rec["initial_drop"] == pytest.approx(initial_drop, abs=1e-3)
    assert rec["final_drop"] <= BUDGET and not misses(int8)[0]
    assert [f["module"] for f in rec["float_ops"]] == [SENSITIVE, READER]
    assert rec["route"].startswith("ai-edge-quantizer 0.10")
    # ai-edge-quantizer's own full-int8 model is tried first; it misses too.
    assert rec["tried"][0]["float_ops"] == 0 and not rec["tried"][0]["met_budget"]
    assert rec["tried"][-1]["met_budget"] and rec["tried"][-1]["float_ops"] == 2
    assert rec["ranking"][0]["module"] == SENSITIVE and len(rec["ranking"]) <= 15
    assert any(SENSITIVE in s for s in said)

    # The artifact in place is the chosen one, complete, with no candidate left beside it.
    assert sha256_file(int8) != pt2e_sha and rec["artifact"]["sha256"] == sha256_file(int8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.tflite"]
    assert sorted(f["op"] for f in inspect_tflite(int8)["float_op_details"]) == \
        ["CONV_2D", "DEPTHWISE_CONV_2D"]
    # It holds on samples it was not chosen with.
    x, y = task["x"][task["report"]], task["y"][task["report"]]
    ref = accuracy(converted["fp32"], x, y)
    assert ref > 85  # the task was learnt
    assert accuracy(int8, x, y) >= ref - 2 * BUDGET
    assert accuracy(converted["int8"], x, y) < ref - 3 * BUDGET
    assert rec["seconds"] < 120

    lat = {k: measure_file(p, threads=1, warmup=5, runs=30)["latency_ms"]["p50"]
           for k, p in (("pt2e", converted["int8"]), ("fallback", int8), ("fp32", converted["fp32"]))}
    print(f"fallback record: {rec['initial_drop']} -> {rec['final_drop']} points, "
          f"{rec['seconds']} s; p50 latency ms {lat}")


def test_fallback_does_nothing_within_budget(task, converted, tmp_path):
    int8 = tmp_path / "model.int8.tflite"
    shutil.copy(converted["int8"], int8)
    before = sha256_file(int8)
    assert fallback(converted["fp32"], int8, [task["calib"]], lambda p: (False, 0.5)) is None
    assert sha256_file(int8) == before


def test_fallback_keeps_the_original_when_nothing_beats_it(task, converted, tmp_path):
    int8 = tmp_path / "model.int8.tflite"
    shutil.copy(converted["int8"], int8)
    before = sha256_file(int8)
    # Every candidate misses and loses more than the original: nothing to gain.
    rec = fallback(converted["fp32"], int8, [task["calib"]],
                   lambda p: (True, 50.0 if Path(p) == int8 else 60.0), max_float_ops=4)
    assert not rec["met_budget"] and not rec["replaced"] and rec["float_ops"] == []
    assert rec["final_drop"] == rec["initial_drop"] == 50.0
    counts = [t["float_ops"] for t in rec["tried"]]
    assert counts[0] == 0 and max(counts) <= 4 and len(counts) >= 3
    assert len({tuple(t["ops"]) for t in rec["tried"]}) == len(counts)  # each set tried once
    assert sha256_file(int8) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.tflite"]


def test_mixed_fallback_keeps_the_sensitive_ops_in_fp16(task, converted, tmp_path):
    """The mixed int8/fp16 mode: the ops the fallback keeps out of int8 get fp16 weights
    (DEQUANTIZE from float16 tensors) instead of float32 ones, and the budget still holds."""
    from ai_edge_litert.interpreter import Interpreter

    int8 = tmp_path / "model.int8.tflite"
    shutil.copy(converted["int8"], int8)
    misses, _ = budget_check(task, converted, task["choose"])
    rec = fallback(converted["fp32"], int8, [task["calib"]], misses, max_float_ops=8, float_precision="fp16")
    assert rec is not None and rec["met_budget"] and rec["float_precision"] == "fp16", rec
    assert [(f["module"], f["precision"]) for f in rec["float_ops"]] == [(SENSITIVE, "fp16"), (READER, "fp16")]
    half = [t for t in Interpreter(model_path=str(int8)).get_tensor_details() if t["dtype"] == np.float16]
    assert half, "no float16 weight tensor in the mixed model"
    assert not misses(int8)[0]
    x, y = task["x"][task["report"]], task["y"][task["report"]]
    assert accuracy(int8, x, y) >= accuracy(converted["fp32"], x, y) - 2 * BUDGET


def test_adopted_ranges_that_ruin_the_model_are_dropped(task, converted, tmp_path, monkeypatch):
    """Ranges adopted from the artifact that make ai-edge-quantizer's model far worse than the
    artifact itself (tensors paired wrongly: seen on a ConvNeXt-T-style model) are not used."""
    import importlib
    module = importlib.import_module("edgepack.tflite.fallback")  # the package exports fallback()
    # A good int8 artifact: ai-edge-quantizer's, with the outlier layer and its reader in float.
    full = tmp_path / "full.tflite"
    quantize_tflite(converted["fp32"], full, [task["calib"]])
    ranking = rank_ops(converted["fp32"], full, [task["calib"]])
    keep = [ranking[0]["name"], next(r["index"] for r in ranking if r["module"] == READER)]
    int8 = tmp_path / "model.int8.tflite"
    quantize_tflite(converted["fp32"], int8, [task["calib"]], float_ops=keep)
    real = module.Int8Quantizer._adopt_ranges

    def wrong(self, path):  # every adopted range 1000x too wide
        ranges, how = real(self, path)
        return {k: {"min": v["min"] * 1000, "max": v["max"] * 1000} for k, v in ranges.items()}, how
    monkeypatch.setattr(module.Int8Quantizer, "_adopt_ranges", wrong)
    rec = fallback(converted["fp32"], int8, [task["calib"]], lambda p: (True, 5.0), max_float_ops=1)
    assert "not used" in rec["adopted_ranges_rejected"], rec.get("initial_output_sqnr_db")
    assert "min/max" in rec["activation_ranges"]
