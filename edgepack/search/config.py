"""`SearchConfig`: how many trials, where the study lives, which sampler, which devices.

The study is Optuna's; its storage is an Optuna RDB URL. By default it is a SQLite file in the
search directory beside the build (`<out>/<study>.search/study.db`), so a killed search resumes
from it; `postgresql://` or `mysql://` URLs let `edgepack search` processes on several machines
share one study.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..names import checked_name, is_plain_name

SEARCH_SUFFIX = ".search"  # <out>/<study>.search/: the study file, the trial table, the plot, trial builds
STUDY_DB = "study.db"
SQL_SCHEMES = ("sqlite", "postgresql", "mysql")


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(20, ge=1, description="trials the study runs in all (every worker counts toward it)")
    study: str | None = None  # default: <build name>-<target>
    storage: str | None = None  # an Optuna RDB URL; None: sqlite:///<out>/<study>.search/study.db
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int | None = None
    devices: list[str] = []  # empty: the build's own --device (or this host)
    space: dict[str, Any] = {}  # the [search] table; empty keys keep the defaults (edgepack.search.space)
    out: str = "dist"  # the best build goes to <out>/<name>-<target>/, the search to <out>/<study>.search/
    # Fine-tuning and pruning bound of one trial (prune max_minutes / max_prune_minutes).
    trial_minutes: float = Field(15.0, gt=0)
    # Optuna's RDBStorage heartbeat: a trial without a heartbeat for grace_s is failed and retried.
    heartbeat_s: int = Field(20, ge=1)
    grace_s: int = Field(120, ge=2)
    max_retry: int = Field(2, ge=0, description="retries of a trial whose worker died")
    poll_s: float = Field(2.0, gt=0, description="wait between looks at the study when only others' trials remain")
    # The best trial's latency benchmarked again before it is written (edgepack.search.confirm):
    # the `confirm_candidates` most preferred feasible trials, in `confirm_rounds` interleaved rounds.
    confirm_rounds: int = Field(3, ge=0, description="0: the best is chosen on the trials' own single measurement")
    confirm_candidates: int = Field(3, ge=1)
    keep_trials: bool = False  # keep the model files of every trial, not only the Pareto front's

    @field_validator("study")
    @classmethod
    def _plain(cls, v):
        return checked_name(v, "the search directory")

    @field_validator("storage")
    @classmethod
    def _url(cls, v):
        if v is not None and v.split(":", 1)[0].split("+", 1)[0] not in SQL_SCHEMES:
            raise ValueError(f"{v!r} is not a database URL: use sqlite:///FILE, postgresql://USER@HOST/DB "
                             "or mysql://USER@HOST/DB")
        return v


def search_dir(out: str | Path, study: str) -> Path:
    return Path(out) / f"{study}{SEARCH_SUFFIX}"


def storage_url(scfg: SearchConfig, study: str) -> str:
    if scfg.storage:
        return scfg.storage
    return f"sqlite:///{(search_dir(scfg.out, study) / STUDY_DB).resolve()}"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def redact(url: str) -> str:
    """The storage URL without its password, for output and search.json."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def default_study(build_name: str | None, model: str | None, target: str) -> str:
    """<name>-<target>: the build's --name, else the model's file stem or factory name."""
    name = build_name
    if not name:
        if model is None:
            name = "digits-cnn"  # the embedded example's factory
        else:
            spec, _, attr = model.partition(".py:")
            if attr:
                name = Path(spec).name
            elif ":" in model:
                name = model.rsplit(":", 1)[1]
            else:
                name = Path(model).stem
    stem = Path(target).stem if target.endswith(".toml") else target
    out = f"{name}-{stem}".replace("_", "-")
    return out if is_plain_name(out) else "search"
