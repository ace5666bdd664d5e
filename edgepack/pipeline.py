"""The `edgepack build` pipeline: load -> (prune) -> export -> int8 -> (TFLite) -> validate -> write, atomically.

Each stage lives in its own module; this file only sequences them, records what they did and
writes the build directory (temporary path, then rename: a failed build never replaces a good one).
"""
from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import __version__, example
from .config import BuildConfig
from .data import Dataset, Preprocess, load_dataset
from .errors import EdgepackError
from .onnx_tools.export import check_parity, to_onnx, torch_predict
from .stages.load import LoadedModel, load_model
from .manifest import (MANIFEST, Artifact, ArtifactMetrics, Manifest, TensorSpec, sha256_file,
                       write_json_atomic)
from .outdir import replace_dir, staging_dir, writable_dir
from .onnx_tools.quantize import check_calibration_data, node_sensitivity, preprocess, quantize_onnx
from .report import write_report
from .targets import TargetProfile, load_profile
from .stages.validate import (judge, latency_record, measure_in_subprocess, predict, quality)
from . import runtime

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    sections: dict[str, Any] = field(default_factory=dict)
    device_results: list[dict] = field(default_factory=list)  # `--device`: the on-device bench

    @property
    def passed(self) -> bool:
        return self.manifest.passed and all(r.get("passed", False) for r in self.device_results)


def resolve_profile(cfg: BuildConfig) -> TargetProfile:
    """The target profile with the config's overrides applied."""
    profile = load_profile(cfg.target, [Path(d) for d in cfg.targets_dir]).model_copy(deep=True)
    if cfg.threads:
        profile.threads = cfg.threads
    if cfg.formats:
        profile.formats = list(cfg.formats)
    if cfg.calibration_method:
        profile.quantization.calibration_method = cfg.calibration_method
    overrides = cfg.budgets.model_dump(exclude_none=True)
    profile.budgets = profile.budgets.model_copy(update=overrides)
    return profile


def build(cfg: BuildConfig | None = None, progress: Progress | None = None, **overrides) -> BuildResult:
    """Build, validate and write one artifact directory. Never raises for a missed budget: check
    `result.passed` (the CLI exits 1 then). Raises EdgepackError for bad input."""
    if overrides:  # validated like a config file, so budgets={"size_mb": 5} works too
        cfg = BuildConfig.model_validate({**(cfg or BuildConfig()).model_dump(exclude_unset=True), **overrides})
    cfg = cfg or BuildConfig()
    say = progress or (lambda msg: None)
    profile = resolve_profile(cfg)
    device = _resolve_device(cfg, profile) if cfg.device else None  # fail before a long build
    out_root = writable_dir(Path(cfg.out))
    if cfg.model is None:
        cfg = cfg.model_copy(update={"model": example.MODEL_SPEC, "weights": str(example.WEIGHTS),
                                     "calib": cfg.calib or example.CALIB_SPEC,
                                     "eval": cfg.eval or example.EVAL_SPEC,
                                     "train": cfg.train or example.TRAIN_SPEC})
        say("using the embedded default: a digits CNN with the scikit-learn digits")

    say(f"loading {cfg.model}")
    pre = Preprocess(cfg.data.mean, cfg.data.std)
    if not cfg.calib:
        raise EdgepackError("int8 calibration needs representative data: none was given",
                            "pass --calib DIR|file.npz|module:function (a few hundred samples is plenty)")
    raw_calib = None
    if cfg.input_shape is None and not Path(cfg.calib).is_dir():
        raw_calib = load_dataset(cfg.calib, None, pre, "calibration data")  # its shape may be the model's
    loaded = load_model(cfg.model, cfg.weights, cfg.input_shape, cfg.trust_pickle,
                        data_shape=(1, *raw_calib.x.shape[1:]) if raw_calib is not None else None)
    data = _load_data(cfg, loaded, pre, raw_calib)
    name = cfg.name or loaded.name.replace("_", "-")
    final = out_root / f"{name}-{profile.name}"
    with staging_dir(final) as tmp:
        result = _build_into(tmp, cfg, profile, loaded, data, name, say, _judged_on(device))
        replace_dir(tmp, final)
    result.path = final
    say(f"wrote {final}")
    if cfg.device:
        from .stages.deploy import deploy_and_bench
        deploy_and_bench(result, device, cfg, data["eval"], say)
    return result


