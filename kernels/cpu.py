"""Integer CPU kernels for the compile back-end's ``inductor`` target.

Each canonical linear is mapped to a kernel torch itself ships, with its weight repacked once, when the graph is
compiled (the stored format does not change):

``int4``
    4- and 2-bit integer weights (symmetric or with zero points; per channel, per tensor, or in groups that 32
    divides): ``aten._weight_int4pack_mm_for_cpu``, with ``bfloat16`` activations and scales. The kernel computes
    ``(q - 8) * scale + zero`` per group of 32, 64, 128 or 256, so codes become ``q = code + 8`` (symmetric), or
    ``q = code - zero_point + 8`` with ``zero = 0`` where that fits 4 bits (2-bit codes), else ``q = code`` with
    ``zero = (8 - zero_point) * scale``. A partial last group (K = 576 with groups of 128) is split into kernel
    groups that divide both (64 here, each with its group's scale: exact); where none divides K, K is padded
    with zero activations inside the kernel's weight. N is padded to a multiple of 16, the kernel's tile.
``int8``
    8-bit symmetric weight-only, per channel or per tensor: ``aten._weight_int8pack_mm`` with ``bfloat16``
    activations and scales. K is padded to a multiple of 16, below which the kernel reads out of bounds.
``int8 x int8``
    W8A8 (dynamic per-token or per-tensor, or calibrated static): ``torch._int_mm`` (oneDNN's int8 GEMM, VNNI
    where the CPU has it) on the int8 codes, then the same float epilogue as the reference
    (``acc * x_scale * w_scale + bias``): bit-identical to :func:`qexport.kernels.reference.qlinear_a8` without an
    activation zero point (with one, the correction is exact in int32 where the reference rounds it in float).
    The activation quantizers become plain torch code that inductor fuses into one loop.
``float``
    A float32 linear the recipe left float (a preset's ``lm_head``): ``x @ W^T`` on a ``[K, N]`` contiguous copy
    of the weight, made once. At M = 1 torch's float32 product reads a ``[N, K]`` weight through its
    transposed-operand path, about half as fast (SmolLM2's 49152 x 576 ``lm_head``: 12.8 against 6.3 ms on a
    2-core AVX-512 machine); inductor's freezing makes the same copy for the float models it compiles.

The weight-only kernels take ``bfloat16`` activations: their ``float32`` paths in torch 2.13 are scalar loops,
10-20x slower. The result is therefore not bit-identical to the reference; :data:`TOLERANCE` states the bound
each layer is checked against (:func:`probe`) when it is packed. NF4 (a lookup table), grouped int8 weights and
int8 weights with zero points have no integer kernel here and keep the reference. Every kernel runs on any
x86-64 CPU torch supports: the vector width (AVX2, AVX-512, AVX-512 VNNI, AMX) is chosen by torch at run time,
so nothing here depends on the CPU's features; only the speed does (``qexport bench`` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qexport.formats import _load, _num_groups, expand_groups

__all__ = ["INT4_GROUPS", "TOLERANCE", "Unsupported", "Packed", "pack_int4", "pack_int8", "pack_int8_int8",
           "int4_linear", "int8_linear", "int8_int8_linear", "run", "probe"]

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes aten._weight_int4pack_mm_for_cpu takes, largest first
N_TILE = 16  # aten._convert_weight_to_int4pack_for_cpu needs N % 16 == 0
K_TILE_INT8 = 16  # aten._weight_int8pack_mm reads past K unless K % 16 == 0

# Largest |kernel - reference| / max|reference| accepted when a layer is packed. The weight-only kernels round
# activations and scales to bfloat16 (8 significant bits; a dot product's relative error stays near 2^-8),
# the int8 x int8 kernel is exact up to float32 rounding of its epilogue.
TOLERANCE = {"int4": 2e-2, "int8": 2e-2, "int8_int8": 1e-5, "float": 1e-5}


class Unsupported(Exception):
    """This layer has no CPU integer kernel: it keeps the reference (the message says why)."""


@dataclass
class Packed:
    """A layer's weight repacked for one kernel: ``fn(x, *tensors, *args, bias)`` computes the linear."""

    kind: str  # "int4", "int8", "int8_int8" or "float"
    fn: Callable[..., Tensor]
    tensors: dict[str, Tensor]
    args: tuple[Any, ...] = ()
    note: str = ""  # what runs, for the report


