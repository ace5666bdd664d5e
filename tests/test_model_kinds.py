"""Models as people ship them: six kinds that are not "one float image in, class scores out".

tests/fixtures/kinds/ trains each kind on a synthetic task (cached on the source), so the figures
mean something: a detector with three heads, image + token ids, a stateful streaming VAD (ONNX,
three inputs, two outputs), a dynamic-size segmenter (ONNX opset 11), a transformer encoder with an
attention mask, and a one-column regressor. The first test checks the fixtures alone (torch and
onnxruntime, no edgepack); the others run `edgepack build` on each kind for x86 and rpi and check
the manifest's inputs/outputs, that the recorded quality figures (user metric or top-1, per-output
SQNR) are the ones the artifacts really score, and that the int8 artifacts load and run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures.kinds import make

pytestmark = pytest.mark.slow

KINDS = make.KINDS
MODULES = {name: make.load_kind(name) for name in KINDS}
EDGEPACK = Path(sys.executable).parent / "edgepack"
# edgepack runs with the profile's thread count and compares with PyTorch (its float reference);
# these runs use one thread and the fp32 ONNX file: a borderline sample may flip, dBs barely move.
METRIC_TOLERANCE, SQNR_TOLERANCE_DB = 0.005, 0.2


@pytest.fixture(scope="session")
def kinds(request, tmp_path_factory) -> dict[str, dict]:
    """The six kinds' files: trained once per source content (pytest's cache dir outlives runs)."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    root = Path(cache.mkdir("edgepack-model-kinds")) if cache is not None else tmp_path_factory.mktemp("kinds")
    return make.make_all(root)


