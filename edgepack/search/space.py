"""The search space: the [search] table, merged over sensible defaults, sampled by Optuna and
applied to one trial's BuildConfig and target profile.

A key is a dotted path naming what it changes; nested TOML tables flatten into it
(`[search.prune] ratio = ...` is `prune.ratio`). A value is
  - a list: the choices (categorical),
  - a table {low, high, step?, log?}: a range (int when low, high and step are ints, else float),
  - anything else: fixed, not searched (how to switch a default dimension off).

What a key may name, so new compression stages need no code here:
  prune.<field>                  the [prune] table (ratio 0 = no pruning); prune.finetune.<field>
  compress.<stage>.<field>       the [compress] table (edgepack.compress stages)
  quantization.<field>           the target profile's [quantization] (activation_type fixes the scheme)
  runtime | format               onnxruntime/onnx or tflite: which artifact is judged
  threads                        the profile's thread count
  <BuildConfig field>            e.g. max_float_nodes, fallback, calibration_method
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from ..config import BuildConfig
from ..errors import EdgepackError
from ..targets import Quantization, TargetProfile, format_validation

# BuildConfig fields a trial owns itself: the space cannot name them.
_NOT_SEARCHABLE = {"target", "targets_dir", "out", "device", "devices_dir", "search", "model", "weights", "calib",
                   "eval", "train", "name", "prune", "compress", "cache", "trust_pickle"}
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "onnxruntime": "onnxruntime", "tflite": "tflite"}


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (table or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_range(value):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_range(value: dict) -> bool:
    return "low" in value or "high" in value


def is_torch_model(cfg: BuildConfig) -> bool:
    return cfg.model is None or not str(cfg.model).lower().endswith(".onnx")


def default_space(profile: TargetProfile, cfg: BuildConfig) -> dict[str, Any]:
    """What a search varies when the [search] table says nothing."""
    space: dict[str, Any] = {}
    if is_torch_model(cfg):  # pruning needs the PyTorch model
        space["prune.ratio"] = {"low": 0.0, "high": 0.6, "step": 0.1}
        space["prune.importance"] = ["l2", "l1"]
        space["prune.global_pruning"] = [False, True]
    space["quantization.calibration_method"] = ["MinMax", "Percentile", "Entropy"]
    space["quantization.per_channel"] = [True, False]
    # Activation type: only where the judged artifact is ONNX and the profile fixes the scheme
    # ("auto" lets the CPU's int8 flags choose it: VNNI wants unsigned activations).
    if profile.primary_format == "onnx" and profile.quantization.scheme == "fixed":
        space["quantization.activation_type"] = ["QUInt8", "QInt8"]
    space["max_float_nodes"] = [0, 1, 2, 4, 8]
    if len(set(profile.formats)) > 1 and is_torch_model(cfg) and importlib.util.find_spec("litert_torch"):
        space["runtime"] = sorted({RUNTIME_OF_FORMAT[f] for f in profile.formats})
    if profile.threads > 1:
        space["threads"] = sorted({t for t in (1, 2, 4, 8, 16) if t < profile.threads} | {profile.threads})
    return space


def resolve_space(table: dict[str, Any] | None, profile: TargetProfile, cfg: BuildConfig) -> dict[str, Any]:
    """The defaults with the [search] table's keys over them, each value checked."""
    given = flatten(table or {})
    space = {**default_space(profile, cfg), **given}
    if not space.get("prune.ratio", 1) and not isinstance(space.get("prune.ratio"), (list, dict)):
        # no pruning: the other pruning defaults would only multiply the same builds
        space = {k: v for k, v in space.items() if not k.startswith("prune.") or k in given}
    for key, value in space.items():
        _check(key, value)
    return space


def _check(key: str, value) -> None:
    if isinstance(value, list) and not value:
        raise EdgepackError(f"[search] {key}: an empty list of choices", "give choices, or one value to fix it")
    if isinstance(value, list) and not all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        raise EdgepackError(f"[search] {key}: choices must be numbers, strings or booleans")
    if isinstance(value, dict):
        extra = set(value) - {"low", "high", "step", "log"}
        if extra or not all(isinstance(value.get(k), (int, float)) for k in ("low", "high")):
            raise EdgepackError(f"[search] {key}: a range is {{low = A, high = B}} with optional step and log",
                                f"got {value}")
        if value["low"] > value["high"]:
            raise EdgepackError(f"[search] {key}: low {value['low']} is above high {value['high']}")


