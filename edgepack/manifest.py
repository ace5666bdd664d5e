"""`manifest.json`: the contract between a build directory and everything after it.

Deploy and the on-device agent rely on `artifacts[*].path / sha256 / format / precision`, on
`inputs` (name, shape, dtype, layout) and on `target`. Bench results land next to it in
`bench/`. Bump SCHEMA when a field changes meaning.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, Field

from .errors import EdgepackError
from .hashing import sha256_file  # noqa: F401  (re-exported for callers)

SCHEMA = 2  # 2: named multi-input/-output specs, per-output fidelity, user metric, timed shapes
MANIFEST = "manifest.json"


class TensorSpec(BaseModel):
    name: str
    shape: list[int | str]
    dtype: str = "float32"
    layout: str | None = None  # "NCHW" / "NHWC" for images, None otherwise
    quantization: dict | None = None  # {"scale", "zero_point"} of an integer model input/output


class LatencyMs(BaseModel):
    p50: float
    p90: float
    p99: float | None = None
    mean: float | None = None
    runs: int | None = None
    threads: int | None = None
    measured_on: str | None = None  # machine arch; a latency measured off-target is not judged
    input_shapes: dict[str, list[int]] | None = None  # exactly the shapes it was timed at
    samples_ms: list[float] | None = None  # every timed run (the report plots the distribution)


class ArtifactMetrics(BaseModel):
    accuracy: float | None = None  # top-1 on labelled eval data, in percent
    agreement: float | None = None  # top-1 agreement with the float reference, in percent
    metric: float | None = None  # the user's --metric (higher is better)
    max_abs_diff: float | None = None  # worst output
    cosine: float | None = None  # worst output
    sqnr_db: float | None = None  # worst output, vs the float reference
    outputs: dict[str, dict] | None = None  # per output: sqnr_db, cosine, max_abs_diff
    samples: int | None = None  # how many evaluation samples these figures come from
    latency_ms: LatencyMs | None = None
    size_mb: float | None = None


class Artifact(BaseModel):
    path: str  # relative to the build directory
    format: str  # "onnx" | "tflite"
    precision: str  # "fp32" | "int8" | "fp16"
    sha256: str
    size_bytes: int
    # deflate level 9 of the file (its zip entry): what shipping it costs (edgepack.compress.size)
    compressed_bytes: int | None = None
    layout: str | None = "NCHW"
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    metrics: ArtifactMetrics = ArtifactMetrics()
    notes: list[str] = []


class DataFile(BaseModel):
    """A data file shipped with the build (the on-device evaluation subset), hashed like an artifact."""
    path: str
    sha256: str
    size_bytes: int
    samples: int
    labelled: bool
    inputs: list[str]  # array names in the .npz, in the model's input order (plus "y" when labelled)


class Verdict(BaseModel):
    budget: str  # "min_*" budgets pass at or above the limit, the others at or below
    limit: float | None
    value: float | None
    ok: bool | None  # None: not judged (no figure, or measured off-target)
    artifact: str | None = None
    note: str | None = None


class Manifest(BaseModel):
    schema_version: int = SCHEMA
    edgepack_version: str
    name: str
    created: str
    target: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    artifacts: list[Artifact]
    primary: str  # path of the artifact that is judged and deployed first
    verdicts: list[Verdict] = []
    passed: bool = True
    stages: dict[str, Any] = {}  # per-stage records (prune, export, quantize, fallback, ...)
    versions: dict[str, str] = {}
    config_hash: str = ""
    data_hash: str = ""
    bench: list[dict[str, Any]] = Field(default_factory=list)  # device results, appended by bench
    eval_subset: DataFile | None = None  # evaluated on the device with its own kernels

    def artifact(self, path: str) -> Artifact:
        for a in self.artifacts:
            if a.path == path:
                return a
        raise KeyError(path)


def read_manifest(build_dir: Path) -> Manifest:
    path = Path(build_dir) / MANIFEST
    if not path.exists():
        raise EdgepackError(f"{build_dir} is not an edgepack build directory (no {MANIFEST})",
                            "run `edgepack build` first and pass the directory it printed")
    try:
        return Manifest.model_validate_json(path.read_text())
    except Exception as e:
        raise EdgepackError(f"{path} is corrupt or from an incompatible edgepack: {e}",
                            "rebuild with `edgepack build`") from e


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a unique temporary file beside `path`, then rename: readers never see half a file
    and two writers never share a temporary name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    text = data.model_dump_json(indent=2) if isinstance(data, BaseModel) else json.dumps(data, indent=2, default=str)
    write_text_atomic(path, text + "\n")


@contextmanager
def build_lock(build_dir: Path):
    """Serialise read-modify-write of a build's manifest and report (threads and processes:
    fleet benches finish concurrently). filelock's FileLock is re-entrant per object, so each
    call takes its own: threads and processes both wait."""
    lock_dir = Path(build_dir) / "bench"
    lock_dir.mkdir(exist_ok=True)
    with FileLock(str(lock_dir / ".lock")):
        yield
