"""Stage `cluster`: weight clustering (edgepack.compress.cluster) after pruning, before export.

Each Conv/Linear layer's weights are shared among k values (1-D k-means per layer), then the
model is fine-tuned with distillation from the unclustered model with the assignment kept, and
the build goes on with it. int8 keeps at most k values per output channel, so the artifacts
compress (zip, OTA) far better; their raw size does not change. Enabled by `[compress.cluster]`
(BuildConfig.compress = {"cluster": {...}}).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..compress.cluster import (INITS, INT8_MAX, check_clusters, check_qmax, clusterable_layers, distinct_per_channel,
                                distinct_values, int8_codes, out_axis)
from ..compress.cluster_steps import MAX_STEPS, cluster_and_finetune
from ..compress.qat import scheme_qmax
from ..compress.sensitivity import SAMPLES, weight_sensitivity
from ..compress.size import deflate_len
from ..data import Preprocess, load_dataset
from ..errors import EdgepackError
from ..prune import FinetuneConfig, evaluate
from ..prune.finetune import score_name
from ..prune.record import format_score
from . import quantize
from .context import BuildContext
from .tables import require_torch, user_metric, validate_table

NAME = "cluster"
# Fine-tuning a clustered model only moves centroids (and BatchNorm, biases): a short schedule
# at a smaller learning rate than pruning's (bench/compress_cluster.py).
FINETUNE_DEFAULTS = {"epochs": 3, "lr": 0.005, "patience": 2}
RATE_DEFAULT = 0.0


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: int = Field(16, description="values per layer (2..256)")
    skip: list[str] = Field(default_factory=list, description="layer names or fnmatch patterns left unclustered")
    per_channel: bool = Field(False, description="k centroids per output channel instead of per layer")
    scaled: bool | None = Field(None, description="one codebook per layer times each output channel's max |w|: "
                                                  "the same k int8 codes in every channel (default: on unless per_channel)")
    rate: float = Field(RATE_DEFAULT, ge=0, le=1, description="entropy-constrained k-means: weight of the code length "
                                                            "(0: plain k-means; larger: fewer bits, more error)")
    rate_by: Literal["sensitivity", "uniform"] = Field(
        "sensitivity", description="rate > 0: 'sensitivity' weights each layer's rate by how much its weights move the "
                                   "outputs (measured on the training or choosing inputs); 'uniform': one rate for all")
    qmax: int | None = Field(None, description="scaled: the int8 grid centroids snap to (multiples of 1/qmax of a channel's "
                                                "max); default: the build's int8 scheme's, 64 with reduce_range, else 127")
    steps: int = Field(1, ge=1, le=MAX_STEPS, description="cluster the layers in this many groups of about equal "
                                                          "weight count, least sensitive first, fine-tuning after each")
    init: Literal[INITS] = "linear"
    seed: int = 0
    finetune: dict = Field(default_factory=dict, description="edgepack.prune.FinetuneConfig keys")


def config(ctx: BuildContext) -> Config | None:
    """The clustering options; None unless the build's [compress] table has a `cluster` entry."""
    if not ctx.cfg.compress or "cluster" not in ctx.cfg.compress:
        return None
    require_torch(ctx, "weight clustering needs a PyTorch model: it fine-tunes the weights", "[compress.cluster]")
    cfg = validate_table(Config, ctx.cfg.compress["cluster"], "cluster",
                         'clusters = 16, skip = ["fc"], [compress.cluster.finetune] epochs = 3',
                         lambda c: FinetuneConfig.model_validate({**FINETUNE_DEFAULTS, **c.finetune}))
    check_clusters(cfg.clusters)
    return resolve(cfg, quantize.config(ctx).scheme)


def resolve(cfg: Config, scheme) -> Config:
    """The defaults that depend on other options and on the build's int8 scheme: scaled unless
    per_channel; the grid of the int8 file the build writes, so that it holds the fine-tuned
    weights exactly."""
    if cfg.scaled is None:
        cfg.scaled = not cfg.per_channel
    if cfg.qmax is None:
        cfg.qmax = scheme_qmax(scheme)
    check_qmax(cfg.qmax)
    return cfg


