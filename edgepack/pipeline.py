"""The `edgepack build` pipeline: the ordered list of stages, and nothing else.

Each stage (edgepack/stages/) has a typed Config and `run(ctx, config) -> record`. The build
stages write into a staging directory that is renamed into place at the end (a failed build
never replaces a good one); the device stages then work on the final directory.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import example
from .version import __version__
from .cache import StageCache
from .config import BuildConfig
from .manifest import Manifest
from .outdir import replace_dir, staging_dir, writable_dir
from .progress import as_progress
from .stages import (bench, cluster, deploy, export, factorize, fp16, judge, load, prune, quantize, tflite, validate,
                     sparsify, write)
from .stages import qat
from .stages.context import BuildContext, Progress
from .targets import TargetProfile, load_profile

BUILD_STAGES = [load, prune, factorize, cluster, sparsify, export, quantize, tflite, qat, fp16, validate, judge, write]
DEVICE_STAGES = [deploy, bench]
LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "numpy", "torch-pruning", "litert-torch",
             "ai-edge-litert")


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    sections: dict[str, Any] = field(default_factory=dict)
    device_results: list[dict] = field(default_factory=list)  # `--device`: the on-device bench
    reused: list[str] = field(default_factory=list)  # stages whose results came from the cache

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
    overrides = {**cfg.budgets.model_dump(exclude_none=True), **{k: None for k in cfg.budgets_off}}
    profile.budgets = profile.budgets.model_copy(update=overrides)
    return profile


def build(cfg: BuildConfig | None = None, progress: Progress | None = None, **overrides) -> BuildResult:
    """Build, validate and write one artifact directory. Never raises for a missed budget: check
    `result.passed` (the CLI exits 1 then). Raises EdgepackError for bad input."""
    if overrides:  # validated like a config file, so budgets={"size_mb": 5} works too
        cfg = BuildConfig.model_validate({**(cfg or BuildConfig()).model_dump(exclude_unset=True), **overrides})
    cfg = cfg or BuildConfig()
    say = as_progress(progress)  # None: silent; a plain callable(str) or a Progress (tasks, bars)
    if cfg.model is None:
        cfg = cfg.model_copy(update={"model": example.MODEL_SPEC, "weights": str(example.WEIGHTS),
                                     "calib": cfg.calib or example.CALIB_SPEC, "eval": cfg.eval or example.EVAL_SPEC,
                                     "train": cfg.train or example.TRAIN_SPEC})
        say("using the embedded default: a digits CNN with the scikit-learn digits")
    ctx = BuildContext(cfg=cfg, profile=resolve_profile(cfg), work=Path(), say=say,
                       cache=StageCache(enabled=cfg.cache), versions=versions())
    if cfg.device:
        deploy.resolve_device(ctx)  # fail before a long build
    out_root = writable_dir(Path(cfg.out))
    say(f"loading {cfg.model}")
    ctx.records[load.NAME] = load.run(ctx, load.config(ctx))
    ctx.name = cfg.name or ctx.model.name.replace("_", "-")
    final = out_root / f"{ctx.name}-{ctx.profile.name}"
    with staging_dir(final) as tmp:
        ctx.work = tmp
        run_stages(ctx, BUILD_STAGES[1:])
        replace_dir(tmp, final)
    ctx.path = final
    say(f"wrote {final}" + (f" (reused from the cache: {', '.join(ctx.reused)})" if ctx.reused else ""))
    run_stages(ctx, DEVICE_STAGES)
    return BuildResult(final, ctx.manifest, ctx.sections, ctx.device_results, ctx.reused)


def run_stages(ctx: BuildContext, stages) -> None:
    for stage in stages:
        stage_cfg = stage.config(ctx)
        if stage_cfg is not None:
            ctx.records[stage.NAME] = stage.run(ctx, stage_cfg)


def versions() -> dict[str, str]:
    out = {"edgepack": __version__, "python": platform.python_version(), "machine": platform.machine()}
    for pkg in LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
