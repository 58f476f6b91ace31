"""Triton kernels: quantized linear layers that read qexport's stored weights as they are.

Three kernels, all computing ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)``:

``_qlinear_gemv_kernel`` (weight only, decode, M <= 16)
    One program owns ``BLOCK_N`` output features and *every* row of ``x``, so each packed weight byte is
    read from memory exactly once. For M <= 4 the product is a broadcast multiply and a reduction over K on
    the CUDA cores (no padding of M); for 8 <= BLOCK_M <= 16 it is a ``tl.dot``.
``_qlinear_gemm_kernel`` (weight only, prefill, M > 16)
    Classic tiled matmul over ``BLOCK_M x BLOCK_N`` output tiles (grouped launch order for L2 reuse); the
    weight tile is dequantized in registers and fed to ``tl.dot`` in the dtype of ``x``.
``_qlinear_a8_kernel`` (W8A8)
    int8 x int8 -> int32 ``tl.dot`` (exact), then ``(acc - x_zp * sum_k wq) * x_scale * w_scale + bias``
    in float32, in that order (the reference's). With ``DYNAMIC`` it takes float activations and fuses
    ``qexport::quantize_per_token``: a first pass over K finds each row's ``max|x|``, the main loop then
    quantizes every ``x`` tile on the fly (``scale = max|x_row| / 127``, IEEE division, round half to even,
    clamp to [-128, 127]). Floating-point contraction (FMA) is switched off for this kernel so that, like
    the reference, every multiply and add rounds on its own: the result is bit-exact.

Stored layouts read by the weight-only kernels (see :mod:`qexport.formats`; nothing is repacked)
    ``qdata``  ``[N, ceil(K * bits / 8)]`` uint8 for 2 and 4 bits: element ``k`` of a row sits in byte
               ``k // (8 // bits)`` at bit ``(k % (8 // bits)) * bits`` (LSB first: element 2i in the low
               nibble). 8-bit codes are ``[N, K]`` int8 (symmetric) or uint8 (asymmetric). Symmetric codes
               are two's complement within their field and are sign-extended after the shift.
    ``scale``  ``[R, G]`` float (R = N, or R = 1 for per-tensor; ``G = ceil(K / group)``); element ``k``
               of row ``n`` uses group ``k // group``, so a partial last group needs nothing special.
    ``zero_point`` (asymmetric only) ``[R, G]`` unsigned codes packed like ``qdata`` (8 bits: uint8).
               ``w = (q - zero_point) * scale``; symmetric ``w = q * scale``.
    NF4        ``qdata`` holds 4-bit indices into the 16-entry code book (``qexport.formats.NF4_CODE``,
               passed as a 64-byte table in global memory, L1-resident): ``w = code[q] * scale``.
    NF4 double-quantized: ``scale = qscale[r, g] * scale2[(r * G + g) // block] + offset`` computed per
               group in the kernel from the int8 ``qscale [R, G]`` (contiguous), ``scale2`` and the 0-d
               ``offset``, exactly as :func:`qexport.formats.double_dequantize` does.

A packed byte holding 2 (int4) or 4 (int2) codes is loaded once per code by neighbouring lanes (the same
address), which keeps element ``k`` of the tile at lane ``k`` and costs no extra memory traffic.
The dequantized weight is rounded to the dtype of ``x`` before the product, as the reference does
(``dequantize(...).to(x.dtype)``).

Block sizes come from :func:`pick_blocks`, a small fixed heuristic (documented there) rather than
autotuning: it keeps Triton's interpreter fast on CPU and makes runs reproducible. Its weight-only sizes
come from a sweep on an H100 (``docs/gpu-h100.md``); ``examples/bench_kernels.py`` measures them.

The GEMV also has a split-K form (``Blocks.split_k > 1``): a 2-D grid whose second axis splits the K
tiles; each program adds its float32 partial sums atomically into a zeroed workspace, and the host adds
the bias and casts (large layers at M = 1, where N / BLOCK_N programs alone leave most SMs idle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qexport.errors import InvalidConfig, InvalidTensor
from qexport.formats import NF4_CODE

__all__ = ["Blocks", "pick_blocks", "qlinear", "qlinear_nf4_dq", "qlinear_a8", "qlinear_a8_dynamic"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TINY = torch.finfo(torch.float32).tiny  # the clamp_min of qexport::quantize_per_token


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    """``torch.round`` for float32 values of magnitude < 2^22 (ties go to the even integer)."""
    f = tl.floor(v)
    d = v - f  # exact: v and f are within 1 of each other
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _group_params(s_ptr, z_ptr, s2_ptr, soff_ptr, r, g, mask, G, dq_block,
                  stride_sr, stride_sg, stride_zr, stride_zg,
                  BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_DQ: tl.constexpr):
    """Scale and zero point (float32) of scale row ``r`` and group ``g`` (broadcastable index tensors).

    With ``HAS_DQ``, ``s_ptr`` points at the int8 ``qscale`` and the scale is rebuilt as
    ``qscale * scale2[flat // dq_block] + offset`` with ``flat = r * G + g``.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    if HAS_DQ:
        qs = tl.load(s_ptr + r * stride_sr + g * stride_sg, mask=mask, other=0).to(tl.float32)
        s2 = tl.load(s2_ptr + (r * G + g) // dq_block, mask=mask, other=0.0)
        scale = qs * s2 + tl.load(soff_ptr)
    else:
        scale = tl.load(s_ptr + r * stride_sr + g * stride_sg, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZP:
        zb = tl.load(z_ptr + r * stride_zr + (g // PER_BYTE) * stride_zg, mask=mask, other=0).to(tl.int32)
        if BITS < 8:
            zb = (zb >> ((g % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
        zp = zb.to(tl.float32)
    else:
        zp = scale  # unused without a zero point
    return scale, zp


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, lut_ptr, s2_ptr, soff_ptr, offs_n, offs_k, k0, N, K, G, group, dq_block,
                  scale_row_step, stride_qn, stride_qk, stride_sr, stride_sg, stride_zr, stride_zg,
                  BITS: tl.constexpr, IS_NF4: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr,
                  HAS_DQ: tl.constexpr, GROUP_ALIGNED: tl.constexpr):
    """Float32 weight tile ``[BLOCK_N, BLOCK_K]`` for rows ``offs_n`` and columns ``offs_k = k0 + arange``.

    ``GROUP_ALIGNED`` (``group % BLOCK_K == 0``): the tile lies in a single group, so one scale / zero point
    per row is loaded; otherwise each element looks up its own group ``k // group``.
    Out-of-range rows and columns come back as 0.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_k[None, :] < K)
    rows = offs_n.to(tl.int64)[:, None]
    byte_ptrs = q_ptr + rows * stride_qn + (offs_k[None, :] // PER_BYTE) * stride_qk
    q = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)  # int8 sign-extends, uint8 zero-extends
    if BITS < 8:
        q = (q >> ((offs_k[None, :] % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
        if SIGNED:
            q = q - ((q >> (BITS - 1)) << BITS)  # two's complement within the field

    r = (offs_n * scale_row_step)[:, None]  # scale row: n, or 0 for per-tensor
    if GROUP_ALIGNED:
        scale, zp = _group_params(s_ptr, z_ptr, s2_ptr, soff_ptr, r, k0 // group, n_mask[:, None], G, dq_block,
                                  stride_sr, stride_sg, stride_zr, stride_zg, BITS, HAS_ZP, HAS_DQ)
    else:
        g = (offs_k // group)[None, :]
        scale, zp = _group_params(s_ptr, z_ptr, s2_ptr, soff_ptr, r, g, mask, G, dq_block,
                                  stride_sr, stride_sg, stride_zr, stride_zg, BITS, HAS_ZP, HAS_DQ)
    if IS_NF4:
        return tl.load(lut_ptr + q, mask=mask, other=0.0) * scale
    if HAS_ZP:
        return (q.to(tl.float32) - zp) * scale
    return q.to(tl.float32) * scale


# ----------------------------------------------------------------------------------------------------
# Weight-only kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _qlinear_gemv_kernel(
    x_ptr, y_ptr, b_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, s2_ptr, soff_ptr,
    M, N, K, G, group, dq_block, scale_row_step,
    stride_xm, stride_xk, stride_ym, stride_qn, stride_qk, stride_sr, stride_sg, stride_zr, stride_zg,
    BITS: tl.constexpr, IS_NF4: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, HAS_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, USE_DOT: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, split_k, SPLIT: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), split_k)``; ``BLOCK_M >= M``: all rows of x in one program.

    With ``SPLIT`` (``split_k > 1``) program ``(n, s)`` sums the K tiles ``s, s + split_k, ...`` and adds its
    partial sums atomically into ``y_ptr``, a zeroed float32 workspace (the host adds the bias and casts).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * split_k):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, lut_ptr, s2_ptr, soff_ptr, offs_n, offs_k, k0, N, K, G, group,
                          dq_block, scale_row_step, stride_qn, stride_qk, stride_sr, stride_sg, stride_zr, stride_zg,
                          BITS, IS_NF4, SIGNED, HAS_ZP, HAS_DQ, GROUP_ALIGNED)
        w = w.to(x_ptr.dtype.element_ty)
        if USE_DOT:
            if IEEE_FP32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SPLIT:
        tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                      mask=m_mask[:, None] & (offs_n < N)[None, :])
    else:
        _store_output(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _store_output(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """``y = acc + bias`` in the dtype of ``y``; the bias is first rounded to that dtype, as the reference."""
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(y_ptr.dtype.element_ty)
        acc = acc + bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile, ``GROUP_M`` row tiles at a time so that weight tiles
    stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _qlinear_gemm_kernel(
    x_ptr, y_ptr, b_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, s2_ptr, soff_ptr,
    M, N, K, G, group, dq_block, scale_row_step,
    stride_xm, stride_xk, stride_ym, stride_qn, stride_qk, stride_sr, stride_sg, stride_zr, stride_zg,
    BITS: tl.constexpr, IS_NF4: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, HAS_DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``."""
    offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, lut_ptr, s2_ptr, soff_ptr, offs_n, offs_k, k0, N, K, G, group,
                          dq_block, scale_row_step, stride_qn, stride_qk, stride_sr, stride_sg, stride_zr, stride_zg,
                          BITS, IS_NF4, SIGNED, HAS_ZP, HAS_DQ, GROUP_ALIGNED)
        w = w.to(x_ptr.dtype.element_ty)
        if IEEE_FP32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    _store_output(y_ptr, b_ptr, acc, offs_m.to(tl.int64), offs_n, M, N, stride_ym, HAS_BIAS)


# ----------------------------------------------------------------------------------------------------
# W8A8 kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _qlinear_a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, x_zero_point,
    stride_xm, stride_xk, stride_xs, stride_wn, stride_wk, stride_ws, stride_ym,
    DYNAMIC: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """int8 GEMM with exact int32 accumulation. ``DYNAMIC``: ``x`` is float and is quantized per row here."""
    offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn

    if DYNAMIC:  # pass 1: scale = max(max|x_row| / 127, tiny), as qexport::quantize_per_token
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & (offs_k[None, :] < K),
                         other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xt), axis=1))
        x_scale = tl.maximum(tl.div_rn(amax, 127.0), 1.1754943508222875e-38)
    else:
        x_scale = tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k[None, :] < K
        if DYNAMIC:
            xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask, other=0.0)
            v = tl.div_rn(xt.to(tl.float32), x_scale[:, None])
            xq = tl.minimum(tl.maximum(_round_half_even(v), -128.0), 127.0).to(tl.int8)
        else:
            xq = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask, other=0)
        wq = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=n_mask[:, None] & k_mask, other=0)
        acc = tl.dot(xq, tl.trans(wq), acc, out_dtype=tl.int32)
        if HAS_ZP:
            w_sum += tl.sum(wq.to(tl.int32), axis=1)

    # Epilogue in float32, in the reference's order: ((acc - zp * sum_k wq) * x_scale) * w_scale + bias.
    y = acc.to(tl.float32)
    if HAS_ZP:
        y = y - x_zero_point * w_sum.to(tl.float32)[None, :]
    y = y * x_scale[:, None]
    y = y * tl.load(ws_ptr + offs_n * stride_ws, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y,
             mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one kernel launch."""

    kernel: str  # "gemv", "gemm" or "a8"
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1  # gemv only: programs sharing one output tile's K range (atomic float32 sums, so the
    # order of the additions, and the last bits of a float32 result, can differ from run to run)


def _pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _fit_k(block_k: int, k: int, group: int | None, lo: int) -> int:
    """Shrink ``block_k`` to K (as a power of two, at least ``lo``); then, for weight-only kernels, halve it
    (not below ``lo``) until it divides the group size so that each tile has one scale per row. When no
    such size exists the kernel looks up a group per element instead."""
    block_k = min(block_k, _pow2_at_least(k, lo))
    if group is None:
        return block_k
    b = block_k
    while b > lo and group % b:
        b //= 2
    return b if group % b == 0 else block_k


def pick_blocks(kind: str, m: int, n: int, k: int, group: int | None = None, bits: int = 4) -> Blocks:
    """The fixed heuristic that sizes every launch (``kind``: ``"weight_only"`` or ``"a8"``).

    The weight-only choices for M = 1, M = 16 and M = 128 are the best of a block-size sweep on an H100
    (Triton 3.6; int4 g128 on five layer shapes, int8 on 4096x4096; ``docs/gpu-h100.md``):

    weight-only, M = 1 (decode): the GEMV reduction path with BLOCK_N = 16 (32 for 8-bit codes),
    BLOCK_K = 128, 2 warps, 3 stages; for layers of 4M weights or more (K * N >= 2^22) 8 programs share
    each output tile's K range (split-K, atomic float32 sums), since N / BLOCK_N programs alone leave the
    GPU mostly idle. Split-K costs two extra small launches (zeroing, cast), a loss on small layers.
    weight-only, M in 2..4: the reduction path with BLOCK_K = 128 and BLOCK_N = 32 / BLOCK_M (at least 8);
    M in 5..16: the ``tl.dot`` path with BLOCK_M = 16, BLOCK_N = 16, BLOCK_K = 128, 4 warps.
    weight-only, M > 16 (prefill): the GEMM kernel with 64 x 64 tiles, BLOCK_K = 128, 8 warps, 3 stages;
    128 x 128 tiles with 4 warps when N >= 8192 (faster there by 2.4x in the sweep).
    a8: BLOCK_M = 16 (M <= 16), 64 (M <= 64) or 128; BLOCK_N = 64 for decode, else 128; BLOCK_K = 128
    (int8 ``tl.dot`` needs K >= 32 per step); not swept yet.
    BLOCK_K is then fitted to K and to the group size (:func:`_fit_k`).
    """
    if kind == "weight_only":
        if m == 1:
            split = 8 if k * n >= 1 << 22 else 1
            return Blocks("gemv", 1, 32 if bits == 8 else 16, _fit_k(128, k, group, 16), num_warps=2, num_stages=3,
                          split_k=split)
        if m <= 16:
            bm = _pow2_at_least(m)
            if bm <= 4:
                return Blocks("gemv", bm, max(8, 32 // bm), _fit_k(128, k, group, 16), num_warps=4, num_stages=3)
            return Blocks("gemv", 16, 16, _fit_k(128, k, group, 16), num_warps=4, num_stages=3)
        if n >= 8192:
            return Blocks("gemm", 128, 128, _fit_k(128, k, group, 16), num_warps=4, num_stages=3)
        return Blocks("gemm", 64, 64, _fit_k(128, k, group, 16), num_warps=8, num_stages=3)
    if kind == "a8":
        bm = 16 if m <= 16 else (64 if m <= 64 else 128)
        bn = 64 if m <= 16 else 128
        return Blocks("a8", bm, bn, _fit_k(128, k, None, 32), num_warps=8 if bm == 128 else 4, num_stages=3)
    raise InvalidConfig(f"pick_blocks(): unknown kind {kind!r}; use 'weight_only' or 'a8'")


# ----------------------------------------------------------------------------------------------------
# Launchers (host side): check the stored tensors, then launch
# ----------------------------------------------------------------------------------------------------
_LUTS: dict[torch.device, torch.Tensor] = {}


def _nf4_lut(device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values on ``device`` (cached; 64 bytes)."""
    if device not in _LUTS:
        _LUTS[device] = NF4_CODE.to(device)
    return _LUTS[device]


def _check_same_device(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise InvalidTensor(f"{name} is on {t.device} but the input is on {x.device}: move the layer with .to()")


def _as_rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != k:
        raise InvalidTensor(f"{what}: expected an input [..., {k}], got shape {tuple(x.shape)}")
    return x.reshape(-1, k)


def _per_row(t: torch.Tensor, rows: int, what: str) -> tuple[torch.Tensor, int]:
    """A per-row (or single) parameter as a flat tensor and its stride (0 when shared by every row)."""
    flat = t.reshape(-1)
    if flat.numel() == 1:
        return flat, 0
    if flat.numel() != rows:
        raise InvalidTensor(f"{what}: expected 1 or {rows} values, got shape {tuple(t.shape)}")
    return flat, flat.stride(0)


def _weight_only(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric, dq, blocks):
    if fmt not in ("int", "nf4"):
        raise InvalidConfig(f"Triton qlinear: unknown weight format {fmt!r}; expected 'int' or 'nf4'")
    if bits not in (2, 4, 8) or (fmt == "nf4" and bits != 4):
        raise InvalidConfig(f"Triton qlinear: bits={bits} is not supported for format {fmt!r} (int: 8, 4, 2; nf4: 4)")
    if x.dtype not in _FLOAT_DTYPES:
        raise InvalidTensor(f"Triton qlinear: input dtype {x.dtype} is not supported; use float16, bfloat16 or float32")
    k = int(in_features)
    x2 = _as_rows(x, k, "Triton qlinear")
    n = qdata.shape[0]
    num_groups = -(-k // group)
    per_byte = 8 // bits
    if qdata.dim() != 2 or qdata.shape[1] * per_byte < k:
        raise InvalidTensor(f"Triton qlinear: qdata must be [out, >= {-(-k // per_byte)}] for {bits}-bit codes "
                            f"of {k} inputs, got {tuple(qdata.shape)}")
    # 8-bit codes are read with the sign of their dtype (int8 / uint8), packed ones are uint8 bytes
    if qdata.dtype not in ((torch.int8, torch.uint8) if bits == 8 else (torch.uint8,)):
        raise InvalidTensor(f"Triton qlinear: qdata of {bits}-bit weights must be "
                            f"{'int8 or uint8' if bits == 8 else 'uint8 (packed)'}, got {qdata.dtype}")
    s = dq[0] if dq is not None else scale
    if s.dim() != 2 or s.shape[0] not in (1, n) or s.shape[1] != num_groups:
        raise InvalidTensor(f"Triton qlinear: {'qscale' if dq else 'scale'} must be [{n} or 1, {num_groups}] "
                            f"(groups of {group} over {k} inputs), got {tuple(s.shape)}")
    has_zp = zero_point is not None and fmt == "int"  # as dequantize_stored: NF4 has none
    if has_zp and (zero_point.dim() != 2 or zero_point.shape[0] != s.shape[0]
                   or zero_point.shape[1] * per_byte < num_groups):
        raise InvalidTensor(f"Triton qlinear: zero_point must be [{s.shape[0]}, {-(-num_groups // per_byte)}], "
                            f"got {tuple(zero_point.shape)}")
    if dq is not None and not dq[0].is_contiguous():
        raise InvalidTensor("Triton qlinear: qscale must be contiguous (its flat order picks the scale2 block)")
    _check_same_device(x, qdata=qdata, scale=s, zero_point=zero_point, bias=bias)

    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], n)
    b = blocks or pick_blocks("weight_only", m, n, k, group, bits)
    lut = _nf4_lut(x.device) if fmt == "nf4" else s  # any valid pointer when unused
    z = zero_point if has_zp else s
    s2, soff = (dq[1], dq[2]) if dq is not None else (s, s)
    common = dict(
        M=m, N=n, K=k, G=num_groups, group=group, dq_block=dq[3] if dq is not None else 1,
        scale_row_step=1 if s.shape[0] == n else 0,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_ym=y.stride(0),
        stride_qn=qdata.stride(0), stride_qk=qdata.stride(1), stride_sr=s.stride(0), stride_sg=s.stride(1),
        stride_zr=z.stride(0), stride_zg=z.stride(1),
        BITS=bits, IS_NF4=fmt == "nf4", SIGNED=fmt == "int" and symmetric, HAS_ZP=has_zp, HAS_DQ=dq is not None,
        HAS_BIAS=bias is not None, GROUP_ALIGNED=group % b.block_k == 0, IEEE_FP32=x.dtype == torch.float32,
        BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, num_warps=b.num_warps, num_stages=b.num_stages,
        # FMA contraction allowed (this path is compared with a tolerance), except with double-quantized
        # scales: ``qscale * scale2 + offset`` contracted to one FMA would round differently from the
        # reference's scales, so every weight would differ (seen on an H100). Explicit, since Triton 3.9
        # warns when it is left to its default, which changes in 3.10.
        enable_fp_fusion=dq is None,
    )
    args = (x2, y, bias if bias is not None else y, qdata, s, z, lut, s2, soff)
    if b.kernel == "gemv":
        if b.block_m < m:
            raise InvalidConfig(f"Triton qlinear: the GEMV kernel needs BLOCK_M >= M, got {b.block_m} < {m}")
        if b.split_k > 1:
            # partial sums of the K slices meet in a float32 workspace; then bias and cast, in the order
            # of _store_output (bias rounded to the output dtype first)
            ws = torch.zeros((m, n), dtype=torch.float32, device=x.device)
            split = dict(common, HAS_BIAS=False)
            _qlinear_gemv_kernel[(triton.cdiv(n, b.block_n), b.split_k)](
                x2, ws, ws, *args[3:], USE_DOT=b.block_m >= 8, split_k=b.split_k, SPLIT=True, **split)
            if bias is not None:
                ws += bias.to(x.dtype).to(torch.float32)
            y.copy_(ws)
        else:
            _qlinear_gemv_kernel[(triton.cdiv(n, b.block_n), 1)](*args, USE_DOT=b.block_m >= 8, split_k=1,
                                                                  SPLIT=False, **common)
    else:
        grid = (triton.cdiv(m, b.block_m) * triton.cdiv(n, b.block_n),)
        _qlinear_gemm_kernel[grid](*args, GROUP_M=b.group_m, **common)
    return y.reshape(*x.shape[:-1], n)


def qlinear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            bias: torch.Tensor | None, fmt: str, bits: int, group: int, in_features: int, symmetric: bool,
            blocks: Blocks | None = None) -> torch.Tensor:
    """Weight-only quantized linear, the arguments of ``qexport::qlinear``: ``x @ W^T + bias`` in ``x.dtype``.

    ``scale`` is the float ``[R, G]`` scale (reconstructed already when double-quantized, as
    ``QLinear`` passes it). ``blocks`` overrides :func:`pick_blocks` (tests use it to force tile edges).
    """
    return _weight_only(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric, None, blocks)