def _build_into(tmp: Path, cfg: BuildConfig, profile: TargetProfile, loaded: LoadedModel,
                data: dict[str, Dataset], name: str, say: Progress,
                judged_elsewhere: str | None = None) -> BuildResult:
    sections: dict[str, Any] = {}
    calib, evals = data["calib"], data["eval"]
    stages: dict[str, Any] = {}
    if loaded.kind == "torch" and cfg.prune:
        from .stages.prune import prune
        loaded, stages["prune"], sections["prune"] = prune(loaded, cfg, profile, data, say)

    fp32 = tmp / "model.fp32.onnx"
    ref = None
    if loaded.kind == "torch":
        say("exporting to ONNX and simplifying")
        t0 = time.perf_counter()
        to_onnx(loaded.module, loaded.example_inputs(), fp32)
        ref = torch_predict(loaded.module, evals.x)
        parity = check_parity(ref, predict(runtime.open_model(fp32, profile.threads), evals))
        stages["export"] = {"seconds": round(time.perf_counter() - t0, 2), "parity": parity,
                            "nodes": len(onnx.load(str(fp32)).graph.node)}
        say(f"ONNX parity with PyTorch: max abs diff {parity['max_abs_diff']:.2g}, cosine {parity['cosine']:.6f}")
    else:
        shutil.copyfile(loaded.onnx_path, fp32)
        stages["export"] = {"skipped": "input is already ONNX"}
    fp32_out = predict(runtime.open_model(fp32, profile.threads), evals)

    int8 = tmp / "model.int8.onnx"
    q = profile.quantization
    say(f"quantizing to int8 ({q.activation_type} activations, {q.weight_type} weights, "
        f"{q.calibration_method} calibration on {min(len(calib), q.calibration_samples)} samples)")
    pre = preprocess(fp32, tmp / ".pre.onnx")
    stages["quantize"] = quantize_onnx(fp32, int8, calib, q, profile.threads, preprocessed=pre)
    int8_out = predict(runtime.open_model(int8, profile.threads), evals)
    drop = _drop(fp32_out, int8_out, evals)
    say(f"int8 {'accuracy' if evals.labelled else 'agreement'} drop: {drop:.2f} points")
    budget = profile.budgets.max_accuracy_drop
    if cfg.fallback and budget is not None and drop > budget:
        int8_out, drop, stages["fallback"] = _fallback(fp32, pre, int8, calib, evals, fp32_out,
                                                       profile, cfg.max_float_nodes, drop, say)
    (tmp / ".pre.onnx").unlink(missing_ok=True)

    artifacts = [_artifact(tmp, fp32, "onnx", "fp32", quality(fp32_out, evals, None)),
                 _artifact(tmp, int8, "onnx", "int8", quality(int8_out, evals, fp32_out))]
    if "tflite" in profile.formats:
        from .stages.tflite import build_tflite
        tfl_artifacts, stages["tflite"], sections["tflite"] = build_tflite(
            tmp, loaded, profile, calib, evals, ref if loaded.kind == "torch" else None, say)
        artifacts += tfl_artifacts

    say(f"measuring latency and memory ({profile.threads} thread(s), {cfg.latency_runs} runs)")
    for a in artifacts:
        measured = measure_in_subprocess(tmp / a.path, profile.threads, cfg.latency_runs)
        a.metrics.latency_ms = latency_record(measured)
        a.notes.append(f"peak memory {measured['peak_rss_mb']:.1f} MB, load {measured['load_ms']:.0f} ms")
        sections.setdefault("peak_mb", {})[a.path] = measured["peak_rss_mb"]

    primary = _primary(artifacts, profile)
    fp32_ref = next(a for a in artifacts if a.format == primary.format and a.precision == "fp32")
    verdicts = judge(profile.budgets, profile.arch, primary.path, primary.metrics.size_mb,
                     primary.metrics.latency_ms, sections["peak_mb"][primary.path],
                     _metric_drop(fp32_ref.metrics, primary.metrics), judged_elsewhere=judged_elsewhere)
    manifest = Manifest(
        edgepack_version=__version__, name=name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target=profile.model_dump(mode="json"), inputs=artifacts[0].inputs, outputs=artifacts[0].outputs,
        artifacts=artifacts, primary=primary.path, verdicts=verdicts,
        passed=all(v.ok is not False for v in verdicts), stages=stages, versions=_versions(),
        config_hash=cfg.fingerprint(), data_hash=f"{calib.fingerprint()}-{evals.fingerprint()}")
    manifest.stages["data"] = {"calibration": calib.source, "calibration_samples": len(calib),
                               "evaluation": evals.source, "evaluation_samples": len(evals),
                               "labelled": evals.labelled, "eval_is_calibration": data["eval_is_calib"]}
    write_json_atomic(tmp / MANIFEST, manifest)
    write_report(tmp, manifest, sections)
    return BuildResult(tmp, manifest, sections)


