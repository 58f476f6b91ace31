"""Reference kernels: plain PyTorch, exact with respect to :mod:`qexport.formats`.

Slow but simple; the CPU implementations of the ``qexport`` custom ops and the oracle for every faster
kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qexport.formats import dequantize_stored


def qlinear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            bias: torch.Tensor | None, fmt: str, bits: int, group: int, in_features: int,
            symmetric: bool) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias`` in the dtype of ``x``."""
    w = dequantize_stored(qdata, scale, zero_point, fmt, bits, group, in_features, symmetric).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def qlinear_a8(xq: torch.Tensor, x_scale: torch.Tensor, x_zero_point: int, wq: torch.Tensor,
               w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """int8 activations x int8 weights: exact integer accumulation, then the scales (float32 result)."""
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, xq.shape[-1])
    # Integer dot products, computed exactly in floating point (torch._int_mm is ~17x slower than an fp32
    # matmul on CPU): each product is at most 2^14, so fp32 sums are exact up to K = 1024, fp64 beyond.
    exact = torch.float32 if xq.shape[-1] <= 1024 else torch.float64
    acc = (x2.to(exact) @ wq.to(exact).t()).to(torch.float32)
    if x_zero_point:
        acc = acc - float(x_zero_point) * wq.to(torch.float32).sum(dim=1)
    xs = x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(1, 1)
    y = acc * xs * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, wq.shape[0])
