"""Build configuration: `edgepack.toml` (or --config FILE), overridden by command-line flags.

Everything the CLI can say is a field here, so `edgepack.build(BuildConfig(...))` does the same.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import EdgepackError
from .names import PLAIN_NAME, checked_name
from .targets import Budgets, format_validation

DEFAULT_CONFIG = "edgepack.toml"


# A build name becomes a directory under --out: no separators, no "..", nothing hidden.
BUILD_NAME = PLAIN_NAME


class DataConfig(BaseModel):
    """Image-folder preprocessing (edgepack.data.Preprocess); unset fields keep its defaults."""
    model_config = ConfigDict(extra="forbid")
    preprocess: Literal["imagenet"] | None = None
    resize: int | list[int] | None = None
    crop: int | list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v

    def preprocess_fields(self) -> dict:
        fields = self.model_dump(exclude_none=True)
        if "preprocess" in fields:
            fields["preset"] = fields.pop("preprocess")
        return fields


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = "x86"
    targets_dir: list[str] = []
    model: str | None = None  # None: the embedded default example
    weights: str | None = None
    trust_pickle: bool = False
    # One shape for a single-input model, or a shape per input name; batch first.
    input_shape: list[int] | dict[str, list[int]] | None = None
    input_dtype: dict[str, Literal["float32", "float16", "int64", "int32", "bool"]] = {}
    calib: str | None = None
    eval: str | None = None
    train: str | None = None
    out: str = "dist"
    name: str | None = None
    data: DataConfig = DataConfig()
    # Overrides of the target profile.
    threads: int | None = Field(None, ge=1)
    formats: list[Literal["onnx", "tflite"]] | None = None
    calibration_method: Literal["MinMax", "Entropy", "Percentile"] | None = None
    budgets: Budgets = Budgets()
    budgets_off: list[str] = []  # profile budgets switched off (`--budget NAME=off`)
    # Quality: a user metric `file.py:function` (outputs, labels) -> number, higher is better.
    metric: str | None = None
    # Evaluation samples split off (seeded) to choose with (fallback, early stop); the rest report.
    choose_samples: int = Field(256, ge=0)
    cache: bool = True  # reuse export/int8/TFLite results keyed by content (--no-cache)
    device_eval_samples: int = Field(256, ge=0)  # evaluation subset shipped to devices (0: none)
    # Accuracy-aware fallback: leave up to this many of the most sensitive nodes in float.
    fallback: bool = True
    max_float_nodes: int = Field(8, ge=0)
    # --debug-quant: every node's and op's int8 SQNR (not the 10 worst) in the manifest and quant_debug.md.
    debug_quant: bool = False
    latency_runs: int = Field(50, ge=5)
    # Pruning (see edgepack.prune.PruneConfig); None = no pruning.
    prune: dict[str, Any] | None = None
    # Compression stages after pruning (edgepack.compress): {"lowrank": {...}, "cluster": {...}, ...},
    # the [compress] table of the config file; None or an absent key = that stage is off.
    compress: dict[str, dict[str, Any]] | None = None
    # The [search] table (edgepack.search): read by `edgepack search` only; a build ignores it.
    search: dict[str, Any] | None = None
    # Deploy + benchmark on a device after building.
    device: str | None = None
    devices_dir: list[str] = []
    accept_new_host_key: bool = False

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        return checked_name(v, "a directory under --out")

    @field_validator("budgets_off")
    @classmethod
    def _known_budgets(cls, v):
        unknown = [b for b in v if b not in Budgets.model_fields]
        if unknown:
            raise ValueError(f"unknown budget(s) {', '.join(unknown)}; known: {', '.join(Budgets.model_fields)}")
        return v

    def fingerprint(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Read the config file (explicit path, or ./edgepack.toml if present) and apply overrides.

    Overrides with value None are ignored, so unset CLI flags never erase file settings.
    """
    data: dict[str, Any] = {}
    file = Path(path) if path else (Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).exists() else None)
    if path and not file.exists():
        raise EdgepackError(f"config file {file} does not exist")
    if file:
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise EdgepackError(f"config file {file} is not valid TOML: {e}") from e
        if "trust_pickle" in data:  # a config file found in the working directory must not run code
            raise EdgepackError(f"config file {file}: trust_pickle can only be given on the command line",
                                "remove it from the file and pass --trust-pickle if you trust the model file")
        data = _resolve_paths(data, file.parent)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "compress" and isinstance(data.get(key), dict):  # one table per stage: merge each
            data[key] = {**data[key], **{stage: {**(data[key].get(stage) or {}), **opts}
                                         for stage, opts in value.items()}}
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **{k: v for k, v in value.items() if v is not None}}
        else:
            data[key] = value
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as e:
        where = f"config file {file}" if file else "options"
        raise EdgepackError(f"{where} invalid:\n{format_validation(e)}") from e


_PATH_KEYS = ("model", "weights", "calib", "eval", "train", "out", "target", "metric")
_LIST_PATH_KEYS = ("targets_dir", "devices_dir")


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths in a config file are relative to the file, not to the working directory."""
    out = dict(data)
    for key in _PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = _relative_to(out[key], base, bare_name_is_path=key not in ("target",))
    for key in _LIST_PATH_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [str(base / v) if isinstance(v, str) else v for v in out[key]]
    return out


def _relative_to(value: str, base: Path, bare_name_is_path: bool) -> str:
    """`file.py:fn` -> its file resolved; `package.module:fn` unchanged; `x.toml`, `data/calib` ->
    resolved (a target given by name, like "rpi", stays a name)."""
    if Path(value).is_absolute():
        return value
    path, sep, attr = value.partition(".py:")
    if sep:
        return f"{base / (path + '.py')}:{attr}"
    if ":" in value:  # package.module:function
        return value
    if not bare_name_is_path and not value.endswith(".toml"):
        return value
    return str(base / value)
