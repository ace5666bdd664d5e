"""`edgepack prune` end to end on a user-style model file."""
from __future__ import annotations

import json

import torch

from conftest import run_cli
from edgepack.userimport import import_attr
from edgepack.prune import load_pruned


def test_prune_cli_writes_a_loadable_pruned_model(user_model, tmp_path):
    out, rec = tmp_path / "pruned.safetensors", tmp_path / "record.json"
    code, stdout, err = run_cli("prune", "--model", user_model["model"], "--weights", user_model["weights"],
                                "--input-shape", user_model["shape"], "--ratio", "0.5",
                                "--train", user_model["calib"], "--eval", user_model["eval"], "--epochs", "1",
                                "--out", str(out), "--record", str(rec))
    assert code == 0, err
    assert "## Pruning" in stdout and "fine-tune" in err
    record = json.loads(rec.read_text())
    assert record["macs_after"] < record["macs_before"] and record["finetune"][0]["distill"]
    model = load_pruned(import_attr(user_model["model"], "model")(), out)
    assert model.body[0].out_channels == 8 and model.head.out_features == 4
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)


def test_prune_cli_errors_are_clear(user_model, tmp_path):
    base = ("prune", "--model", user_model["model"], "--input-shape", user_model["shape"],
            "--out", str(tmp_path / "p.safetensors"))
    code, _, err = run_cli(*base, "--ratio", "1.5")
    assert code == 2 and "strictly between 0 and 1" in err
    code, _, err = run_cli(*base, "--ratio", "0.5", "--ignore-layer", "body.O")
    assert code == 2 and "no layer named 'body.O'" in err and "body.0" in err
    code, _, err = run_cli(*base)
    assert code == 2 and "nothing to prune towards" in err
    code, _, err = run_cli(*base, "--to-latency")
    assert code == 2 and "--to-latency needs --target" in err
    assert not (tmp_path / "p.safetensors").exists()


def test_prune_cli_metric_picks_the_epoch_and_names_the_figures(user_model, tmp_path):
    """--metric as in `build`: the epoch kept is the one the metric (here the error rate, higher is
    better to it) scores best, and the record and report give the figures under its name; a metric
    that does not exist is a clear error and writes nothing."""
    (tmp_path / "m.py").write_text("def error_rate(outputs, labels):\n"
                                   "    return float((next(iter(outputs.values())).argmax(1) != labels).mean())\n")
    spec = f"{tmp_path / 'm.py'}:error_rate"
    rec = tmp_path / "record.json"
    code, stdout, err = run_cli("prune", "--model", user_model["model"], "--weights", user_model["weights"],
                                "--input-shape", user_model["shape"], "--ratio", "0.5", "--metric", spec,
                                "--train", user_model["calib"], "--eval", user_model["eval"], "--epochs", "2",
                                "--patience", "5", "--out", str(tmp_path / "p.safetensors"), "--record", str(rec))
    assert code == 0, err
    record = json.loads(rec.read_text())
    assert record["accuracy"]["metric"] == spec and f"Eval {spec}" in stdout
    ft = record["finetune"][-1]
    assert ft["eval_metric"] == spec and ft["eval_acc_after"] == max([ft["eval_acc_before"], *ft["eval_acc"]])
    base = ("prune", "--model", user_model["model"], "--input-shape", user_model["shape"], "--ratio", "0.5",
            "--out", str(tmp_path / "q.safetensors"))
    code, _, err = run_cli(*base, "--metric", f"{tmp_path / 'm.py'}:nope", "--eval", user_model["eval"])
    assert code == 2 and "nope" in err
    code, _, err = run_cli(*base, "--metric", spec)  # nothing labelled to score it on
    assert code == 2 and "labelled evaluation data" in err and "--eval" in err
    assert not (tmp_path / "q.safetensors").exists()
