"""Accuracy on the device: the build's evaluation subset run by the agent with the device's
kernels, scored beside this machine's outputs; the shapes the agent times at; devices whose
outputs disagree with this machine's are named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest_devices import (VENV_PYTHON, add_eval_subset, add_int8, build_dir, isolated_inventory,  # noqa: E402,F401
                              local_device, make_build, noisy_python)

from edgepack.devices import DeviceError, bench, bench_fleet, deploy  # noqa: E402
from edgepack.devices.summary import fleet_table  # noqa: E402
from edgepack.manifest import Artifact, TensorSpec, read_manifest, sha256_file, write_json_atomic  # noqa: E402


@pytest.fixture
def eval_build(tmp_path):
    b = make_build(tmp_path / "build", budgets={"max_accuracy_drop": 1.0, "min_sqnr_db": 20.0})
    add_int8(b)
    y = add_eval_subset(b)
    return b, y


def _host_top1(build: Path, artifact: str) -> float:
    """This machine's top-1 of `artifact` on the subset, computed here independently of edgepack."""
    import onnxruntime as ort
    z = np.load(build / "eval" / "subset.npz")
    sess = ort.InferenceSession(str(build / artifact), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": z["input"][i:i + 1]})[0] for i in range(len(z["y"]))])
    return float((logits.argmax(1) == z["y"]).mean() * 100)


def test_device_accuracy_equals_the_hosts_for_the_same_artifact(tmp_path, eval_build):
    b, y = eval_build
    r = bench(b, local_device(tmp_path / "d"), threads=1, runs=5, warmup=1)
    (e,) = r["eval"]
    assert e["artifact"] == "model.int8.onnx" and e["timed"] and e["samples"] == len(y) == 64
    assert e["machine"] == "x86_64" and e["runtime"].startswith("onnxruntime")
    # Same kernels: identical outputs, so identical figures.
    assert e["device"]["accuracy"] == e["host"]["accuracy"] == pytest.approx(_host_top1(b, "model.int8.onnx"))
    assert e["reference"] == "model.fp32.onnx" and e["reference_figures"]["accuracy"] == 100.0  # labels = fp32's
    assert e["vs_host"]["top1_agreement"] == 100.0 and e["vs_host"]["max_abs_diff"] == 0.0 and e["vs_host"]["consistent"]
    assert e["drop"] == pytest.approx(100.0 - e["device"]["accuracy"]) and e["drop_unit"] == "top-1 points"
    # The verdicts judge the device's own figure.
    v = {v["budget"]: v for v in r["verdicts"]}
    assert v["max_accuracy_drop"]["value"] == e["drop"] and v["max_accuracy_drop"]["ok"] is (e["drop"] <= 1.0)
    assert "on loc: 64 samples, model.int8.onnx on the device vs model.fp32.onnx" in v["max_accuracy_drop"]["note"]
    assert v["min_sqnr_db"]["value"] == e["device"]["sqnr_db"] > 20
    # The subset travelled like an artifact; the fetched outputs were removed from the device.
    deployed = Path(r["deploy"]["path"])
    assert sha256_file(deployed / "eval" / "subset.npz") == read_manifest(b).eval_subset.sha256
    assert not list((tmp_path / "d" / "loc-work" / ".edgepack-eval").glob("*.npz"))
    # Recorded in the result file, the manifest's bench entry and report.md.
    saved = json.loads((b / r["result_file"]).read_text())
    assert saved["eval"][0]["device"]["accuracy"] == e["device"]["accuracy"]
    entry = read_manifest(b).bench[-1]
    assert entry["eval"][0]["host"]["accuracy"] == e["host"]["accuracy"] and entry["consistent"] is True
    report = (b / "report.md").read_text()
    assert "Accuracy on the device" in report and f"| model.int8.onnx | {e['runtime']} | 64 | top-1 % |" in report


def test_also_evaluated_artifacts_and_a_device_metric(tmp_path, eval_build):
    b, _ = eval_build
    metric = tmp_path / "score.py"
    metric.write_text("import numpy as np\n\ndef mean_logit(outputs, labels):\n"
                      "    return float(np.mean(outputs['logits']))\n")
    from edgepack.quality import load_metric
    r = bench(b, local_device(tmp_path / "d"), threads=1, runs=3, warmup=0, also_evaluate=["model.fp32.onnx"],
              metric=(f"{metric}:mean_logit", load_metric(f"{metric}:mean_logit")))
    timed, other = r["eval"]
    assert timed["timed"] and not other["timed"] and other["artifact"] == "model.fp32.onnx"
    assert other["device"]["metric"] == other["host"]["metric"] == other["reference_figures"]["metric"]
    assert timed["drop_unit"] == "metric"  # the user's metric wins over top-1, as in the build
    assert timed["drop"] == pytest.approx(other["device"]["metric"] - timed["device"]["metric"], abs=1e-4)


def test_tampered_subset_is_refused_by_the_hash_check(tmp_path, eval_build):
    b, _ = eval_build
    dev = local_device(tmp_path / "d")
    subset = Path(deploy(b, dev)["path"]) / "eval" / "subset.npz"
    z = dict(np.load(subset))
    z["y"] = (z["y"] + 1) % 10  # "better" labels on the device: must never be scored
    np.savez(subset, **z)
    with pytest.raises(DeviceError, match=r"the agent refused: evaluation subset eval/subset.npz has sha256 "
                                          r"[0-9a-f]{64} but the manifest says") as e:
        bench(b, dev, runs=2, warmup=0, redeploy=False)
    assert "deploy again" in e.value.hint
    # A subset changed in the build directory itself never leaves this machine.
    (b / "eval" / "subset.npz").write_bytes(subset.read_bytes())
    with pytest.raises(DeviceError, match=r"evaluation subset .*subset.npz does not match its sha256"):
        deploy(b, dev)


def _dynamic_hw_build(root: Path, manifest_shape: list) -> Path:
    import torch
    from torch import nn
    b = make_build(root)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    path = b / "model.fp32.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 24, 20), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}},
                      dynamo=False, opset_version=17)
    m = read_manifest(b)
    m.inputs = [TensorSpec(name="input", shape=manifest_shape, layout="NCHW")]
    m.artifacts = [Artifact(path=path.name, format="onnx", precision="fp32", sha256=sha256_file(path),
                            size_bytes=path.stat().st_size,
                            inputs=[TensorSpec(name="input", shape=["batch", 3, "h", "w"], layout="NCHW")])]
    write_json_atomic(b / "manifest.json", m)
    return b