def _codes(qdata: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, group: int, k: int,
           symmetric: bool):
    """Integer codes ``[N, K]`` (int32), scales ``[N, G]`` and zero points ``[N, G]`` (float32 or None)."""
    n = qdata.shape[0]
    g = _num_groups(k, group)
    codes = _load(qdata, bits, k, symmetric).to(torch.int32)
    s = scale.to(torch.float32).expand(n, g) if scale.shape[0] == 1 else scale.to(torch.float32)
    zp = None
    if zero_point is not None:
        zp = _load(zero_point, bits, g, False).to(torch.float32)
        zp = zp.expand(n, g) if zp.shape[0] == 1 else zp
    return codes, s, zp


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _kernel_group(group: int, k: int) -> tuple[int, int]:
    """``(kernel group, padded K)``: a kernel group size that lies within one stored group (it divides the
    stored group, or there is one group per row), the one that pads K least (none, where one divides K)."""
    one_group = _num_groups(k, group) == 1
    fits = [c for c in INT4_GROUPS if one_group or group % c == 0]
    if not fits:
        raise Unsupported(f"groups of {group}: the int4 CPU kernel takes groups of {', '.join(map(str, INT4_GROUPS))}, "
                          "none of which divides it")
    c = min(fits, key=lambda c: (_round_up(k, c), -c))
    return c, _round_up(k, c)