def qlinear_nf4_dq(x: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, scale2: torch.Tensor,
                   scale_offset: torch.Tensor, dq_block: int, bias: torch.Tensor | None, group: int,
                   in_features: int, blocks: Blocks | None = None) -> torch.Tensor:
    """NF4 with double-quantized scales read as ``QLinear`` stores them (``qscale``, ``scale2``,
    ``scale_offset`` buffers): the scales are rebuilt per group inside the kernel."""
    if qscale.dtype != torch.int8 or scale2.dim() != 1 or scale_offset.numel() != 1:
        raise InvalidTensor(f"Triton qlinear_nf4_dq: expected int8 qscale, 1-D scale2 and a single offset, got "
                            f"{qscale.dtype} {tuple(qscale.shape)}, {tuple(scale2.shape)}, {tuple(scale_offset.shape)}")
    if scale2.numel() * dq_block < qscale.numel():
        raise InvalidTensor(f"Triton qlinear_nf4_dq: {scale2.numel()} scale2 blocks of {dq_block} cannot cover "
                            f"{qscale.numel()} scales")
    _check_same_device(x, scale2=scale2, scale_offset=scale_offset)
    dq = (qscale, scale2, scale_offset.reshape(()), int(dq_block))
    return _weight_only(x, qdata, None, None, bias, "nf4", 4, group, in_features, True, dq, blocks)


