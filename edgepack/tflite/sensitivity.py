"""Which ops of an int8 `.tflite` lose the most signal: per-op SQNR against the float model.

Both models run the same samples in interpreters that keep every intermediate tensor
(`experimental_preserve_all_tensors`); each float activation is compared with its int8
counterpart (dequantized with the tensor's own scale and zero point). Cumulative error grows
with depth, so an op's own cost is the SQNR of its inputs minus the SQNR of its output, as in
the ONNX path (`onnx_tools.quantize.node_sensitivity`). A tensor's SQNR is the lower of its
overall one and its median channel's (see `_sqnr_of`). Memory stays bounded: only running sums
of signal and noise energy per tensor channel are kept, batch by batch.

Tensors are matched by name. ai-edge-quantizer keeps the float model's tensor names, so that
match is exact; litert-torch's PT2E model names its tensors differently (only the residual ADDs
agree), but its ops come out in the same order as the float model's, so there the ops are
paired by position when the two op sequences (QUANTIZE/DEQUANTIZE aside) are identical.

Each ranked op also carries `grid_sqnr_db`: the SQNR its output would have if the float output
were only rounded to the int8 output's grid (35-48 dB for a well-used grid). Far below that
(an activation whose range is set by a huge outlier), keeping the op alone in float does not
help: its consumers re-quantize the same tensor onto the same grid. `output_limited` marks
those ops, and the fallback keeps their consumers in float too.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import EdgepackError
from ..onnx_tools.sensitivity import release_heap
from ._quiet import quiet_native
from .inspect import _enum_names, _load, read_io
from .validate import _cast, _to_layout

CAP_DB = 100.0  # an exact tensor (no noise at all) counts as this much SQNR
# An int8 grid used well gives 35-48 dB; far below that, the range is set by outliers.
POOR_GRID_DB = 25.0
# Ops that only move or reshape data: int8 runs them on the input's grid, so they lose nothing
# of their own; they are never ranked (a float PAD fixes nothing).
MOVEMENT_OPS = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "TRANSPOSE", "PAD", "PADV2", "SQUEEZE",
                "EXPAND_DIMS", "GATHER", "SLICE", "STRIDED_SLICE", "SPLIT", "SPLIT_V", "PACK",
                "UNPACK", "CONCATENATION", "TILE", "BROADCAST_TO", "SHAPE", "CAST", "IDENTITY"}
CONVERSION_OPS = {"QUANTIZE", "DEQUANTIZE"}


def graph_ops(path: Path) -> dict:
    """The first subgraph's ops: {"ops": [{"index", "op", "inputs", "outputs"}] (tensor indices),
    "names": [tensor name by index], "inputs": graph input tensor indices, "consumers": {tensor:
    [op index]}, "int8_grids": {tensor: (scale, zero point)} of per-tensor int8 tensors, "ranks",
    "float32": the float32 tensors}."""
    model, schema, _ = _load(Path(path))
    op_names = _enum_names(schema.BuiltinOperator)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(op_names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "CUSTOM"))
    sg = model.Subgraphs(0)
    ops, consumers = [], {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        ins = [int(t) for t in op.InputsAsNumpy()] if op.InputsLength() else []
        outs = [int(t) for t in op.OutputsAsNumpy()] if op.OutputsLength() else []
        ops.append({"index": i, "op": codes[op.OpcodeIndex()], "inputs": [t for t in ins if t >= 0],
                    "outputs": outs})
        for t in ins:
            consumers.setdefault(t, []).append(i)
    names, grids, ranks, floats = [], {}, [], set()
    int8 = schema.TensorType.INT8
    for t in range(sg.TensorsLength()):
        tensor = sg.Tensors(t)
        names.append(tensor.Name().decode())
        ranks.append(tensor.ShapeLength())
        if tensor.Type() == schema.TensorType.FLOAT32:
            floats.add(t)
        q = tensor.Quantization()
        if tensor.Type() == int8 and q is not None and q.ScaleLength() == 1:
            grids[t] = (float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0]))
    return {"ops": ops, "names": names, "consumers": consumers, "int8_grids": grids,
            "ranks": ranks, "float32": floats,
            "inputs": [int(t) for t in sg.InputsAsNumpy()] if sg.InputsLength() else []}


def module_of(tensor_name: str) -> str:
    """A readable module path from litert-torch's location-style tensor name, e.g.
    "pkg.Net/torch.nn.modules.container.Sequential_features/pkg.Block_3/torch.nn.modules.conv.
    Conv2d_0;" -> "features.3.0 (Conv2d)". Fused ops list several locations; the last is the
    first op of the chain (the conv of conv+BN+ReLU)."""
    parts = [p for p in tensor_name.split(";") if p and not p.isdigit()]
    if not parts or "." not in parts[-1]:  # e.g. "serving_default_output_0_output"
        return tensor_name
    segs = parts[-1].split("/")
    # The NHWC wrapper (litert-torch's ChannelLastIOWrapper) holds the user's model as `wrapped`.
    segs = segs[2:] if segs[0].endswith("ChannelLastIOWrapper") else segs[1:]
    path, cls = [], parts[-1].split("/")[-1].rpartition(".")[2].partition("_")[0]
    for seg in segs:
        head, _, attr = seg.rpartition(".")[2].partition("_")
        path.append(attr or head)
    return f"{'.'.join(path) or '(top level)'} ({cls})"


class _Probe:
    """An interpreter keeping every tensor, fed PyTorch-ordered data (quantized if need be)."""

    def __init__(self, path: Path, layout: str, threads: int):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        self.path, self.layout = Path(path), layout
        self.io = read_io(self.path, layout)
        with warnings.catch_warnings(), quiet_native():
            warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": it is
            # TFLite's own kernels, no XNNPACK: it keeps a packed copy of the weights besides every
            # kept tensor (measured on ConvNeXt-T-224: rank_ops peaked at 920 MB with it, 720 without).
            self.it = Interpreter(model_path=str(path), num_threads=int(threads),
                                  experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            self.it.allocate_tensors()
        details = self.it.get_input_details()
        self.inputs = [details[p] for p in self.io["input_order"]]
        self.details = {d["index"]: d for d in self.it.get_tensor_details()}
        self.batch = int(self.inputs[0]["shape"][0]) if len(self.inputs[0]["shape"]) else 1

    def run(self, arrays: list[np.ndarray]) -> None:
        for i, (a, d, spec) in enumerate(zip(arrays, self.inputs, self.io["inputs"])):
            a = _cast(_to_layout(a, self.layout), spec, f"{self.path.name} input {i}")
            scale, zero = d.get("quantization", (0.0, 0))
            if np.issubdtype(d["dtype"], np.integer) and scale and a.dtype.kind == "f":
                info = np.iinfo(d["dtype"])
                a = np.clip(np.round(a / scale + zero), info.min, info.max)
            self.it.set_tensor(d["index"], np.ascontiguousarray(a, dtype=d["dtype"]))
        self.it.invoke()

    def value(self, t: int) -> tuple[np.ndarray, tuple[float, int] | None]:
        """Tensor `t` as float64, and its int8 grid (scale, zero point) when it is quantized."""
        d = self.details[t]
        v = self.it.get_tensor(t)
        scale, zero = d.get("quantization", (0.0, 0))
        if np.issubdtype(v.dtype, np.integer) and scale:
            return (v.astype(np.float64) - zero) * scale, (float(scale), int(zero))
        return v.astype(np.float64), None


def pair_tensors(f: dict, q: dict) -> tuple[dict[int, int], str]:
    """float tensor index -> int8 tensor index, for graph inputs and op outputs."""
    pairs = {a: b for a, b in zip(f["inputs"], q["inputs"])}
    core_f = [o for o in f["ops"] if o["op"] not in CONVERSION_OPS]
    core_q = [o for o in q["ops"] if o["op"] not in CONVERSION_OPS]
    by_name = {n: i for i, n in enumerate(q["names"])}
    named = {t: by_name[f["names"][t]] for o in core_f for t in o["outputs"] if f["names"][t] in by_name}
    if len(named) == sum(len(o["outputs"]) for o in core_f):
        return {**pairs, **named}, "name"
    if [o["op"] for o in core_f] == [o["op"] for o in core_q]:
        for a, b in zip(core_f, core_q):
            pairs.update(zip(a["outputs"], b["outputs"]))
        return pairs, "op order"
    return {**pairs, **named}, "name"


def _sqnr(signal: float, noise: float) -> float | None:
    if signal <= 0:
        return None
    return CAP_DB if noise <= signal * 10 ** (-CAP_DB / 10) else float(10 * np.log10(signal / noise))


def _chunks(arrays: list[np.ndarray], batch: int, samples: int):
    n = min(samples, len(arrays[0]))
    if n < batch:
        arrays, n = [np.resize(a[:n], (batch, *a.shape[1:])) for a in arrays], batch
    for i in range(0, n // batch * batch, batch):
        yield [a[i:i + batch] for a in arrays]


class _Sums:
    """Running signal and noise energy of one tensor, per channel (its last axis, NHWC)."""

    def __init__(self):
        self.sig = self.noise = self.grid = 0.0

    def add(self, a: np.ndarray, b: np.ndarray, grid: tuple[float, int] | None) -> None:
        axes = tuple(range(a.ndim - 1)) if a.ndim >= 2 else None
        self.sig = self.sig + np.sum(a * a, axis=axes)
        self.noise = self.noise + np.sum((a - b) ** 2, axis=axes)
        if grid is not None:
            scale, zero = grid
            g = (np.clip(np.round(a / scale) + zero, -128, 127) - zero) * scale
            self.grid = self.grid + np.sum((a - g) ** 2, axis=axes)

    def result(self) -> dict:
        return {"sqnr_db": _sqnr_of(self.sig, self.noise), "grid_sqnr_db": _sqnr_of(self.sig, self.grid),
                "overall_db": _sqnr(float(np.sum(self.sig)), float(np.sum(self.noise)))}


def _sqnr_of(sig, noise) -> float | None:
    """The lower of the tensor's overall SQNR and its median channel's. Overall SQNR is weighted
    by energy, so one channel with a huge range hides the others being rounded to nothing (they
    carry little energy but, after the next layer rescales them, most of the signal); the
    median channel shows that."""
    sig = np.atleast_1d(np.asarray(sig, np.float64))
    noise = np.atleast_1d(np.asarray(noise, np.float64))
    whole = _sqnr(float(sig.sum()), float(noise.sum()))
    live = sig > 0
    if whole is None or live.sum() < 2 or noise.shape != sig.shape:  # no per-channel noise (e.g. no grid)
        return whole
    per = [_sqnr(s, n) for s, n in zip(sig[live], noise[live])]
    return min(whole, float(np.median(per)))


def tensor_sqnr(fp32_tflite: Path, int8_tflite: Path, calib_arrays, layout: str = "NCHW",
                samples: int = 32, threads: int = 1) -> dict:
    """Run both models on up to `samples` samples; per matched float tensor index: {"sqnr_db",
    "grid_sqnr_db"} (None where the float tensor is all zeros). Also "graph" (`graph_ops` of the
    float model), "match" (how tensors were paired), "samples"."""
    arrays = [np.asarray(a) for a in calib_arrays]
    fg, qg = graph_ops(fp32_tflite), graph_ops(int8_tflite)
    pairs, how = pair_tensors(fg, qg)
    fp, qp = _Probe(fp32_tflite, layout, threads), _Probe(int8_tflite, layout, threads)
    if fp.batch != qp.batch or len(fp.inputs) != len(qp.inputs) or len(arrays) != len(fp.inputs):
        raise EdgepackError(f"{Path(int8_tflite).name} and {Path(fp32_tflite).name} do not take the "
                            f"same inputs ({len(arrays)} arrays given)",
                            "compare an int8 model with the float model it was made from")
    sums: dict[int, _Sums] = {}
    ran = 0
    for chunk in _chunks(arrays, fp.batch, samples):
        fp.run(chunk)
        qp.run(chunk)
        ran += len(chunk[0])
        for ft, qt in pairs.items():
            a, _ = fp.value(ft)
            b, grid = qp.value(qt)
            if a.shape == b.shape:
                sums.setdefault(ft, _Sums()).add(a, b, grid)
    out = {t: s.result() for t, s in sums.items()}
    del fp, qp
    release_heap()  # every kept tensor of both interpreters
    return {"tensors": out, "graph": fg, "match": how, "samples": ran}


def rank_ops(fp32_tflite: Path, int8_tflite: Path, calib_arrays, layout: str = "NCHW",
             samples: int = 32, threads: int = 1, measured: dict | None = None) -> list[dict]:
    """Ops of the float model ranked by the SQNR each loses in the int8 model, worst first:
    [{"op", "index" (in the float model), "name" (its output tensor), "module", "sqnr_db" (of its
    output), "input_sqnr_db", "lost_db", "grid_sqnr_db", "output_limited"}]. `calib_arrays` are in
    PyTorch layout and argument order. `measured` is a `tensor_sqnr` result to reuse."""
    m = measured or tensor_sqnr(fp32_tflite, int8_tflite, calib_arrays, layout, samples, threads)
    t, g = m["tensors"], m["graph"]
    ranked = []
    for op in g["ops"]:
        if op["op"] in MOVEMENT_OPS or not op["outputs"] or op["outputs"][0] not in t:
            continue
        out = t[op["outputs"][0]]
        if out["sqnr_db"] is None:
            continue
        ins = [t[i]["sqnr_db"] for i in op["inputs"] if i in t and t[i]["sqnr_db"] is not None]
        before = min(ins) if ins else CAP_DB
        lost = before - out["sqnr_db"]
        grid = out["grid_sqnr_db"]
        name = g["names"][op["outputs"][0]]
        ranked.append({
            "op": op["op"], "index": op["index"], "name": name, "module": module_of(name),
            "sqnr_db": round(out["sqnr_db"], 2), "input_sqnr_db": round(before, 2),
            "lost_db": round(lost, 2), "grid_sqnr_db": None if grid is None else round(grid, 2),
            # The output's own int8 grid explains most of the loss: see the module docstring.
            "output_limited": bool(grid is not None and lost > 3 and grid < POOR_GRID_DB)})
    return sorted(ranked, key=lambda r: -r["lost_db"])


def int8_report(fp32_tflite: Path, int8_tflite: Path, calib_arrays, layout: str = "NCHW",
                top: int | None = 10, samples: int = 32, threads: int = 1) -> dict:
    """The `top` ops losing the most SQNR in `int8_tflite`, for every build's report (cheap: 16-32
    samples). Returns {"ops": rank_ops(...)[:top], "samples", "match", "output_sqnr_db",
    "seconds"}; "output_sqnr_db" is the worst model output's SQNR (over all its values)."""
    t0 = time.perf_counter()
    m = tensor_sqnr(fp32_tflite, int8_tflite, calib_arrays, layout, samples, threads)
    ranking = rank_ops(fp32_tflite, int8_tflite, None, layout, measured=m)
    worst = [m["tensors"][o]["overall_db"] for o in _graph_outputs(fp32_tflite)
             if o in m["tensors"] and m["tensors"][o]["overall_db"] is not None]
    return {"ops": ranking[:top], "samples": m["samples"], "match": m["match"],
            "output_sqnr_db": round(min(worst), 2) if worst else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def _graph_outputs(path: Path) -> list[int]:
    model, _, _ = _load(Path(path))
    sg = model.Subgraphs(0)
    return [int(t) for t in sg.OutputsAsNumpy()] if sg.OutputsLength() else []