def test_dynamic_hw_onnx_is_timed_at_the_manifest_shape(tmp_path):
    b = _dynamic_hw_build(tmp_path / "build", [1, 3, 24, 20])
    add_eval_subset(b, n=16, shape=(3, 24, 20))
    r = bench(b, local_device(tmp_path / "d"), threads=1, runs=3, warmup=0)
    assert r["inputs"] == [{"shape": [1, 3, 24, 20], "dtype": "float32"}]  # not 1x3x1x1
    assert r["eval"][0]["samples"] == 16 and r["eval"][0]["device"]["accuracy"] == 100.0


def test_symbolic_dim_without_a_concrete_size_is_never_timed(tmp_path):
    b = _dynamic_hw_build(tmp_path / "build", [1, 3, "h", "w"])  # a manifest that never said its size
    with pytest.raises(DeviceError, match=r"input input dimension 2 is 'h' in model.fp32.onnx and the manifest "
                                          r"gives no concrete size.*refusing to time at a guessed shape") as e:
        bench(b, local_device(tmp_path / "d"), runs=2, warmup=0)
    assert "--input-shape" in e.value.hint


def test_outputs_too_large_to_fetch_are_skipped_with_a_note(tmp_path):
    """An output of 4M floats per sample: 5 samples would be 84 MB, over the 64 MB fetched."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    b = make_build(tmp_path / "build")
    reps = numpy_helper.from_array(np.array([1, 1 << 20], dtype=np.int64), "reps")
    graph = helper.make_graph([helper.make_node("Tile", ["input", "reps"], ["big"])], "big",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("big", TensorProto.FLOAT, ["batch", 4 << 20])], [reps])
    path = b / "model.fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    m = read_manifest(b)
    m.inputs = [TensorSpec(name="input", shape=[1, 4])]
    m.outputs = [TensorSpec(name="big", shape=[1, 4 << 20])]
    m.artifacts[0] = m.artifacts[0].model_copy(update={"sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                                                       "inputs": m.inputs})
    write_json_atomic(b / "manifest.json", m)
    add_eval_subset(b, n=5, shape=(4,))
    r = bench(b, local_device(tmp_path / "d"), threads=1, runs=1, warmup=0)
    assert r["eval"] == [] and r["passed"]
    assert "would be 83.9 MB, over the 64 MB the host fetches" in r["eval_notes"][0]
    assert "model.fp32.onnx not evaluated on the device" in (b / "report.md").read_text()


def test_fleet_names_the_device_whose_outputs_disagree(tmp_path, eval_build, capsys):
    b, _ = eval_build
    devs = tmp_path / "devs"
    local_device(devs, name="good")
    local_device(devs, name="noisy", python=noisy_python(tmp_path))
    fleet = bench_fleet(b, "good,noisy", dirs=[devs], threads=1, runs=3, warmup=0)
    by = {r["device"]: r for r in fleet["results"]}
    assert by["good"]["consistent"] and by["good"]["passed"]
    assert not by["noisy"]["consistent"] and not by["noisy"]["passed"]
    assert [d["device"] for d in fleet["disagreeing"]] == ["noisy"]
    why = fleet["disagreeing"][0]["why"]
    assert "top-1 agreement" in why and "< 99%" in why
    drop = next(v for v in by["noisy"]["verdicts"] if v["budget"] == "max_accuracy_drop")
    assert drop["ok"] is False and drop["value"] > 10
    from rich.console import Console
    console = Console(width=400, record=True)
    console.print(fleet_table(fleet))
    text = console.export_text()
    assert "outputs differ from this machine's on: noisy (model.int8.onnx: top-1 agreement" in text
    # The CLI names it too, and exits 1 for the missed budget.
    from edgepack.cli import main
    capsys.readouterr()
    assert main(["bench", str(b), "--devices", "good,noisy", "--devices-dir", str(devs), "--runs", "2",
                 "--warmup", "0"]) == 1
    err = capsys.readouterr().err
    assert "warning: noisy: outputs of model.int8.onnx differ from this machine's" in err
    assert "noisy: max_accuracy_drop" in err and "good:" not in err.split("budget not met")[-1]


def test_agent_eval_only_writes_outputs_and_checks_the_subset(tmp_path, eval_build):
    b, _ = eval_build
    out = tmp_path / "o" / "outputs.npz"
    argv = [VENV_PYTHON, str(Path(__file__).parent.parent / "edgepack" / "agent.py"), "--manifest",
            str(b / "manifest.json"), "--artifact", "model.fp32.onnx", "--eval-only", "--eval-out", str(out)]
    p = subprocess.run(argv, capture_output=True, text=True)
    answer = json.loads(p.stdout)
    assert p.returncode == 0 and "latency_ms" not in answer and answer["eval"]["outputs"] == ["logits"]
    logits = np.load(out)["o0"]
    assert logits.shape == (64, 10) and (logits.argmax(1) == np.load(b / "eval" / "subset.npz")["y"]).all()
    assert answer["runtimes"]["onnxruntime"]
