"""The compression stages' refusals and network slimming on the model kinds (see
tests/test_compress_model_kinds.py): a method that cannot handle an input (an ONNX file, a layer
name the model does not have, a target out of reach) stops the build with an EdgepackError naming
it and what to do, exit 2 from the CLI, no traceback; slimming before pruning on models other than
image classifiers."""
from __future__ import annotations

import json
import subprocess
import textwrap

import onnxruntime as ort
import pytest

import edgepack
from edgepack.errors import EdgepackError
from fixtures.compress_kinds import (CLI_FLAGS, EDGEPACK, FP16_ATOL, FP32_ATOL, METHODS, REFUSED, artifact,
                                     assert_close, check_onnx_artifacts, cli_build, make_files, ort_run, run_build)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict]:
    return make_files(tmp_path_factory.mktemp("compress-kinds"))



# ---------------------------------------------------------------- network slimming

@pytest.mark.parametrize("kind,on", [("detector", "bn_scale"), ("image_tokens", "group_norm"),
                                     ("regress", "group_norm")])
def test_slimming_then_pruning(files, tmp_path, kind, on):
    """Sparsity training, then pruning by the matching importance: the detector's BatchNorm scales
    (its three heads reshaped to anchors once took 350 s in torch-pruning), and a group lasso on
    models without BatchNorm (image + tokens once crashed in GroupNormPruner.regularize)."""
    importance = "bn_scale" if on == "bn_scale" else "l2"
    opts = {"prune": {"ratio": 0.3, "importance": importance, "slimming": {"l1": 1e-4, "epochs": 1, "on": on},
                      "finetune": {"epochs": 1}}}
    b = run_build(files, kind, opts, tmp_path)
    rec = b["manifest"]["stages"]["prune"]
    slim = rec["finetune"][0]
    assert slim["phase"] == "sparsity training" and slim["penalty"] == on and slim["epochs_run"] == 1, slim
    assert rec["macs_after"] < rec["macs_before"] and rec["importance"] == importance
    if on == "bn_scale":
        assert slim["bn_scales_before"]["count"] > 0 and slim["bn_scales_after"]["mean_abs"] > 0
    check_onnx_artifacts(b, files)


def test_bn_scale_slimming_without_batchnorm_says_why(files, tmp_path):
    opts = {"prune": {"ratio": 0.3, "importance": "bn_scale", "slimming": {"l1": 1e-4, "epochs": 1}}}
    with pytest.raises(EdgepackError) as e:
        run_build(files, "regress", opts, tmp_path)
    assert "BatchNorm" in e.value.message and "Regressor" in e.value.message, e.value.message
    assert "group_norm" in (e.value.hint or "") and "l2" in (e.value.hint or ""), e.value.hint


# ---------------------------------------------------------------- what a method cannot handle


@pytest.mark.parametrize("method", list(REFUSED))
def test_an_onnx_input_is_refused_by_the_methods_that_train(files, tmp_path, method):
    """The stateful VAD as ONNX (three inputs, two outputs): exit 2 naming the file and what to do."""
    code, _, err = cli_build(files, "vad_onnx", tmp_path, *CLI_FLAGS[method])
    assert code == 2, err
    assert "Traceback" not in err and str(files["vad_onnx"]["path"]) in err and "PyTorch" in err, err
    assert "--model file.py:factory" in err, err
    with pytest.raises(EdgepackError) as e:
        run_build(files, "vad_onnx", METHODS[method], tmp_path / "api")
    assert str(files["vad_onnx"]["path"]) in e.value.message and REFUSED[method] in e.value.hint
    assert not list(tmp_path.glob("*/manifest.json")), "a refused build writes nothing"


def test_the_cli_prints_the_table_to_drop(files, tmp_path):
    code, _, err = cli_build(files, "vad_onnx", tmp_path, *CLI_FLAGS["sparsity"])
    assert code == 2 and "[compress.sparsity]" in err, err


def test_pruning_an_onnx_input_is_refused(files, tmp_path):
    code, _, err = cli_build(files, "vad_onnx", tmp_path, "--json", *CLI_FLAGS["entropy"])
    assert code == 2 and str(files["vad_onnx"]["path"]) in err and "Traceback" not in err, err
    assert "--prune" in err, err


