"""Calibration in bounded memory, on top of ONNX Runtime's calibrators.

ORT's calibrators run an augmented model and keep what it returns for every batch until the end:
the histogram ones keep every intermediate activation of every sample (MobileNetV2-224: 4.2 GB
peak with 64 samples, past 8 GB long before 512), MinMax keeps only reductions but its session
holds every tensor of a batch of 16 (2.1 GB). Here the same augmented models (ORT's
`augment_graph`) run in batches sized so one batch of intermediates stays under a budget, each
batch is folded into per-tensor state and dropped, and the result is the `TensorsData` ORT's
`quantize_static` consumes (bench/calib_memory.py: under 0.5 GB at 512 samples). The ranges equal
the stock calibrators': MinMax keeps running minima and maxima; the histogram methods take two
passes, the first for each tensor's exact extremes, so the second can bin every batch on the grid
ORT would have built from all the data at once and sum the counts.

Progress: `calibrate(progress=...)` counts batches in a task (two passes for the histogram
methods); callers that cannot pass it through (`onnx_tools.quantize.calibration_ranges`) wrap
the call in `reporting(progress)` instead.
"""
from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import (CalibrationMethod, EntropyCalibrater, HistogramCollector,
                                                MinMaxCalibrater, PercentileCalibrater, TensorsData)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from ..data import Dataset
from ..errors import EdgepackError
from ..progress import as_progress

BUDGET_MB = 64  # one batch of intermediate outputs; the session and numpy's copy come on top
MAX_BATCH = 32  # past this, bigger batches buy no speed on CPU
LIVE_TENSORS = 4
_REPORTING: ContextVar = ContextVar("edgepack_calibration_progress", default=None)


@contextmanager
def reporting(progress):
    """Calibrations run inside report their batches to `progress` (a Progress or a callable(str))."""
    token = _REPORTING.set(progress)
    try:
        yield
    finally:
        _REPORTING.reset(token)


class DatasetReader(CalibrationDataReader):
    """ONNX Runtime's data-reader protocol over a Dataset: one feed dict per batch (or per sample,
    for a model whose inputs are not all batch-first with a dynamic batch). With `indices`, only
    those rows are read (in ascending order, a batch at a time): no copy of the whole sample."""

    def __init__(self, names: list[str], dtypes: list[str], data: Dataset, batch_size: int = 16,
                 batchable: bool = True, indices: np.ndarray | None = None):
        self.names, self.dtypes, self.data = names, dtypes, data
        self.batch_size, self.batchable = batch_size, batchable
        self.indices = None if indices is None else np.sort(np.asarray(indices, np.int64))
        self.on_batch = None  # called after each feed is handed out (a progress task's advance)
        self.rewind()

    def __len__(self) -> int:
        return len(self.data) if self.indices is None else len(self.indices)

    def get_next(self):
        arrays = next(self._it, None)
        if arrays is None:
            return None
        if self.on_batch is not None:
            self.on_batch()
        return {n: np.asarray(a, dtype=d) for n, d, a in zip(self.names, self.dtypes, arrays)}

    def rewind(self):
        self._it = self._feeds()

    def _feeds(self):
        rows = np.arange(len(self.data)) if self.indices is None else self.indices
        step = self.batch_size if self.batchable else 1
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            contiguous = chunk[-1] - chunk[0] == len(chunk) - 1
            arrays = self.data.arrays(slice(int(chunk[0]), int(chunk[-1]) + 1) if contiguous else chunk)
            yield arrays if self.batchable else [a[0] for a in arrays]

    @classmethod
    def for_model(cls, model_path: Path, data: Dataset, batch_size: int = 16,
                  indices: np.ndarray | None = None) -> "DatasetReader":
        """A reader shaped for the model's inputs: batches when every input's batch axis is dynamic."""
        g = onnx.load(str(model_path), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        dims0 = [i.type.tensor_type.shape.dim[0] if i.type.tensor_type.shape.dim else None for i in inputs]
        batchable = all(d is not None and d.dim_value <= 0 for d in dims0)
        dtypes = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in inputs]
        names = [i.name for i in inputs]
        if len(names) == 1:  # a single input may be named anything in the data
            ordered = Dataset({names[0]: next(iter(data.inputs.values()))}, data.y, data.source, data.classes)
        else:
            missing = [n for n in names if n not in data.inputs]
            if missing:
                raise EdgepackError(f"calibration data {data.source} has no input named {', '.join(missing)}",
                                    f"it has: {', '.join(data.names)}")
            ordered = Dataset({n: data.inputs[n] for n in names}, data.y, data.source, data.classes)
        return cls(names, dtypes, ordered, batch_size, batchable, indices)


