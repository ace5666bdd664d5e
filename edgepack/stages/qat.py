"""Stage `qat`: quantization-aware training when static int8 (with its fallback) misses the
accuracy budget, or when asked (`always`, the `--qat` flag). Runs after `quantize`.

The float model (after pruning and clustering) is BatchNorm-folded, trained with the target's
ONNX int8 scheme simulated and distillation from itself (edgepack.compress.qat), exported, and
quantized by the same quantizer with the same scheme as the PTQ artifact (QDQ, same runtimes).
The QAT file replaces `model.int8.onnx` only when its drop on the choosing samples is lower than
PTQ's; both drops are recorded. Enabled by a `[compress.qat]` table (BuildConfig.compress =
{"qat": {...}}); without one a build whose fallback still missed the budget is told QAT exists.
Cached by content (the float file, the module, the scheme, the data). TFLite is not covered:
`model.int8.tflite` stays litert-torch's PT2E PTQ.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..cache import hash_module
from ..compress.qat import train_qat
from ..onnx_tools.export import to_onnx
from ..onnx_tools.inspect import float_nodes
from ..onnx_tools.qdq_tidy import tidy_qdq
from ..onnx_tools.quantize import quantize_onnx
from ..prune import FinetuneConfig
from ..quality import drop, measure
from ..scheme import scheme_name
from . import quantize
from .cluster import training_data
from .context import BuildContext
from .tables import require_torch, validate_table
from .export import FILE as FP32
from .infer import predict_onnx

NAME = "qat"
CANDIDATE = ".qat.int8.onnx"
# QAT starts from trained weights: a few epochs of Adam at a small learning rate (compress.qat.fit
# says why Adam; bench/compress_qat.py measured these).
FINETUNE_DEFAULTS = {"epochs": 3, "lr": 1e-4, "patience": 2}


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    always: bool = Field(False, description="run even when PTQ met the budgets (--qat)")
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    distill: bool = True
    max_minutes: float | None = Field(30.0, gt=0, description="wall-clock bound for the training")
    finetune: dict = Field(default_factory=dict, description="other edgepack.prune.FinetuneConfig keys")

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig.model_validate({**FINETUNE_DEFAULTS, **self.finetune, "epochs": self.epochs,
                                              "lr": self.lr, "distill": self.distill,
                                              "max_minutes": self.max_minutes})


def config(ctx: BuildContext) -> Config | None:
    if not ctx.cfg.compress or "qat" not in ctx.cfg.compress:
        fb = ctx.records.get("fallback") or {}
        if fb and not fb.get("met_budget", True) and ctx.model.kind == "torch":
            ctx.say("note: int8 still misses the accuracy budget after the fallback; quantization-aware "
                    "training may recover it: add --qat (with --train data)")
        return None
    require_torch(ctx, "quantization-aware training needs a PyTorch model: it trains the weights",
                  "--qat / [compress.qat]")
    return validate_table(Config, ctx.cfg.compress["qat"], "qat", "always = true, epochs = 3, lr = 1e-4, max_minutes = 20",
                          Config.finetune_config)


def run(ctx: BuildContext, cfg: Config) -> dict:
    fp32, int8 = ctx.work / FP32, ctx.work / quantize.FILE
    q = quantize.config(ctx)
    choose = ctx.data.choose
    reference = predict_onnx(ctx, fp32, choose)
    ref = measure(reference, ctx.model.outputs, choose.y, reference, ctx.metric)
    ptq_drop, unit = drop(ref, measure(predict_onnx(ctx, int8, choose), ctx.model.outputs, choose.y, reference,
                                       ctx.metric))
    budget = q.max_accuracy_drop
    record = {"scheme": scheme_name(q.scheme), "per_channel": q.scheme.per_channel, "ptq_drop": _round(ptq_drop),
              "drop_unit": unit, "budget": budget, "chosen_on": f"{len(choose)} choosing samples", "replaced": False}
    missed = budget is not None and ptq_drop is not None and ptq_drop > budget
    if not (cfg.always or missed):
        record["skipped"] = ("PTQ met max_accuracy_drop on the choosing samples" if budget is not None else
                             "no max_accuracy_drop budget to aim at") + "; --qat (always = true) forces it"
        ctx.say(f"qat: skipped ({record['skipped']})")
        ctx.sections[NAME] = markdown(record)
        return record
    train = training_data(ctx)
    if train is None:
        train = ctx.data.calib  # distillation needs no labels: the calibration samples can teach
        record["train_note"] = "no --train data: trained on the calibration samples by distillation"
    record["train_samples"] = len(train)
    key = ctx.cache.key(NAME, config={**cfg.model_dump(), "scheme": q.scheme.model_dump()}, files=[fp32],
                        blobs=[hash_module(ctx.model.module)], versions=ctx.versions,
                        data=f"{ctx.data.calib.fingerprint()}-{choose.fingerprint()}-{train.fingerprint()}")
    cand = ctx.work / CANDIDATE
    stored = ctx.restore(NAME, key)
    if stored is None:
        stored = _train(ctx, cfg, q, train, cand)
        ctx.store(NAME, key, {CANDIDATE: cand}, stored)
    record.update(stored)
    qat_drop, _ = drop(ref, measure(predict_onnx(ctx, cand, choose), ctx.model.outputs, choose.y, reference,
                                    ctx.metric))
    record["qat_drop"] = _round(qat_drop)
    better = qat_drop is not None and ptq_drop is not None and qat_drop < ptq_drop
    if better:
        cand.replace(int8)
        ctx.outputs[quantize.FILE] = predict_onnx(ctx, int8)
        record["replaced"], record["float_nodes"] = True, float_nodes(int8)
    else:
        cand.unlink(missing_ok=True)
    record["met_budget"] = budget is None or min(x for x in (ptq_drop, qat_drop) if x is not None) <= budget
    ctx.say(f"qat: drop {record['qat_drop']} vs PTQ {record['ptq_drop']} {unit} on {len(choose)} choosing samples: "
            + ("model.int8.onnx is the QAT one" if better else "PTQ's model.int8.onnx is kept"))
    ctx.sections[NAME] = markdown(record)
    return record


def _train(ctx: BuildContext, cfg: Config, q, train, cand: Path) -> dict:
    m, ft = ctx.model, cfg.finetune_config()
    t0 = time.perf_counter()
    ctx.say(f"quantization-aware training ({scheme_name(q.scheme)}, "
            f"{'per-channel' if q.scheme.per_channel else 'per-tensor'} weights; {ft.epochs} epoch(s) on {len(train)} "
            f"samples, distillation {'on' if ft.distill else 'off'})")
    trained, rec = train_qat(m.module, q.scheme, train, ctx.data.choose, ctx.data.calib, ft, ctx.progress)
    fp32 = ctx.work / ".qat.fp32.onnx"
    try:
        to_onnx(trained, m.example_inputs(), fp32, True, m.input_names, m.outputs, m.batchable)
        rec["quantize"] = quantize_onnx(fp32, cand, ctx.data.calib, q.scheme, ctx.profile.threads)
    finally:
        fp32.unlink(missing_ok=True)
    if q.tidy:
        rec["tidy"] = tidy_qdq(cand)
    summary = rec.pop("finetune")
    rec.update(epochs_run=summary["epochs_run"], best_epoch=summary["best_epoch"], stopped=summary["stopped"],
               distill=summary["distill"], train_loss=summary["train_loss"], warnings=summary["warnings"],
               seconds=round(time.perf_counter() - t0, 2))
    return rec


def markdown(record: dict) -> str:
    lines = ["## Quantization-aware training", ""]
    if record.get("skipped"):
        return "\n".join(lines + [f"Not run: {record['skipped']} (PTQ drop {record['ptq_drop']} "
                                  f"{record['drop_unit']} on {record['chosen_on']}).", ""]) + "\n"
    pct = (lambda v: "n/a" if v is None else f"{100 * v:.2f}%")
    lines += [f"{record['scheme']} ({'per-channel' if record['per_channel'] else 'per-tensor'} weights) simulated in "
              f"{record['layers']} Conv/Linear layer(s), BatchNorm {'folded' if record['batchnorm_folded'] else 'NOT folded (approximate)'}; "
              f"{record['epochs_run']} epoch(s) on {record['train_samples']} samples, distillation "
              f"{'on' if record['distill'] else 'off'}, {record['seconds']} s."
              + (f" {record['train_note']}." if record.get("train_note") else ""), "",
              f"| {record['drop_unit']} drop on {record['chosen_on']} | PTQ (+ fallback) | QAT |", "|---|---:|---:|",
              f"| | {record['ptq_drop']} | {record['qat_drop']} |", "",
              f"Simulated int8 top-1 on the choosing samples (PyTorch): {pct(record['simulated_top1_before'])} before, "
              f"{pct(record['simulated_top1_after'])} after training.", "",
              ("`model.int8.onnx` is the QAT artifact (QDQ, the same quantizer and scheme as PTQ)." if record["replaced"]
               else "QAT did not beat PTQ on the choosing samples: `model.int8.onnx` is PTQ's.")
              + (f" Budget {record['budget']}: {'met' if record['met_budget'] else 'still NOT met'}."
                 if record.get("budget") is not None else ""), ""]
    return "\n".join(lines) + "\n"


def _round(v):
    return None if v is None else round(float(v), 3)
