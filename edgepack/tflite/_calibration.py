"""ai-edge-quantizer's calibration holding one copy of the model's activations, not two copies of
every tensor.

Its preserve-all-tensors calibrator copies every named tensor of the model, the weights as well
as the activations, into a dict after each sample, and merges that into the dict of the sample
before, so while the new copies are made the old ones are still held. The min/max calibration
of the static int8 recipe skips constant tensors before it looks one up, and each step rewrites
every activation of the subgraphs it runs (a step reads only what its own subgraph just
produced). So emptying the dict first and leaving the weights out gives the same ranges, bit
for bit (tests/test_tflite_calibration.py), with one copy of the activations. Measured on the
ConvNeXt-T-style model of bench/build_memory.py (3 samples): the process peaked at 1412 MB
with the library's own calibration and at 1129 MB with the dict emptied first.
"""
from __future__ import annotations

import contextlib

import numpy as np


def calibrate(q, data, threads: int) -> dict:
    """`q.calibrate(data, num_threads=threads)` for an ai-edge-quantizer `Quantizer`."""
    with _lean_calibrator():
        return q.calibrate(data, num_threads=threads)


@contextlib.contextmanager
def _lean_calibrator():
    try:
        from ai_edge_quantizer import calibrator
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fbu
        from ai_edge_quantizer.utils import tfl_interpreter_utils as iu
        cls = calibrator._PreserveAllTensorsCalibrator
        step = cls.__dict__["_calibrate_step"]
        library_map = iu.get_tensor_name_to_content_map
    except (ImportError, AttributeError, KeyError):  # another version: calibrate as it is
        yield
        return
    running: dict = {}  # the flatbuffer model of the calibrator in its step
    constants: dict = {}

    def lean_step(self, *args, **kwargs):
        content = getattr(self, "_tensor_content_map", None)
        if isinstance(content, dict):
            content.clear()  # the last sample's copies go before this sample's are made
        running["model"] = getattr(self, "_flatbuffer_model", None)
        try:
            return step(self, *args, **kwargs)
        finally:
            running.pop("model", None)

    def activations(interpreter, subgraph_index: int = 0, dequantize: bool = False) -> dict:
        """The library's tensor map without the constant tensors (min/max calibration skips them)."""
        model = running.get("model")
        if model is None:
            return library_map(interpreter, subgraph_index, dequantize)
        key = (id(model), subgraph_index)
        if key not in constants:
            constants[key] = {fbu.get_tensor_name(t) for t in model.subgraphs[subgraph_index].tensors
                              if fbu.get_tensor_data(t, model.buffers) is not None}
        tensors = {}
        for detail in interpreter.get_tensor_details(subgraph_index):
            name = detail["name"]
            if not name or not np.all(detail["shape"]) or name in constants[key]:
                continue
            tensors[name] = iu.get_tensor_data(interpreter, detail, subgraph_index, dequantize)
        return tensors

    cls._calibrate_step, iu.get_tensor_name_to_content_map = lean_step, activations
    try:
        yield
    finally:
        cls._calibrate_step, iu.get_tensor_name_to_content_map = step, library_map
