"""Quantization-aware training for the TFLite int8 route: litert-torch's own PT2E QAT, so the
`.tflite` file is made by the same quantizer, scheme and converter as the PTQ one.

The route (torchao's PT2E QAT flow with litert-torch's `PT2EQuantizer`):
1. torch.export the model (strict first, as the PTQ conversion does: the quantizer finds residual
   adds by metadata only strict export records) with a dynamic batch, so it can be trained.
2. Fold BatchNorm into the convolutions with torchao's `_fuse_conv_bn_` / `_fuse_linear_bn_`,
   the very functions `prepare_pt2e` runs for the PTQ file: the folded weights are the ones the
   PTQ artifact quantizes, and the ones trained here.
3. `prepare_qat_pt2e` with `get_symmetric_quantization_config(is_per_channel=True, is_qat=True)`:
   the PTQ scheme (per-channel symmetric int8 weights in [-127, 127], per-tensor affine int8
   activations) as fake quantization with moving-average observers. litert-torch 0.10.0's
   conv+BatchNorm annotators (`conv_bn`, `conv_bn_relu`, run only for QAT) crash on every model,
   with or without BatchNorm: they hand torchao's `_get_aten_graph_module_for_pattern` a plain
   function where torch.export needs an nn.Module ("Expected `mod` to be an instance of
   `torch.nn.Module`, got <class 'function'>"; litert-torch issues #355 and #801, open). After
   step 2 there is no conv+BatchNorm pair left for them to match, so they are skipped
   (`_FoldedQuantizer`); the conv, linear, add... annotators are litert-torch's, unchanged.
4. Activation ranges initialised by the observers over the calibration samples, then trained
   with distillation from the float model (compress.qat.fit: Adam, clipping, best epoch on the
   choosing samples kept). The graph stays in eval semantics: dropout off, any BatchNorm left
   (one not after a conv) frozen at its statistics.
5. `convert_pt2e` (the trained scales and zero points become Q/DQ pairs) and
   `litert_torch.convert(..., QuantConfig(pt2e_quantizer=...))`, a STATIC QDQ conversion as for PTQ.

The conversion runs in this process (edgepack.tflite's worker converts only from a float program).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgepackError
from ..tflite import require_litert_torch, require_torch_model
from ..tflite import convert as tconvert
from ..tflite._isolate import publish, tmp_path_for
from ..tflite._quiet import quiet_native
from ..tflite._worker import _quiet_litert
from .qat import fit

ROUTE = ("litert-torch PT2E QAT: torch.export, BatchNorm folded (torchao _fuse_conv_bn_), prepare_qat_pt2e with "
         "PT2EQuantizer(get_symmetric_quantization_config(is_per_channel=True, is_qat=True)), distillation, "
         "convert_pt2e, litert_torch.convert (STATIC QDQ)")
SCHEME = ("PT2E QAT: per-channel symmetric int8 weights, per-tensor int8 activations (moving-average ranges "
          "trained), int8 inputs/outputs")


def _pt2e():
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e import quantize_pt2e
    from torchao.quantization.pt2e import fake_quantize as fq
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_, _fuse_linear_bn_
    return pq, quantize_pt2e, fq, (_fuse_conv_bn_, _fuse_linear_bn_)


def quantizer():
    """litert-torch's quantizer with the PTQ scheme in QAT form, minus the conv+BatchNorm annotators."""
    pq = _pt2e()[0]

    class _FoldedQuantizer(pq.PT2EQuantizer):
        STATIC_QAT_ONLY_OPS: list = []  # conv_bn, conv_bn_relu: broken in 0.10.0, nothing to match once folded

    return _FoldedQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True, is_qat=True))


class Student(nn.Module):
    """The prepared (fake-quantized) exported graph as a module compress.qat.fit can train: takes
    PyTorch-layout (NCHW) inputs of any batch, `.train()` runs the observers, `.eval()` freezes them."""

    def __init__(self, graph: torch.fx.GraphModule, images: list[int], min_batch: int):
        super().__init__()
        self.graph, self.images, self.min_batch = graph, images, min_batch
        self.train(False)

    def train(self, mode: bool = True):
        fq = _pt2e()[2]
        self.training = mode  # the graph itself refuses .train()/.eval(); its semantics stay eval
        self.graph.apply(fq.enable_observer if mode else fq.disable_observer)
        return self

    def forward(self, *xs):
        n = int(xs[0].shape[0])
        if n < self.min_batch:  # exported for a batch >= 2 (torch.export specialises 1)
            xs = tuple(torch.cat([x] * self.min_batch) for x in xs)
        xs = tuple(x.permute(0, 2, 3, 1) if i in self.images else x for i, x in enumerate(xs))
        out = self.graph(*xs)
        return tuple(t[:n] for t in out) if isinstance(out, (tuple, list)) else out[:n]


