"""The TFLite fallback's ai-edge-quantizer calibration with one copy of the activations at a time
(edgepack.tflite._calibration) gives exactly the ranges of the library's own calibration, and
leaves the library as it found it."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from test_tflite_fallback import converted, task  # noqa: F401  (module fixtures: a trained tiny MobileNet)

pytest.importorskip("ai_edge_quantizer", reason="needs ai-edge-quantizer (a litert-torch dependency)")

from ai_edge_quantizer import calibrator  # noqa: E402

from edgepack.tflite._calibration import calibrate as lean_calibrate  # noqa: E402
from edgepack.tflite._quiet import quiet_native  # noqa: E402
from edgepack.tflite.fallback import Int8Quantizer, _aeq  # noqa: E402


def _calibrated(fp32, calib, lean: bool) -> tuple[dict, list[tuple[int, int]]]:
    """The ranges, and how many tensor copies the calibrator held as each sample began and ended."""
    quantizer, recipe, _ = _aeq()
    data, _ = Int8Quantizer(fp32, [calib])._feed()
    cls = calibrator._PreserveAllTensorsCalibrator
    step, held = cls._calibrate_step, []

    def counting(self, *a, **k):
        before = len(self._tensor_content_map)
        out = step(self, *a, **k)
        held.append((before, len(self._tensor_content_map)))
        return out
    cls._calibrate_step = counting  # under the lean wrapper, which is installed around it
    try:
        with quiet_native(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai8())
            ranges = lean_calibrate(q, data, 1) if lean else q.calibrate(data, num_threads=1)
    finally:
        cls._calibrate_step = step
    return ranges, held


def test_lean_calibration_gives_the_same_ranges_with_one_copy_held(converted, task):
    calib = task["calib"][:12]
    lean, held_lean = _calibrated(converted["fp32"], calib, lean=True)
    plain, held_plain = _calibrated(converted["fp32"], calib, lean=False)
    assert len(held_lean) == len(held_plain) == 12
    assert held_plain[0][0] == 0 and min(b for b, _ in held_plain[1:]) > 0  # the last sample's copies kept
    assert [b for b, _ in held_lean] == [0] * 12  # emptied before each sample
    assert 0 < held_lean[0][1] < held_plain[0][1]  # and the weights left out
    assert lean.keys() == plain.keys() and len(lean) > 10
    for name in plain:
        assert lean[name].keys() == plain[name].keys()
        for k in plain[name]:
            np.testing.assert_array_equal(np.asarray(lean[name][k]), np.asarray(plain[name][k]), err_msg=name)


def test_the_library_is_restored(converted, task):
    from ai_edge_quantizer.utils import tfl_interpreter_utils
    cls = calibrator._PreserveAllTensorsCalibrator
    before = cls.__dict__["_calibrate_step"], tfl_interpreter_utils.get_tensor_name_to_content_map
    _calibrated(converted["fp32"], task["calib"][:2], lean=True)
    assert (cls.__dict__["_calibrate_step"], tfl_interpreter_utils.get_tensor_name_to_content_map) == before
