"""ONNX tools below the stages: export and simplification, int8 quantization, output comparison."""
