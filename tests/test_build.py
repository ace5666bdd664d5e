"""The build spine end to end on small real models: files produced, loaded, numbers checked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli
from edgepack import runtime
from edgepack.manifest import read_manifest, sha256_file


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    code, stdout, err = run_cli("build", "--target", "x86", "--out", str(out), "--latency-runs", "10")
    assert code == 0, err
    return out / "digits-cnn-x86", stdout, err


def test_default_build_writes_the_contract(default_build):
    path, stdout, err = default_build
    assert sorted(p.name for p in path.iterdir()) == ["eval", "manifest.json", "model.fp32.onnx", "model.int8.onnx",
                                                      "report.html", "report.md"]
    m = read_manifest(path)
    assert m.passed and m.primary == "model.int8.onnx" and m.target["name"] == "x86"
    assert m.inputs[0].shape[1:] == [1, 32, 32] and m.inputs[0].layout == "NCHW"
    for a in m.artifacts:
        assert a.sha256 == sha256_file(path / a.path)
        assert a.size_bytes == (path / a.path).stat().st_size
        assert a.metrics.latency_ms.p50 > 0 and a.metrics.latency_ms.p90 >= a.metrics.latency_ms.p50
    assert {v.budget for v in m.verdicts} == {"latency_p50_ms", "latency_p90_ms", "peak_memory_mb",
                                               "size_mb", "max_accuracy_drop", "min_sqnr_db", "min_accuracy"}
    assert m.versions["onnxruntime"] and m.config_hash and m.data_hash
    subset = np.load(path / m.eval_subset.path)  # the evaluation subset that ships to devices
    assert m.eval_subset.sha256 == sha256_file(path / m.eval_subset.path) and m.eval_subset.labelled
    assert subset["x"].shape == (m.eval_subset.samples, 1, 32, 32) and len(set(subset["y"])) == 10
    assert "PASS" in stdout and "budgets" in stdout and "quantizing to int8" in err


def test_default_build_meets_the_int8_acceptance(default_build):
    """int8 top-1 drop <= 0.5 points on the example's eval split; fp32/int8 size >= 3.5x."""
    m = read_manifest(default_build[0])
    fp32, int8 = (m.artifact(f"model.{p}.onnx") for p in ("fp32", "int8"))
    assert fp32.metrics.accuracy > 95
    assert fp32.metrics.accuracy - int8.metrics.accuracy <= 0.5
    assert fp32.size_bytes / int8.size_bytes >= 3.5