def prepare(model: nn.Module, example_inputs: tuple, layout: str = "NCHW"):
    """(Student, quantizer, example inputs in the file's layout) for `model`; an EdgepackError
    when torch.export cannot export it with a dynamic batch."""
    lt = require_litert_torch()
    pq, qpt2e, _, folds = _pt2e()
    model = require_torch_model(model).eval()
    example_inputs = tuple(example_inputs)
    wrapped, example = tconvert._wrap_layout(model, example_inputs, layout, lt)
    images = tconvert._image_args(example_inputs) if layout == "NHWC" else []
    twice = tuple(torch.cat([t, t]) if t.ndim else t for t in example)
    dynamic = torch.export.ShapesCollection()  # keyed by tensor: whatever the forward's signature (*args)
    for t in twice:
        if t.ndim:
            dynamic[t] = {0: torch.export.Dim.AUTO}
    errors = []
    for strict in (True, False):
        try:
            program = torch.export.export(wrapped, twice, dynamic_shapes=dynamic, strict=strict)
            break
        except Exception as e:  # noqa: BLE001  (strict export fails on some models: try non-strict)
            errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    else:
        raise EdgepackError(f"quantization-aware training for TFLite cannot export the model with torch.export "
                            f"(dynamic batch, needed to train it): {errors[-1]}",
                            "the model must be traceable by torch.export (no data-dependent Python control flow); "
                            "or run QAT for ONNX only (drop tflite from the target's formats)")
    graph = program.module()
    for fold in folds:
        fold(graph)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    quant = quantizer()
    with torch.no_grad():
        prepared = qpt2e.prepare_qat_pt2e(graph, quant)
    return Student(prepared, images, 2), quant, example


@torch.no_grad()
def calibrate(student: Student, samples: list[np.ndarray], batch_size: int = 32) -> int:
    """Initialise the ranges: observers on, fake quantization off, over the calibration samples."""
    fq = _pt2e()[2]
    student.train(True)
    student.graph.apply(fq.disable_fake_quant)
    try:
        for i in range(0, len(samples[0]), batch_size):
            student(*(torch.from_numpy(np.ascontiguousarray(s[i:i + batch_size])) for s in samples))
    finally:
        student.graph.apply(fq.enable_fake_quant)
        student.train(False)
    return int(len(samples[0]))


def train_qat_tflite(model: nn.Module, example_inputs: tuple, train, choose, calib, ft_cfg, layout: str = "NCHW",
                     num_calib: int = 128, progress=None, metric=None) -> tuple[Student, object, tuple, dict]:
    """litert-torch's PT2E QAT of `model`, distilled from it: (trained Student, quantizer, example
    inputs in the file's layout, record with the simulated top-1, or `metric` (the build's
    UserMetric), on `choose` before and after)."""
    from ..prune.finetune import evaluate, score_name
    teacher = model.eval()
    student, quant, example = prepare(model, example_inputs, layout)
    samples = tconvert._calibration_samples(calib, num_calib, tuple(example_inputs))
    n_cal = calibrate(student, samples)
    layers = sum(1 for n in student.graph.graph.nodes if n.op == "call_module" and n.target.startswith("activation_post_process"))
    before = evaluate(student, choose, ft_cfg.batch_size, metric=metric)
    summary = fit(student, teacher if ft_cfg.distill else None, train, choose, ft_cfg, progress, metric)
    after = evaluate(student.eval(), choose, ft_cfg.batch_size, metric=metric)
    record = {"route": ROUTE, "scheme": SCHEME, "fake_quantizers": layers, "calibration_samples": n_cal,
              "simulated_metric": score_name(choose, metric, "top-1"),
              "simulated_top1_before": before, "simulated_top1_after": after, "finetune": summary}
    return student, quant, example, record


def convert_trained(student: Student, quant, example: tuple, out: Path, layout: str = "NCHW",
                    input_names=None, output_names=None) -> tuple[dict, torch.fx.GraphModule]:
    """`convert_pt2e` and litert-torch's STATIC conversion of a trained Student to `out` (published
    atomically); (the artifact's record, in edgepack.tflite's form, and the converted graph:
    the trained model with int8 simulated, in the file's layout)."""
    lt = require_litert_torch()
    qpt2e = _pt2e()[1]
    from litert_torch.quantize.quant_config import QuantConfig
    student.eval()
    converted = qpt2e.convert_pt2e(student.graph, fold_quantize=False)
    for m in converted.modules():
        m.training = False  # eval semantics already; silences litert-torch's training-mode warning
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    t0 = time.perf_counter()
    try:
        with quiet_native(), _quiet_litert():
            try:
                lt.convert(converted, tuple(example), quant_config=QuantConfig(pt2e_quantizer=quant)).export(str(tmp))
            except Exception as e:  # noqa: BLE001
                raise tconvert._explain(type(e).__name__, str(e), None) from e
        publish(tmp, out, "TFLite QAT int8 conversion")
    finally:
        tmp.unlink(missing_ok=True)
    rec = tconvert._record(out, "int8", layout, {"convert_seconds": time.perf_counter() - t0}, lt,
                           (input_names, output_names))
    tconvert._check_outputs(converted, tuple(example), rec)
    rec.update(seconds=time.perf_counter() - t0, scheme=SCHEME, route=ROUTE)
    return rec, converted


@torch.no_grad()
def simulated_outputs(converted: torch.fx.GraphModule, arrays: list[np.ndarray], layout: str = "NCHW",
                      batch_size: int = 64) -> list[np.ndarray]:
    """The converted graph (int8 simulated in PyTorch) on PyTorch-layout arrays."""
    images = [i for i, a in enumerate(arrays) if a.ndim == 4 and a.dtype.kind == "f"] if layout == "NHWC" else []
    parts = []
    for i in range(0, len(arrays[0]), batch_size):
        xs = [torch.from_numpy(np.ascontiguousarray(a[i:i + batch_size])) for a in arrays]
        xs = [x.permute(0, 2, 3, 1) if j in images else x for j, x in enumerate(xs)]
        out = converted(*xs)
        parts.append([t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
