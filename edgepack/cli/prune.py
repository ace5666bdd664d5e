"""`edgepack prune`: prune a PyTorch model's channels, fine-tune by distillation, save it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from . import console, emit_json, out, reporter, stdout_to_stderr
from ..errors import EdgepackError


def register(app: typer.Typer) -> None:
    @app.command(help="Prune channels of a PyTorch model (fine-tuning by distillation) and save it "
                      "as safetensors that `edgepack.prune.load_pruned` rebuilds without pickle.")
    def prune(
        model: str = typer.Option(..., "--model", "-m", help="file.py:factory or package.module:factory"),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", help=".safetensors or a torch state dict"),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1x3x32x32"),
        ratio: Optional[float] = typer.Option(None, "--ratio", help="fraction of channels to remove, 0 < R < 1"),
        macs_target: Optional[float] = typer.Option(None, "--macs-target", help="keep this fraction of the MACs, 0 < F < 1"),
        to_latency: bool = typer.Option(False, "--to-latency", help="search the ratio meeting the target's latency_p50_ms (measured)"),
        target: Optional[str] = typer.Option(None, "--target", "-t", help="target profile: channel rounding, threads, latency budget"),
        importance: str = typer.Option("l2", "--importance", help="l1, l2, bn_scale, taylor, entropy or random"),
        global_pruning: bool = typer.Option(False, "--global", help="rank channels across layers instead of per layer"),
        ignore: list[str] = typer.Option([], "--ignore-layer", help="module name to leave unpruned (repeatable)"),
        round_to: Optional[int] = typer.Option(None, "--round-to", help="keep channel counts multiples of N [target simd_width]"),
        steps: int = typer.Option(1, "--steps", help="iterative prune/fine-tune steps"),
        train: Optional[str] = typer.Option(None, "--train", help="training data (.npz, image folder, module:function)"),
        eval_: Optional[str] = typer.Option(None, "--eval", help="evaluation data for early stopping and the report"),
        metric: Optional[str] = typer.Option(None, "--metric", help="file.py:function(outputs, labels) -> number, "
                                             "higher is better: picks the epoch kept (labelled --eval) [top-1]"),
        epochs: int = typer.Option(5, "--epochs", help="fine-tuning epochs (0: prune only)"),
        lr: float = typer.Option(0.01, "--lr", help="fine-tuning learning rate (SGD, cosine schedule)"),
        batch_size: int = typer.Option(64, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
        patience: int = typer.Option(2, "--patience", help="stop after N epochs without eval improvement"),
        max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="wall-clock bound for fine-tuning"),
        no_distill: bool = typer.Option(False, "--no-distill", help="fine-tune on labels only"),
        temperature: float = typer.Option(4.0, "--temperature", help="distillation temperature"),
        alpha: float = typer.Option(0.7, "--alpha", help="weight of the distillation loss (1 - alpha: labels)"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for fine-tuning [torch's default]"),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow unpickling a full model file"),
        out_path: Path = typer.Option(Path("pruned.safetensors"), "--out", "-o", help="pruned model file (safetensors)"),
        record_path: Optional[Path] = typer.Option(None, "--record", help="also write the pruning record as JSON"),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
        as_json: bool = typer.Option(False, "--json", help="print the pruning record as JSON"),
    ):
        # Imported when the command runs: they bring torch (seconds), and the CLI imports every
        # command module at start-up.
        from ..data import load_dataset
        from ..stages.load import load_model, parse_shape
        from ..prune import make_config, run_prune_stage, save_pruned
        from ..targets import load_profile
        cfg = make_config(ratio=ratio, macs_target=macs_target, to_latency=to_latency, importance=importance,
                          global_pruning=global_pruning, ignore_layers=ignore, round_to=round_to,
                          iterative_steps=steps, finetune=dict(
                              epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=patience,
                              max_minutes=max_minutes, distill=not no_distill, temperature=temperature,
                              alpha=alpha, threads=threads))
        if not cfg.enabled:
            raise EdgepackError("nothing to prune towards", "pass --ratio R, --macs-target F or --to-latency --target T")
        if to_latency and target is None:
            raise EdgepackError("--to-latency needs --target: the latency budget is the target's",
                                "e.g. --target x86 (budgets.latency_p50_ms in the profile)")
        shape_given = parse_shape(input_shape)
        loaded = load_model(model, weights, list(shape_given) if shape_given else None, None, trust_pickle)
        if loaded.kind != "torch":
            raise EdgepackError(f"{model} is an ONNX model; pruning needs the PyTorch model",
                                "pass file.py:factory (and --weights)")
        profile = load_profile(target or "x86")
        if target is None and round_to is None:
            cfg = cfg.model_copy(update={"round_to": 1})  # no target: no channel rounding
        shape = loaded.sample_specs()
        train_ds = load_dataset(train, shape, what="training data") if train else None
        eval_ds = load_dataset(eval_, shape, what="evaluation data") if eval_ else None
        scorer = None
        if metric:
            if eval_ds is None or eval_ds.y is None:
                raise EdgepackError("--metric scores the fine-tuning on labelled evaluation data, and there is none",
                                    "pass --eval with labels (x and y), or leave out --metric")
            from ..prune.finetune import UserMetric
            from ..quality import load_metric
            scorer = UserMetric(metric, load_metric(metric), tuple(loaded.outputs))
        progress = reporter(quiet, as_json)  # which step, groups k/N, fine-tuning epochs and batches
        # torch-pruning's MAC counter prints its warnings to stdout: keep them out of the JSON.
        with stdout_to_stderr(as_json):
            pruned, record = run_prune_stage(loaded.module, loaded.example_inputs(), cfg, profile,
                                             train_ds, eval_ds, progress, scorer)
        for warning in record.warnings:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        if record.ratio == 0.0:  # a latency goal the unpruned model already meets
            if as_json:
                emit_json({"written": None, "record_file": None, "record": record.to_dict()})
                return
            console.print(f"[yellow]{model} already meets the {profile.budgets.latency_p50_ms} ms budget of "
                          f"{profile.name}: nothing pruned, nothing written[/]", highlight=False)
            return
        save_pruned(pruned, out_path, record)
        if record_path is not None:
            record_path.write_text(json.dumps(record.to_dict(), indent=1))
        if as_json:
            emit_json({"written": str(out_path), "record_file": str(record_path) if record_path else None,
                       "record": record.to_dict()})
        elif not quiet:
            out.print(record.markdown(), highlight=False, markup=False)
            out.print(f"wrote {out_path} (load with edgepack.prune.load_pruned(factory(), path))")