def test_fp16_of_a_stateful_onnx_input(files, tmp_path):
    """fp16 needs no PyTorch: the VAD's ONNX file (float chunk/state, int64 sr) gets an fp16 twin that
    takes the same feeds and agrees with the fp32 file and the user's file."""
    b = run_build(files, "vad_onnx", METHODS["fp16"], tmp_path)
    info = files["vad_onnx"]
    sess = ort.InferenceSession(str(b["path"] / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("chunk", "tensor(float)"), ("state", "tensor(float)"),
                                                             ("sr", "tensor(int64)")]
    want = ort_run(info["path"], info["inputs"])
    assert_close(ort_run(b["path"] / "model.fp32.onnx", info["inputs"]), want, FP32_ATOL, b["outputs"], "fp32")
    assert_close(ort_run(b["path"] / "model.fp16.onnx", info["inputs"]), want, FP16_ATOL, b["outputs"], "fp16")
    assert list(artifact(b, "model.fp16.onnx")["metrics"]["outputs"]) == ["prob", "new_state"]


@pytest.mark.parametrize("flags,message", [
    (["--lowrank-energy", "0.5", "--lowrank-skip", "mlp.9"], "skip names 'mlp.9'"),
    (["--lowrank-macs", "0.02"], "macs_target 0.02 is out of reach"),
    (["--sparsity", "1.5"], "strictly between 0 and 1"),
    (["--clusters", "1"], "clusters"),
    (["--clusters", "8", "--cluster-skip", "mlp.9"], "mlp.9"),
    (["--prune", "0.3", "--prune-importance", "entropy", "--prune-ignore", "mlp.9"], "mlp.9"),
], ids=["lowrank-skip", "lowrank-out-of-reach", "sparsity-target", "cluster-k", "cluster-skip", "prune-ignore"])
def test_what_a_method_cannot_do_is_exit_2_naming_it(files, tmp_path, flags, message):
    code, _, err = cli_build(files, "regress", tmp_path, *flags)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "hint:" in err, err
    if "skip" in flags[-2] or "ignore" in flags[-2]:  # the hint lists the layers there are
        assert "mlp.0" in err, err
    assert not list(tmp_path.iterdir()) or not list(tmp_path.glob("*/manifest.json"))


def test_skipping_every_layer_is_an_error_naming_them(files, tmp_path):
    for opts, message in (({"sparsity": {"target": 0.5, "skip": ["*"]}}, "no layer can be sparsified"),
                          ({"lowrank": {"energy": 0.5, "skip": ["mlp"]}}, None)):
        if message is None:  # low-rank with nothing left to factorize: a warning and the unfactorized model
            b = run_build(files, "regress", {"compress": opts}, tmp_path / "lowrank")
            rec = b["manifest"]["stages"]["factorize"]
            assert not rec["layers"] and rec["warnings"] and {s["name"] for s in rec["skipped"]} == {"mlp.0", "mlp.2", "mlp.4"}
            check_onnx_artifacts(b, files)
            continue
        with pytest.raises(EdgepackError, match=message) as e:
            run_build(files, "regress", {"compress": opts}, tmp_path / "sparsity")
        assert all(n in e.value.message for n in ("mlp.0", "mlp.2", "mlp.4"))


def test_one_cli_subprocess_exits_2_without_a_traceback(files, tmp_path):
    """The contract end to end, in a fresh process as a user runs it (not the in-process CLI)."""
    a = files["vad_onnx"]["args"]
    proc = subprocess.run([str(EDGEPACK), "build", "--target", "x86", "--out", str(tmp_path), "-q", "--model",
                           a["model"], "--calib", a["calib"], "--lowrank-macs", "0.5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "low-rank factorization needs the PyTorch model" in proc.stderr
    assert a["model"] in proc.stderr



PRICE_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Price(nn.Module):
        """A regressor in raw units (prices, Pa, Hz): outputs and a constant beyond fp16's 65504."""
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))

        def forward(self, features):
            return torch.relu(self.mlp(features)) * 1e5 + 2e5

    def build():
        return Price()
''')


def test_fp16_keeps_what_is_beyond_its_range_in_float32(tmp_path):
    """Out of fp16's range, the converter alone clamps `+ 2e5` to 65504 and the outputs to inf: the
    nodes that read or write such tensors stay float32, are named in the record, and the fp16 file
    agrees with PyTorch."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    (tmp_path / "price.py").write_text(PRICE_MODEL)
    ns: dict = {}
    exec(PRICE_MODEL, ns)
    torch.manual_seed(0)
    model = ns["build"]().eval()
    save_file(model.state_dict(), str(tmp_path / "price.safetensors"))
    x = np.random.default_rng(0).random((48, 10)).astype(np.float32)
    np.savez(tmp_path / "data.npz", features=x)
    result = edgepack.build(model=f"{tmp_path / 'price.py'}:build", weights=str(tmp_path / "price.safetensors"),
                            calib=str(tmp_path / "data.npz"), eval=str(tmp_path / "data.npz"), out=str(tmp_path / "o"),
                            latency_runs=5, fallback=False, cache=False, compress={"fp16": {}})
    rec = json.loads((result.path / "manifest.json").read_text())["stages"]["fp16"]["onnx"]
    kept = {n["op"] for n in rec["float32_nodes"]}
    assert {"Mul", "Add"} <= kept and all("beyond fp16" in n["reason"] or "within 2x" in n["reason"]
                                            for n in rec["float32_nodes"]), rec["float32_nodes"]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert float(np.abs(want).max()) > 2e5
    got = ort_run(result.path / "model.fp16.onnx", {"features": x})
    assert_close(got, [want], FP16_ATOL, ["output"], "model.fp16.onnx")
    assert "|x| up to" in (result.path / "report.md").read_text()


def test_cluster_rate_and_steps_from_the_cli(files, tmp_path):
    """--cluster-rate and --cluster-steps reach the stage: the regressor clustered in two groups,
    each layer's rate weighted by its sensitivity."""
    import json
    code, _, err = cli_build(files, "regress", tmp_path / "b", "--clusters", "8", "--cluster-rate", "0.05",
                             "--cluster-steps", "2", "--cluster-epochs", "1")
    assert code == 0, err
    (manifest,) = (tmp_path / "b").glob("*/manifest.json")  # the build directory is named after model and target
    rec = json.loads(manifest.read_text())["stages"]["cluster"]
    assert rec["rate"] == 0.05 and rec["rate_by"] == "sensitivity" and len(rec["steps"]) == 2, rec
    assert rec["finetune"]["epochs_run"] == 1