def _a8(x, x_scale, x_zero_point, wq, w_scale, bias, dynamic, blocks):
    if wq.dtype != torch.int8 or wq.dim() != 2:
        raise InvalidTensor(f"Triton qlinear_a8: weights must be int8 [out, in], got {wq.dtype} {tuple(wq.shape)}")
    n, k = wq.shape
    x2 = _as_rows(x, k, "Triton qlinear_a8")
    m = x2.shape[0]
    if dynamic:
        if x.dtype not in _FLOAT_DTYPES:
            raise InvalidTensor(f"Triton qlinear_a8_dynamic: input dtype {x.dtype} is not supported; "
                                "use float16, bfloat16 or float32")
        xs, stride_xs = x2, 0  # unused
    else:
        if x.dtype != torch.int8:
            raise InvalidTensor(f"Triton qlinear_a8: activations must be int8, got {x.dtype}")
        if not -128 <= int(x_zero_point) <= 127:
            raise InvalidTensor(f"Triton qlinear_a8: activation zero point {x_zero_point} is outside [-128, 127]")
        xs, stride_xs = _per_row(x_scale.to(torch.float32), m, "Triton qlinear_a8: x_scale")
    ws, stride_ws = _per_row(w_scale, n, "Triton qlinear_a8: w_scale (one scale per output row)")
    _check_same_device(x, wq=wq, w_scale=w_scale, x_scale=None if dynamic else x_scale, bias=bias)
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    b = blocks or pick_blocks("a8", m, n, k)
    grid = (triton.cdiv(m, b.block_m) * triton.cdiv(n, b.block_n),)
    _qlinear_a8_kernel[grid](
        x2, xs, wq, ws, bias if bias is not None else y, y,
        m, n, k, int(x_zero_point),
        x2.stride(0), x2.stride(1), stride_xs, wq.stride(0), wq.stride(1), stride_ws, y.stride(0),
        DYNAMIC=dynamic, HAS_ZP=int(x_zero_point) != 0, HAS_BIAS=bias is not None,
        BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, GROUP_M=b.group_m,
        num_warps=b.num_warps, num_stages=b.num_stages,
        enable_fp_fusion=False,  # no FMA contraction: the float epilogue rounds like the reference
    )
    return y.reshape(*x.shape[:-1], n)


def qlinear_a8(xq: torch.Tensor, x_scale: torch.Tensor, x_zero_point: int, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, blocks: Blocks | None = None) -> torch.Tensor:
    """``qexport::qlinear_a8``: int8 activations (per-token ``x_scale [..., 1]`` or one scale) x int8 weights
    (per-channel ``w_scale [N, 1]`` or one scale) -> float32, bit-exact with the reference."""
    return _a8(xq, x_scale, x_zero_point, wq, w_scale, bias, False, blocks)


def qlinear_a8_dynamic(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       blocks: Blocks | None = None) -> torch.Tensor:
    """``qlinear_a8(*quantize_per_token(x), 0, wq, w_scale, bias)`` in one kernel (float32, bit-exact)."""
    return _a8(x, None, 0, wq, w_scale, bias, True, blocks)
