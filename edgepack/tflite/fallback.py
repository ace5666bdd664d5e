"""Accuracy-aware fallback for the TFLite int8 artifact: the most sensitive ops stay in float.

litert-torch 0.10's PT2E quantizer cannot leave a module in float (`set_module_name(name,
None)` asserts), so the fallback re-quantizes the float `model.fp32.tflite` with Google's
ai-edge-quantizer instead: a static recipe (int8 per-channel symmetric weights, int8 per-tensor
activations, int8 model inputs and outputs) with a `no_quantize` rule per op left in float,
matched on the op's scope (its output tensor names). The activation ranges are the PT2E
artifact's own where its tensors match (better than ai-edge-quantizer's min/max, see
`Int8Quantizer._adopt_ranges`), else calibrated once on the calibration data; each candidate
is then one quantization pass (0.1-0.3 s on a MobileNetV2).
"""
from __future__ import annotations

import gc
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgepackError
from ..manifest import sha256_file
from ._calibration import calibrate as lean_calibrate
from ._isolate import tmp_path_for
from ._quiet import quiet_native
from .convert import _named
from .fp16 import FP16_OPS, fp16_recipe
from .inspect import inspect_tflite, read_io
from .validate import _cast, _to_layout, run_tflite
from .sensitivity import CONVERSION_OPS, MOVEMENT_OPS, graph_ops, module_of, pair_tensors, rank_ops

SCHEME = ("ai-edge-quantizer static: per-channel symmetric int8 weights, per-tensor int8 activations (ranges taken "
          "from the int8 artifact where its tensors match, else min/max calibration), int8 inputs/outputs; listed ops in float")
SCOPE_MAX = 10000  # ai-edge-quantizer truncates an op's scope string to this many characters
ADOPT_MARGIN_DB = 3.0  # adopted ranges that lose more output SQNR than this against their source are dropped