def searched(space: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in space.items() if isinstance(v, (list, dict))}


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """One value per key: sampled by the trial (optuna.Trial) for lists and ranges, else fixed."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec, dict):
            step, log = spec.get("step"), bool(spec.get("log", False))
            if all(isinstance(spec.get(k, 1), int) and not isinstance(spec.get(k, 1), bool)
                   for k in ("low", "high", "step")):
                values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=step or 1, log=log)
            else:
                value = trial.suggest_float(key, spec["low"], spec["high"], step=step, log=log)
                # low + k * step in binary floating point: 0.30000000000000004 reads as noise
                values[key] = round(value, 10)
        else:
            values[key] = spec
    return values


def first_values(space: dict[str, Any]) -> dict[str, Any]:
    """A point of the space (the first choice, the low end), to check a space before any trial."""
    return {k: (v[0] if isinstance(v, list) else v["low"] if isinstance(v, dict) else v) for k, v in space.items()}


def apply(cfg: BuildConfig, profile: TargetProfile, values: dict[str, Any], trial_dir: Path,
          trial_minutes: float, device: str | None) -> BuildConfig:
    """The trial's BuildConfig: values applied to the config and to a copy of the profile, which
    is written as `trial_dir/target.toml` (same name, so the build directory is named as usual)."""
    prof = profile.model_copy(deep=True)
    data = cfg.model_dump()
    prune = copy.deepcopy(cfg.prune or {})
    compress = copy.deepcopy(cfg.compress or {})
    fields: dict[str, Any] = {}
    ratio = None
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head == "prune" and rest:
            if rest == "ratio":
                ratio = value
            else:
                _set_path(prune, rest.split("."), value)
        elif head == "compress" and "." in rest:
            _set_path(compress, rest.split("."), value)
        elif head == "quantization" and rest:
            _set_quantization(prof, rest, value)
        elif key in ("runtime", "format"):
            _set_runtime(prof, key, value)
        elif key == "threads":
            prof.threads = int(value)
        elif key in BuildConfig.model_fields and key not in _NOT_SEARCHABLE:
            fields[key] = value
        else:
            raise EdgepackError(f"[search] {key}: not something a trial can change",
                                "keys are prune.<field>, compress.<stage>.<field>, quantization.<field>, runtime, "
                                "threads, or a build option such as max_float_nodes")
    if ratio is not None:
        for goal in ("to_latency", "macs_target", "ratio"):
            prune.pop(goal, None)
        if ratio > 0:
            prune["ratio"] = round(float(ratio), 6)
    if prune.get("ratio") or prune.get("to_latency") or prune.get("macs_target"):
        prune["max_minutes"] = min(float(prune.get("max_minutes") or trial_minutes), trial_minutes)
        prune["max_prune_minutes"] = min(float(prune.get("max_prune_minutes") or trial_minutes), trial_minutes)
    else:
        prune = {}
    trial_dir.mkdir(parents=True, exist_ok=True)
    profile_path = trial_dir / "target.toml"
    profile_path.write_text(tomli_w.dumps(prof.model_dump(mode="json", exclude_none=True)))
    data.update(target=str(profile_path), threads=None, formats=None, calibration_method=None,
                prune=prune or None, compress=compress or None, out=str(trial_dir), device=device, search=None)
    data.update(fields)
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as e:
        raise EdgepackError(f"[search] gives a trial an invalid build option:\n{format_validation(e)}") from e


def _set_path(table: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        table = table.setdefault(part, {})
    table[path[-1]] = value


def _set_quantization(prof: TargetProfile, field: str, value) -> None:
    if field not in Quantization.model_fields:
        raise EdgepackError(f"[search] quantization.{field}: the profile's [quantization] has no such field",
                            f"known: {', '.join(Quantization.model_fields)}")
    try:
        prof.quantization = prof.quantization.model_copy(update={field: value})
        Quantization.model_validate(prof.quantization.model_dump())
    except ValidationError as e:
        raise EdgepackError(f"[search] quantization.{field} = {value!r}:\n{format_validation(e)}") from e
    if field in ("activation_type", "weight_type"):
        prof.quantization.scheme = "fixed"  # the trial asks for these types, not the CPU's choice


def _set_runtime(prof: TargetProfile, key: str, value) -> None:
    runtime = RUNTIME_OF_FORMAT.get(str(value))
    if runtime is None:
        raise EdgepackError(f"[search] {key} = {value!r}: use onnxruntime (onnx) or tflite")
    prof.runtime = runtime
    prof.formats = ["onnx"] if runtime == "onnxruntime" else ["onnx", "tflite"]
