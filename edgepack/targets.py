"""Target profiles: `targets/*.toml` files, validated on load.

A profile says what the device is (arch, runtime, threads), how to quantize for it and what the
artifact must fit (budgets). Users add their own with `--targets-dir DIR` (searched first).
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EdgepackError

_PACKAGE = Path(__file__).resolve().parent
BUILTIN_DIRS = [_PACKAGE.parent / "targets", _PACKAGE / "_data" / "targets"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=False)


class Quantization(Strict):
    # "fixed": the types below are used as written. "auto": edgepack.scheme chooses them (and
    # reduce_range) from the device CPU's int8 flags at build time; the fields below are then the
    # default used when those flags are unknown.
    scheme: Literal["fixed", "auto"] = "fixed"
    activation_type: Literal["QInt8", "QUInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    # 7-bit weights: keeps ONNX Runtime's U8S8 kernels on x86 without VNNI (vpmaddubsw sums
    # pairs in int16) from saturating, at the cost of one bit of weight precision.
    reduce_range: bool = False
    per_channel: bool = True
    calibration_method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax"
    calibration_samples: int = Field(256, ge=1)
    percentile: float = Field(99.999, gt=90, le=100)


class Budgets(Strict):
    latency_p50_ms: float | None = Field(None, gt=0)
    latency_p90_ms: float | None = Field(None, gt=0)
    peak_memory_mb: float | None = Field(None, gt=0)
    size_mb: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(None, ge=0, description="points of top-1, of agreement, or of the user metric")
    min_sqnr_db: float | None = Field(None, description="lowest SQNR (dB) of any output vs the float model")
    # An absolute floor: max_accuracy_drop compares int8 with the float model the build exported,
    # which after pruning or other compression is already the smaller model.
    min_accuracy: float | None = Field(None, description="the judged artifact's own figure: top-1 %, agreement % "
                                       "when unlabelled, or the user metric")


class TargetProfile(Strict):
    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64", "armv7l"]
    runtime: Literal["onnxruntime", "tflite"]
    formats: list[Literal["onnx", "tflite"]] = ["onnx"]
    # The precisions the build makes artifacts in; "fp16" adds model.fp16.onnx/.tflite (stage fp16).
    precisions: list[Literal["fp32", "int8", "fp16"]] = ["fp32", "int8"]
    threads: int = Field(1, ge=1, le=256)
    simd_width: int = Field(8, ge=1, le=64)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    tflite_optional: bool = False
    quantization: Quantization = Quantization()
    budgets: Budgets = Budgets()
    source: str | None = Field(None, exclude=True)

    @property
    def primary_format(self) -> str:
        return "tflite" if self.runtime == "tflite" and "tflite" in self.formats else "onnx"


# How platform.machine() and OS vendors spell the profile architectures.
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv7": "armv7l", "armhf": "armv7l"}


def normalize_arch(machine: str | None) -> str | None:
    """A machine name as a profile `arch` spells it ("arm64" -> "aarch64"); None stays None."""
    return ARCH_ALIASES.get(machine.lower(), machine.lower()) if machine else None


def user_dirs() -> list[Path]:
    """$EDGEPACK_TARGETS_DIR (os.pathsep-separated), then ~/.config/edgepack/targets, if present."""
    env = [Path(p).expanduser() for p in os.environ.get("EDGEPACK_TARGETS_DIR", "").split(os.pathsep) if p]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path("~/.config").expanduser()) / "edgepack" / "targets"
    return env + ([xdg] if xdg.is_dir() else [])


def _search_dirs(extra: list[Path] | None) -> list[Path]:
    dirs = [Path(d).expanduser() for d in (extra or [])] + user_dirs()
    return dirs + [d for d in BUILTIN_DIRS if d.is_dir()]


def load_profile_file(path: Path) -> TargetProfile:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise EdgepackError(f"cannot read target profile {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"target profile {path} is not valid TOML: {e}") from e
    data.setdefault("name", Path(path).stem)
    try:
        profile = TargetProfile.model_validate(data)
    except ValidationError as e:
        raise EdgepackError(f"target profile {path} is invalid:\n{format_validation(e)}",
                            "fix the fields named above; `edgepack targets show x86` prints a valid profile") from e
    profile.source = str(path)
    return profile


def list_profiles(extra_dirs: list[Path] | None = None) -> dict[str, TargetProfile]:
    """All profiles by name; a user directory shadows a built-in profile of the same name."""
    found: dict[str, TargetProfile] = {}
    for d in _search_dirs(extra_dirs):
        if not d.is_dir():
            raise EdgepackError(f"targets directory {d} does not exist")
        for f in sorted(d.glob("*.toml")):
            p = load_profile_file(f)
            found.setdefault(p.name, p)
    return found


def load_profile(name_or_path: str | Path, extra_dirs: list[Path] | None = None) -> TargetProfile:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return load_profile_file(p)
    profiles = list_profiles(extra_dirs)
    if str(name_or_path) not in profiles:
        known = ", ".join(sorted(profiles)) or "(none)"
        raise EdgepackError(f"unknown target {name_or_path!r}; known targets: {known}",
                            "pick one of those, or pass --targets-dir DIR with your own NAME.toml")
    return profiles[str(name_or_path)]


def format_validation(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)