def _aeq():
    try:
        with quiet_native(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from ai_edge_quantizer import algorithm_manager, quantizer, recipe
    except ImportError as e:
        raise EdgepackError("the TFLite fallback needs ai-edge-quantizer, which is not installed",
                            "pip install -c constraints.txt ai-edge-quantizer==0.10.0") from e
    return quantizer, recipe, algorithm_manager.AlgorithmName


def route() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"ai-edge-quantizer {version('ai-edge-quantizer')}"
    except PackageNotFoundError:
        return "ai-edge-quantizer (not installed)"


def _arrays(calib) -> list[np.ndarray]:
    """Calibration data as one array per model input: a Dataset, a list of arrays or one array."""
    if isinstance(calib, np.ndarray):
        return [calib]
    if hasattr(calib, "arrays"):
        return [np.asarray(a) for a in calib.arrays()]
    return [np.asarray(a) for a in calib]


class Int8Quantizer:
    """ai-edge-quantizer on one float `.tflite`: calibrated once, quantized per float-op set."""

    def __init__(self, fp32_tflite: Path, calib_arrays, layout: str = "NCHW", threads: int = 1,
                 input_names: list[str] | None = None, output_names: list[str] | None = None,
                 ranges_from: Path | None = None, float_precision: str = "fp32"):
        self.fp32, self.layout, self.threads = Path(fp32_tflite), layout, int(threads)
        # "fp16": the ops kept out of int8 get fp16 weights where ai-edge-quantizer can cast them
        # (the mixed int8/fp16 mode); "fp32": they stay as in the float model.
        self.float_precision = float_precision
        self.ranges_from = None if ranges_from is None else Path(ranges_from)
        self.ranges = "ai-edge-quantizer min/max (moving average)"
        self.names = (input_names, output_names)
        self.arrays = _arrays(calib_arrays)
        self.graph = graph_ops(self.fp32)
        self.io = read_io(self.fp32, layout)
        self._qsvs = None
        if len(self.arrays) != len(self.io["inputs"]):
            raise EdgepackError(f"{self.fp32.name} takes {len(self.io['inputs'])} input(s) but the "
                                f"calibration data has {len(self.arrays)}",
                                "give one array per model input, in the model's argument order")

    def _signature(self) -> tuple[str, list[str]]:
        """The signature key and, in PyTorch argument order, its input names."""
        from ai_edge_litert.interpreter import Interpreter
        with quiet_native():
            it = Interpreter(model_path=str(self.fp32))
        sigs = it._get_full_signature_list()
        if len(sigs) != 1:
            raise EdgepackError(f"{self.fp32.name} has {len(sigs)} signatures; the TFLite fallback "
                                "needs exactly one", "convert the model with litert-torch")
        key, sig = next(iter(sigs.items()))
        by_tensor = {t: n for n, t in sig["inputs"].items()}
        details = it.get_input_details()
        return key, [by_tensor[details[p]["index"]] for p in self.io["input_order"]]

    def _feed(self):
        key, names = self._signature()
        batch = self.io["inputs"][0]["shape"][0] if self.io["inputs"][0]["shape"] else 1
        batch = batch if isinstance(batch, int) and batch > 0 else 1
        prepared = [_cast(_to_layout(a, self.layout), s, f"{self.fp32.name} input {i}")
                    for i, (a, s) in enumerate(zip(self.arrays, self.io["inputs"]))]
        n = len(prepared[0]) // batch * batch
        if n == 0:
            prepared, n = [np.resize(a, (batch, *a.shape[1:])) for a in prepared], batch

        class Feed:  # re-iterable: ai-edge-quantizer counts the samples first, then runs them
            def __iter__(self):
                for i in range(0, n, batch):
                    yield {nm: np.ascontiguousarray(a[i:i + batch])
                           for nm, a in zip(names, prepared)}
        return {key: Feed()}, n

    def calibrate(self) -> dict:
        """Activation ranges ({tensor name: {"min", "max"}}), computed once."""
        if self._qsvs is None:
            t0 = time.perf_counter()
            adopted, how = self._adopt_ranges(self.ranges_from) if self.ranges_from else ({}, "")
            g = self.graph
            acts = [*g["inputs"], *(t for o in g["ops"] for t in o["outputs"])]
            needed = {g["names"][t] for t in acts if t in g["float32"]}
            self.calibration_samples = 0
            if needed <= set(adopted):  # every activation has a range: no calibration pass needed
                self._qsvs = adopted
                self.ranges = f"all {len(needed)} from {self.ranges_from.name} (matched by {how})"
            else:
                quantizer, recipe, _ = _aeq()
                data, self.calibration_samples = self._feed()
                with quiet_native(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q = quantizer.Quantizer(str(self.fp32), recipe.static_wi8_ai8())
                    self._qsvs = lean_calibrate(q, data, self.threads)  # one copy of the tensors at a time
                used = {k: v for k, v in adopted.items() if k in self._qsvs}
                self._qsvs.update(used)
                if used:
                    self.ranges = (f"{len(used)} of {len(self._qsvs)} from {self.ranges_from.name} "
                                   f"(matched by {how}), the rest ai-edge-quantizer min/max")
            self.calibration_seconds = time.perf_counter() - t0
        return self._qsvs

    def _adopt_ranges(self, int8_tflite: Path) -> tuple[dict, str]:
        """Activation ranges from an int8 model of the same graph, for the tensors it has: its
        grid [(-128 - zp) * scale, (127 - zp) * scale].

        Measured on a trained MobileNetV2 (noisy digits, 32x32): ai-edge-quantizer's own
        moving-average min/max gave 16.5 dB output SQNR against fp32 where litert-torch's PT2E
        histogram ranges gave 24.2 dB; ai-edge-quantizer with the PT2E ranges gave 27.7 dB. So
        the fallback starts from the artifact's own ranges and changes only the ops it floats."""
        other = graph_ops(int8_tflite)
        pairs, how = pair_tensors(self.graph, other)
        ranges = {}
        for ft, qt in pairs.items():
            grid = other["int8_grids"].get(qt)
            if grid is None or ft not in self.graph["float32"]:
                continue
            scale, zero = grid
            shape = (1,) * self.graph["ranks"][ft]  # ai-edge-quantizer keeps dims: (1, 1, 1, 1)
            ranges[self.graph["names"][ft]] = {
                "min": np.full(shape, (-128 - zero) * scale, np.float32),
                "max": np.full(shape, (127 - zero) * scale, np.float32)}
        return ranges, how

    def resolve(self, float_ops) -> list[dict]:
        """Op indices or output tensor names -> [{"index", "op", "name", "module"}]."""
        names = self.graph["names"]
        by_name = {names[o["outputs"][0]]: o for o in self.graph["ops"] if o["outputs"]}
        chosen = []
        for f in float_ops:
            f = f.get("index", f.get("name")) if isinstance(f, dict) else f
            ops = self.graph["ops"]
            op = ops[f] if isinstance(f, (int, np.integer)) and 0 <= f < len(ops) else by_name.get(f)
            if op is None:
                raise EdgepackError(f"{self.fp32.name} has no op {f!r} to keep in float",
                                    "name an op by its index or output tensor name (see rank_ops)")
            if op["index"] not in {c["index"] for c in chosen}:
                name = names[op["outputs"][0]] if op["outputs"] else ""
                chosen.append({"index": op["index"], "op": op["op"], "name": name,
                               "module": module_of(name)})
        return chosen

    def quantize(self, out: Path, float_ops=()) -> dict:
        """Write the int8 model to `out` (atomically) with `float_ops` left in float."""
        quantizer, recipe, algorithms = _aeq()
        qsvs = self.calibrate()
        chosen = self.resolve(float_ops)
        t0 = time.perf_counter()
        out = Path(out)
        tmp = tmp_path_for(out)
        try:
            with quiet_native(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantizer.Quantizer(str(self.fp32), recipe.static_wi8_ai8())
                for c in chosen:
                    if self.float_precision == "fp16" and c["op"] in FP16_OPS:
                        fp16_recipe(q, self._scope_regex(c["index"]), ops=[c["op"]])
                        c["precision"] = "fp16"
                    else:
                        q.update_quantization_recipe(self._scope_regex(c["index"]), "*",
                                                     algorithm_key=algorithms.NO_QUANTIZE)
                        c["precision"] = "fp32"
                result = q.quantize(qsvs, enable_progress_bar=False, enable_progress_report=False)
            tmp.write_bytes(bytes(result.quantized_model))
            tmp.replace(out)
        except EdgepackError:
            raise
        except Exception as e:
            raise EdgepackError(f"ai-edge-quantizer could not quantize {self.fp32.name}: "
                                f"{type(e).__name__}: {e}", "rerun with --debug and report it "
                                "with the model") from e
        finally:
            tmp.unlink(missing_ok=True)
        info = inspect_tflite(out, self.layout)
        notes = [f"{len(chosen)} op(s) kept in float: "
                 + ", ".join(f"{c['module']} ({c['op']}, {c['precision']})" for c in chosen)
                 + "; each costs a dequantize/quantize round trip on the device"] if chosen else []
        # Keys as in a conversion record (convert._record), so the build can swap this one in.
        return {"path": str(out), "format": "tflite", "precision": "int8", "layout": self.layout,
                "seconds": round(time.perf_counter() - t0, 2), "export_mode": None,
                "calibration_seconds": round(self.calibration_seconds, 2),
                "calibration_samples": self.calibration_samples,
                "size_bytes": info["size_bytes"], "sha256": sha256_file(out),
                "inputs": _named(info["inputs"], self.names[0], "input"),
                "outputs": _named(info["outputs"], self.names[1], "output"),
                "input_order": info["input_order"], "output_order": info["output_order"],
                "output_order_source": info["order_source"],
                "tflite_names": {"inputs": [x["name"] for x in info["inputs"]],
                                 "outputs": [x["name"] for x in info["outputs"]]},
                "ops": info["ops"], "num_ops": info["num_ops"], "quantize_ops": info["quantize_ops"],
                "dequantize_ops": info["dequantize_ops"], "float_ops": info["float_ops"],
                "float_op_details": info["float_op_details"],
                "float_op_counts": info["float_op_counts"],
                "kept_in_float": chosen, "converter": f"{route()} (from {self.fp32.name})",
                "scheme": SCHEME, "activation_ranges": self.ranges, "notes": notes}

    def _scope_regex(self, index: int) -> str:
        # The op's scope as ai-edge-quantizer computes it (tfl_flatbuffer_utils.get_op_scope):
        # its output tensor names joined by ";" plus a trailing ";", anchored so that no other
        # op whose scope merely contains it is caught.
        op = self.graph["ops"][index]
        names = [self.graph["names"][t] for t in op["outputs"] if t >= 0]
        names = [n for n in names if n] or [self.graph["names"][t] for t in op["inputs"]]
        scope = (";".join(names) + ";")[:SCOPE_MAX]
        return f"^{re.escape(scope)}$"


def quantize_tflite(fp32_tflite: Path, out: Path, calib_arrays, layout: str = "NCHW",
                    float_ops=(), threads: int = 1, input_names: list[str] | None = None,
                    output_names: list[str] | None = None) -> dict:
    """Full-integer static int8 `.tflite` at `out` from the float one with ai-edge-quantizer,
    the ops in `float_ops` (indices or output tensor names, e.g. `rank_ops` entries' "name")
    left in float. The record has a conversion record's keys; "kept_in_float" names the ops
    asked for ({"index", "op", "name", "module"}), "float_ops"/"float_op_details" every op that
    computes in float (those, plus any the quantizer cannot do in int8)."""
    return Int8Quantizer(fp32_tflite, calib_arrays, layout, threads, input_names,
                         output_names).quantize(out, float_ops)


# Ops that only move or pad values carry their input's int8 grid: a tensor kept off that grid
# must stay off it through them, up to the ops that compute with it. PyTorch's stride-2 convs
# with padding=1 (every MobileNet's downsampling depthwise conv) become PAD + DEPTHWISE_CONV_2D
# in TFLite: floating the conv and the PAD alone left the depthwise conv reading the outlier grid.
PASS_THROUGH = MOVEMENT_OPS - CONVERSION_OPS - {"SHAPE", "CAST"}


def _group(entry: dict, graph: dict) -> list[int]:
    """An op and, when its loss is its output's int8 grid, the ops that read that output (see
    sensitivity's docstring), through data movement (PASS_THROUGH) to the ops computing with it:
    float consumers are what keeps the tensor off the grid."""
    idx = [entry["index"]]
    if entry.get("output_limited"):
        todo = list(graph["ops"][entry["index"]]["outputs"])
        while todo:
            for c in graph["consumers"].get(todo.pop(0), []):
                if c not in idx:
                    idx.append(c)
                    if graph["ops"][c]["op"] in PASS_THROUGH:
                        todo += graph["ops"][c]["outputs"]
    return idx


def fallback(fp32_tflite: Path, int8_tflite: Path, calib,
             misses: Callable[[Path], tuple[bool, float | None]], max_float_ops: int = 8,
             layout: str = "NCHW", threads: int = 1, rank_samples: int = 32,
             say: Callable[[str], None] | None = None, input_names: list[str] | None = None,
             output_names: list[str] | None = None, adopt_ranges: bool = True,
             float_precision: str = "fp32") -> dict | None:
    """None when `misses(int8_tflite)` says the artifact holds its budgets. Otherwise quantize
    the float model with ai-edge-quantizer (activation ranges adopted from `int8_tflite` where
    its tensors match, see `Int8Quantizer._adopt_ranges`), rank its ops by the SQNR int8 costs
    them, and try 0, then the 1, 2, 4, ... most sensitive ops in float (at most
    `max_float_ops`), stopping at the first model `misses` accepts. `int8_tflite` is replaced
    atomically by that model; when none is accepted, by the best one only if it is no worse
    than the original in both drop and output SQNR (a slower model that still misses is no
    gain). `misses(path) -> (missed, drop)` is the build's budget check. `float_precision="fp16"`
    keeps those ops' weights in fp16 instead of fp32 (the mixed int8/fp16 mode)."""
    say = say or (lambda _msg: None)
    int8_tflite = Path(int8_tflite)
    missed, first = misses(int8_tflite)
    if not missed:
        return None
    t0 = time.perf_counter()
    arrays = _arrays(calib)
    q = Int8Quantizer(fp32_tflite, arrays, layout, threads, input_names, output_names,
                      ranges_from=int8_tflite if adopt_ranges else None, float_precision=float_precision)
    probe = [a[:rank_samples] for a in arrays]
    with quiet_native():
        reference = run_tflite(fp32_tflite, probe, layout)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    made: list[Path] = []
    record = {"initial_drop": _round(first),
              "initial_output_sqnr_db": _sqnr_vs(reference, int8_tflite, probe, layout),
              "route": route(), "scheme": SCHEME, "tried": [], "applies_to": int8_tflite.name,
              "float_precision": float_precision,
              "output_sqnr_on": f"{len(probe[0])} calibration samples, against "
                                f"{Path(fp32_tflite).name}"}
    original = {"missed": True, "drop": first, "sqnr": record["initial_output_sqnr_db"],
                "path": None, "rec": None}
    best = original
    gc.freeze()  # run in a forked child: collections would touch (copy) every inherited object
    try:
        # ai-edge-quantizer's full-int8 model: the first candidate, and what the ranking reads.
        t1 = time.perf_counter()
        base = int8_tflite.with_name(f".{int8_tflite.stem}.fallback0-{tag}.tflite")
        made.append(base)
        rec0 = q.quantize(base)
        base_sqnr = _sqnr_vs(reference, base, probe, layout)
        initial = record["initial_output_sqnr_db"]
        if q.ranges_from is not None and None not in (base_sqnr, initial) and base_sqnr < initial - ADOPT_MARGIN_DB:
            # Adopted ranges worse than their own artifact (tensors paired wrongly; seen on a ConvNeXt-T
            # style model: 0.28 dB, where ai-edge-quantizer's own min/max gave 18.4): calibrate instead.
            rejected = f"{q.ranges} gave {base_sqnr} dB output SQNR against {initial} dB: not used"
            q.ranges_from, q._qsvs, q.ranges = None, None, "ai-edge-quantizer min/max (moving average)"
            rec0 = q.quantize(base)
            record["adopted_ranges_rejected"] = rejected
        record["activation_ranges"] = q.ranges
        ranking = rank_ops(fp32_tflite, base, arrays, layout, rank_samples, threads)
        record["ranking"] = ranking[:15]
        say(f"int8 TFLite misses a quality budget (drop {_round(first)}); ops losing the most SQNR: "
            + ", ".join(f"{r['module']} {r['lost_db']:.1f} dB" for r in ranking[:3]))
        for ops in _candidates(ranking, q.graph, max_float_ops):
            if ops:
                path = int8_tflite.with_name(f".{int8_tflite.stem}.fallback{len(made)}-{tag}.tflite")
                made.append(path)
                t1 = time.perf_counter()
                rec = q.quantize(path, ops)
            else:
                path, rec = base, rec0
            missed, value = misses(path)
            cand = {"missed": missed, "drop": value, "sqnr": _sqnr_vs(reference, path, probe, layout),
                    "path": path, "rec": rec}
            record["tried"].append({"float_ops": len(ops),
                                    "ops": [o["module"] for o in rec["kept_in_float"]],
                                    "drop": _round(value), "output_sqnr_db": cand["sqnr"],
                                    "met_budget": not missed,
                                    "seconds": round(time.perf_counter() - t1, 2)})
            say(f"  {len(ops)} op(s) in float: drop {_round(value)}, output SQNR {cand['sqnr']} dB"
                + ("" if missed else " (within budget)"))
            if not missed or (_no_worse(cand, original) and _no_worse(cand, best)):
                best = cand
            if not missed:
                break
        rec = best["rec"]
        if best["path"] is not None:
            best["path"].replace(int8_tflite)  # same directory: atomic
            rec = {**rec, "path": str(int8_tflite)}
        record.update({"final_drop": _round(best["drop"]), "final_output_sqnr_db": best["sqnr"],
                       "float_ops": rec["kept_in_float"] if rec else [],
                       "met_budget": not best["missed"], "replaced": rec is not None,
                       "artifact": rec, "calibration_seconds": round(q.calibration_seconds, 2)})
    finally:
        gc.unfreeze()
        for p in made:
            p.unlink(missing_ok=True)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _no_worse(a: dict, b: dict) -> bool:
    """`a` has no larger drop and no lower output SQNR than `b`, and differs from it."""
    drop_ok = a["drop"] is None or b["drop"] is None or a["drop"] <= b["drop"]
    sqnr_ok = a["sqnr"] is None or b["sqnr"] is None or a["sqnr"] >= b["sqnr"]
    return drop_ok and sqnr_ok and (a["drop"], a["sqnr"]) != (b["drop"], b["sqnr"])


def _sqnr_vs(reference: list[np.ndarray], path: Path, probe, layout) -> float | None:
    """Output SQNR (dB) of `path` against the float model's outputs on the same samples."""
    with quiet_native():
        got = run_tflite(path, probe, layout)
    sig = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(g, np.float64)) ** 2))
                for r, g in zip(reference, got))
    return None if sig <= 0 else round(float(10 * np.log10(sig / max(noise, sig * 1e-10))), 2)


def _candidates(ranking: list[dict], graph: dict, max_float_ops: int) -> list[list[int]]:
    """Float-op sets to try: none, then the 1, 2, 4, ... most sensitive ops (each with its group),
    at most `max_float_ops` ops, each distinct set once."""
    sets, seen = [[]], {()}
    cap = min(max_float_ops, len(ranking))
    for k in sorted({min(2 ** i, cap) for i in range(cap.bit_length() + 1)} - {0}):
        chosen: list[int] = []
        for r in ranking[:k]:
            chosen += [i for i in _group(r, graph) if i not in chosen]
        chosen = chosen[:max_float_ops]
        if tuple(sorted(chosen)) not in seen:
            seen.add(tuple(sorted(chosen)))
            sets.append(chosen)
    return sets


def _round(v):
    return None if v is None else round(float(v), 3)
