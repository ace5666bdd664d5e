"""Stage `sparsify`: unstructured magnitude sparsity (edgepack.compress.sparsity) after
clustering, before export.

The smallest weights of each Conv/Linear layer become zeros along Zhu & Gupta's gradual
schedule while the model is fine-tuned with distillation from the model as it was; the build
goes on with it. The zeros survive export (BatchNorm folding scales a channel, 0 stays 0), so
the artifacts compress (zip, OTA) better; their raw size and dense latency do not change.
Enabled by `[compress.sparsity]` (BuildConfig.compress = {"sparsity": {...}}).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..compress.sparsity import SCHEDULES, check_target, magnitude_sparsify, sparsifiable_layers, weight_bytes
from ..prune import FinetuneConfig, evaluate
from ..prune.finetune import score_name
from ..prune.record import format_score
from .cluster import training_data
from .context import BuildContext
from .tables import require_torch, user_metric, validate_table

NAME = "sparsify"
FINETUNE_DEFAULTS = {"epochs": 2, "lr": 0.005}


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: float = Field(0.8, description="fraction of each layer's weights set to zero, in (0, 1)")
    epochs: int | None = Field(None, ge=0, description="fine-tuning epochs over which sparsity rises (default 2)")
    schedule: Literal[SCHEDULES] = "polynomial"
    skip: list[str] = Field(default_factory=list, description="layer names or fnmatch patterns left dense")
    finetune: dict = Field(default_factory=dict, description="edgepack.prune.FinetuneConfig keys")

    def finetune_config(self) -> FinetuneConfig:
        extra = {"epochs": self.epochs} if self.epochs is not None else {}
        return FinetuneConfig.model_validate({**FINETUNE_DEFAULTS, **self.finetune, **extra})


def config(ctx: BuildContext) -> Config | None:
    """The sparsity options; None unless the build's [compress] table has a `sparsity` entry."""
    if not ctx.cfg.compress or "sparsity" not in ctx.cfg.compress:
        return None
    require_torch(ctx, "magnitude sparsity needs a PyTorch model: it fine-tunes the weights", "--sparsity / [compress.sparsity]")
    cfg = validate_table(Config, ctx.cfg.compress["sparsity"], "sparsity",
                         'target = 0.8, epochs = 2, schedule = "polynomial", skip = ["fc"]', Config.finetune_config)
    check_target(cfg.target)
    sparsifiable_layers(ctx.model.module, cfg.skip)  # a skip pattern matching nothing fails before training
    return cfg


def run(ctx: BuildContext, cfg: Config) -> dict:
    """Sparsifies a copy of ctx.model's module while fine-tuning it, and makes it the build's model."""
    loaded, say = ctx.model, ctx.say
    train, choose = training_data(ctx), ctx.data.choose
    teacher = loaded.module.eval()
    student = copy.deepcopy(teacher)
    ft_cfg = cfg.finetune_config()
    if train is None or ft_cfg.epochs == 0:
        say("warning: no --train data or 0 epochs: sparsifying one-shot without fine-tuning, accuracy will drop")
    say(f"sparsifying weights: {100 * cfg.target:.0f}% zeros per layer ({cfg.schedule} schedule, "
        f"{ft_cfg.epochs} epoch(s))")

    def progress(info: dict) -> None:
        acc = info.get("eval_acc")
        say(f"  sparsity fine-tuning: epoch {info['epoch']}/{info['epochs']}, loss {info['loss']:.4g}"
            + (f", choosing top-1 {acc:.4f}" if acc is not None else ""))

    names = list(sparsifiable_layers(student, cfg.skip)[0])
    before = weight_bytes(teacher, names)
    student, rec, summary = magnitude_sparsify(student, teacher, train, cfg.target, cfg.schedule, cfg.skip,
                                               ft_cfg, progress)
    for w in summary["warnings"]:
        say(f"warning: {w}")
    ctx.model = replace(loaded, module=student.eval())
    after = weight_bytes(student, names)
    metric = user_metric(ctx)
    record = {**rec.to_dict(), "finetune": summary,
              "accuracy": {"samples": len(choose), "metric": score_name(choose, metric, "top-1"),
                           "before": evaluate(teacher, choose, ft_cfg.batch_size, metric=metric),
                           "sparsified": evaluate(student, choose, ft_cfg.batch_size, metric=metric)},
              "fp32_weights": {"raw_bytes": before["raw_bytes"], "deflate_bytes_before": before["deflate_bytes"],
                               "deflate_bytes_after": after["deflate_bytes"],
                               "measure": "deflate level 9 of the sparsified layers' fp32 weights, in order"}}
    ctx.sections[NAME] = markdown(record)
    say(f"sparsified {len(rec.layers)} layer(s): {record['sparsity']:.1%} of {rec.weights:,} weights are zero; "
        f"their fp32 weights deflate to {after['deflate_bytes']:,} bytes, from {before['deflate_bytes']:,}")
    return record


def markdown(record: dict) -> str:
    acc, est, ft = record["accuracy"], record["fp32_weights"], record["finetune"]
    pct = (lambda v: format_score(v, acc.get("metric"), "n/a"))
    lines = ["## Magnitude sparsity", "",
             f"{100 * record['sparsity']:.1f}% of the weights of {len(record['layers'])} Conv/Linear layer(s) "
             f"({record['sparsified_weights']:,} weights) are zero: target {record['target']}, "
             f"{record['schedule']} schedule over {record['steps']} step(s) ({record['mask_updates']} mask update(s)), "
             f"fine-tuned {ft['epochs_run']} epoch(s) with distillation {'on' if ft['distill'] else 'off'}.", "",
             f"| {acc.get('metric') or 'top-1'} on {acc['samples']} choosing samples | before | sparsified and fine-tuned |",
             "|---|---:|---:|",
             f"| | {pct(acc['before'])} | {pct(acc['sparsified'])} |", "",
             f"fp32 weights of these layers: {est['raw_bytes']:,} bytes raw, deflated {est['deflate_bytes_before']:,} -> "
             f"{est['deflate_bytes_after']:,} bytes ({est['deflate_bytes_before'] / max(1, est['deflate_bytes_after']):.2f}x). "
             "The artifacts' zip sizes are in the table above; dense runtimes run them as fast as before.", ""]
    if record["skipped"]:
        lines += ["Left dense: " + "; ".join(f"`{s['layer']}` ({s['reason']})" for s in record["skipped"]) + ".", ""]
    return "\n".join(lines) + "\n"