def session(path: str | Path, priority_order: bool = False) -> ort.InferenceSession:
    """A session for an augmented model: unoptimised like ORT's calibrators (the tensors must stay
    as they are), without the memory pattern (measured on MobileNetV2-224's MinMax-augmented
    model at batch 16: 1.8 GB peak with it, 0.95 GB without), threads that sleep instead of
    spinning (calibration shares the machine). `priority_order` for a model whose added outputs
    are small reductions: ORT's default order runs them last, keeping every tensor they read
    alive (0.95 GB at batch 16); in priority order 0.26 GB."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if priority_order:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def sample_sizes(model: onnx.ModelProto, tensors, reader: DatasetReader) -> list[int]:
    """Bytes of each of `tensors` for one sample: ONNX shape inference at the data's own sample
    shape (batch 1) on a copy of the graph whose large weights are typed inputs instead of data;
    a tensor whose shape stays unknown counts as the largest known one."""
    feeds = {n: a for n, a in zip(reader.names, next(reader._feeds()))}
    probe = _without_weights(model)
    for i in probe.graph.input:
        if i.name in feeds:
            shape = (1, *feeds[i.name].shape[1:]) if reader.batchable else feeds[i.name].shape
            i.type.tensor_type.shape.Clear()
            for d in shape:
                i.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
    except Exception:  # an op shape inference does not know: fall back to the declared shapes
        inferred = model.graph
    infos = {v.name: v for v in (*inferred.value_info, *inferred.output, *inferred.input)}
    sizes, unknown = [], 0
    for t in tensors:
        tt = infos[t].type.tensor_type if t in infos else None
        dims = [d.dim_value for d in tt.shape.dim] if tt is not None and tt.HasField("shape") else None
        if not dims or any(d <= 0 for d in dims):
            unknown += 1
            continue
        sizes.append(int(np.prod(dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize)
    return sizes + [max(sizes, default=1 << 20)] * unknown


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every initializer over 4096 elements turned into a typed input: what shape
    inference needs (shape constants stay), without copying the weights."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = model.graph
    light.graph.node.extend(g.node)
    light.graph.output.extend(g.output)
    light.graph.input.extend(i for i in g.input if i.name not in {w.name for w in g.initializer})
    for w in g.initializer:
        if np.prod(w.dims, dtype=np.int64) <= 4096:
            light.graph.initializer.append(w)
        else:
            light.graph.input.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    return light


def batch_size_for(per_sample: int, budget_mb: float = BUDGET_MB) -> int:
    return int(max(1, min(MAX_BATCH, budget_mb * 2**20 // max(per_sample, 1))))


def live_bytes(sizes: list[int]) -> int:
    """What a sample keeps alive in a session whose outputs are small: a few of the largest
    activations at once (an op's input and output, a residual). MobileNetV2-224 in priority
    order measures 10 MB a sample, 2.2 times its largest activation; 4 times is the estimate."""
    return min(sum(sizes), LIVE_TENSORS * max(sizes, default=0))


class BoundedMinMaxCalibrater(MinMaxCalibrater):
    """ORT's MinMax augmentation (ReduceMin/ReduceMax per tensor), folded batch by batch into
    running extremes instead of a list of every batch's reductions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._low, self._high = {}, {}  # ReduceMin / ReduceMax output name -> running extreme

    def create_inference_session(self):
        self.infer_session = session(self.augmented_model_path, priority_order=True)
        self.model = None  # the session has its own copy; nothing after this reads the proto

    def collect_data(self, data_reader: CalibrationDataReader):
        names = [o.name for o in self.infer_session.get_outputs()]
        added = [i for i, n in enumerate(names) if n not in self.model_original_outputs]
        while (inputs := data_reader.get_next()):
            outputs = self.infer_session.run(None, inputs)
            for i in added:  # ORT's compute_data: nanmin over batches, so NaN batches drop out
                keep = self._low if names[i].endswith("_ReduceMin") else self._high
                fold = np.fmin if keep is self._low else np.fmax
                keep[names[i]] = outputs[i] if names[i] not in keep else fold(keep[names[i]], outputs[i])
        if not self._low:
            raise ValueError("No data is collected.")

    def compute_data(self) -> TensorsData:
        pairs = {}
        for low_name, low in self._low.items():
            tensor = low_name.rpartition("_")[0]
            high = self._high[tensor + "_ReduceMax"]
            if self.symmetric:
                m = np.nanmax([np.abs(low), np.abs(high)], axis=0)
                pairs[tensor] = (-m, m)
            else:
                pairs[tensor] = (low, high)
        self.calibrate_tensors_range = TensorsData(CalibrationMethod.MinMax, pairs)
        return self.calibrate_tensors_range


class _TwoPassHistogram:
    """For ORT's Entropy and Percentile calibrators: two passes over the data instead of keeping
    it. Pass 1 finds each tensor's extremes; pass 2 bins each batch on the final grid (ORT's: for
    values, `num_bins` over +-max|x|; for |x| (symmetric percentile), over [min|x|, max|x|]),
    so the summed counts are the histogram ORT builds from all the data at once. One
    `collect_data` call takes all the data (the reader is rewound for the second pass)."""

    def create_inference_session(self):
        self.infer_session = session(self.augmented_model_path)
        self.model = None  # the session has its own copy; nothing after this reads the proto

    def collect_data(self, data_reader: CalibrationDataReader):
        if not hasattr(data_reader, "rewind"):
            raise TypeError("the two-pass calibrator needs a reader with rewind() (edgepack's DatasetReader)")
        absolute = self.method == "percentile" and self.symmetric
        low, high, abs_low, dtypes = {}, {}, {}, {}
        for name, a in self._tensors(data_reader):
            dtypes[name] = a.dtype
            if a.size == 0:
                continue
            lo, hi = np.nanmin(a), np.nanmax(a)
            low[name] = lo if name not in low else min(low[name], lo)
            high[name] = hi if name not in high else max(high[name], hi)
            if absolute:
                alo = np.nanmin(np.absolute(a))
                abs_low[name] = alo if name not in abs_low else min(abs_low[name], alo)
        grids = {}
        for name, dtype in dtypes.items():
            if name not in low:  # no values at all: ORT takes 0 as both extremes
                low[name] = high[name] = np.array(0, dtype=dtype)
                grids[name] = (0, 1) if absolute else (low[name], high[name])
            elif absolute:  # ORT: np.histogram(|x|, num_bins), i.e. over [min|x|, max|x|]
                grids[name] = (abs_low[name], max(abs(low[name]), abs(high[name])))
            else:
                t = np.array(max(abs(low[name]), abs(high[name])), dtype=low[name].dtype)
                grids[name] = (-t, t)
        hists = {}
        for name, a in self._tensors(data_reader):
            if name not in grids:
                continue
            counts, edges = np.histogram(np.absolute(a) if absolute else a, self.num_bins, range=grids[name])
            if name in hists:
                hists[name][0] += counts
            else:
                hists[name] = [counts, edges.astype(a.dtype) if absolute else edges]
        self.collector = HistogramCollector(method=self.method, symmetric=self.symmetric, num_bins=self.num_bins,
                                            num_quantized_bins=self.num_quantized_bins,
                                            percentile=self.percentile, scenario=self.scenario)
        for name, (counts, edges) in hists.items():
            state = (counts, edges, low[name], high[name])
            self.collector.histogram_dict[name] = state if absolute else (*state, grids[name][1])
        if not hists:
            raise ValueError("No data is collected.")

    def _tensors(self, data_reader):
        """(tensor name, array) for every calibrated tensor of every batch, one batch alive at a time."""
        data_reader.rewind()
        names = [o.name for o in self.infer_session.get_outputs()]
        wanted = [i for i, n in enumerate(names) if n in self.tensors_to_calibrate]
        while (inputs := data_reader.get_next()):
            outputs = self.infer_session.run(None, inputs)
            for i in wanted:
                yield names[i], np.asarray(outputs[i]).reshape(-1)
            del outputs


class BoundedEntropyCalibrater(_TwoPassHistogram, EntropyCalibrater):
    pass


class BoundedPercentileCalibrater(_TwoPassHistogram, PercentileCalibrater):
    pass


def quantizable_op_types() -> list[str]:
    """What `quantize_static` calibrates when not told otherwise."""
    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def calibrate(model_path: Path, data: Dataset, method: str = "MinMax", *, indices: np.ndarray | None = None,
              symmetric: bool = False, percentile: float = 99.999, num_bins: int | None = None,
              num_quantized_bins: int = 128, op_types: list[str] | None = None,
              budget_mb: float = BUDGET_MB, progress=None) -> TensorsData:
    """Per-tensor ranges of `model_path` (ideally preprocessed) over `data` (rows `indices`),
    computed as ORT's `create_calibrator(...)` + `collect_data` + `compute_data` would with the
    same options (`symmetric` is quantize_static's CalibTensorRangeSymmetric, `percentile` its
    CalibPercentile; bins default to ORT's: 128 for Entropy, 2048 for Percentile), in memory
    bounded by one batch of intermediate tensors. `progress` (or the one `reporting` set) gets a
    task counting the batches."""
    op_types = quantizable_op_types() if op_types is None else op_types
    bars = as_progress(progress if progress is not None else _REPORTING.get())
    with tempfile.TemporaryDirectory(prefix="edgepack-calib-") as tmp:
        aug = str(Path(tmp) / "augmented.onnx")
        if method == "MinMax":
            cal = BoundedMinMaxCalibrater(Path(model_path), op_types, aug, symmetric=symmetric)
        elif method == "Entropy":
            cal = BoundedEntropyCalibrater(Path(model_path), op_types, aug, symmetric=symmetric,
                                           num_bins=num_bins or 128, num_quantized_bins=num_quantized_bins)
        elif method == "Percentile":
            cal = BoundedPercentileCalibrater(Path(model_path), op_types, aug, symmetric=symmetric,
                                              num_bins=num_bins or 2048, percentile=percentile)
        else:
            raise EdgepackError(f"unknown calibration method {method!r}", "use MinMax, Entropy or Percentile")
        reader = DatasetReader.for_model(Path(model_path), data, 1, indices)
        sizes = sample_sizes(cal.model, cal.select_tensors_to_calibrate(cal.model)[0], reader)
        # MinMax returns reductions only; the histogram methods get every tensor back
        reader.batch_size = batch_size_for(live_bytes(sizes) if method == "MinMax" else sum(sizes), budget_mb)
        reader.rewind()
        cal.augment_graph()
        cal.create_inference_session()
        passes = 1 if method == "MinMax" else 2  # the histogram methods read the data twice
        feeds = math.ceil(len(reader) / reader.batch_size) if reader.batchable else len(reader)
        size = reader.batch_size if reader.batchable else 1
        with bars.task(f"calibrating ({method}, {len(reader)} samples in batches of {size}"
                       + (", two passes" if passes == 2 else "") + ")", total=passes * feeds) as bar:
            reader.on_batch = bar.advance
            cal.collect_data(reader)
        ranges = cal.compute_data()
        del cal
    return ranges
