"""TFLite artifacts: conversion from PyTorch (litert-torch), inspection and validation.

litert-torch is an optional extra (`pip install 'edgepack[tflite]'`); this package imports it
only inside the functions that need it, so `import edgepack.tflite` always works and a TFLite
request fails early with `require_litert_torch()`.
"""
from .convert import (INSTALL_HINT, INT8_SCHEME, check_litert_torch, convert_fp32, convert_int8,
                      require_litert_torch, require_torch_model)
from ._quiet import quiet_native
from .fallback import fallback, quantize_tflite
from .inspect import inspect_tflite, read_io
from .sensitivity import int8_report, rank_ops
from .validate import run_tflite

__all__ = ["INSTALL_HINT", "INT8_SCHEME", "check_litert_torch", "convert_fp32", "convert_int8", "fallback",
           "inspect_tflite", "int8_report", "quantize_tflite", "quiet_native", "rank_ops",
           "read_io", "require_litert_torch", "require_torch_model", "run_tflite"]
