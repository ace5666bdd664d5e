"""Stage `qat`: quantization-aware training when static int8 (with its fallback) misses the
accuracy budget, or when asked (`always`, the `--qat` flag). Runs after `quantize`.

The float model (after pruning and clustering) is BatchNorm-folded, trained with the target's
ONNX int8 scheme simulated and distillation from itself (edgepack.compress.qat), exported, and
quantized by the same quantizer with the same scheme as the PTQ artifact (QDQ, same runtimes).
The QAT file replaces `model.int8.onnx` only when its drop on the choosing samples is lower than
PTQ's; both drops are recorded. Enabled by a `[compress.qat]` table (BuildConfig.compress =
{"qat": {...}}); without one a build whose fallback still missed the budget is told QAT exists.
Cached by content (the float file, the module, the scheme, the data).

TFLite (when the target makes it): litert-torch's PT2E QAT (edgepack.compress.qat_tflite: the PTQ
file's quantizer and scheme in QAT form, BatchNorm folded, distillation), converted by litert-torch;
it replaces `model.int8.tflite` (PT2E PTQ, after the TFLite fallback) only when its drop on the
choosing samples against `model.fp32.tflite` is lower. It needs the tflite stage's files, so this
stage must run after `tflite`; run before it, the record says TFLite QAT was not done. Cached on
its own key (the module, the layout, calibration, the data, the route's source).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pydantic import BaseModel, ConfigDict, Field

from ..cache import hash_module
from ..compress import qat as qat_fit, qat_tflite
from ..compress.qat import RANGE_LR, train_qat
from ..onnx_tools.export import to_onnx
from ..onnx_tools.inspect import float_nodes
from ..onnx_tools.qdq_tidy import tidy_qdq
from ..onnx_tools.quantize import quantize_onnx
from ..prune import FinetuneConfig
from ..prune.record import format_score
from ..quality import drop, measure
from ..scheme import scheme_name
from . import quantize
from .cluster import training_data
from .context import BuildContext
from .tables import require_torch, user_metric, validate_table
from .export import FILE as FP32
from .infer import predict, predict_onnx
from . import tflite as tflite_stage

NAME = "qat"
CANDIDATE, CANDIDATE_TFLITE = ".qat.int8.onnx", ".qat.int8.tflite"
# QAT starts from trained weights: a few epochs of Adam at a small learning rate (compress.qat.fit
# says why Adam; bench/compress_qat.py measured these).
FINETUNE_DEFAULTS = {"epochs": 3, "lr": 1e-4, "patience": 2}


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    always: bool = Field(False, description="run even when PTQ met the budgets (--qat)")
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    distill: bool = True
    learn_ranges: bool = Field(True, description="train a clip ratio per weight scale (LSQ); false: ORT's max|w| scales")
    range_lr: float = Field(RANGE_LR, gt=0, description="Adam learning rate of the clip ratios")
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
    train = training_data(ctx)
    if train is None:
        train = ctx.data.calib  # distillation needs no labels: the calibration samples can teach
        record["train_note"] = "no --train data: trained on the calibration samples by distillation"
    record["train_samples"] = len(train)
    if "tflite" in ctx.profile.formats:
        record["tflite"] = run_tflite(ctx, cfg, train)
    if not (cfg.always or missed):
        record["skipped"] = _skip_reason(budget)
        ctx.say(f"qat: skipped for ONNX ({record['skipped']})")
        ctx.sections[NAME] = markdown(record)
        return record
    metric_files, metric = ctx.metric_key()  # it picks the epoch kept
    key = ctx.cache.key(NAME, config={**cfg.model_dump(), "scheme": q.scheme.model_dump()},
                        files=[fp32, *metric_files], blobs=[hash_module(ctx.model.module), metric], versions=ctx.versions,
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
    trained, rec = train_qat(m.module, q.scheme, train, ctx.data.choose, ctx.data.calib, ft, ctx.progress,
                             user_metric(ctx), cfg.learn_ranges, cfg.range_lr)
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


def _skip_reason(budget) -> str:
    return (("PTQ met max_accuracy_drop on the choosing samples" if budget is not None else
             "no max_accuracy_drop budget to aim at") + "; --qat (always = true) forces it")


def run_tflite(ctx: BuildContext, cfg: Config, train) -> dict:
    """PT2E QAT for `model.int8.tflite`; replaces it when its drop on the choosing samples is lower."""
    tfl, m, choose = ctx.records.get(tflite_stage.NAME), ctx.model, ctx.data.choose
    if tfl is None or "int8" not in tfl:
        why = (tfl or {}).get("skipped") or "the tflite stage had not run: the qat stage must run after it"
        ctx.say(f"qat: no TFLite QAT ({why})")
        return {"skipped": f"no TFLite QAT: {why}", "replaced": False}
    layout, n_cal, budget = ctx.profile.layout, tfl["calibration_samples"], ctx.profile.budgets.max_accuracy_drop
    fp32, int8, cand = ctx.work / tflite_stage.FP32, ctx.work / tflite_stage.INT8, ctx.work / CANDIDATE_TFLITE
    reference = predict(fp32, m, choose, ctx.profile.threads, layout)
    ref = measure(reference, m.outputs, choose.y, reference, ctx.metric)

    def drop_of(path):
        return drop(ref, measure(predict(path, m, choose, ctx.profile.threads, layout), m.outputs, choose.y,
                                 reference, ctx.metric))
    ptq_drop, unit = drop_of(int8)
    rec = {"route": qat_tflite.ROUTE, "scheme": qat_tflite.SCHEME, "ptq_route": tfl.get("scheme"),
           "ptq_drop": _round(ptq_drop), "drop_unit": unit, "reference": tflite_stage.FP32, "replaced": False,
           "ptq_fallback": bool((tfl.get("fallback") or {}).get("replaced"))}
    if not (cfg.always or (budget is not None and ptq_drop is not None and ptq_drop > budget)):
        rec["skipped"] = _skip_reason(budget)
        ctx.say(f"qat: skipped for TFLite ({rec['skipped']})")
        return rec
    calib = ctx.data.calib.sample(n_cal, seed=0)  # the tflite stage's calibration samples
    metric_files, metric = ctx.metric_key()
    # learn_ranges/range_lr are the ONNX route's (PT2E has its own observers); fit lives in compress/qat.py
    onnx_only = {"learn_ranges", "range_lr"}
    key = ctx.cache.key(f"{NAME}-tflite", config={**cfg.model_dump(exclude=onnx_only), "layout": layout, "calibration_samples": n_cal,
                                                  "inputs": [s.model_dump() for s in m.inputs], "route": qat_tflite.ROUTE},
                        files=[Path(qat_tflite.__file__), Path(qat_fit.__file__), *metric_files],
                        blobs=[hash_module(m.module), metric],
                        versions=ctx.versions,
                        data=f"{calib.fingerprint()}-{choose.fingerprint()}-{train.fingerprint()}")
    stored = ctx.restore(f"{NAME} (TFLite)", key)
    if stored is None:
        stored = _train_tflite(ctx, cfg, train, calib, cand, layout)
        ctx.store(f"{NAME} (TFLite)", key, {CANDIDATE_TFLITE: cand}, stored)
    rec.update(stored)
    qat_drop, _ = drop_of(cand)
    rec["qat_drop"] = _round(qat_drop)
    better = qat_drop is not None and ptq_drop is not None and qat_drop < ptq_drop
    if better:
        cand.replace(int8)
        ctx.outputs[tflite_stage.INT8] = predict(int8, m, ctx.data.report, ctx.profile.threads, layout)
        # the file's IO scales and ops are the QAT conversion's now: the manifest reads them from here
        tfl["int8_ptq"], tfl["int8"], tfl["int8_route"] = tfl["int8"], rec["artifact"], "qat"
        ctx.sections[tflite_stage.NAME] = ctx.sections.get(tflite_stage.NAME, "").rstrip() + (
            "\n\n`model.int8.tflite` was then replaced by the quantization-aware-trained one (see Quantization-aware "
            "training, below): the conversion figures above are the PT2E PTQ file's.\n")
        rec["replaced"] = True
    else:
        cand.unlink(missing_ok=True)
        tfl["int8_route"] = "ptq"
    rec["met_budget"] = budget is None or min(x for x in (ptq_drop, qat_drop) if x is not None) <= budget
    ctx.say(f"qat: TFLite drop {rec['qat_drop']} vs PTQ {rec['ptq_drop']} {unit} on {len(choose)} choosing samples: "
            + ("model.int8.tflite is the QAT one" if better else "PTQ's model.int8.tflite is kept"))
    return rec


def _train_tflite(ctx: BuildContext, cfg: Config, train, calib, cand: Path, layout: str) -> dict:
    from ..onnx_tools.export import FlatOutputs
    m, ft = ctx.model, cfg.finetune_config()
    t0 = time.perf_counter()
    ctx.say(f"quantization-aware training for TFLite (litert-torch PT2E QAT, per-channel weights; {ft.epochs} epoch(s) "
            f"on {len(train)} samples, distillation {'on' if ft.distill else 'off'})")
    student, quant, example, rec = qat_tflite.train_qat_tflite(FlatOutputs(m.module).eval(), m.example_inputs(), train,
                                                               ctx.data.choose, calib, ft, layout, len(calib), ctx.progress,
                                                               user_metric(ctx))
    with ctx.progress.task("converting the QAT model to TFLite int8 (litert-torch)"):
        art, converted = qat_tflite.convert_trained(student, quant, example, cand, layout, m.input_names, m.outputs)
    # the file against the model it was made from (int8 simulated in PyTorch), on the choosing samples
    got = predict(cand, m, ctx.data.choose, ctx.profile.threads, layout)
    sim = qat_tflite.simulated_outputs(converted, ctx.data.choose.arrays(), layout)
    rec["vs_simulated"] = vs_simulated(got, sim, m.outputs)
    summary = rec.pop("finetune")
    rec.update(artifact={k: art.get(k) for k in tflite_stage.KEEP}, epochs_run=summary["epochs_run"],
               best_epoch=summary["best_epoch"], stopped=summary["stopped"], distill=summary["distill"],
               train_loss=summary["train_loss"], seconds=round(time.perf_counter() - t0, 2))
    return rec


def vs_simulated(got: list[np.ndarray], sim: list[np.ndarray], names: list[str]) -> dict:
    """The TFLite file's outputs against the simulated int8 graph's, every output: the worst
    figures on top (a detector's boxes can be wrong while its scores agree), each output's below."""
    per = []
    for i, (name, g, e) in enumerate(zip(names, got, sim)):
        g, e = g.astype(np.float64), e.astype(np.float64)
        row = {"output": name, "max_abs_diff": round(float(np.abs(g - e).max()), 6),
               "relative_error": round(float(np.linalg.norm(g - e) / (np.linalg.norm(e) + 1e-12)), 6)}
        if i == 0 and g.ndim == 2 and g.shape[1] > 1:  # the output top-1 is read from, as in the build's figures
            row["top1_agreement"] = round(float((g.argmax(1) == e.argmax(1)).mean()), 4)
        per.append(row)
    out = {"max_abs_diff": max(r["max_abs_diff"] for r in per), "relative_error": max(r["relative_error"] for r in per),
           "samples": len(got[0]), "outputs": per}
    if "top1_agreement" in per[0]:
        out["top1_agreement"] = per[0]["top1_agreement"]
    return out


def markdown(record: dict) -> str:
    lines = ["## Quantization-aware training", ""]
    if record.get("skipped"):
        lines += [f"ONNX: not run: {record['skipped']} (PTQ drop {record['ptq_drop']} {record['drop_unit']} on "
                  f"{record['chosen_on']}).", ""]
        return "\n".join(lines + _tflite_markdown(record)) + "\n"
    pct = (lambda v: format_score(v, record.get("simulated_metric"), "n/a"))
    lines += [f"{record['scheme']} ({'per-channel' if record['per_channel'] else 'per-tensor'} weights) simulated in "
              f"{record['layers']} Conv/Linear layer(s), BatchNorm {'folded' if record['batchnorm_folded'] else 'NOT folded (approximate)'}; "
              f"{record['epochs_run']} epoch(s) on {record['train_samples']} samples, distillation "
              f"{'on' if record['distill'] else 'off'}, {record['seconds']} s."
              + (f" {record['train_note']}." if record.get("train_note") else ""), "",
              f"| {record['drop_unit']} drop on {record['chosen_on']} | PTQ (+ fallback) | QAT |", "|---|---:|---:|",
              f"| | {record['ptq_drop']} | {record['qat_drop']} |", "",
              f"Simulated int8 {record.get('simulated_metric') or 'top-1'} on the choosing samples (PyTorch): "
              f"{pct(record['simulated_top1_before'])} before, "
              f"{pct(record['simulated_top1_after'])} after training.", "",
              *_ranges_markdown(record.get("weight_ranges")),
              ("`model.int8.onnx` is the QAT artifact (QDQ, the same quantizer and scheme as PTQ)." if record["replaced"]
               else "QAT did not beat PTQ on the choosing samples: `model.int8.onnx` is PTQ's.")
              + (f" Budget {record['budget']}: {'met' if record['met_budget'] else 'still NOT met'}."
                 if record.get("budget") is not None else ""), ""]
    return "\n".join(lines + _tflite_markdown(record)) + "\n"


def _ranges_markdown(r: dict | None) -> list[str]:
    if not r:
        return ["Weight ranges: ORT's max|w| scales (not learned).", ""]
    return [f"Weight ranges: {r['rule']}; {r['below_0.99']} of {r['ratios']} ratio(s) below 0.99, "
            f"median {r['median']}, smallest {r['min']} (the exported weights are clipped to them).", ""]


def _tflite_markdown(record: dict) -> list[str]:
    t = record.get("tflite")
    if not t:
        return []
    lines = ["### TFLite", ""]
    if t.get("skipped"):
        drop = f" (PTQ drop {t['ptq_drop']} {t['drop_unit']})" if t.get("ptq_drop") is not None else ""
        return lines + [f"Not run: {t['skipped']}{drop}; `model.int8.tflite` is litert-torch's PT2E PTQ.", ""]
    pct = (lambda v: format_score(v, t.get("simulated_metric"), "n/a"))
    vs = t.get("vs_simulated") or {}
    lines += [f"Route: {t['route']}. Scheme: {t['scheme']}; {t['fake_quantizers']} fake quantizers (weights and activations), "
              f"ranges initialised on {t['calibration_samples']} calibration samples; {t['epochs_run']} epoch(s), "
              f"distillation {'on' if t['distill'] else 'off'}, {t['seconds']} s.", "",
              f"| {t['drop_unit']} drop vs `{t['reference']}` on {record['chosen_on']} | PT2E PTQ"
              f"{' (+ fallback)' if t.get('ptq_fallback') else ''} | PT2E QAT |", "|---|---:|---:|",
              f"| | {t['ptq_drop']} | {t['qat_drop']} |", "",
              f"Simulated int8 {t.get('simulated_metric') or 'top-1'} on the choosing samples (PyTorch): "
              f"{pct(t['simulated_top1_before'])} before, "
              f"{pct(t['simulated_top1_after'])} after training. The QAT `.tflite` against the trained model "
              f"(int8 simulated in PyTorch) on {vs.get('samples')} samples"
              + (f", the worst of its {len(vs['outputs'])} outputs" if len(vs.get("outputs", [])) > 1 else "")
              + f": max abs diff {vs.get('max_abs_diff')}, "
              f"relative error {vs.get('relative_error')}"
              + (f", top-1 agreement {format_score(vs['top1_agreement'], 'top-1')}" if "top1_agreement" in vs else "")
              + ".", "",
              ("`model.int8.tflite` is the QAT artifact (litert-torch PT2E QAT)." if t["replaced"]
               else "QAT did not beat PTQ on the choosing samples: `model.int8.tflite` is litert-torch's PT2E PTQ."), ""]
    return lines


def _round(v):
    return None if v is None else round(float(v), 3)
