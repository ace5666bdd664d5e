"""Stage `tflite`: `model.fp32.tflite` and full-integer `model.int8.tflite` with litert-torch,
checked against PyTorch on every output. Cached by content (weights, shapes, layout, calibration).

A model given as ONNX has no PyTorch graph to convert: on a TFLite target its ONNX int8 artifact
is the one judged (ONNX Runtime runs on the Pi and on Android), and the report says so.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
from pathlib import Path

from pydantic import BaseModel, Field

from .. import tflite
from ..cache import hash_module
from ..errors import EdgepackError
from ..lifetime import die_with_parent
from ..manifest import TensorSpec
from ..onnx_tools.export import FlatOutputs, check_parity
from ..onnx_tools.sensitivity import release_heap
from ..quality import drop, measure
from ..report import table
from .context import BuildContext
from .infer import predict

NAME = "tflite"
FP32, INT8 = "model.fp32.tflite", "model.int8.tflite"
MAX_CALIB = 128  # PT2E calibration is slow (FACTS.md: 64 samples took 86-123 s on ResNet-18)
ONNX_INPUT_NOTE = ("the model was given as ONNX, which litert-torch cannot convert: the ONNX int8 artifact "
                   "is judged on this target instead (ONNX Runtime runs on the Pi and on Android)")


class Config(BaseModel):
    layout: str
    calibration_samples: int
    optional: bool
    inputs: list[dict]
    # The accuracy-aware fallback (ai-edge-quantizer, ops left float) aims at these budgets.
    fallback: bool = True
    max_float_ops: int = 8
    # "fp16" (a profile listing fp16, or [compress.fp16] mixed = true): the ops the fallback keeps out
    # of int8 get fp16 weights, the mixed int8/fp16 mode; "fp32": they stay float32.
    float_precision: str = "fp32"
    max_accuracy_drop: float | None = None
    min_sqnr_db: float | None = None
    # Ops the per-op SQNR report lists (None: all, --debug-quant); cut after the cache, as in quantize.
    ranked: int | None = Field(10, exclude=True)


def config(ctx: BuildContext) -> Config | None:
    if "tflite" not in ctx.profile.formats:
        return None
    if ctx.model.kind != "torch":
        ctx.say(f"note: no TFLite artifacts: {ONNX_INPUT_NOTE}")
        ctx.records[NAME] = {"skipped": ONNX_INPUT_NOTE}
        ctx.sections[NAME] = f"## TFLite\n\nNot produced: {ONNX_INPUT_NOTE}.\n"
        return None
    n_cal = min(len(ctx.data.calib), ctx.profile.quantization.calibration_samples, MAX_CALIB)
    b = ctx.profile.budgets
    return Config(layout=ctx.profile.layout, calibration_samples=n_cal, optional=ctx.profile.tflite_optional,
                  inputs=[s.model_dump() for s in ctx.model.inputs], fallback=ctx.cfg.fallback,
                  max_float_ops=ctx.cfg.max_float_nodes, max_accuracy_drop=b.max_accuracy_drop, min_sqnr_db=b.min_sqnr_db,
                  float_precision=_float_precision(ctx), ranked=None if ctx.cfg.debug_quant else 10)


def run(ctx: BuildContext, cfg: Config) -> dict:
    m = ctx.model
    calib = ctx.data.calib.sample(cfg.calibration_samples, seed=0)
    metric_files, metric = ctx.metric_key()
    key = ctx.cache.key(NAME, config=cfg.model_dump(), blobs=[hash_module(m.module), metric], files=metric_files,
                        data=f"{calib.fingerprint()}-{ctx.data.choose.fingerprint()}", versions=ctx.versions)
    try:
        stage = ctx.restore(NAME, key)
        if stage is None:
            stage = _fallback_and_report(ctx, cfg, calib, _converted(ctx, cfg, calib))
            ctx.store(NAME, key, {FP32: ctx.work / FP32, INT8: ctx.work / INT8}, stage)
        if stage.get("sensitivity", {}).get("ops"):
            stage["sensitivity"] = {**stage["sensitivity"], "ops": stage["sensitivity"]["ops"][:cfg.ranked]}
        out32 = predict(ctx.work / FP32, m, ctx.data.report, ctx.profile.threads, cfg.layout)
        out8 = predict(ctx.work / INT8, m, ctx.data.report, ctx.profile.threads, cfg.layout)
        stage["parity"] = check_parity(ctx.reference, out32, "TFLite fp32", names=m.outputs)
    except EdgepackError as e:
        if not cfg.optional:
            raise
        for f in (FP32, INT8):
            (ctx.work / f).unlink(missing_ok=True)
        ctx.say(f"warning: no TFLite artifacts ({e.message}); the profile marks TFLite optional")
        ctx.sections[NAME] = f"## TFLite\n\nNot produced: {e.message}\n"
        return {"skipped": e.message}
    ctx.outputs[FP32], ctx.outputs[INT8] = out32, out8
    ctx.sections[NAME] = section(stage)
    return stage


CONVERSION_KEYS = {"layout", "calibration_samples", "inputs"}  # what the litert-torch conversions depend on


def _converted(ctx: BuildContext, cfg: Config, calib) -> dict:
    """The two litert-torch conversions, cached on their own: a build that changes only the
    fallback or the budgets it aims at reuses them (they are most of the stage's time)."""
    key = ctx.cache.key(f"{NAME}-convert", config=cfg.model_dump(include=CONVERSION_KEYS),
                        blobs=[hash_module(ctx.model.module)], data=calib.fingerprint(), versions=ctx.versions)
    stage = ctx.restore(f"{NAME} conversions", key)
    if stage is None:
        stage = _convert(ctx, cfg, calib)
        ctx.store(f"{NAME} conversions", key, {FP32: ctx.work / FP32, INT8: ctx.work / INT8}, stage)
    stage.pop("cache", None)  # the stage's own cache record is the one the manifest keeps
    return stage


def _convert(ctx: BuildContext, cfg: Config, calib) -> dict:
    m, module = ctx.model, FlatOutputs(ctx.model.module).eval()
    tflite.check_litert_torch(cfg.layout)  # not imported here: the conversions run in a child
    names = {"input_names": m.input_names, "output_names": m.outputs}
    # Each conversion runs in a child process that reports nothing back while it works: a task
    # without a total (elapsed time only). No task is open around the forked parts below.
    _lean()  # the build waits minutes on each conversion child: hand its freed heap back first
    with ctx.progress.task(f"converting to TFLite fp32 with litert-torch ({cfg.layout})"):
        rec32 = tflite.convert_fp32(module, m.example_inputs(), ctx.work / FP32, cfg.layout, **names)
    _lean()
    with ctx.progress.task(f"converting to TFLite int8 (PT2E static, {len(calib)} calibration samples)"):
        rec8 = tflite.convert_int8(module, m.example_inputs(), calib, ctx.work / INT8, cfg.layout,
                                   num_calib=len(calib), **names)
    return {"fp32": {k: rec32.get(k) for k in KEEP}, "int8": {k: rec8.get(k) for k in KEEP},
            "calibration_samples": len(calib), "scheme": tflite.INT8_SCHEME}


def _fallback_and_report(ctx: BuildContext, cfg: Config, calib, stage: dict) -> dict:
    """The accuracy-aware fallback (it may replace model.int8.tflite) and the per-op SQNR report."""
    m, keep = ctx.model, KEEP
    names = {"input_names": m.input_names, "output_names": m.outputs}
    # Ranking ops keeps every intermediate tensor, and ai-edge-litert aborts the whole process on
    # some graphs (seen: a small transformer encoder): run that part in a forked child.
    if cfg.fallback:
        fb = _isolated(lambda: tflite.fallback(ctx.work / FP32, ctx.work / INT8, calib, _misses(ctx, cfg),
                                               max_float_ops=cfg.max_float_ops, layout=cfg.layout,
                                               float_precision=cfg.float_precision,
                                               threads=ctx.profile.threads, say=ctx.say, **names), "the TFLite fallback")
        if isinstance(fb, str):
            ctx.say(f"warning: {fb}")
            stage["fallback_skipped"] = fb
        elif fb:
            stage["fallback"] = fb
            if fb.get("replaced"):
                stage["int8"] = {k: fb["artifact"].get(k) for k in keep}  # new IO scales for the manifest
    report = _isolated(lambda: tflite.int8_report(ctx.work / FP32, ctx.work / INT8, calib.arrays(), cfg.layout,
                                                  top=None, samples=32), "the TFLite per-op SQNR report")
    stage["sensitivity"] = {"skipped": report, "ops": []} if isinstance(report, str) else report
    return stage


def _isolated(fn, what: str):
    """fn() in a forked child: its result, or a sentence saying why there is none (a native abort
    there costs only that part). An EdgepackError in the child is raised here with its message."""
    _lean()  # what the parent has freed is not copied into, nor counted twice with, the child
    mp = multiprocessing.get_context("fork")
    receive, send = mp.Pipe(duplex=False)

    parent = os.getpid()

    def child():
        die_with_parent(parent)  # ends with the build (killed, or Ctrl-C'd twice), not orphaned with its memory
        try:
            send.send(("ok", fn()))
        except EdgepackError as e:
            send.send(("edgepack", (e.message, e.hint)))
        except BaseException as e:  # noqa: BLE001  (reported to the parent as a skipped part)
            send.send(("error", f"{type(e).__name__}: {e}"))
    proc = mp.Process(target=child)
    proc.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:
        kind, value = "died", None
    proc.join()
    if kind == "ok":
        return value
    if kind == "edgepack":
        raise EdgepackError(*value)
    why = value or f"the process running it died (exit {proc.exitcode}: ai-edge-litert aborted)"
    return f"{what} was skipped: {why}"


def _lean() -> None:
    """Free what only cycles hold and hand the freed heap back to the OS (glibc keeps it)."""
    gc.collect()
    release_heap()


def _float_precision(ctx: BuildContext) -> str:
    mixed = ((ctx.cfg.compress or {}).get("fp16") or {}).get("mixed")
    if mixed is None:
        mixed = "fp16" in ctx.profile.precisions
    return "fp16" if mixed else "fp32"


def _misses(ctx: BuildContext, cfg: Config):
    """Whether an int8 .tflite misses a quality budget on the samples set aside to choose with."""
    m, choose = ctx.model, ctx.data.choose
    reference = predict(ctx.work / FP32, m, choose, ctx.profile.threads, cfg.layout)
    ref = measure(reference, m.outputs, choose.y, reference, ctx.metric)

    def misses(path: Path) -> tuple[bool, float | None]:
        q = measure(predict(path, m, choose, ctx.profile.threads, cfg.layout), m.outputs, choose.y, reference, ctx.metric)
        value, _ = drop(ref, q)
        return ((cfg.max_accuracy_drop is not None and value is not None and value > cfg.max_accuracy_drop)
                or (cfg.min_sqnr_db is not None and q.get("sqnr_db", float("inf")) < cfg.min_sqnr_db)), value
    return misses


KEEP = ("seconds", "convert_seconds", "calibration_seconds", "process_overhead_seconds", "export_mode",
        "size_bytes", "num_ops", "ops", "quantize_ops", "dequantize_ops", "float_ops", "float_op_counts",
        "converter", "layout", "inputs", "outputs", "input_order", "output_order", "output_order_source",
        "tflite_names", "notes")


def specs(stage: dict, precision: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    rec = stage[precision]
    return [TensorSpec(**s) for s in rec["inputs"]], [TensorSpec(**s) for s in rec["outputs"]]


def section(stage: dict) -> str:
    lines = ["## TFLite", "", f"Converted with {stage['int8']['converter']}; int8 scheme: {stage['scheme']}, "
             f"{stage['calibration_samples']} calibration samples.", ""]
    p = stage.get("parity")
    if p:
        lines += [f"TFLite fp32 vs PyTorch: max abs diff {p['max_abs_diff']:.3g}, cosine {p['cosine']:.6f}.", ""]
    rows = []
    for path, key in ((FP32, "fp32"), (INT8, "int8")):
        r = stage[key]
        floats = ", ".join(f"{k} x{v}" for k, v in (r["float_op_counts"] or {}).items()) or "-"
        rows.append([path, r["layout"], f"{r['seconds']:.1f}", r["num_ops"], r["quantize_ops"], r["dequantize_ops"],
                     floats if key == "int8" else "n/a (float model)"])
    lines.append(table(["artifact", "layout", "convert s", "ops", "QUANTIZE", "DEQUANTIZE", "float ops left in graph"], rows))
    fb = stage.get("fallback")
    if fb:
        kept = ", ".join(f"`{o.get('module') or o.get('name')}`" + (f" ({o['precision']})" if o.get('precision') else "")
                         for o in fb.get("float_ops", [])) or "none"
        lines += ["", "### TFLite accuracy-aware fallback", "",
                  f"{fb.get('route', 'ai-edge-quantizer')}: int8 drop {fb.get('initial_drop')} missed a quality budget on "
                  f"the choosing samples; after leaving ops in float the drop is {fb.get('final_drop')} "
                  f"(budget {'met' if fb.get('met_budget') else 'still NOT met'}). Ops left in float: {kept}.", "",
                  table(["ops in float", "drop"], [[t.get("float_ops", t.get("k")), t.get("drop")] for t in fb.get("tried", [])])]
    ops = (stage.get("sensitivity") or {}).get("ops") or []
    if ops:
        lines += ["", f"Ops that lose the most SQNR in `model.int8.tflite` ({stage['sensitivity'].get('samples')} samples):", "",
                  table(["op", "module", "SQNR dB", "lost dB"],
                        [[o.get("op"), o.get("module") or o.get("name"), o.get("sqnr_db"), o.get("lost_db")] for o in ops[:10]])]
    return "\n".join(lines) + "\n"
