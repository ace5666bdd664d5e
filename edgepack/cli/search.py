"""`edgepack search` and `edgepack search show`: flags -> BuildConfig + SearchConfig -> edgepack.search."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import emit_json, out, reporter, stdout_to_stderr
from .build import _parse_budgets, _parse_shapes
from ..errors import BudgetNotMet, EdgepackError


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def trial_table(result, rows: list[dict], title: str) -> Table:
    metric = next((r["metric_name"] for r in rows if r.get("metric_name")), "metric")
    t = Table(title=title, title_justify="left")
    for h in ("trial", "state", metric, "p50 ms", "where", "size MB", "budgets", "params"):
        t.add_column(h, justify="right" if h in ("trial", metric, "p50 ms", "size MB") else "left")
    best = result.best["number"] if result.best else None
    for r in rows:
        mark = " *" if r["number"] == best else ""
        budgets = "-" if r["metric"] is None else "[green]met[/]" if r["feasible"] else \
            "[red]missed: " + ", ".join(r["violations"]) + "[/]"
        if r["state"] not in ("COMPLETE",) and r.get("reason"):
            budgets = r["reason"][:80]
        t.add_row(f"{r['number']}{mark}", r["state"], _fmt(r["metric"]), _fmt(r["latency_ms"], 3),
                  r["latency_where"] or "-", _fmt(r["size_mb"], 3), budgets,
                  ", ".join(f"{k}={_fmt(v, 3)}" for k, v in r["params"].items()))
    return t


def print_result(result, all_trials: bool) -> None:
    front = [r for r in result.trials if r["number"] in set(result.pareto)]
    out.print(trial_table(result, front, f"Pareto front of {result.study_name} ({len(front)} of "
                                         f"{len(result.trials)} trials)"))
    if all_trials:
        out.print(trial_table(result, result.trials, "every trial"))
    if result.best:
        b = result.best
        out.print(f"best build: trial {b['number']}, {b['metric_name']} {_fmt(b['metric'])}, p50 "
                  f"{_fmt(b['latency_ms'], 3)} ms on {b['latency_where']}, {_fmt(b['size_mb'], 3)} MB"
                  + (f"  -> {result.best_path}" if result.best_path else ""), highlight=False)
        if b["not_judged"]:
            out.print(f"not judged: {', '.join(b['not_judged'])} ({result.latency_note})", highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    out.print(f"trial table: {result.table_path} (and {result.markdown_path}); plot: {result.plot_path}",
              highlight=False)


def register(app: typer.Typer) -> None:
    search_app = typer.Typer(help="Search pruning, int8 and runtime settings for the best build that meets "
                                  "the budgets (Optuna; devices measure latency).")
    app.add_typer(search_app, name="search")

    @search_app.callback(invoke_without_command=True)
    def search_cmd(
        ctx: typer.Context,
        target: Optional[str] = typer.Option(None, "--target", "-t", help="target profile name or .toml path [default: x86]"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="file.py:factory, package.module:factory or model.onnx"),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", help=".safetensors or a torch state dict"),
        input_shape: list[str] = typer.Option([], "--input-shape", help="1x3x224x224, or NAME=SHAPE per input"),
        metric: Optional[str] = typer.Option(None, "--metric", help="file.py:function(outputs, labels) -> number"),
        calib: Optional[str] = typer.Option(None, "--calib", help="calibration data"),
        eval_: Optional[str] = typer.Option(None, "--eval", help="evaluation data"),
        train: Optional[str] = typer.Option(None, "--train", help="training data for fine-tuning pruned trials"),
        out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="output root [default: dist]"),
        name: Optional[str] = typer.Option(None, "--name", help="build name"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="config file with a [search] table [default: ./edgepack.toml]"),
        targets_dir: list[str] = typer.Option([], "--targets-dir", help="extra directory of target profiles"),
        budget: list[str] = typer.Option([], "--budget", help="override a budget: KEY=VALUE or KEY=off (repeatable)"),
        device: Optional[str] = typer.Option(None, "--device", help="benchmark every trial on this device"),
        devices: Optional[str] = typer.Option(None, "--devices", help="'all' (every device of the target's kind) or a,b,c: one worker per device"),
        devices_dir: list[str] = typer.Option([], "--devices-dir", help="extra device inventory directory"),
        accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help="trust an unknown SSH host key once"),
        latency_runs: Optional[int] = typer.Option(None, "--latency-runs", help="timed runs per artifact on the host [50]"),
        finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", help="fine-tuning epochs of a pruned trial"),
        choose_samples: Optional[int] = typer.Option(None, "--choose-samples", help="evaluation samples split off to choose with [256]"),
        trials: int = typer.Option(20, "--trials", "-n", help="trials in all (every worker counts toward it)"),
        study: Optional[str] = typer.Option(None, "--study", help="study name [default: NAME-TARGET]"),
        storage: Optional[str] = typer.Option(None, "--storage", help="postgresql://... or mysql://... to share the study [default: sqlite in OUT/STUDY.search/]"),
        sampler: str = typer.Option("tpe", "--sampler", help="tpe (constrained TPE), nsga2 or random"),
        seed: Optional[int] = typer.Option(None, "--seed", help="sampler seed"),
        trial_minutes: float = typer.Option(15.0, "--trial-minutes", help="time bound of one trial's pruning and fine-tuning"),
        heartbeat: int = typer.Option(20, "--heartbeat", help="seconds between a running trial's heartbeats"),
        grace: int = typer.Option(120, "--grace", help="seconds without a heartbeat before a trial is failed and retried"),
        confirm_rounds: int = typer.Option(3, "--confirm-rounds", help="benchmark the best trials again this many interleaved rounds before one is written (0: off)"),
        confirm_candidates: int = typer.Option(3, "--confirm-candidates", help="how many of the most preferred feasible trials are benchmarked again"),
        keep_trials: bool = typer.Option(False, "--keep-trials", help="keep every trial's model files, not only the Pareto front's"),
        as_json: bool = typer.Option(False, "--json", help="print the result as one JSON document on stdout"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    ):
        if ctx.invoked_subcommand is not None:
            return
        from ..config import load_config
        from ..search import SearchConfig, search
        budgets, budgets_off = _parse_budgets(budget)
        prune = {"epochs": finetune_epochs} if finetune_epochs is not None else None
        cfg = load_config(config, {
            "target": target, "model": model, "weights": weights, "input_shape": _parse_shapes(input_shape),
            "metric": metric, "calib": calib, "eval": eval_, "train": train, "out": out_dir, "name": name,
            "targets_dir": targets_dir or None, "budgets": budgets or None, "budgets_off": budgets_off or None,
            "device": device, "devices_dir": devices_dir or None, "accept_new_host_key": accept_new_host_key or None,
            "latency_runs": latency_runs, "choose_samples": choose_samples, "prune": prune,
        })
        if device and devices:
            raise EdgepackError("give --device NAME or --devices LIST, not both")
        try:
            scfg = SearchConfig(trials=trials, study=study, storage=storage, sampler=sampler, seed=seed,
                                devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else [],
                                space=cfg.search or {}, out=cfg.out, trial_minutes=trial_minutes,
                                heartbeat_s=heartbeat, grace_s=grace, keep_trials=keep_trials,
                                confirm_rounds=confirm_rounds, confirm_candidates=confirm_candidates)
        except ValueError as e:
            raise EdgepackError(f"invalid search options: {e}") from e
        with stdout_to_stderr(as_json):
            result = search(cfg, scfg, progress=reporter(quiet, as_json))
        if as_json:
            emit_json(result.to_dict())
        elif not quiet:
            print_result(result, all_trials=False)
        if result.best is None:
            raise BudgetNotMet(f"no trial of {result.study_name} met every judged budget "
                               f"(trial table: {result.markdown_path})")

    @search_app.command("show", help="The stored study: Pareto front, best build and the trial table.")
    def show_cmd(
        study: str = typer.Argument(..., help="study name (as `edgepack search` printed it)"),
        storage: Optional[str] = typer.Option(None, "--storage", help="the study's database URL [default: sqlite in OUT/STUDY.search/]"),
        out_dir: str = typer.Option("dist", "--out", "-o", help="output root the search used"),
        as_json: bool = typer.Option(False, "--json", help="print the result as one JSON document on stdout"),
    ):
        from ..search import show
        with stdout_to_stderr(as_json):
            result = show(study, storage=storage, out=out_dir)
        if as_json:
            emit_json(result.to_dict())
        else:
            print_result(result, all_trials=True)