def eval_data(info: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(info["eval"]) as f:
        data = {k: f[k] for k in f.files}
    return {i["name"]: data[i["name"]] for i in info["inputs"]}, data["y"]


def ort_run(path: Path, inputs: dict[str, np.ndarray], batch: int = 64) -> dict[str, np.ndarray]:
    """All outputs by name; one sample at a time when the graph's batch axis is fixed at 1."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if any(i.shape and i.shape[0] == 1 for i in sess.get_inputs()):
        batch = 1
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(inputs.values())))
    feeds = {i.name: inputs[i.name] for i in sess.get_inputs()}
    parts = [sess.run(None, {k: v[s:s + batch] for k, v in feeds.items()}) for s in range(0, n, batch)]
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = np.sum((ref - test) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def score(name: str, outputs: dict[str, np.ndarray], y: np.ndarray) -> float:
    """The kind's quality figure as edgepack should record it: the user metric, or top-1 percent."""
    mod = MODULES[name]
    return float(mod.metric(outputs, y)) if hasattr(mod, "metric") else 100.0 * mod.accuracy(outputs, y)


# ---------------------------------------------------------------- the fixtures alone (no edgepack)

@pytest.mark.parametrize("name", KINDS)
def test_fixture_learns_its_task(kinds, name):
    info, mod = kinds[name], MODULES[name]
    inputs, y = eval_data(info)
    assert info["fp32"]["value"] >= mod.GOOD, info["fp32"]
    assert info["eval_samples"] == len(y) >= 256
    with np.load(info["calib"]) as calib:
        assert sorted(calib.files) == sorted([i["name"] for i in info["inputs"]] + ["y"])
    for spec in info["inputs"]:
        data = inputs[spec["name"]]
        assert str(data.dtype) == spec["dtype"]
        assert len(data.shape) == len(spec["shape"])
        assert all(isinstance(w, str) or g == w for g, w in zip(data.shape[1:], spec["shape"][1:])), spec
    if info["kind"] == "onnx":  # the .onnx file alone reproduces the recorded figure
        assert [o.name for o in onnx.load(info["model"]).graph.output] == mod.OUTPUTS
        value = make.score(mod, ort_run(Path(info["model"]), inputs), y)
        assert value == pytest.approx(info["fp32"]["value"], abs=1e-6)
        assert info["checks"]["torch_fp32"] == pytest.approx(info["fp32"]["value"], abs=0.01)
    else:  # the weights file alone reproduces the recorded figure
        from safetensors.torch import load_file
        model = mod.build().eval()
        model.load_state_dict(load_file(info["weights"]))
        outs = make.torch_outputs(mod, model, inputs)
        assert list(outs) == mod.OUTPUTS
        assert make.score(mod, outs, y) == pytest.approx(info["fp32"]["value"], abs=1e-6)


def test_fixtures_need_what_they_claim(kinds):
    """Both inputs matter, the mask matters, the state matters, and H/W really are dynamic."""
    assert kinds["image_tokens"]["checks"]["accuracy_with_wrong_ids"] < 0.75
    assert kinds["textclf"]["checks"]["accuracy_if_mask_ignored"] < kinds["textclf"]["fp32"]["value"] - 0.3
    assert kinds["vad"]["checks"]["accuracy_with_state_zeroed"] < kinds["vad"]["fp32"]["value"] - 0.02
    assert kinds["segment"]["checks"]["miou_at_48x64"] >= MODULES["segment"].GOOD
    vad, seg = (onnx.load(kinds[k]["model"]) for k in ("vad", "segment"))
    assert vad.opset_import[0].version == 17 and seg.opset_import[0].version == 11
    assert [i.type.tensor_type.elem_type for i in vad.graph.input] == \
        [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    dims = seg.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


# ---------------------------------------------------------------- edgepack build, per kind and target

@pytest.fixture(scope="session")
def build_kind(kinds, tmp_path_factory):
    """build_kind(name, target) -> {"code", "path", "manifest", "stderr", "cwd_leftovers"}, one
    build per pair, each run from its own empty working directory."""
    out, builds = tmp_path_factory.mktemp("kinds-dist"), {}

    def run(name: str, target: str) -> dict:
        if (name, target) not in builds:
            info = kinds[name]
            args = [str(EDGEPACK), "build", "--target", target, "--out", str(out), "--json", "-q",
                    "--latency-runs", "5", *info["args"]]
            if info["kind"] == "onnx" and target == "rpi":
                args += ["--format", "onnx"]  # TFLite needs the PyTorch model
            cwd = tmp_path_factory.mktemp(f"cwd-{name}-{target}")  # empty: the build may write only to --out
            proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=cwd)
            record = {"code": proc.returncode, "stderr": proc.stderr[-4000:], "command": args,
                      "cwd_leftovers": sorted(p.name for p in cwd.iterdir())}
            if proc.returncode in (0, 1):
                doc = json.loads(proc.stdout)
                record.update(path=Path(doc["path"]), manifest=doc["manifest"])
            builds[name, target] = record
        return builds[name, target]
    return run


def artifact(manifest: dict, path: str) -> dict:
    found = [a for a in manifest["artifacts"] if a["path"] == path]
    assert found, f"{path} not in {[a['path'] for a in manifest['artifacts']]}"
    return found[0]


def report_rows(b: dict, info: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The evaluation rows the manifest's figures come from: edgepack keeps a seeded share of the
    eval data for choosing (fallback, early stop) and reports on the rest."""
    from edgepack.data import Dataset  # imported here: the fixture tests need no edgepack at all
    from edgepack.stages.load import SPLIT_SEED
    inputs, y = eval_data(info)
    notes = b["manifest"]["stages"]["data"]
    if notes["choose_samples"] == notes["report_samples"] == len(y):
        return inputs, y
    _, report = Dataset(inputs, y).split(notes["choose_samples"], seed=SPLIT_SEED)
    assert len(report) == notes["report_samples"]
    return dict(zip(report.names, report.arrays())), report.y


def recorded_sqnr(art: dict) -> dict[str, float]:
    """Per-output SQNR (dB) of an artifact against the float reference, by output name."""
    return {name: float(o["sqnr_db"]) for name, o in (art["metrics"].get("outputs") or {}).items()}


def check_quality(name: str, art: dict, outputs: dict[str, np.ndarray], y: np.ndarray) -> None:
    """The artifact's recorded figure is the kind's own one, and the value its outputs score."""
    metrics, mine = art["metrics"], score(name, outputs, y)
    assert metrics["samples"] == len(y), metrics
    if hasattr(MODULES[name], "metric"):  # the user's figure, not a top-1 of outputs that are not scores
        assert metrics["metric"] == pytest.approx(mine, abs=METRIC_TOLERANCE), metrics
        assert metrics.get("accuracy") is None, metrics
    else:
        assert metrics["accuracy"] == pytest.approx(mine, abs=100 * METRIC_TOLERANCE), metrics


TARGETS = ["x86", "rpi"]
CASES = [pytest.param(k, t, id=f"{k}-{t}") for t in TARGETS for k in KINDS]


@pytest.mark.parametrize("name,target", CASES)
def test_build_exits_0_or_1_and_lists_inputs_and_outputs(build_kind, kinds, name, target):
    b, info = build_kind(name, target), kinds[name]
    assert b["code"] in (0, 1), f"exit {b['code']} for {' '.join(b['command'])}\n{b['stderr']}"
    m = b["manifest"]
    assert [i["name"] for i in m["inputs"]] == [i["name"] for i in info["inputs"]]
    assert [i["dtype"] for i in m["inputs"]] == [i["dtype"] for i in info["inputs"]]
    for got, want in zip(m["inputs"], info["inputs"]):
        for g, w in zip(got["shape"][1:], want["shape"][1:]):
            assert g == w or (isinstance(w, str) and (isinstance(g, str) or g == 32)), (got, want)
        assert len(got["shape"]) == len(want["shape"])
    assert [o["name"] for o in m["outputs"]] == info["outputs"]
    paths = {a["path"] for a in m["artifacts"]}
    assert {"model.fp32.onnx", "model.int8.onnx"} <= paths
    if target == "rpi" and info["kind"] == "pytorch":
        assert {"model.fp32.tflite", "model.int8.tflite"} <= paths
    assert (b["path"] / "manifest.json").exists() and (b["path"] / "report.md").exists()


@pytest.mark.parametrize("name,target", CASES)
def test_build_writes_nothing_outside_out(build_kind, name, target):
    b = build_kind(name, target)
    assert b["code"] in (0, 1), b["stderr"]
    assert b["cwd_leftovers"] == [], "the build left temporary files in its working directory"


@pytest.mark.parametrize("name,target", CASES)
def test_int8_onnx_loads_and_scores_what_the_manifest_says(build_kind, kinds, name, target):
    b, info = build_kind(name, target), kinds[name]
    assert b["code"] in (0, 1), b["stderr"]
    inputs, y = report_rows(b, info)
    int8_path, fp32_path = b["path"] / "model.int8.onnx", b["path"] / "model.fp32.onnx"
    ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    sess = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i["name"] for i in info["inputs"]]
    assert [o.name for o in sess.get_outputs()] == info["outputs"]
    out8, out32 = ort_run(int8_path, inputs), ort_run(fp32_path, inputs)
    check_quality(name, artifact(b["manifest"], "model.int8.onnx"), out8, y)
    check_quality(name, artifact(b["manifest"], "model.fp32.onnx"), out32, y)
    assert not all(np.array_equal(out8[k], out32[k]) for k in out8)  # really quantized


@pytest.mark.parametrize("name,target", CASES)
def test_sqnr_recorded_for_every_output(build_kind, kinds, name, target):
    b, info = build_kind(name, target), kinds[name]
    assert b["code"] in (0, 1), b["stderr"]
    inputs, _ = report_rows(b, info)
    art = artifact(b["manifest"], "model.int8.onnx")
    sqnr = recorded_sqnr(art)
    assert list(sqnr) == info["outputs"], art["metrics"]
    out8, out32 = ort_run(b["path"] / "model.int8.onnx", inputs), ort_run(b["path"] / "model.fp32.onnx", inputs)
    for out in info["outputs"]:
        assert np.isfinite(sqnr[out]) and sqnr[out] > 0, (out, sqnr)
        assert sqnr[out] == pytest.approx(sqnr_db(out32[out], out8[out]), abs=SQNR_TOLERANCE_DB), out
    assert art["metrics"]["sqnr_db"] == pytest.approx(min(sqnr.values()))  # the worst output
    if "min_sqnr_db=20" in info["args"]:  # the budget judges the primary artifact's worst output
        primary = artifact(b["manifest"], b["manifest"]["primary"])
        verdict = next(v for v in b["manifest"]["verdicts"] if v["budget"] == "min_sqnr_db")
        assert verdict["limit"] == 20 and verdict["value"] == pytest.approx(min(recorded_sqnr(primary).values()))
        assert verdict["ok"] == (verdict["value"] >= 20)
        assert (b["code"] == 0) == b["manifest"]["passed"]


@pytest.mark.parametrize("name", [k for k in KINDS if not hasattr(MODULES[k], "export_onnx")])
def test_rpi_int8_tflite_runs_and_scores_what_the_manifest_says(build_kind, kinds, name):
    from edgepack import runtime
    b, info = build_kind(name, "rpi"), kinds[name]
    assert b["code"] in (0, 1), b["stderr"]
    art = artifact(b["manifest"], "model.int8.tflite")
    assert b["manifest"]["primary"] == "model.int8.tflite"
    assert [i["name"] for i in art["inputs"]] == [i["name"] for i in info["inputs"]]
    assert [o["name"] for o in art["outputs"]] == info["outputs"]
    inputs, y = report_rows(b, info)
    model = runtime.open_model(b["path"] / "model.int8.tflite", threads=1)
    outs = runtime.run_batched(model, [inputs[i["name"]] for i in info["inputs"]])
    check_quality(name, art, dict(zip(info["outputs"], outs)), y)
    assert list(recorded_sqnr(art)) == info["outputs"]
