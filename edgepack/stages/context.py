"""What the stages share: the build context, the loaded model, and how samples are fed to it.

Every stage module has `NAME`, a typed `Config`, `config(ctx) -> Config | None` (None: the stage
does not apply to this build) and `run(ctx, config) -> dict`, the record that lands in
`manifest.json` under `stages[NAME]`. The pipeline runs them in order.

Stages report through `ctx.say(message)` for one line and `with ctx.progress.task(what, total) as t:
... t.advance()` for long loops (an edgepack.progress.Progress: live bars on a terminal, lines in
logs, nothing when quiet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..cache import StageCache
from ..config import BuildConfig
from ..data import Dataset
from ..manifest import Artifact, Manifest, TensorSpec
from ..progress import Progress as Reporter, as_progress
from ..targets import TargetProfile

# What a build may be given to report to: an edgepack.progress.Progress, or any plain
# callable(str) (the Python API's `progress=`), which BuildContext wraps so `.task()` exists.
Progress = Callable[[str], None]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
                "int32": torch.int32, "bool": torch.bool}


@dataclass
class LoadedModel:
    kind: str  # "torch" | "onnx"
    name: str
    inputs: list[TensorSpec]  # concrete shapes, batch first: what the build validates and times at
    outputs: list[str]  # output names, flattened in the model's order
    module: nn.Module | None = None
    onnx_path: Path | None = None
    source: str = ""
    # Axis 0 of every input and output is the batch, so samples can be stacked there. When not
    # (a fixed-shape ONNX file, a state tensor laid out (layers, batch, hidden)), a sample is one
    # whole feed and the data holds (N, *full input shape).
    batchable: bool = True
    declared: list[TensorSpec] = field(default_factory=list)  # the file's own dims (symbols kept)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inputs[0].shape)

    def sample_specs(self) -> list[TensorSpec]:
        """What one dataset sample of each input looks like, with a leading batch axis of 1."""
        if self.batchable:
            return self.inputs
        return [s.model_copy(update={"shape": [1, *s.shape]}) for s in self.inputs]

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros([int(d) for d in s.shape], dtype=TORCH_DTYPES[s.dtype]) for s in self.inputs)


def feeds(model: LoadedModel, data: Dataset, batch_size: int = 32) -> Iterator[list[np.ndarray]]:
    """Model feeds over a dataset, in order: batches when batchable, else one sample per feed."""
    if model.batchable:
        for arrays, _ in data.batches(batch_size):
            yield arrays
    else:
        for i in range(len(data)):
            yield [a[0] for a in data.arrays(slice(i, i + 1))]


def gather(per_feed: list[list[np.ndarray]], batchable: bool) -> list[np.ndarray]:
    """Per-feed outputs -> one (N, ...) array per output."""
    if not per_feed:
        return []
    join = np.concatenate if batchable else np.stack
    return [join([np.asarray(f[i]) for f in per_feed]) for i in range(len(per_feed[0]))]


@dataclass
class BuildData:
    calib: Dataset
    choose: Dataset  # picks the fallback's node count and fine-tuning's early stop
    report: Dataset  # the figures in the report come from these samples only
    train: Dataset | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    cfg: BuildConfig
    profile: TargetProfile
    work: Path  # the staging directory that becomes the build directory
    say: Progress
    cache: StageCache
    model: LoadedModel | None = None
    data: BuildData | None = None
    metric: tuple[str, Callable] | None = None
    reference: list[np.ndarray] | None = None  # float outputs on data.report (PyTorch, else ONNX fp32)
    artifacts: list[Artifact] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # artifact path -> outputs on data.report
    records: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)  # report sections by stage
    peak_mb: dict[str, float] = field(default_factory=dict)
    judged_elsewhere: str | None = None
    verdicts: list = field(default_factory=list)
    primary: str | None = None
    device: Any = None
    # (Quantization, choice record): the int8 scheme, chosen once per build (quantize.config) so the
    # stages that ask (cluster, quantize, qat) agree even if a device probe would answer differently twice
    int8_scheme: tuple | None = None
    device_results: list[dict] = field(default_factory=list)
    name: str = ""
    path: Path | None = None  # the final build directory, once the staging one is renamed into place
    manifest: Manifest | None = None
    reused: list[str] = field(default_factory=list)  # stages whose results came from the cache
    versions: dict[str, str] = field(default_factory=dict)  # library versions: part of every cache key

    def __post_init__(self):
        self.say = as_progress(self.say)  # a plain callable (or None) gets tasks too

    @property
    def progress(self) -> Reporter:
        """Where long loops report: `with ctx.progress.task("calibrating", total=n) as t`."""
        return self.say

    def metric_key(self) -> tuple[list[Path], str]:
        """What a cache key holds of --metric, for a stage whose result it steers: the file of a
        `file.py:function` by content, with the function's name; a `package.module:function`
        by name. Nothing without one."""
        if self.metric is None:
            return [], ""
        source, _, function = self.metric[0].rpartition(":")
        return ([Path(source)], function) if source.endswith(".py") else ([], self.metric[0])

    def restore(self, stage: str, key: str) -> dict | None:
        """A cached stage result: its files copied into the build, its record; None on a miss."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        self.cache.restore(entry, self.work)
        self.reused.append(stage)
        self.say(f"{stage}: reused from the cache (key {key[:12]})")
        return dict(entry.record, cache={"reused": True, "key": key})

    def store(self, stage: str, key: str, files: dict[str, Path], record: dict) -> None:
        self.cache.put(key, files, record)
        record["cache"] = {"reused": False, "key": key}
