"""Stage `prune`: structured channel pruning with distillation fine-tuning (edgepack.prune),
before export; the build goes on with the smaller model."""
from __future__ import annotations

from dataclasses import replace

from ..errors import EdgepackError
from ..prune import UnprunableModel, make_config, run_prune_stage
from ..prune.record import format_score
from .context import BuildContext
from .tables import require_torch, user_metric

NAME = "prune"

# Build-level shorthands (CLI flags and [prune] keys) that belong to the fine-tuning schedule.
_FINETUNE_KEYS = {"epochs": "epochs", "distill": "distill", "lr": "lr", "temperature": "temperature",
                  "alpha": "alpha", "max_minutes": "max_minutes", "patience": "patience", "seed": "seed"}


def prune_config(options: dict):
    opts = dict(options)
    opts.pop("allow_unpruned", None)
    finetune = dict(opts.pop("finetune", {}) or {})
    for key, target in _FINETUNE_KEYS.items():
        if key in opts:
            finetune[target] = opts.pop(key)
    return make_config(**opts, finetune=finetune)


def config(ctx: BuildContext):
    """The pruning options (edgepack.prune.PruneConfig); None when the build does not prune."""
    if not ctx.cfg.prune:
        return None
    if ctx.model.kind != "torch":  # asked for, not possible: refused like every compression stage
        if ctx.cfg.prune.get("allow_unpruned"):
            reason = f"channel pruning needs the PyTorch model, and {ctx.model.source or 'the input'} is an ONNX file"
            ctx.say(f"warning: {reason}; going on unpruned as allowed")
            ctx.records[NAME] = {"skipped": reason}
            ctx.sections[NAME] = f"## Pruning\n\nSkipped: {reason}\n"
            return None
        require_torch(ctx, "channel pruning needs the PyTorch model: it removes channels from its layers and "
                      "fine-tunes them", "--prune / --prune-to-latency / [prune] (or pass --allow-unpruned)")
    pcfg = prune_config(ctx.cfg.prune)
    if not pcfg.enabled:
        raise EdgepackError("pruning options were given without a goal",
                            "add --prune R (0 < R < 1) or --prune-to-latency, or ratio = R under [prune]")
    return pcfg


def run(ctx: BuildContext, pcfg) -> dict:
    """Prunes ctx.model in place (a new module) and returns the stage record."""
    loaded, say, profile = ctx.model, ctx.say, ctx.profile
    train, choose = ctx.data.train, ctx.data.choose
    if train is None:
        say("warning: no --train data: pruning without fine-tuning, accuracy will drop")
    goal = "the latency budget" if pcfg.to_latency else (f"ratio {pcfg.ratio}" if pcfg.ratio else f"MACs {pcfg.macs_target}")
    say(f"pruning channels to {goal} ({pcfg.importance} importance, round to {pcfg.round_to or profile.simd_width})")
    if pcfg.slimming is not None:
        sp = pcfg.slimming
        say(f"sparsity training first (network slimming): {sp.epochs} epoch(s), {sp.on} penalty {sp.l1:g}")
    try:
        module, record = run_prune_stage(loaded.module, loaded.example_inputs(), pcfg, profile,
                                         train=train, eval=choose, progress=ctx.progress, metric=user_metric(ctx))
    except UnprunableModel as e:
        if not ctx.cfg.prune.get("allow_unpruned"):
            raise EdgepackError(f"{e.message} (pass --allow-unpruned to build the unpruned model instead)", e.hint) from e
        say(f"warning: {e.message}; going on unpruned as allowed")
        ctx.sections[NAME] = f"## Pruning\n\nSkipped: {e.message}\n"
        return {"skipped": e.message}
    if record is None:
        return {"skipped": "no pruning goal"}
    acc = record.accuracy or {}
    tuned = (f"; {acc['metric']} {format_score(acc.get('before'), acc['metric'])} -> "
             f"{format_score(acc.get('finetuned'), acc['metric'])}") if acc.get("metric") else ""
    say(f"pruned: MACs {record.macs_before:,} -> {record.macs_after:,} ({record.macs_reduction:.2f}x fewer){tuned}")
    ctx.model = replace(loaded, module=module.eval())
    ctx.sections[NAME] = record.markdown() + slimming_markdown(record)
    return {**record.to_dict(), "early_stop_on": f"{len(choose)} choosing samples"}


def slimming_markdown(record) -> str:
    """The sparsity-training run's line (the first fine-tuning summary, when there was one)."""
    runs = [f for f in record.finetune if f.get("phase") == "sparsity training"]
    if not runs:
        return ""
    r, before, after = runs[0], runs[0].get("bn_scales_before") or {}, runs[0].get("bn_scales_after") or {}
    scales = (f"; BatchNorm scales mean |gamma| {before.get('mean_abs')} -> {after.get('mean_abs')}, "
              f"{100 * after.get('fraction_below_0.01', 0):.1f}% below 0.01" if after else "")
    return (f"\nSparsity training before pruning (network slimming): {r['penalty']} penalty {r['l1']:g}, "
            f"{r['epochs_run']} epoch(s) in {r['seconds']:.1f} s{scales}.\n")