def _fallback(fp32: Path, pre: Path, int8: Path, calib: Dataset, evals: Dataset, fp32_out,
              profile: TargetProfile, max_nodes: int, drop: float, say: Progress):
    """Leave the most sensitive nodes in float, 1, 2, 4... of them, until the drop fits."""
    budget = profile.budgets.max_accuracy_drop
    say(f"drop {drop:.2f} > budget {budget}: ranking nodes by int8 sensitivity")
    ranking = node_sensitivity(pre, int8, calib)
    record = {"initial_drop": round(drop, 3), "ranking": ranking[:15], "tried": [],
              "applies_to": "the ONNX int8 artifact"}
    best = (drop, None)
    cap = min(max_nodes, len(ranking))
    for k in sorted({min(2 ** i, cap) for i in range(cap.bit_length() + 1)} - {0}):  # 1, 2, 4, ..., cap
        excluded = [r["node"] for r in ranking[:k]]
        cand = int8.with_name(".fallback.int8.onnx")
        quantize_onnx(fp32, cand, calib, profile.quantization, profile.threads, excluded, preprocessed=pre)
        out = predict(runtime.open_model(cand, profile.threads), evals)
        d = _drop(fp32_out, out, evals)
        record["tried"].append({"float_nodes": k, "drop": round(d, 3)})
        say(f"  {k} node(s) in float: drop {d:.2f}")
        if d < best[0]:
            cand.replace(int8)
            best = (d, excluded)
            int8_out = out
        if d <= budget:
            break
    record["float_nodes"] = best[1] or []
    record["final_drop"] = round(best[0], 3)
    record["met_budget"] = best[0] <= budget
    int8.with_name(".fallback.int8.onnx").unlink(missing_ok=True)
    if best[1] is None:
        int8_out = predict(runtime.open_model(int8, profile.threads), evals)
    return int8_out, best[0], record


def _drop(ref_out: np.ndarray, out: np.ndarray, evals: Dataset) -> float:
    """Points lost against labels, or disagreement with the float model when unlabelled."""
    if evals.labelled:
        r = ref_out.reshape(len(ref_out), -1).argmax(1) == evals.y
        o = out.reshape(len(out), -1).argmax(1) == evals.y
        return float((r.mean() - o.mean()) * 100)
    return float(100 - (ref_out.reshape(len(ref_out), -1).argmax(1) == out.reshape(len(out), -1).argmax(1)).mean() * 100)


def _metric_drop(ref: ArtifactMetrics, m: ArtifactMetrics) -> float | None:
    if ref.accuracy is not None and m.accuracy is not None:
        return round(ref.accuracy - m.accuracy, 3)
    return None if m.agreement is None else round(100 - m.agreement, 3)


def _artifact(root: Path, path: Path, fmt: str, precision: str, q: dict, layout: str = "NCHW",
              specs: tuple[list, list] | None = None) -> Artifact:
    ins, outs = specs or _onnx_specs(path, layout)
    size = path.stat().st_size
    metrics = ArtifactMetrics(accuracy=q.get("accuracy"), agreement=q.get("agreement"),
                              max_abs_diff=q.get("max_abs_diff"), cosine=q.get("cosine"),
                              size_mb=round(size / 1e6, 4))
    return Artifact(path=path.relative_to(root).as_posix(), format=fmt, precision=precision,
                    sha256=sha256_file(path), size_bytes=size, layout=layout, inputs=ins,
                    outputs=outs, metrics=metrics)


def _onnx_specs(path: Path, layout: str):
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def spec(v, lay):
        dims = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return TensorSpec(name=v.name, shape=dims, dtype=dtype, layout=lay if len(dims) == 4 else None)
    return ([spec(v, layout) for v in g.input if v.name not in inits], [spec(v, None) for v in g.output])


def _primary(artifacts: list[Artifact], profile: TargetProfile) -> Artifact:
    fmt = profile.primary_format
    for a in artifacts:
        if a.format == fmt and a.precision == "int8":
            return a
    return next(a for a in artifacts if a.precision == "int8")


def _load_data(cfg: BuildConfig, loaded: LoadedModel, pre: Preprocess, raw_calib: Dataset | None) -> dict:
    if raw_calib is not None:
        from .data import conform
        calib = conform(raw_calib, loaded.sample_shape, "calibration data")
    else:
        calib = load_dataset(cfg.calib, loaded.sample_shape, pre, "calibration data")
    check_calibration_data(calib)
    evals = load_dataset(cfg.eval, loaded.sample_shape, pre, "evaluation data") if cfg.eval else calib
    if not np.isfinite(evals.x).all():
        raise EdgepackError(f"evaluation data {evals.source} has NaN/Inf values", "clean or drop those samples")
    train = None
    if cfg.train and cfg.prune:
        train = load_dataset(cfg.train, loaded.sample_shape, pre, "training data")
    return {"calib": calib, "eval": evals, "train": train, "eval_is_calib": not cfg.eval}


def _judged_on(device) -> str | None:
    if device is None:
        return None
    if device.emulated:
        return f"{device.name} is emulated, so only a real device can judge speed and memory"
    return f"judged on device {device.name} (see the device results)"


def _resolve_device(cfg: BuildConfig, profile: TargetProfile):
    from .devices import get_device
    device = get_device(cfg.device, cfg.devices_dir or None, cfg.targets_dir or None)
    arch = device.profile().arch
    if arch != profile.arch:
        raise EdgepackError(f"device {device.name} is {arch} (target {device.target!r}) but this build is for "
                            f"{profile.name!r} ({profile.arch})",
                            f"build with --target {device.target}, or pick a device of the {profile.name} kind")
    return device


def _versions() -> dict[str, str]:
    out = {"edgepack": __version__, "python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "numpy", "torch-pruning",
                "litert-torch", "ai-edge-litert"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