def pack_int4(qdata: Tensor, scale: Tensor, zero_point: Tensor | None, fmt: str, bits: int, group: int, k: int,
              symmetric: bool) -> Packed:
    if fmt != "int" or bits not in (2, 4):
        raise Unsupported(f"{bits}-bit {fmt} weights have no int4 CPU kernel")
    kernel_group, k_pad = _kernel_group(group, k)
    codes, s, zp = _codes(qdata, scale, zero_point, bits, group, k, symmetric)
    n = codes.shape[0]
    # The kernel computes (q - 8) * scale + zero. With zero points, q = code - zero_point + 8 keeps zero = 0
    # (exact up to the scale's rounding) when that fits 4 bits everywhere, as it does for 2-bit codes; otherwise
    # (4-bit codes spanning their range) q = code and zero = (8 - zero_point) * scale.
    zero = torch.zeros_like(s)
    if zp is None:
        q = codes + 8
    else:
        q = codes - expand_groups(zp, group, k).to(torch.int32) + 8
        if int(q.min()) < 0 or int(q.max()) > 15:
            q, zero = codes, (8.0 - zp) * s
    # per kernel group: the parameters of the stored group it lies in (its first column's); padding repeats the last
    first_cols = torch.arange(0, k_pad, kernel_group).clamp(max=k - 1)
    s, zero = expand_groups(s, group, k)[:, first_cols], expand_groups(zero, group, k)[:, first_cols]
    n_pad = _round_up(n, N_TILE)
    q = F.pad(q, (0, k_pad - k, 0, n_pad - n), value=8)  # padded codes are 0 * scale + zero, times zero inputs
    s = F.pad(s, (0, 0, 0, n_pad - n))
    zero = F.pad(zero, (0, 0, 0, n_pad - n))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    except RuntimeError as e:
        raise Unsupported(f"aten._convert_weight_to_int4pack_for_cpu: {e}") from None
    scales_zeros = torch.stack([s.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K / group, N, 2]
    pad_note = f", K padded {k} -> {k_pad}" if k_pad != k else ""
    return Packed("int4", int4_linear, {"packed": packed, "scales_zeros": scales_zeros}, (kernel_group, n, k_pad),
                  f"aten._weight_int4pack_mm_for_cpu ({bits}-bit codes, kernel groups of {kernel_group}{pad_note}, "
                  "bfloat16 activations)")


def _bf16_rows(x: Tensor, k_pad: int) -> Tensor:
    """The weight-only kernels' input: ``x`` as bfloat16 rows ``[M, k_pad]``, zero-padded past K."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return F.pad(x2, (0, k_pad - x.shape[-1])) if k_pad != x.shape[-1] else x2


def _output(y: Tensor, x: Tensor, n: int, bias: Tensor | None) -> Tensor:
    """A weight-only kernel's ``[M, N]`` result (N padded or not) in ``x``'s dtype and leading shape, plus the bias."""
    y = y[:, :n].to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def int4_linear(x: Tensor, packed: Tensor, scales_zeros: Tensor, group: int, n: int, k_pad: int,
                bias: Tensor | None) -> Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16_rows(x, k_pad), packed, group, scales_zeros)
    return _output(y, x, n, bias)


def pack_int8(qdata: Tensor, scale: Tensor, zero_point: Tensor | None, fmt: str, bits: int, group: int, k: int,
              symmetric: bool) -> Packed:
    if fmt != "int" or bits != 8:
        raise Unsupported(f"{bits}-bit {fmt} weights have no int8 CPU kernel")
    if _num_groups(k, group) != 1:
        raise Unsupported(f"int8 weights in groups of {group}: the int8 CPU kernel takes one scale per output channel")
    if zero_point is not None:  # a zero-point correction after the kernel's bfloat16 output would cancel badly
        raise Unsupported("int8 weights with zero points: the int8 CPU kernel takes symmetric codes")
    codes, s, _ = _codes(qdata, scale, None, bits, group, k, symmetric)
    k_pad = _round_up(k, K_TILE_INT8)
    wq = F.pad(codes, (0, k_pad - k)).to(torch.int8).contiguous()
    return Packed("int8", int8_linear, {"weight": wq, "scale": s[:, 0].to(torch.bfloat16)}, (wq.shape[0], k_pad),
                  "aten._weight_int8pack_mm (per-channel int8, bfloat16 activations)")


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, n: int, k_pad: int, bias: Tensor | None) -> Tensor:
    return _output(torch.ops.aten._weight_int8pack_mm(_bf16_rows(x, k_pad), weight, scale), x, n, bias)


def pack_int8_int8(wq: Tensor, w_scale: Tensor, x_zero_point: int) -> Packed:
    if wq.dtype != torch.int8:
        raise Unsupported(f"int8 x int8 kernel: weight codes are {wq.dtype}, not int8")
    tensors = {"weight": wq.contiguous(), "w_scale": w_scale.to(torch.float32).reshape(1, -1)}
    # a zero point of the activations adds -x_zp * sum_k wq to each output: precomputed, in int32
    tensors["zero_term"] = (wq.to(torch.int32).sum(dim=1) * int(x_zero_point)).reshape(1, -1) if x_zero_point else None
    return Packed("int8_int8", int8_int8_linear, tensors, (),
                  "torch._int_mm (int8 x int8 -> int32, oneDNN), float epilogue")


def int8_int8_linear(xq: Tensor, x_scale: Tensor, weight: Tensor, w_scale: Tensor, zero_term: Tensor | None,
                     bias: Tensor | None) -> Tensor:
    lead = xq.shape[:-1]
    acc = torch._int_mm(xq.reshape(-1, xq.shape[-1]), weight.t())
    if zero_term is not None:
        acc = acc - zero_term
    y = acc.to(torch.float32) * x_scale.reshape(-1, 1) * w_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, weight.shape[0])


def pack_float(weight: Tensor) -> Packed:
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise Unsupported(f"float linear: a {weight.dtype} weight of {weight.dim()} dimensions, not float32 [N, K]")
    return Packed("float", float_linear, {"weight_t": weight.t().contiguous()}, (),
                  "x @ W^T on a [K, N] copy of the float32 weight")


def float_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    y = torch.matmul(x, weight_t)
    return y if bias is None else y + bias


def run(packed: Packed, inputs: tuple, bias: Tensor | None) -> Tensor:
    """The packed layer on ``inputs`` (``(x,)``, or ``(xq, x_scale)`` for int8 x int8)."""
    return packed.fn(*inputs, *packed.tensors.values(), *packed.args, bias)


def probe(packed: Packed, reference: Callable[..., Tensor], inputs: tuple, bias: Tensor | None) -> float:
    """Run the packed kernel and the reference on ``inputs``; the error relative to the reference's largest
    value. Raises :class:`Unsupported` when the kernel fails or misses :data:`TOLERANCE`."""
    try:
        with torch.no_grad():
            got = run(packed, inputs, bias)
    except RuntimeError as e:  # a kernel this torch build lacks, or a shape it refuses
        raise Unsupported(f"{packed.note}: {e}") from None
    with torch.no_grad():
        want = reference(*inputs)
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))
    if not err <= TOLERANCE[packed.kind]:  # also catches NaN
        raise Unsupported(f"{packed.note}: error {err:.3g} on a probe input exceeds {TOLERANCE[packed.kind]}")
    return err
