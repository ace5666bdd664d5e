"""`edgepack build`: flags -> BuildConfig -> edgepack.build.build()."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import emit_json, out, reporter, stdout_to_stderr
from ..errors import BudgetNotMet, EdgepackError


def _parse_budgets(items: list[str]) -> tuple[dict, list[str]]:
    """`KEY=VALUE` overrides, and `KEY=off` for budgets of the profile to switch off."""
    budgets, off = {}, []
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise EdgepackError(f"--budget {item!r} must look like KEY=VALUE, e.g. latency_p50_ms=20 (or KEY=off)")
        if value.strip().lower() in ("off", "none"):
            off.append(key)
            continue
        try:
            budgets[key] = float(value)
        except ValueError:
            raise EdgepackError(f"--budget {item!r}: {value!r} is not a number (or 'off')") from None
    return budgets, off


def _parse_shapes(items: list[str]):
    """`1x3x224x224` (a single-input model) or `NAME=1x512` per input."""
    from ..stages.load import parse_shape
    if not items:
        return None
    named = [i for i in items if "=" in i]
    if not named:
        if len(items) > 1:
            raise EdgepackError("several --input-shape values need names: --input-shape NAME=1x512 for each input")
        return list(parse_shape(items[0]))
    if len(named) != len(items):
        raise EdgepackError("mix of named and unnamed --input-shape values", "name every input: NAME=SHAPE")
    return {k.strip(): list(parse_shape(v)) for k, _, v in (i.partition("=") for i in items)}


def _parse_dtypes(items: list[str]) -> dict | None:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise EdgepackError(f"--input-dtype {item!r} must look like NAME=int64")
        out[key.strip()] = value.strip()
    return out or None


def _ints(flag: str, text: str | None):
    if not text:
        return None
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise EdgepackError(f"{flag} {text!r} must be a size like 256 or 224x224") from None
    return parts[0] if len(parts) == 1 else parts


def _floats(flag: str, text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise EdgepackError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _compress_tables(lowrank_energy, lowrank_macs, lowrank_skip, lowrank_epochs, cluster: dict, fp16,
                     sparsity: dict, qat: dict) -> dict | None:
    """The [compress] tables the flags given ask for (merged over the config file's, key by key)."""
    given = {"lowrank": {"energy": lowrank_energy, "macs_target": lowrank_macs, "skip": lowrank_skip or None,
                         "epochs": lowrank_epochs},
             "cluster": cluster,
             "fp16": {} if fp16 else None, "sparsity": sparsity, "qat": qat}
    tables = {}
    for stage, opts in given.items():
        if opts is None:
            continue
        kept = {k: v for k, v in opts.items() if v is not None}
        if kept or stage == "fp16":
            tables[stage] = kept
    return tables or None


def summary_table(result) -> tuple[Table, Table]:
    from ..report import ARTIFACT_HEADER, artifact_rows, verdict_rows
    m = result.manifest
    t = Table(title=f"{m.name} for {m.target['name']}: {'PASS' if m.passed else 'FAIL'}", title_justify="left")
    for h in ARTIFACT_HEADER:
        t.add_column(h, justify="left" if h in ("artifact", "format", "precision") else "right")
    for row in artifact_rows(m, result.sections.get("peak_mb")):
        t.add_row(*row)
    v = Table(title="budgets", title_justify="left")
    for h in ("budget", "limit", "value", "verdict", "note"):
        v.add_column(h)
    for row in verdict_rows(m.verdicts):
        row[3] = {"pass": "[green]pass[/]", "FAIL": "[bold red]FAIL[/]"}.get(row[3], row[3])
        v.add_row(*row)
    return t, v


def register(app: typer.Typer) -> None:
    @app.command(help="Build a validated int8 artifact for a target (the embedded example if no --model).")
    def build(
        target: Optional[str] = typer.Option(None, "--target", "-t", help="target profile name or .toml path [default: x86]"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="file.py:factory, package.module:factory, model.onnx, or model.pt with --trust-pickle"),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", help=".safetensors or a torch state dict"),
        input_shape: list[str] = typer.Option([], "--input-shape", help="1x3x224x224, or NAME=SHAPE per input (repeatable)"),
        input_dtype: list[str] = typer.Option([], "--input-dtype", help="NAME=int64|int32|float32|float16|bool (repeatable)"),
        metric: Optional[str] = typer.Option(None, "--metric", help="file.py:function(outputs, labels) -> number, higher is better"),
        choose_samples: Optional[int] = typer.Option(None, "--choose-samples", help="evaluation samples split off to choose with [256]"),
        no_cache: bool = typer.Option(False, "--no-cache", help="rebuild every stage (do not reuse cached results)"),
        preprocess: Optional[str] = typer.Option(None, "--preprocess", help="image-folder preset: imagenet"),
        resize: Optional[str] = typer.Option(None, "--resize", help="image folders: shorter side (256) or HxW"),
        crop: Optional[str] = typer.Option(None, "--crop", help="image folders: centre crop (224 or HxW)"),
        data_layout: Optional[str] = typer.Option(None, "--data-layout", help="image folders: NCHW (default) or NHWC"),
        calib: Optional[str] = typer.Option(None, "--calib", help="calibration data: image folder, .npz, or module:function"),
        eval_: Optional[str] = typer.Option(None, "--eval", help="evaluation data (labels give accuracy; none give agreement)"),
        train: Optional[str] = typer.Option(None, "--train", help="training data for fine-tuning after pruning"),
        out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="output root [default: dist]"),
        name: Optional[str] = typer.Option(None, "--name", help="build name [default: model name]"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="config file [default: ./edgepack.toml if present]"),
        targets_dir: list[str] = typer.Option([], "--targets-dir", help="extra directory of target profiles"),
        threads: Optional[int] = typer.Option(None, "--threads", help="override the profile's thread count"),
        formats: list[str] = typer.Option([], "--format", help="override the profile's formats: onnx, tflite (repeatable)"),
        calibration_method: Optional[str] = typer.Option(None, "--calibration-method", help="MinMax, Entropy or Percentile"),
        mean: Optional[str] = typer.Option(None, "--mean", help="image normalisation mean, e.g. 0.485,0.456,0.406"),
        std: Optional[str] = typer.Option(None, "--std", help="image normalisation std, e.g. 0.229,0.224,0.225"),
        budget: list[str] = typer.Option([], "--budget", help="override a budget: KEY=VALUE (repeatable)"),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow unpickling a full model file (runs its code)"),
        no_fallback: bool = typer.Option(False, "--no-fallback", help="never leave sensitive nodes in float"),
        max_float_nodes: Optional[int] = typer.Option(None, "--max-float-nodes", help="at most this many nodes left in float by the fallback [8]"),
        debug_quant: bool = typer.Option(False, "--debug-quant", help="every node's and op's int8 SQNR (not the 10 worst) in the manifest and quant_debug.md"),
        latency_runs: Optional[int] = typer.Option(None, "--latency-runs", help="timed runs per artifact [50]"),
        prune: Optional[float] = typer.Option(None, "--prune", help="prune this fraction of channels, 0 < R < 1"),
        prune_to_latency: bool = typer.Option(False, "--prune-to-latency", help="prune until the profile's latency budget holds"),
        prune_importance: Optional[str] = typer.Option(None, "--prune-importance", help="l1, l2, bn_scale, taylor, entropy or random"),
        prune_ignore: list[str] = typer.Option([], "--prune-ignore", help="module name to leave unpruned (repeatable)"),
        finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", help="fine-tuning epochs after pruning"),
        no_distill: bool = typer.Option(False, "--no-distill", help="fine-tune on labels only, without distillation"),
        allow_unpruned: bool = typer.Option(False, "--allow-unpruned", help="go on unpruned if the model cannot be pruned"),
        prune_max_memory_mb: Optional[int] = typer.Option(None, "--prune-max-memory-mb", help="stop pruning with a clear error past this resident memory [3/4 of free]"),
        prune_max_minutes: Optional[float] = typer.Option(None, "--prune-max-minutes", help="stop pruning with a clear error after this long [30]"),
        lowrank_energy: Optional[float] = typer.Option(None, "--lowrank-energy", help="low-rank factorization: keep this fraction (0, 1] of each layer's singular-value energy"),
        lowrank_macs: Optional[float] = typer.Option(None, "--lowrank-macs", help="low-rank factorization: keep this fraction (0, 1) of the model's MACs"),
        lowrank_skip: list[str] = typer.Option([], "--lowrank-skip", help="leave this layer unfactorized (repeatable)"),
        lowrank_epochs: Optional[int] = typer.Option(None, "--lowrank-epochs", help="distillation epochs after factorizing [5]"),
        clusters: Optional[int] = typer.Option(None, "--clusters", help="weight clustering: each Conv/Linear layer's weights share K values (2-256; 16 is usual)"),
        cluster_skip: list[str] = typer.Option([], "--cluster-skip", help="leave this layer (name or fnmatch pattern) unclustered (repeatable)"),
        cluster_epochs: Optional[int] = typer.Option(None, "--cluster-epochs", help="distillation epochs after clustering [3]"),
        cluster_steps: Optional[int] = typer.Option(None, "--cluster-steps", help="cluster the layers in this many groups, least sensitive first, fine-tuning after each (1-8) [1]"),
        cluster_rate: Optional[float] = typer.Option(None, "--cluster-rate", help="entropy-constrained clustering: fewer bits per weight for more error, 0..1 [0]; each layer's rate is weighted by its output sensitivity ([compress.cluster] rate_by)"),
        slimming_l1: Optional[float] = typer.Option(None, "--slimming-l1", help="network slimming: sparsity training with this L1 penalty on BatchNorm scales before pruning"),
        slimming_epochs: Optional[int] = typer.Option(None, "--slimming-epochs", help="sparsity-training epochs before pruning"),
        slimming_on: Optional[str] = typer.Option(None, "--slimming-on", help="what the sparsity penalty shrinks: bn_scale (BatchNorm scales) or group_norm"),
        sparsity: Optional[float] = typer.Option(None, "--sparsity", help="unstructured magnitude sparsity: this fraction of Conv/Linear weights zeroed (gradual schedule, distillation)"),
        sparsity_epochs: Optional[int] = typer.Option(None, "--sparsity-epochs", help="fine-tuning epochs over which sparsity ramps up"),
        qat: bool = typer.Option(False, "--qat", help="quantization-aware training of the int8 artifacts (ONNX, and TFLite when the target makes it) even when PTQ met the budgets"),
        qat_epochs: Optional[int] = typer.Option(None, "--qat-epochs", help="QAT epochs (alone: QAT only when PTQ misses max_accuracy_drop)"),
        fp16: bool = typer.Option(False, "--fp16", help="also make model.fp16.onnx (and .tflite) on a target that does not list fp16"),
        device: Optional[str] = typer.Option(None, "--device", help="deploy to this device and benchmark there"),
        devices_dir: list[str] = typer.Option([], "--devices-dir", help="extra device inventory directory"),
        accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help="trust an unknown SSH host key once"),
        as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON on stdout"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    ):
        from ..config import load_config
        from ..pipeline import build as run_build
        # Only flags actually given: load_config merges these tables over the config file's.
        slimming = {k: v for k, v in {"l1": slimming_l1, "epochs": slimming_epochs, "on": slimming_on}.items() if v is not None}
        prune_cfg = {k: v for k, v in {
            "ratio": prune, "to_latency": prune_to_latency or None, "importance": prune_importance,
            "ignore_layers": prune_ignore or None, "epochs": finetune_epochs,
            "distill": False if no_distill else None, "allow_unpruned": allow_unpruned or None,
            "max_memory_mb": prune_max_memory_mb, "max_prune_minutes": prune_max_minutes,
            "slimming": slimming or None,
        }.items() if v is not None} or None
        compress_cfg = _compress_tables(lowrank_energy, lowrank_macs, lowrank_skip, lowrank_epochs,
                                        {"clusters": clusters, "skip": cluster_skip or None, "rate": cluster_rate,
                                         "steps": cluster_steps,
                                         "finetune": {"epochs": cluster_epochs} if cluster_epochs is not None else None},
                                        fp16,
                                        {"target": sparsity, "epochs": sparsity_epochs},
                                        {"always": qat or None, "epochs": qat_epochs})
        data_cfg = {k: v for k, v in {"mean": _floats("--mean", mean), "std": _floats("--std", std),
                                      "preprocess": preprocess, "resize": _ints("--resize", resize),
                                      "crop": _ints("--crop", crop), "layout": data_layout}.items()
                    if v is not None} or None
        budgets, budgets_off = _parse_budgets(budget)
        cfg = load_config(config, {
            "target": target, "model": model, "weights": weights,
            "input_shape": _parse_shapes(input_shape), "input_dtype": _parse_dtypes(input_dtype),
            "metric": metric, "choose_samples": choose_samples, "cache": False if no_cache else None,
            "calib": calib, "eval": eval_, "train": train, "out": out_dir, "name": name,
            "targets_dir": targets_dir or None, "threads": threads, "formats": formats or None,
            "calibration_method": calibration_method, "data": data_cfg,
            "budgets": budgets or None, "budgets_off": budgets_off or None, "trust_pickle": trust_pickle or None,
            "fallback": False if no_fallback else None, "max_float_nodes": max_float_nodes,
            "debug_quant": debug_quant or None,
            "latency_runs": latency_runs, "prune": prune_cfg, "compress": compress_cfg, "device": device,
            "devices_dir": devices_dir or None, "accept_new_host_key": accept_new_host_key or None,
        })
        # Libraries print on stdout (torch-pruning's MAC counter, ONNX export notes): not into the JSON.
        with stdout_to_stderr(as_json):
            result = run_build(cfg, progress=reporter(quiet, as_json))
        if as_json:
            emit_json({"path": str(result.path), "manifest": result.manifest.model_dump(mode="json")})
        elif not quiet:
            for t in summary_table(result):
                out.print(t)
            if result.device_results:
                from ..devices.summary import fleet_table
                rs = result.device_results
                out.print(fleet_table({"results": rs, "ok": len(rs), "failed": 0,
                                       "wall_s": sum(r.get("agent_wall_s", 0) for r in rs)}))
            out.print(f"build directory: {result.path}  (report: {result.path / 'report.md'})")
        if not result.passed:
            failed = [v.budget for v in result.manifest.verdicts if v.ok is False]
            failed += [f"{r['device']}: {v['budget']}" for r in result.device_results
                       for v in r.get("verdicts", []) if v["ok"] is False]
            raise BudgetNotMet(f"budget not met: {', '.join(failed)} (report written to {result.path / 'report.md'})")
