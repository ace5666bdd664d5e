"""Pruning inside `edgepack build`, and pruned weights from `edgepack prune` fed back to build."""
from __future__ import annotations

import onnx

from conftest import run_cli
from edgepack.manifest import read_manifest


def _conv_widths(path):
    g = onnx.load(str(path)).graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    return [inits[n.input[1]][0] for n in g.node if n.op_type == "Conv"]


def test_build_prunes_before_export(user_model, tmp_path):
    code, _, err = run_cli("build", "--model", user_model["model"], "--weights", user_model["weights"],
                           "--calib", user_model["calib"], "--eval", user_model["eval"], "--train", user_model["eval"],
                           "--prune", "0.5", "--finetune-epochs", "1", "--out", str(tmp_path), "--latency-runs", "5",
                           "--budget", "max_accuracy_drop=100")
    assert code == 0, err
    m = read_manifest(tmp_path / "mynet-x86")
    p = m.stages["prune"]
    assert p["macs_after"] < p["macs_before"] and p["ratio"] == 0.5
    # MyNet has 16 and 32 filters; the x86 profile rounds to 16: the second conv must be narrower
    assert _conv_widths(tmp_path / "mynet-x86" / "model.fp32.onnx") == [16, 16]
    assert "## Pruning" in (tmp_path / "mynet-x86" / "report.md").read_text()


def test_pruned_file_as_weights(user_model, tmp_path):
    out = tmp_path / "pruned.safetensors"
    code, _, err = run_cli("prune", "--model", user_model["model"], "--weights", user_model["weights"],
                           "--input-shape", user_model["shape"], "--ratio", "0.5", "--target", "x86", "--epochs", "0",
                           "--out", str(out), "-q")
    assert code == 0, err
    code, _, err = run_cli("build", "--model", user_model["model"], "--weights", str(out), "--calib",
                           user_model["calib"], "--out", str(tmp_path / "d"), "-q", "--latency-runs", "5")
    assert code == 0, err
    assert _conv_widths(tmp_path / "d" / "mynet-x86" / "model.fp32.onnx") == [16, 16]


def test_prune_flag_without_goal_is_an_error(user_model, tmp_path):
    code, _, err = run_cli("build", "--model", user_model["model"], "--weights", user_model["weights"],
                           "--calib", user_model["calib"], "--prune-importance", "l1", "--out", str(tmp_path), "-q")
    assert code == 2 and "pruning options were given without a goal" in err