def test_int8_artifact_is_really_int8_and_runs(default_build):
    path = default_build[0]
    graph = onnx.load(str(path / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights, "conv weights must be stored as int8"
    from edgepack.example import eval_data
    data = eval_data()
    r32 = runtime.open_model(path / "model.fp32.onnx").run([data.x[:64]])[0]
    r8 = runtime.open_model(path / "model.int8.onnx").run([data.x[:64]])[0]
    assert (r32.argmax(1) == r8.argmax(1)).mean() > 0.95
    assert not np.allclose(r32, r8)  # really quantized, not a copy


def test_report_shows_figures(default_build):
    text = (default_build[0] / "report.md").read_text()
    for needle in ("# digits-cnn for x86: PASS", "| model.int8.onnx | onnx | int8 |", "## Budgets",
                   "Parity with PyTorch", "MinMax calibration"):
        assert needle in text


def test_json_output(user_model, tmp_path):
    code, stdout, err = run_cli("build", "--model", user_model["model"], "--weights", user_model["weights"],
                                "--input-shape", user_model["shape"], "--calib", user_model["calib"],
                                "--out", str(tmp_path), "--json", "-q", "--latency-runs", "5")
    assert code == 0, err
    doc = json.loads(stdout)
    assert Path(doc["path"]).name == "mynet-x86"
    assert doc["manifest"]["stages"]["data"]["eval_is_calibration"] is True
    # no labels anywhere: agreement replaces accuracy
    int8 = [a for a in doc["manifest"]["artifacts"] if a["precision"] == "int8"][0]
    assert int8["metrics"]["accuracy"] is None and int8["metrics"]["agreement"] > 80


def test_python_api_matches_cli(user_model, tmp_path):
    import edgepack
    result = edgepack.build(model=user_model["model"], weights=user_model["weights"],
                            calib=user_model["calib"], eval=user_model["eval"], out=str(tmp_path),
                            target="x86", latency_runs=5)
    assert result.passed and result.path == tmp_path / "mynet-x86"
    acc = result.manifest.artifact("model.fp32.onnx").metrics.accuracy
    assert acc == 100.0  # labels in val.npz are the float model's own predictions


def test_onnx_input_skips_torch_stages(user_model, tmp_path):
    import torch
    from edgepack.onnx_tools.export import to_onnx
    onnx_path = to_onnx(user_model["module"], (torch.zeros(1, 3, 16, 16),), tmp_path / "mynet.onnx")
    code, _, err = run_cli("build", "--model", str(onnx_path), "--calib", user_model["calib"],
                           "--eval", user_model["eval"], "--out", str(tmp_path / "d"), "-q", "--latency-runs", "5")
    assert code == 0, err
    m = read_manifest(tmp_path / "d" / "mynet-x86")
    assert m.stages["export"]["skipped"] == "input is already ONNX"
    assert m.artifact("model.int8.onnx").metrics.accuracy >= 90


def test_pruning_an_onnx_input_is_refused_unless_unpruned_is_allowed(user_model, tmp_path):
    import torch
    from edgepack.onnx_tools.export import to_onnx
    onnx_path = to_onnx(user_model["module"], (torch.zeros(1, 3, 16, 16),), tmp_path / "mynet.onnx")
    argv = ["build", "--model", str(onnx_path), "--calib", user_model["calib"], "--eval", user_model["eval"],
            "--out", str(tmp_path / "d"), "-q", "--latency-runs", "5", "--prune", "0.5"]
    code, _, err = run_cli(*argv)
    assert code == 2 and "channel pruning needs the PyTorch model" in err and str(onnx_path) in err
    assert "--prune / --prune-to-latency / [prune]" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "mynet-x86").exists()
    code, _, err = run_cli(*argv, "--allow-unpruned")
    assert code == 0, err
    m = read_manifest(tmp_path / "d" / "mynet-x86")
    assert "needs the PyTorch model" in m.stages["prune"]["skipped"]
    assert "Skipped: channel pruning needs" in (tmp_path / "d" / "mynet-x86" / "report.md").read_text()


def test_budget_failure_exits_1_with_report(user_model, tmp_path):
    code, stdout, err = run_cli("build", "--model", user_model["model"], "--weights", user_model["weights"],
                                "--calib", user_model["calib"], "--out", str(tmp_path), "--budget", "size_mb=0.001",
                                "--latency-runs", "5")
    assert code == 1
    assert "budget not met: size_mb" in err
    m = read_manifest(tmp_path / "mynet-x86")
    assert not m.passed and [v.budget for v in m.verdicts if v.ok is False] == ["size_mb"]
    assert "FAIL" in (tmp_path / "mynet-x86" / "report.md").read_text()


def test_config_file_and_flag_override(user_model, tmp_path, monkeypatch):
    cfg = tmp_path / "edgepack.toml"
    cfg.write_text(f'''
target = "x86"
model = "{user_model['model']}"
weights = "{user_model['weights']}"
calib = "{user_model['calib']}"
name = "fromfile"
latency_runs = 5
threads = 1
[budgets]
size_mb = 0.001
''')
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("build", "-q", "--budget", "size_mb=10")  # flag overrides the file
    assert code == 0, err
    m = read_manifest(tmp_path / "dist" / "fromfile-x86")
    assert m.target["threads"] == 1 and m.target["budgets"]["size_mb"] == 10


def test_off_target_latency_is_not_judged(user_model, tmp_path):
    code, _, err = run_cli("build", "--target", "rpi", "--format", "onnx", "--model", user_model["model"],
                           "--weights", user_model["weights"], "--calib", user_model["calib"],
                           "--out", str(tmp_path), "-q", "--latency-runs", "5")
    assert code == 0, err
    m = read_manifest(tmp_path / "mynet-rpi")
    lat = [v for v in m.verdicts if v.budget == "latency_p50_ms"][0]
    assert lat.ok is None and "target is aarch64: judge on the device with --device" in lat.note
    assert m.primary == "model.int8.onnx"  # tflite not requested here


def test_off_target_note_names_the_device_that_judges():
    from edgepack.manifest import LatencyMs
    from edgepack.targets import load_profile
    from edgepack.stages.judge import judge
    lat = LatencyMs(p50=1.0, p90=1.2, p99=1.5, mean=1.1, runs=5, threads=4, measured_on="x86_64")
    verdicts = judge(load_profile("rpi").budgets, "aarch64", "m.onnx", 1.0, lat, 10.0, 0.0,
                     judged_elsewhere="judged on device pi4 (see the device results)")
    assert "target is aarch64: judged on device pi4" in verdicts[0].note and verdicts[0].ok is None


def test_min_accuracy_is_an_absolute_floor(tmp_path):
    """`max_accuracy_drop` compares int8 with the (possibly pruned) float model; `min_accuracy`
    judges the artifact's own figure: a pruned build without fine-tuning passes the first and
    fails the second, and a figure that cannot be measured fails closed."""
    from edgepack.manifest import LatencyMs
    from edgepack.stages.judge import judge
    from edgepack.targets import Budgets
    lat = LatencyMs(p50=1.0, p90=1.2, p99=1.5, mean=1.1, runs=5, threads=1, measured_on="x86_64")
    budgets = Budgets(max_accuracy_drop=1.0, min_accuracy=90.0)
    low = {v.budget: v for v in judge(budgets, "x86_64", "m.onnx", 1.0, lat, 10.0, 0.0, quality=(19.4, "top-1 %"))}
    assert low["max_accuracy_drop"].ok is True and low["min_accuracy"].ok is False
    assert low["min_accuracy"].note == "top-1 % of the judged artifact itself"
    unmeasured = {v.budget: v for v in judge(budgets, "x86_64", "m.onnx", 1.0, lat, 10.0, 0.0)}
    assert unmeasured["min_accuracy"].ok is False and "not measured, so not met" in unmeasured["min_accuracy"].note
    code, _, err = run_cli("build", "--prune", "0.7", "--finetune-epochs", "0", "--budget", "min_accuracy=90",
                           "--budget", "max_accuracy_drop=100", "--out", str(tmp_path), "-q", "--latency-runs", "5")
    m = read_manifest(tmp_path / "digits-cnn-x86")
    floor = next(v for v in m.verdicts if v.budget == "min_accuracy")
    assert code == 1 and "min_accuracy" in err and floor.ok is False and floor.value < 90, (floor, err)
    # On a device, the device's own figure is judged.
    from edgepack.devices.judge import judge_quality
    record = {"samples": 256, "artifact": "model.int8.tflite", "reference": "model.fp32.tflite", "drop": 0.2,
              "drop_unit": "top-1 points", "device": {"accuracy": 88.5, "sqnr_db": 30.0}}
    on_device = {v.budget: v for v in judge_quality(record, {"min_accuracy": 90.0}, "pi", emulated=True)}
    assert on_device["min_accuracy"].ok is False and on_device["min_accuracy"].value == 88.5
    assert "top-1 % on the device" in on_device["min_accuracy"].note


def test_onnx_with_fixed_batch(user_model, tmp_path):
    """torch.onnx.export's default: batch fixed at 1. Calibration and evaluation must adapt."""
    import torch
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(user_model["module"], (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"])
    code, _, err = run_cli("build", "--model", str(path), "--calib", user_model["calib"], "--eval",
                           user_model["eval"], "--out", str(tmp_path / "d"), "-q", "--latency-runs", "5")
    assert code == 0, err
    m = read_manifest(tmp_path / "d" / "fixed-x86")
    assert m.inputs[0].shape == [1, 3, 16, 16]
    assert m.artifact("model.int8.onnx").metrics.accuracy >= 90  # 32 eval samples, one at a time


def test_config_paths_are_relative_to_the_file(user_model, tmp_path, monkeypatch):
    import shutil
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(user_model["root"] / "mynet.py", proj / "mynet.py")
    shutil.copy(user_model["weights"], proj / "w.safetensors")
    shutil.copy(user_model["calib"], proj / "data" / "calib.npz")
    (proj / "t").mkdir()
    (proj / "t" / "edge.toml").write_text('arch = "x86_64"\nruntime = "onnxruntime"\nthreads = 1\n')
    (proj / "edgepack.toml").write_text('model = "mynet.py:build"\nweights = "w.safetensors"\n'
                                        'calib = "data/calib.npz"\neval = "mynet.py:calib_data"\n'
                                        'target = "edge"\ntargets_dir = ["t"]\nout = "dist"\nlatency_runs = 5\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli("build", "--config", str(proj / "edgepack.toml"), "-q")
    assert code == 0, err
    assert (proj / "dist" / "mynet-edge" / "manifest.json").exists()


def test_mean_std_flags(tmp_path):
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((40, 40), 60 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    code, _, err = run_cli("build", "--calib", str(tmp_path / "imgs"), "--eval", str(tmp_path / "imgs"),
                           "--mean", "0.5", "--std", "0.5", "--out", str(tmp_path / "d"), "-q", "--latency-runs", "5",
                           "--budget", "max_accuracy_drop=100")
    assert code == 0, err
    code, _, err = run_cli("build", "--calib", str(tmp_path / "imgs"), "--mean", "0.5,abc", "-q",
                           "--out", str(tmp_path / "d2"))
    assert code == 2 and "--mean '0.5,abc' must be comma-separated numbers" in err


def test_failure_after_temp_dir_keeps_previous_build(user_model, tmp_path):
    """A build that fails mid-way (export parity) removes its temporary directory and leaves the
    previous good build of the same name untouched."""
    out = tmp_path / "dist"
    code, err = 0, ""
    code, _, err = run_cli("build", "--model", user_model["model"], "--weights", user_model["weights"],
                           "--calib", user_model["calib"], "--out", str(out), "--name", "same", "-q", "--latency-runs", "5")
    assert code == 0, err
    before = (out / "same-x86" / "manifest.json").read_text()
    bad = tmp_path / "dd.py"
    bad.write_text("import torch\nclass DD(torch.nn.Module):\n    input_shape = (1, 3, 16, 16)\n"
                   "    def forward(self, x):\n        return (x * 2 if x.sum() > 0 else x - 1).flatten(1)[:, :4]\n"
                   "def build():\n    return DD()\n")
    x = np.abs(np.random.default_rng(0).standard_normal((16, 3, 16, 16))).astype(np.float32)
    np.savez(tmp_path / "pos.npz", x=x)
    code, _, err = run_cli("build", "--model", f"{bad}:build", "--calib", str(tmp_path / "pos.npz"),
                           "--out", str(out), "--name", "same", "-q")
    assert code == 2 and "disagrees with PyTorch" in err
    assert sorted(p.name for p in out.iterdir()) == ["same-x86"]
    assert (out / "same-x86" / "manifest.json").read_text() == before
