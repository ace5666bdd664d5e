"""The pruning stage inside `edgepack build`: options -> edgepack.prune -> a smaller LoadedModel."""
from __future__ import annotations

from dataclasses import replace

from ..config import BuildConfig
from ..errors import EdgepackError
from .load import LoadedModel
from ..targets import TargetProfile

# Build-level shorthands (CLI flags and [prune] keys) that belong to the fine-tuning schedule.
_FINETUNE_KEYS = {"epochs": "epochs", "distill": "distill", "lr": "lr", "temperature": "temperature",
                  "alpha": "alpha", "max_minutes": "max_minutes", "patience": "patience", "seed": "seed"}


def prune_config(options: dict):
    from ..prune import make_config
    opts = dict(options)
    opts.pop("allow_unpruned", None)
    finetune = dict(opts.pop("finetune", {}) or {})
    for key, target in _FINETUNE_KEYS.items():
        if key in opts:
            finetune[target] = opts.pop(key)
    return make_config(**opts, finetune=finetune)


def prune(loaded: LoadedModel, cfg: BuildConfig, profile: TargetProfile, data: dict, say):
    """Returns (loaded model with the pruned module, stage record, report section)."""
    from ..prune import UnprunableModel, run_prune_stage
    pcfg = prune_config(cfg.prune)
    if not pcfg.enabled:
        raise EdgepackError("pruning options were given without a goal",
                            "add --prune R (0 < R < 1) or --prune-to-latency, or ratio = R under [prune]")
    train, evals = data.get("train"), data["eval"]
    if train is None:
        say("warning: no --train data: pruning without fine-tuning, accuracy will drop")

    def progress(info: dict) -> None:
        stage = info.get("stage", "prune")
        detail = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in info.items() if k != "stage")
        say(f"  {stage}: {detail}")

    goal = "the latency budget" if pcfg.to_latency else (f"ratio {pcfg.ratio}" if pcfg.ratio else f"MACs {pcfg.macs_target}")
    say(f"pruning channels to {goal} ({pcfg.importance} importance, round to {pcfg.round_to or profile.simd_width})")
    try:
        module, record = run_prune_stage(loaded.module, loaded.example_inputs(), pcfg, profile,
                                         train=train, eval=evals, progress=progress)
    except UnprunableModel as e:
        if not cfg.prune.get("allow_unpruned"):
            raise EdgepackError(f"{e.message} (pass --allow-unpruned to build the unpruned model instead)", e.hint) from e
        say(f"warning: {e.message}; going on unpruned as allowed")
        return loaded, {"skipped": e.message}, f"## Pruning\n\nSkipped: {e.message}\n"
    if record is None:
        return loaded, {"skipped": "no pruning goal"}, ""
    say(f"pruned: MACs {record.macs_before:,} -> {record.macs_after:,} ({record.macs_reduction:.2f}x fewer)")
    return replace(loaded, module=module.eval()), record.to_dict(), record.markdown()
