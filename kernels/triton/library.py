"""The Triton kernels as ``torch.library`` custom ops (namespace ``qexport``), with fake kernels.

Registered when :mod:`qexport.kernels.triton` is imported (which needs ``triton``):

``qexport::triton_qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric) -> y``
    the arguments and result of ``qexport::qlinear`` (``y`` in ``x.dtype``).
``qexport::triton_qlinear_nf4_dq(x, qdata, qscale, scale2, scale_offset, dq_block, bias, group, in_features) -> y``
    NF4 whose scales are stored double-quantized (``QLinear``'s ``qscale`` / ``scale2`` / ``scale_offset``).
``qexport::triton_qlinear_a8(xq, x_scale, x_zero_point, wq, w_scale, bias) -> y``
    the arguments and result of ``qexport::qlinear_a8`` (float32, bit-exact).
``qexport::triton_qlinear_a8_dynamic(x, wq, w_scale, bias) -> y``
    ``qlinear_a8(*quantize_per_token(x), 0, wq, w_scale, bias)`` fused in one kernel (float32, bit-exact).

The ops are opaque to ``torch.compile``: the fake kernels give shapes and dtypes, the real ones run at run
time. The existing ``qexport::qlinear`` / ``qlinear_a8`` reach these kernels through
:mod:`qexport.kernels.dispatch` without going through the ops below.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qexport.kernels.triton import gemm

__all__ = ["triton_qlinear", "triton_qlinear_nf4_dq", "triton_qlinear_a8", "triton_qlinear_a8_dynamic"]


@torch.library.custom_op("qexport::triton_qlinear", mutates_args=())
def triton_qlinear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor],
                   fmt: str, bits: int, group: int, in_features: int, symmetric: bool) -> Tensor:
    return gemm.qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric)


@triton_qlinear.register_fake
def _(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("qexport::triton_qlinear_nf4_dq", mutates_args=())
def triton_qlinear_nf4_dq(x: Tensor, qdata: Tensor, qscale: Tensor, scale2: Tensor, scale_offset: Tensor,
                          dq_block: int, bias: Optional[Tensor], group: int, in_features: int) -> Tensor:
    return gemm.qlinear_nf4_dq(x, qdata, qscale, scale2, scale_offset, dq_block, bias, group, in_features)


@triton_qlinear_nf4_dq.register_fake
def _(x, qdata, qscale, scale2, scale_offset, dq_block, bias, group, in_features):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("qexport::triton_qlinear_a8", mutates_args=())
def triton_qlinear_a8(xq: Tensor, x_scale: Tensor, x_zero_point: int, wq: Tensor, w_scale: Tensor,
                      bias: Optional[Tensor]) -> Tensor:
    return gemm.qlinear_a8(xq, x_scale, x_zero_point, wq, w_scale, bias)


@triton_qlinear_a8.register_fake
def _(xq, x_scale, x_zero_point, wq, w_scale, bias):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qexport::triton_qlinear_a8_dynamic", mutates_args=())
def triton_qlinear_a8_dynamic(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return gemm.qlinear_a8_dynamic(x, wq, w_scale, bias)


@triton_qlinear_a8_dynamic.register_fake
def _(x, wq, w_scale, bias):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=torch.float32)
