"""QDQ initializers: a quantized weight as the tensors a ``DequantizeLinear -> MatMul`` reads.

Codes become a ``[K, N]`` initializer of ONNX type INT8 / UINT8 / INT4 / UINT4 / INT2 / UINT2 (signed when
symmetric, unsigned with a zero point otherwise), packed bit-exactly as ONNX packs sub-byte types (the order
of :mod:`qexport.formats`); the scale (and zero point) is a scalar (per-tensor), ``[N]`` (per-channel, axis 1)
or ``[G, N]`` (blocked along K, axis 0). :func:`positive_scales` re-expresses full-range symmetric groups with
scales > 0 for TensorRT. The lowering that uses them is :mod:`qexport.lowering.core`.
"""

from __future__ import annotations

import numpy as np
import torch

from qexport.lowering.embedding import StoredWeight

__all__ = ["weight_initializers", "positive_scales", "int_tensor", "onnx_type"]


def onnx_type(bits: int, signed: bool) -> int:
    from onnx import TensorProto as T

    return {(8, True): T.INT8, (8, False): T.UINT8, (4, True): T.INT4, (4, False): T.UINT4,
            (2, True): T.INT2, (2, False): T.UINT2}[(bits, signed)]


def int_tensor(name: str, codes: torch.Tensor, bits: int, signed: bool):
    """A TensorProto of ONNX type int/uint ``bits`` holding integer ``codes`` (any shape), packed as ONNX packs
    sub-byte types: consecutive elements of the flat order, the first one in the low bits."""
    from onnx import TensorProto

    from qexport.formats import pack

    t = TensorProto()
    t.name = name
    t.dims.extend(codes.shape)
    t.data_type = onnx_type(bits, signed)
    flat = codes.reshape(1, -1)
    if bits == 8:
        t.raw_data = flat.to(torch.int8 if signed else torch.uint8).numpy().tobytes()
    else:
        t.raw_data = pack(flat, bits).numpy().tobytes()
    return t


def positive_scales(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int, k: int, layer: str,
                    report) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes ``[N, K]`` and scales ``[R, G]`` re-expressed with scales > 0, for TensorRT.

    qexport's symmetric grid maps each group's extreme to the most negative code, so the scale of a group
    whose extreme is positive is negative (see :mod:`qexport.formats`). Negating such a group's scale and
    codes is exact except for that one code, ``-2^(b-1)``, which becomes ``2^(b-1)`` and saturates to
    ``2^(b-1) - 1``: one quantization step on one element per such group. The count goes in the report.
    """
    from qexport.formats import expand_groups

    sign = torch.where(scale < 0, -1, 1).to(torch.int16)
    flipped = codes * expand_groups(sign, group, k).expand(codes.shape[0], -1)
    top = 2 ** (bits - 1) - 1
    over = flipped > top
    saturated = int(over.sum())
    # groups with a saturated code: per row, per group (a per-tensor scale is one group over everything)
    n = codes.shape[0]
    if scale.numel() == 1:
        sat_groups = int(bool(over.any()))
    else:
        g_of_col = torch.arange(k) // group
        per_group = torch.zeros(n, scale.shape[1], dtype=torch.int32).index_add_(1, g_of_col, over.to(torch.int32))
        sat_groups = int((per_group > 0).sum())
    negated = int((sign < 0).sum())
    report.negated_groups += negated
    report.saturated_groups += sat_groups
    report.saturated_codes += saturated
    report.notes.append(f"{layer}: {negated} negative weight scales negated for TensorRT; "
                        f"{saturated} codes in {sat_groups} groups saturated from {top + 1} to {top}")
    return flipped.clamp(max=top), scale.abs()


def weight_initializers(name: str, codes: torch.Tensor, scale: torch.Tensor, zp_codes: torch.Tensor | None, bits: int,
                        signed: bool, group: int, k: int):
    """A weight with codes ``[N, K]`` and per-group ``scale`` / zero point codes ``[R, G]`` as the initializers a
    QDQ MatMul reads: ``(StoredWeight, [TensorProto])`` (codes ``[K, N]``, scale scalar / ``[N]`` / ``[G, N]``)."""
    from onnx import numpy_helper

    n = codes.shape[0]
    if scale.numel() == 1:  # per-tensor
        s, z, kind = scale.reshape(()), None if zp_codes is None else zp_codes.reshape(()), "per_tensor"
    elif group >= k:  # per-channel: one scale per output channel, axis 1 of [K, N]
        s, z, kind = scale.reshape(n), None if zp_codes is None else zp_codes.reshape(n), "per_channel"
    else:  # blocked along K
        s, z = scale.t().contiguous(), None if zp_codes is None else zp_codes.t().contiguous()
        kind = "blocked"
    tensors = [int_tensor(f"{name}_Wq", codes.t().contiguous(), bits, signed),
               numpy_helper.from_array(np.ascontiguousarray(s.to(torch.float32).numpy()), f"{name}_Ws")]
    if z is not None:
        tensors.append(int_tensor(f"{name}_Wzp", z, bits, False))
    w = StoredWeight(tensors[0].name, tensors[1].name, tensors[2].name if z is not None else None, bits, signed,
                     group, k, kind)
    return w, tensors
