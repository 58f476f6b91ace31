"""The canonical quantized form: ``torch.library`` custom ops (namespace ``qexport``) with fake kernels.

Every back-end lowers these same ops: the eager ``QLinear``, the graph passes of the compile back-end
(which rewrite ``linear`` calls into them), and later ONNX / TensorRT lowering. Their CPU implementations
are the reference numerics of :mod:`qexport.formats`; the fake implementations give shapes and dtypes
so the ops trace through ``torch.compile`` / ``torch.export`` without running.

Ops
    ``dequantize_weight(qdata, scale, zero_point, fmt, bits, group, in_features, symmetric) -> W[N, K]``
    ``qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric) -> y``
        weight-only quantized linear: ``x @ dequantize_weight(...).T + bias``.
    ``qembedding(indices, qdata, scale, zero_point, fmt, bits, group, dim, symmetric) -> y [*indices, dim]``
        quantized embedding lookup: the rows ``indices`` of the stored ``[V, dim]`` weight (their codes, scales
        and zero points gathered first), dequantized; float32. Equal, bit for bit, to those rows of
        ``dequantize_weight(...)``.
    ``quantize_per_token(x) -> (xq int8, scale [..., 1])``: dynamic symmetric int8, one scale per row,
        ``scale = max|x_row| / 127``.
    ``quantize_per_tensor_dynamic(x) -> (xq int8, scale 0-d)``: the same with one scale for the tensor.
    ``quantize_per_tensor(x, scale, zero_point) -> xq int8``: int8 with one scale (a 0-d tensor) for the tensor.
    ``dequantize_activation(xq, scale, zero_point) -> x``: float from int8 codes (per-token or per-tensor).
    ``qlinear_a8(xq, x_scale, x_zero_point, wq, w_scale, bias) -> y``: int8 x int8 -> int32 matmul, then
        ``(acc - x_zp * sum_k wq) * x_scale * w_scale + bias``.
    ``qlinear_llm_int8(x, wq, w_scale, bias, threshold) -> y``: LLM.int8(): the input columns with some
        ``|x| >= threshold`` times the dequantized weight in float, the others as per-token W8A8, summed
        (:mod:`qexport.llm_int8`).

``qlinear`` and ``qlinear_a8`` run what :mod:`qexport.kernels.dispatch` picks, on every device: the Triton
kernels for CUDA inputs when ``triton`` is installed, the reference otherwise (``QEXPORT_KERNEL`` forces one).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qexport.formats import dequantize_stored
from qexport.kernels import dispatch

__all__ = [
    "dequantize_weight",
    "qlinear",
    "qembedding",
    "quantize_per_token",
    "quantize_per_tensor_dynamic",
    "quantize_per_tensor",
    "dequantize_activation",
    "qlinear_a8",
    "qlinear_llm_int8",
    "double_dequantize",
]

_EPS = torch.finfo(torch.float32).tiny


@torch.library.custom_op("qexport::dequantize_weight", mutates_args=())
def dequantize_weight(qdata: Tensor, scale: Tensor, zero_point: Optional[Tensor], fmt: str, bits: int, group: int,
                      in_features: int, symmetric: bool) -> Tensor:
    return dequantize_stored(qdata, scale, zero_point, fmt, bits, group, in_features, symmetric).contiguous()


@dequantize_weight.register_fake
def _(qdata, scale, zero_point, fmt, bits, group, in_features, symmetric):
    return qdata.new_empty((qdata.shape[0], in_features), dtype=torch.float32)


@torch.library.custom_op("qexport::qlinear", mutates_args=())
def qlinear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor], fmt: str,
            bits: int, group: int, in_features: int, symmetric: bool) -> Tensor:
    return dispatch.qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric)


@qlinear.register_fake
def _(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("qexport::qembedding", mutates_args=())
def qembedding(indices: Tensor, qdata: Tensor, scale: Tensor, zero_point: Optional[Tensor], fmt: str, bits: int,
               group: int, dim: int, symmetric: bool) -> Tensor:
    flat = indices.reshape(-1).long()
    n = flat.numel()

    def rows(t: Tensor) -> Tensor:  # per-tensor parameters ([1, 1]) hold for every row
        if t.numel() == 0:  # a GGML format's (empty) scales: they are inside the gathered rows' blocks
            return t
        return t.expand(n, -1) if t.shape[0] == 1 and qdata.shape[0] != 1 else t.index_select(0, flat)

    zp = None if zero_point is None else rows(zero_point)
    w = dequantize_stored(qdata.index_select(0, flat), rows(scale), zp, fmt, bits, group, dim, symmetric)
    return w.reshape(*indices.shape, dim)


@qembedding.register_fake
def _(indices, qdata, scale, zero_point, fmt, bits, group, dim, symmetric):
    return qdata.new_empty((*indices.shape, dim), dtype=torch.float32)


def _div_127(amax: Tensor) -> Tensor:
    """``amax / 127`` rounded as an IEEE division on every device. A Python-number divisor would not do:
    on CUDA PyTorch multiplies by its float32 reciprocal instead, which rounds some quotients one ulp off
    (and then differs from the CPU, from ONNX Runtime's Div and from the Triton kernel)."""
    return amax / torch.full_like(amax, 127.0)


def per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """The computation of ``quantize_per_token`` as plain torch code (the op's implementation; the inductor
    target's CPU kernels put it in the graph instead of the op, so inductor fuses it)."""
    xf = x.to(torch.float32)
    scale = _div_127(xf.abs().amax(dim=-1, keepdim=True)).clamp_min(_EPS)
    q = torch.round(xf / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


@torch.library.custom_op("qexport::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    return per_token_int8(x)


@quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def per_tensor_dynamic_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_per_tensor_dynamic`` as plain torch code."""
    xf = x.to(torch.float32)
    scale = _div_127(xf.abs().amax()).clamp_min(_EPS)
    q = torch.round(xf / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


@torch.library.custom_op("qexport::quantize_per_tensor_dynamic", mutates_args=())
def quantize_per_tensor_dynamic(x: Tensor) -> tuple[Tensor, Tensor]:
    return per_tensor_dynamic_int8(x)


@quantize_per_tensor_dynamic.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((), dtype=torch.float32)


def per_tensor_int8(x: Tensor, scale: Tensor, zero_point: int) -> Tensor:
    """``quantize_per_tensor`` as plain torch code."""
    return (torch.round(x.to(torch.float32) / scale) + zero_point).clamp(-128, 127).to(torch.int8)


@torch.library.custom_op("qexport::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: Tensor, scale: Tensor, zero_point: int) -> Tensor:
    return per_tensor_int8(x, scale, zero_point)


@quantize_per_tensor.register_fake
def _(x, scale, zero_point):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("qexport::dequantize_activation", mutates_args=())
def dequantize_activation(xq: Tensor, scale: Tensor, zero_point: int) -> Tensor:
    return (xq.to(torch.float32) - zero_point) * scale


@dequantize_activation.register_fake
def _(xq, scale, zero_point):
    return xq.new_empty(xq.shape, dtype=torch.float32)


@torch.library.custom_op("qexport::qlinear_a8", mutates_args=())
def qlinear_a8(xq: Tensor, x_scale: Tensor, x_zero_point: int, wq: Tensor, w_scale: Tensor,
               bias: Optional[Tensor]) -> Tensor:
    return dispatch.qlinear_a8(xq, x_scale, x_zero_point, wq, w_scale, bias)


@qlinear_a8.register_fake
def _(xq, x_scale, x_zero_point, wq, w_scale, bias):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qexport::qlinear_llm_int8", mutates_args=())
def qlinear_llm_int8(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """LLM.int8() linear, float32 result. One op rather than its parts: the outlier columns, found at run
    time, decide the shapes inside it, which a traced graph cannot express as static ops."""
    from qexport.llm_int8 import reference_linear

    return reference_linear(x, wq, w_scale, bias, threshold)


@qlinear_llm_int8.register_fake
def _(x, wq, w_scale, bias, threshold):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qexport::double_dequantize", mutates_args=())
def double_dequantize(qscale: Tensor, scale2: Tensor, offset: Tensor, block: int) -> Tensor:
    """Per-group scales from their int8 double-quantized form: ``qscale * scale2[block] + offset``."""
    from qexport.formats import DoubleQuant, double_dequantize as _dd

    return _dd(DoubleQuant(qscale, scale2, offset, block))


@double_dequantize.register_fake
def _(qscale, scale2, offset, block):
    return qscale.new_empty(qscale.shape, dtype=torch.float32)
