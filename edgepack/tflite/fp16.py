"""fp16 TFLite: the float model's weights stored in half precision (ai-edge-quantizer's
FLOAT_CASTING recipe), with explicit DEQUANTIZE ops in front of the ops that use them.

That is TFLite's "float16 quantization": half the size of the fp32 file. A runtime without fp16
arithmetic dequantizes the weights once at load and computes in fp32 (x86 here: the speed is the
fp32 model's); XNNPACK on a CPU with ARMv8.2 FP16 arithmetic (Cortex-A76 in the Pi 5, most
phones) can run such a model in fp16. Only an ARM device can measure that.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..errors import EdgepackError
from ._quiet import quiet_native

# The ops ai-edge-quantizer's FLOAT_CASTING knows (its algorithm_manager registers these).
FP16_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")


def fp16_recipe(q, regex: str = ".*", ops=FP16_OPS) -> None:
    """Ask the ai_edge_quantizer.Quantizer `q` for fp16 weights on `ops` whose output tensor name
    matches `regex` (the mixed int8/fp16 recipe uses this on the ops the fallback keeps)."""
    from ai_edge_quantizer import qtyping, quantizer

    for op in ops:
        q.update_quantization_recipe(
            regex=regex, operation_name=getattr(qtyping.TFLOperationName, op),
            algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING,
            op_config=qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True))


def convert_fp16(fp32_tflite: Path, out: Path) -> dict:
    """Write the fp16-weight version of `fp32_tflite` to `out` (atomically). Returns its record."""
    try:
        from ai_edge_quantizer import quantizer
    except ImportError as e:
        raise EdgepackError("fp16 TFLite needs ai-edge-quantizer", "pip install 'edgepack[tflite]'") from e
    # It prints its size summary on stdout, which carries --json output.
    with quiet_native(), contextlib.redirect_stdout(io.StringIO()):
        q = quantizer.Quantizer(str(fp32_tflite))
        fp16_recipe(q)
        try:
            result = q.quantize()
        except Exception as e:  # noqa: BLE001  (ai-edge-quantizer raises plain exceptions)
            raise EdgepackError(f"{fp32_tflite.name}: the fp16 conversion failed ({type(e).__name__}: {e})",
                                "build without fp16 (drop it from the profile's precisions)") from e
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_bytes(result.quantized_model)
    tmp.replace(out)
    return {"size_bytes": out.stat().st_size, "converter": "ai-edge-quantizer FLOAT_CASTING (fp16 weights, "
            "explicit DEQUANTIZE)", "ops": list(FP16_OPS)}