def run(ctx: BuildContext, cfg: Config) -> dict:
    """Clusters a copy of ctx.model's module, fine-tunes it, and makes it the build's model."""
    loaded, say = ctx.model, ctx.say
    train, choose = training_data(ctx), ctx.data.choose
    teacher = loaded.module.eval()
    student = copy.deepcopy(teacher)
    say(f"clustering weights: {cfg.clusters} values per {'output channel' if cfg.per_channel else 'layer'}"
        f"{' (scaled per channel)' if cfg.scaled else ''} ({cfg.init} k-means"
        f"{f', entropy-constrained at rate {cfg.rate:g}' if cfg.rate else ''}"
        f"{', weighted by layer sensitivity' if cfg.rate and cfg.rate_by == 'sensitivity' else ''})")
    sensitivity, measured_on = None, 0
    if cfg.rate and cfg.rate_by == "sensitivity":  # inputs only: the training split, else the choosing one
        samples = train if train is not None and len(train) else choose
        if samples is None or not len(samples):
            raise EdgepackError("[compress.cluster] rate_by = \"sensitivity\" needs input samples to measure the layers on",
                                "give --train (or evaluation/calibration data), or set rate_by = \"uniform\"")
        sensitivity, measured_on = weight_sensitivity(teacher, samples, seed=cfg.seed), min(SAMPLES, len(samples))
    ft_cfg = FinetuneConfig.model_validate({**FINETUNE_DEFAULTS, **cfg.finetune})
    metric = user_metric(ctx)
    scored = score_name(choose, metric, "top-1")
    acc_before = evaluate(teacher, choose, ft_cfg.batch_size, metric=metric)
    if train is None:
        say("warning: no --train data: clustering without fine-tuning, accuracy will drop")

    def progress(info: dict) -> None:
        acc = info.get("eval_acc")
        say(f"  cluster fine-tuning: epoch {info['epoch']}/{info['epochs']}, loss {info['loss']:.4g}"
            + (f", choosing {scored} {format_score(acc, scored)}" if acc is not None else ""))

    student, rec, steps = cluster_and_finetune(
        student, teacher, train, choose, ft_cfg, cfg.clusters, cfg.skip, cfg.steps, sensitivity, progress, metric,
        lambda m: evaluate(m, choose, ft_cfg.batch_size, metric=metric),
        per_channel=cfg.per_channel, init=cfg.init, seed=cfg.seed, scaled=cfg.scaled, rate=cfg.rate, qmax=cfg.qmax)
    if not rec.layers:
        raise EdgepackError("no layer could be clustered: " + "; ".join(f"{s['layer']}: {s['reason']}" for s in rec.skipped),
                            "lower `clusters`, or skip fewer layers")
    summary, acc_clustered = steps[-1]["finetune"], steps[-1]["clustered"]
    for w in dict.fromkeys(w for step in steps for w in step["finetune"]["warnings"]):
        say(f"warning: {w}")
    names = [layer.name for layer in rec.layers]
    if rec.scaled:  # k values times each channel's max: the int8 codes of a layer are what is shared
        layers = clusterable_layers(student)
        distinct = {n: int(len(np.unique(int8_codes(layers[n].weight, out_axis(layers[n]), rec.qmax)))) for n in names}
    else:
        distinct = distinct_values(student, names)
    broken = {n: d for n, d in distinct.items() if d > cfg.clusters}
    if broken:  # the parametrization makes this impossible; fail closed if it ever is not
        raise EdgepackError(f"clustered layers lost their clusters during fine-tuning: {broken}")
    ctx.model = replace(loaded, module=student.eval())
    record = {**rec.to_dict(), "finetune": summary,  # the last step's; each step's in "steps"
              "finetune_total": {"epochs_run": sum(st["finetune"]["epochs_run"] for st in steps),
                                 "seconds": round(sum(st["finetune"]["seconds"] for st in steps), 2)},
              "accuracy": {"samples": len(choose), "metric": scored, "before": acc_before,
                           "clustered": acc_clustered,
                           "clustered_when": "every layer clustered, before fine-tuning" if len(steps) < 2 else
                           "after the last group was clustered, before its fine-tuning (the groups before: fine-tuned)",
                           "finetuned": summary["eval_acc_after"] if summary["epochs_run"] else acc_clustered},
              "sensitivity_samples": measured_on or None,
              "steps": [{k: v for k, v in step.items() if k != "finetune"} | {"finetune": _brief(step["finetune"])}
                        for step in steps],
              "int8_weights": int8_weight_sizes(teacher, student, [layer.name for layer in rec.layers], rec.qmax)}
    for layer in record["layers"]:
        layer["distinct_after_finetune"] = distinct[layer["name"]]
    record["distinct_measure"] = "int8 codes per layer" if rec.scaled else "weight values per layer"
    ctx.sections[NAME] = markdown(record)
    est = record["int8_weights"]
    say(f"clustered {len(rec.layers)} layer(s) ({rec.clustered_weights:,} weights); their int8 weights deflate to "
        f"{est['deflate_bytes_after']:,} bytes, from {est['deflate_bytes_before']:,}")
    return record


def _brief(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("epochs_run", "seconds", "best_epoch", "eval_acc_before", "eval_acc_after")}


