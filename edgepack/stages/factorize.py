"""Stage `factorize`: low-rank factorization (edgepack.compress.lowrank) after pruning, then
distillation fine-tuning from the model as it came in; the build goes on with the smaller model.

On when the config has a [compress.lowrank] table (BuildConfig.compress = {"lowrank": {...}}).
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..compress.lowrank import check_options, factorize, factorize_rounded
from ..data import Preprocess, load_dataset
from ..errors import EdgepackError
from ..prune.config import FinetuneConfig
from ..prune.finetune import evaluate, finetune, score_name
from ..prune.record import format_score
from .context import BuildContext
from .tables import require_torch, user_metric

NAME = "factorize"
MAX_ROWS = 24  # per-layer rows in report.md; manifest.json has them all
# Shorthands at the table's top level that belong to the fine-tuning schedule (as [prune] has).
_FINETUNE_KEYS = ("epochs", "distill", "lr", "temperature", "alpha", "max_minutes", "patience", "seed")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    energy: float | None = Field(None, description="fraction of each layer's singular-value energy kept, (0, 1]")
    macs_target: float | None = Field(None, description="fraction of the model's MACs kept, (0, 1)")
    allocation: Literal["energy_per_mac", "global_energy"] = "energy_per_mac"
    form: Literal["auto", "channel", "spatial"] = "auto"
    min_rank: int = Field(1, ge=1)
    rank_multiple: int | None = Field(None, ge=1, description="ranks are multiples of this; default: the "
                                      "target's simd_width, halved while a macs_target is out of reach")
    skip: list[str] = []
    finetune: FinetuneConfig = FinetuneConfig()


def make_config(options: dict, simd_width: int) -> Config:
    opts = dict(options)
    finetune_opts = dict(opts.pop("finetune", {}) or {})
    for key in _FINETUNE_KEYS:
        if key in opts:
            finetune_opts[key] = opts.pop(key)
    try:
        cfg = Config.model_validate({**opts, "finetune": finetune_opts})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "lowrank"
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc}: {msg}")
        raise EdgepackError("invalid [compress.lowrank] options:\n" + "\n".join(lines),
                            "keys: energy | macs_target, allocation, form, min_rank, rank_multiple, skip, "
                            "epochs, distill, max_minutes, [compress.lowrank.finetune]") from e
    try:
        check_options(cfg.energy, cfg.macs_target, cfg.min_rank, cfg.rank_multiple or simd_width, cfg.allocation,
                      None, cfg.form)
    except EdgepackError as e:
        raise EdgepackError(f"[compress.lowrank] {e.message.removeprefix('low-rank: ')}", e.hint) from e
    return cfg


def config(ctx: BuildContext) -> Config | None:
    options = (ctx.cfg.compress or {}).get("lowrank")
    if options is None:
        return None
    require_torch(ctx, "low-rank factorization needs the PyTorch model: it rewrites and fine-tunes the layers",
                  "--lowrank-energy / --lowrank-macs / [compress.lowrank]")
    return make_config(options, ctx.profile.simd_width)


def run(ctx: BuildContext, cfg: Config) -> dict:
    loaded, say = ctx.model, ctx.say
    train, choose = _train_data(ctx), ctx.data.choose
    goal = f"energy {cfg.energy}" if cfg.energy is not None else f"MACs target {cfg.macs_target} ({cfg.allocation})"
    multiple = cfg.rank_multiple or ctx.profile.simd_width
    say(f"factorizing by truncated SVD to {goal}, ranks in multiples of {multiple}")
    start = time.monotonic()
    teacher = copy.deepcopy(loaded.module).eval()
    options = dict(energy=cfg.energy, macs_target=cfg.macs_target, min_rank=cfg.min_rank, skip=cfg.skip,
                   allocation=cfg.allocation, form=cfg.form)
    if cfg.rank_multiple is None:  # the target's SIMD width, or the largest power-of-two fraction of it that fits
        module, record = factorize_rounded(loaded.module, loaded.example_inputs(), multiple, **options)
    else:
        module, record = factorize(loaded.module, loaded.example_inputs(), rank_multiple=multiple, **options)
    record["warnings"] = []
    if not record["layers"]:
        record["warnings"].append("no layer was factorized (every candidate was skipped: see `skipped`)")
        say("warning: low-rank factorized no layer")
    ft, metric = cfg.finetune, user_metric(ctx)
    accuracy = {"metric": score_name(choose, metric, "top-1 agreement with the unfactorized model"),
                "before": evaluate(teacher, choose, ft.batch_size, teacher, metric),
                "factorized": evaluate(module, choose, ft.batch_size, teacher, metric)}
    summary = None
    if record["layers"]:
        if train is None:
            say("warning: no --train data: factorizing without fine-tuning, accuracy will drop")
        summary = finetune(module, teacher, train, choose, ft,
                           lambda info: say(f"  fine-tune: epoch {info['epoch']}/{info['epochs']}, loss "
                                            f"{info['loss']:.4g}, eval {format_score(info['eval_acc'], accuracy['metric'])}"),
                           metric=metric)
        record["warnings"] += [w.replace("the model is pruned only", "the model is factorized only")
                               for w in summary.pop("warnings")]
    accuracy["finetuned"] = evaluate(module, choose, ft.batch_size, teacher, metric)
    accuracy["seconds"] = round(time.monotonic() - start, 2)
    record.update(finetune=summary, finetune_config=ft.model_dump(), accuracy=accuracy,
                  early_stop_on=f"{len(choose)} choosing samples")
    say(f"factorized {len(record['layers'])} layer(s): MACs {record['macs_before']:,} -> {record['macs_after']:,} "
        f"({record['macs_reduction']:.2f}x fewer), params {record['params_reduction']:.2f}x fewer")
    ctx.model = replace(loaded, module=module.eval())
    ctx.sections[NAME] = markdown(record)
    return record


def _train_data(ctx: BuildContext):
    """The training data. The load stage reads --train only when pruning; read it here otherwise
    (and share it with the stages after this one)."""
    if ctx.data.train is None and ctx.cfg.train:
        pre = Preprocess(**ctx.cfg.data.preprocess_fields())
        ctx.data.train = load_dataset(ctx.cfg.train, ctx.model.sample_specs(), pre, "training data")
    return ctx.data.train


def markdown(record: dict) -> str:
    goal = ", ".join(f"{k}={v}" for k, v in record["requested"].items())
    acc = record["accuracy"]
    lines = ["## Low-rank factorization", "",
             f"Truncated SVD ({goal}{', ' + record['allocation'] if record.get('allocation') else ''}), ranks in "
             f"multiples of {record['rank_multiple']}: {len(record['layers'])} layer(s) factorized, "
             f"{len(record['skipped'])} skipped.", "",
             "| | before | after | change |", "|---|---:|---:|---:|",
             f"| MACs | {record['macs_before']:,} | {record['macs_after']:,} | {record['macs_reduction']:.2f}x fewer |",
             f"| params | {record['params_before']:,} | {record['params_after']:,} | "
             f"{record['params_reduction']:.2f}x fewer |", ""]
    if acc.get("metric"):
        tuned = record.get("finetune") or {}
        pct = (lambda v: format_score(v, acc["metric"], "n/a"))  # noqa: E731
        lines += [f"{acc['metric']} on the choosing samples: {pct(acc['before'])} before, {pct(acc['factorized'])} "
                  f"factorized, {pct(acc['finetuned'])} after fine-tuning"
                  + (f" ({tuned.get('epochs_run')} epoch(s), {'distillation' if tuned.get('distill') else 'labels'})"
                     if tuned else " (not fine-tuned)") + ".", ""]
    if record["layers"]:
        lines += ["| layer | form | weight | rank | MACs before | MACs after | energy kept |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for layer in record["layers"][:MAX_ROWS]:
            lines.append(f"| `{layer['name']}` | {layer['form']} | {'x'.join(map(str, layer['shape']))} | "
                         f"{layer['rank']}/{layer['full_rank']} | {layer['macs_before']:,} | {layer['macs_after']:,} | "
                         f"{layer['energy_kept']:.3f} |")
        if len(record["layers"]) > MAX_ROWS:
            lines.append(f"| ... {len(record['layers']) - MAX_ROWS} more in manifest.json | | | | | | |")
        lines.append("")
    if record["skipped"]:
        lines += ["Skipped: " + "; ".join(f"`{s['name']}` ({s['reason']})" for s in record["skipped"][:MAX_ROWS])
                  + (f"; ... {len(record['skipped']) - MAX_ROWS} more" if len(record["skipped"]) > MAX_ROWS else "")
                  + ".", ""]
    for w in record.get("warnings", []):
        lines += [f"Warning: {w}", ""]
    return "\n".join(lines)
