"""Stage `quantize`: static int8 (ONNX Runtime, QDQ) and the accuracy-aware fallback.

If the int8 model misses a quality budget on the samples set aside to choose with, each
weighted node is ranked by the SQNR it loses and the 1, 2, 4, ... most sensitive are left in
float until the budgets hold (at most `max_float_nodes`). Cached by content: the fp32 file, the
scheme, the calibration and choosing data, and the quality budgets the fallback aims at.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from ..compress.qat import scheme_qmax
from ..data import Dataset
from ..devices.deploy import cpu_probe
from ..onnx_tools.calibrate import reporting
from ..onnx_tools.quantize import calibration_ranges, node_sensitivity, preprocess, quantize_onnx
from ..onnx_tools.inspect import float_nodes
from ..onnx_tools.qdq_tidy import tidy_qdq
from ..quality import drop, measure
from ..scheme import scheme_for_build, scheme_name
from ..targets import Quantization
from .context import BuildContext
from .export import FILE as FP32
from .infer import predict_onnx

NAME = "quantize"
FILE = "model.int8.onnx"


class Config(BaseModel):
    scheme: Quantization  # concrete (chosen from the CPU's flags): the cache key follows the choice
    choice: dict = Field(default_factory=dict, exclude=True)  # why this scheme; kept out of the key
    fallback: bool = True
    max_float_nodes: int = 8
    max_accuracy_drop: float | None = None
    min_sqnr_db: float | None = None
    tidy: bool = False  # qdq_tidy's graph pass (stems, channel alignment, Q/DQ around data movement)
    # Nodes the record lists (None: all, --debug-quant). The cache keeps the whole ranking and the cut
    # is made after it, so --debug-quant reuses the entry; hence out of the key.
    ranked: int | None = Field(10, exclude=True)


def config(ctx: BuildContext) -> Config:
    b = ctx.profile.budgets
    # With --device the device's own CPU flags decide (probed there; unreachable: the profile's default, said so).
    if ctx.int8_scheme is None:
        ctx.int8_scheme = scheme_for_build(ctx.profile, ctx.device.name if ctx.device is not None else None,
                                           probe=cpu_probe(ctx.device, ctx.cfg.accept_new_host_key))
    scheme, choice = ctx.int8_scheme
    return Config(scheme=scheme, choice=choice, fallback=ctx.cfg.fallback, max_float_nodes=ctx.cfg.max_float_nodes,
                  max_accuracy_drop=b.max_accuracy_drop, min_sqnr_db=b.min_sqnr_db,
                  tidy=ctx.profile.arch == "x86_64", ranked=None if ctx.cfg.debug_quant else 10)


def run(ctx: BuildContext, cfg: Config) -> dict:
    fp32, int8 = ctx.work / FP32, ctx.work / FILE
    d = ctx.data
    # The fallback aims at the metric: its source is part of the key (a file by content).
    metric_files, metric = ctx.metric_key()
    key = ctx.cache.key(NAME, config=cfg.model_dump(), files=[fp32, *metric_files],
                        data=f"{d.calib.fingerprint()}-{d.choose.fingerprint()}", versions=ctx.versions,
                        blobs=[metric])
    record = ctx.restore(NAME, key)
    if record is None:
        q = cfg.scheme
        ctx.say(f"quantizing to int8 ({scheme_name(q)}: {cfg.choice.get('reason', '')}; "
                f"{q.calibration_method} calibration on {min(len(d.calib), q.calibration_samples)} samples)")
        if cfg.choice.get("warning"):
            ctx.say(f"warning: {cfg.choice['warning']}")
        pre = preprocess(fp32, ctx.work / ".pre.onnx")
        try:
            with reporting(ctx.progress):  # calibration_ranges has no progress= of its own: a task per batch
                ranges = calibration_ranges(pre, d.calib, q)  # once: they do not depend on the nodes left float
            record = quantize_onnx(fp32, int8, d.calib, q, ctx.profile.threads, preprocessed=pre, ranges=ranges)
            if cfg.fallback:
                fallback = _fallback(ctx, cfg, fp32, pre, int8, ranges)
                if fallback:
                    record["fallback"] = fallback
            # Every build lists the nodes that lose the most SQNR (bounded: 32 samples, batch by batch).
            record["sensitivity"] = node_sensitivity(pre, int8, d.calib, samples=32)
        finally:
            pre.unlink(missing_ok=True)
        if cfg.tidy:  # measured on x86 only (bench/int8_speed.py): 2.73x -> 3.05x on ResNet-18-224
            record["tidy"] = tidy_qdq(int8)
        record["float_nodes"] = float_nodes(int8)
        ctx.store(NAME, key, {FILE: int8}, record)
    record["int8_scheme"] = cfg.choice
    clustered = ctx.records.get("cluster") or {}
    grid = scheme_qmax(cfg.scheme)
    if clustered.get("scaled") and clustered.get("qmax") not in (None, grid):
        # A qmax set by hand in [compress.cluster] (the default is this scheme's grid: ctx.int8_scheme is shared)
        ctx.say(f"warning: the weights were clustered on the 1/{clustered['qmax']} grid but this int8 scheme "
                f"quantizes them at 1/{grid}: every centroid is rounded again; rebuild, or set "
                f"[compress.cluster] qmax = {grid}")
        record["cluster_grid_mismatch"] = {"clustered": clustered["qmax"], "quantized": grid}
    record["sensitivity"] = record.get("sensitivity", [])[:cfg.ranked]
    if record.get("fallback"):
        ctx.records["fallback"] = record["fallback"]
    ctx.outputs[FILE] = predict_onnx(ctx, int8)
    return record


def _quality(ctx: BuildContext, path: Path, reference: list) -> dict:
    m, choose = ctx.model, ctx.data.choose
    return measure(predict_onnx(ctx, path, choose), m.outputs, choose.y, reference, ctx.metric)


def _misses(cfg: Config, ref: dict, q: dict) -> tuple[bool, float | None]:
    """Whether the int8 figures on the choosing samples miss a quality budget, and the drop."""
    value, _ = drop(ref, q)
    missed = (cfg.max_accuracy_drop is not None and value is not None and value > cfg.max_accuracy_drop) or \
             (cfg.min_sqnr_db is not None and q.get("sqnr_db", float("inf")) < cfg.min_sqnr_db)
    return missed, value


def _fallback(ctx: BuildContext, cfg: Config, fp32: Path, pre: Path, int8: Path, ranges) -> dict | None:
    """Leave the most sensitive nodes in float, 1, 2, 4... of them, until the budgets hold."""
    choose: Dataset = ctx.data.choose
    reference = predict_onnx(ctx, fp32, choose)
    ref = measure(reference, ctx.model.outputs, choose.y, reference, ctx.metric)
    q = _quality(ctx, int8, reference)
    missed, first = _misses(cfg, ref, q)
    if not missed or cfg.max_float_nodes == 0:
        return None
    ctx.say(f"int8 misses a quality budget on {len(choose)} choosing samples (drop {first}, "
            f"SQNR {q.get('sqnr_db')} dB): ranking nodes by int8 sensitivity")
    ranking = node_sensitivity(pre, int8, ctx.data.calib)
    record = {"initial_drop": _round(first), "initial_sqnr_db": q.get("sqnr_db"), "ranking": ranking[:15],
              "tried": [], "applies_to": "the ONNX int8 artifact", "chosen_on": f"{len(choose)} choosing samples"}
    best, best_score, met = None, (first if first is not None else -q.get("sqnr_db", 0)), False
    cap = min(cfg.max_float_nodes, len(ranking))
    cand = int8.with_name(".fallback.int8.onnx")
    try:
        for k in sorted({min(2 ** i, cap) for i in range(cap.bit_length() + 1)} - {0}):  # 1, 2, 4, ..., cap
            excluded = [r["node"] for r in ranking[:k]]
            quantize_onnx(fp32, cand, ctx.data.calib, cfg.scheme, ctx.profile.threads, excluded, preprocessed=pre,
                          ranges=ranges)
            qk = _quality(ctx, cand, reference)
            missed, value = _misses(cfg, ref, qk)
            record["tried"].append({"float_nodes": k, "drop": _round(value), "sqnr_db": qk.get("sqnr_db")})
            ctx.say(f"  {k} node(s) in float: drop {_round(value)}, SQNR {qk.get('sqnr_db')} dB")
            score = value if value is not None else -qk.get("sqnr_db", 0)
            if score < best_score or not missed:
                cand.replace(int8)
                best, best_score = (excluded, value, qk.get("sqnr_db")), score
            if not missed:
                met = True
                break
    finally:
        cand.unlink(missing_ok=True)
    record["float_nodes"] = best[0] if best else []
    record["final_drop"] = _round(best[1]) if best else record["initial_drop"]
    record["final_sqnr_db"] = best[2] if best else record["initial_sqnr_db"]
    record["met_budget"] = met
    return record


def _round(v):
    return None if v is None else round(float(v), 3)
