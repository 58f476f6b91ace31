"""The Triton weight-only kernel as a ``torch.library`` custom op (namespace ``qexport``), with a fake kernel.

Registered when :mod:`qexport.kernels.triton` is imported (which needs ``triton``):

``qexport::triton_qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric) -> y``
    the arguments and result of ``qexport::qlinear`` (``y`` in ``x.dtype``).

The op is opaque to ``torch.compile``: the fake kernel gives shapes and dtypes, the real one runs at run
time. ``qexport::qlinear`` / ``qlinear_a8`` reach the Triton kernels through :mod:`qexport.kernels.dispatch`
without going through an op of this module; the other kernels of :mod:`.gemm` are called as functions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qexport.kernels.triton import gemm

__all__ = ["triton_qlinear"]


@torch.library.custom_op("qexport::triton_qlinear", mutates_args=())
def triton_qlinear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor],
                   fmt: str, bits: int, group: int, in_features: int, symmetric: bool) -> Tensor:
    return gemm.qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric)


@triton_qlinear.register_fake
def _(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))