def training_data(ctx: BuildContext):
    """The build's training data. The load stage reads --train only when pruning (a request to
    read it for [compress] too is in /tmp/ep/requests.md); until then it is read here."""
    if ctx.data.train is not None or not ctx.cfg.train:
        return ctx.data.train
    pre = Preprocess(**ctx.cfg.data.preprocess_fields())
    ctx.data.train = load_dataset(ctx.cfg.train, ctx.model.sample_specs(), pre, "training data")
    return ctx.data.train


def int8_weight_sizes(before, after, names: list[str], qmax: int = INT8_MAX) -> dict:
    """The clustered layers' weights as per-channel symmetric int8 codes (what ONNX Runtime's
    quantizer makes of them; BatchNorm folding does not change them), raw and deflated, before and
    after clustering, and the most distinct codes in one channel: a figure known before export."""
    layers_before, layers_after = clusterable_layers(before), clusterable_layers(after)
    codes_before = [int8_codes(layers_before[n].weight, out_axis(layers_before[n]), qmax) for n in names]
    codes_after = [int8_codes(layers_after[n].weight, out_axis(layers_after[n]), qmax) for n in names]
    raw = b"".join(c.tobytes() for c in codes_before)
    return {"raw_bytes": len(raw), "deflate_bytes_before": deflate_len(raw),
            "deflate_bytes_after": deflate_len(b"".join(c.tobytes() for c in codes_after)),
            "max_distinct_per_channel": int(max((distinct_per_channel(c) for c in codes_after), default=0)),
            "max_distinct_per_tensor": int(max((len(np.unique(c)) for c in codes_after), default=0)),
            "measure": f"deflate level 9 of the int8 codes, per-channel symmetric (max |w| / {qmax}), layers in order"}


def markdown(record: dict) -> str:
    acc, est, ft = record["accuracy"], record["int8_weights"], record["finetune"]
    steps = record.get("steps") or [{}]
    order = "least sensitive layers first" if record.get("rate_by") == "sensitivity" else "largest layers first"
    step_text = "" if len(steps) < 2 else (
        f"clustered in {len(steps)} steps, {order} "
        f"({' then '.join(format(step['weights'], ',') for step in steps)} weights), each followed by fine-tuning; ")
    pct = (lambda v: format_score(v, acc.get("metric"), "n/a"))
    weighting = f", weighted per layer by output sensitivity ({record['sensitivity_samples']} samples)" \
        if record.get("rate") and record.get("rate_by") == "sensitivity" else ""
    scope = "output channel" if record["per_channel"] else \
        ("layer, scaled by each channel's max |w|" if record["scaled"] else "layer")
    lines = ["## Weight clustering", "",
             f"{record['clusters']} shared values per {scope} ({record['init']} k-means"
             f"{', entropy-constrained, rate ' + format(record['rate'], 'g') if record.get('rate') else ''}"
             f"{weighting}) in "
             f"{record['clustered_layers']} Conv/Linear layer(s), {record['clustered_weights']:,} weights; "
             + step_text + f"fine-tuned with the assignment kept ({ft['epochs_run']} epoch(s){' in the last step' if len(steps) > 1 else ''}, "
             f"distillation {'on' if ft['distill'] else 'off'}).", "",
             f"| {acc.get('metric') or 'top-1'} on {acc['samples']} choosing samples | before clustering | "
             f"{'clustered' if len(steps) < 2 else 'all clustered, before the last step fine-tuned'} | "
             "fine-tuned |",
             "|---|---:|---:|---:|",
             f"| | {pct(acc['before'])} | {pct(acc['clustered'])} | {pct(acc['finetuned'])} |", "",
             f"int8 weights of these layers (estimate before export): {est['raw_bytes']:,} bytes raw, deflated "
             f"{est['deflate_bytes_before']:,} -> {est['deflate_bytes_after']:,} bytes "
             f"({est['deflate_bytes_before'] / max(1, est['deflate_bytes_after']):.2f}x); at most "
             f"{est['max_distinct_per_channel']} distinct int8 values in one channel, "
             f"{est.get('max_distinct_per_tensor', 'n/a')} in one layer.", ""]
    if record["skipped"]:
        lines += ["Not clustered: " + "; ".join(f"`{s['layer']}` ({s['reason']})" for s in record["skipped"]) + ".", ""]
    worst = sorted(record["layers"], key=lambda layer: -layer["rel_error"])[:5]
    lines += ["Largest relative weight error from clustering: "
              + ", ".join(f"`{layer['name']}` {layer['rel_error']:.3f}" for layer in worst) + ".", ""]
    return "\n".join(lines) + "\n"
