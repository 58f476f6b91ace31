"""Lowering of the canonical quantized form to other runtimes (ONNX Runtime first)."""
