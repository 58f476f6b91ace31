"""Compute kernels for quantized layers (installed as ``qexport.kernels``).

``reference`` holds the plain-PyTorch dequantize-then-matmul that every other kernel is checked against.
"""
