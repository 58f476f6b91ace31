"""Reference numerics: ranges, scales, (de)quantization, bit packing, NF4 and double quantization.

Everything here is plain PyTorch and is the oracle that every faster path is tested against.

Weight layout
    A weight is ``[N, K]`` (``nn.Linear``: out_features x in_features). Groups run along K: group ``j`` of
    row ``n`` holds ``w[n, j*g:(j+1)*g]``. When ``g`` does not divide K the last group is partial (it has
    ``K - (G-1)*g`` elements, ``G = ceil(K/g)``), as in ONNX's blocked DequantizeLinear and ONNX Runtime's
    MatMulNBits. Per-channel is one group of K per row; per-tensor is one group over the whole tensor.
    Scales and zero points have shape ``[R, G]`` with ``R = N`` (``R = 1`` for per-tensor).

Integer grids
    symmetric: signed codes in ``[-2^(b-1), 2^(b-1)-1]``, no zero point. In each group the element of
    largest magnitude maps exactly to the most negative code, so ``scale = extreme / -2^(b-1)`` and the
    scale carries the opposite sign of that element (ONNX Runtime's blockwise rule; it uses all 2^b codes,
    where ``max|w| / (2^(b-1)-1)`` wastes one).
    symmetric, restricted range (``QuantSpec.restricted_range``): signed codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``
    and ``scale = max|w| / (2^(b-1)-1)``, always > 0, so the grid is symmetric about 0 and the extreme maps to
    ``+-(2^(b-1)-1)``. TensorRT's QDQ rules (positive scales, zero point 0) take it as it is; the full-range
    grid's negative scales must be negated for TensorRT, which pushes the code ``-2^(b-1)`` out of range.
    asymmetric: unsigned codes in ``[0, 2^b-1]`` and an integer zero point per group, range widened to
    include 0 so that 0 is exact. ``w ~= (q - zero_point) * scale``.
    A group whose range is 0 (all zeros) gets scale 1, so nothing divides by zero.

Packing (bit-exact, reversible), along the last dimension of each row, little end first
    int4/uint4/nf4: two codes per byte, element ``2i`` in the low nibble (bits 0-3) and ``2i+1`` in the
    high nibble (bits 4-7), the order of ONNX's INT4/UINT4 tensors. int2: four codes per byte, element
    ``4i+k`` in bits ``2k..2k+1``. Signed codes are stored in two's complement within their field. A row
    with a number of codes that does not fill its last byte is padded with zero bits. 8-bit codes are
    stored unpacked as ``int8`` (symmetric) or ``uint8`` (asymmetric).

NF4 (QLoRA)
    16 code values, quantiles of N(0, 1) scaled to [-1, 1] with an exact 0; each group is scaled by its
    absmax and every element takes the nearest code. ``NF4_CODE`` holds the float32 values QLoRA published
    (bitsandbytes' table, also ONNX Runtime's ``MatMulBnb4`` table) bit for bit, so that a runtime that uses
    that table dequantizes exactly as this reference does; :func:`nf4_code` derives them (to within 1e-6).
    Double quantization stores the per-group absmax scales as int8 in blocks of 256 after subtracting their
    mean: ``scale ~= q * s2[block] + offset``.

GGML block formats (llama.cpp)
    ``qdata`` holds llama.cpp's blocks byte for byte (scales inside), ``uint8 [N, K / block * type_size]``,
    and there is no separate scale tensor; :mod:`qexport.ggml` has their numerics. A layer is stored in
    the type :func:`qexport.ggml.resolve` gives for its K (llama.cpp's fallback for K-quants on rows that
    are not a multiple of 256), and its :class:`QuantizedWeight` carries that type's spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qexport import ggml
from qexport.config import Granularity, NumberFormat, Observer, QuantSpec
from qexport.errors import InvalidTensor

__all__ = [
    "NF4_CODE",
    "QuantizedWeight",
    "DoubleQuant",
    "observe_range",
    "qparams_from_range",
    "quantize_codes",
    "dequantize_codes",
    "pack",
    "unpack",
    "nf4_code",
    "double_quantize",
    "double_dequantize",
    "quantize_weight",
    "fake_quantize",
    "stored_layout",
    "ggml_layer_spec",
]


# ----------------------------------------------------------------------------------------------------
# NF4 code book
# ----------------------------------------------------------------------------------------------------
def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, built as in QLoRA: 8 positive and 7 negative N(0,1) quantiles plus 0, in [-1, 1].

    The quantiles of the standard normal are taken at evenly spaced probabilities from ``offset`` to 0.5,
    where ``offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2`` keeps the outermost quantile finite; each half is
    scaled so that its outermost value is exactly +-1.
    """
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p_pos)
    neg = -torch.special.ndtri(p_neg)
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    values = values / values.abs().max()
    return values.sort().values.to(torch.float32)


# The table as published with QLoRA, as float32. nf4_code() agrees to within 2e-7 (a few float32 units in the last
# place: the published values were rounded through a different path); the published bits are used so that
# bitsandbytes / ONNX Runtime MatMulBnb4 dequantize qexport's NF4 weights bit-exactly.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0


# ----------------------------------------------------------------------------------------------------
# Group views
# ----------------------------------------------------------------------------------------------------
def _group_size(spec: QuantSpec, k: int) -> int:
    if spec.granularity is Granularity.GROUP:
        return spec.group_size
    return k  # per-channel and per-tensor: one group spans the row


def _num_groups(k: int, g: int) -> int:
    return -(-k // g)


def _split_groups(w: torch.Tensor, g: int) -> list[torch.Tensor]:
    """``[R, K]`` -> views ``[R, G_full, g]`` and, when g does not divide K, the tail ``[R, 1, K % g]``."""
    r, k = w.shape
    full = (k // g) * g
    parts = []
    if full:
        parts.append(w[:, :full].reshape(r, k // g, g))
    if full < k:
        parts.append(w[:, full:].reshape(r, 1, k - full))
    return parts


def expand_groups(p: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """Per-group parameters ``[R, G]`` -> per-element ``[R, K]``."""
    return p.repeat_interleave(g, dim=1)[:, :k]


# ----------------------------------------------------------------------------------------------------
# Observers: the range [lo, hi] of each group
# ----------------------------------------------------------------------------------------------------
MSE_SHRINK = torch.linspace(1.0, 0.2, 41)  # candidate fractions of the min-max range tried by 'mse'
MSE_NORM = 2.0


def _minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.amin(dim=-1), x.amax(dim=-1)


def _percentile(x: torch.Tensor, pct: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    k_hi = min(n, max(1, math.ceil(pct / 100.0 * n)))
    k_lo = n - k_hi + 1
    return x.kthvalue(k_lo, dim=-1).values, x.kthvalue(k_hi, dim=-1).values


def _mse(x: torch.Tensor, bits: int, symmetric: bool, fmt: NumberFormat, restricted: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    lo0, hi0 = _minmax(x)
    best_err = torch.full(lo0.shape, float("inf"), dtype=torch.float32, device=x.device)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for s in MSE_SHRINK.tolist():
        lo, hi = lo0 * s, hi0 * s
        if fmt is NumberFormat.NF4:
            xq = _nf4_roundtrip(x, torch.maximum(lo.abs(), hi.abs()))
        else:
            scale, zp = qparams_from_range(lo, hi, bits, symmetric, restricted)
            xq = dequantize_codes(quantize_codes(x, scale[..., None], None if zp is None else zp[..., None],
                                                 bits, symmetric, restricted), scale[..., None],
                                  None if zp is None else zp[..., None])
        err = (xq - x).abs().pow(MSE_NORM).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def observe_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Range ``(lo, hi)`` over the last dimension of ``x`` (``[..., g]`` -> ``[...]``), by ``spec.observer``."""
    if spec.observer is Observer.MINMAX:
        return _minmax(x)
    if spec.observer is Observer.PERCENTILE:
        return _percentile(x, float(spec.percentile))
    return _mse(x, spec.bits, spec.symmetric, spec.format, spec.restricted_range)


# ----------------------------------------------------------------------------------------------------
# Integer grids
# ----------------------------------------------------------------------------------------------------
def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, restricted: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and integer zero point, asymmetric only) for ranges ``[lo, hi]``; see the module docstring.

    ``restricted`` (symmetric only): the restricted-range grid, ``scale = max(|lo|, |hi|) / (2^(b-1)-1) > 0``.
    """
    lo = lo.to(torch.float32).clamp(max=0.0)
    hi = hi.to(torch.float32).clamp(min=0.0)
    one = torch.ones((), dtype=torch.float32)
    if symmetric and restricted:
        scale = torch.maximum(lo.abs(), hi.abs()) / float(2 ** (bits - 1) - 1)
        return torch.where(scale == 0, one, scale), None
    if symmetric:
        extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = extreme / float(-(2 ** (bits - 1)))
        return torch.where(scale == 0, one, scale), None
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(torch.isinf(scale), hi / qmax - lo / qmax, scale)  # span beyond float32 max
    scale = torch.where(scale == 0, one, scale)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero_point


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                   symmetric: bool, restricted: bool = False) -> torch.Tensor:
    """Integer codes (as float) ``clamp(round(x / scale) + zero_point)``; round half to even, like ONNX.
    ``restricted`` (symmetric only) clamps to ``[-(2^(b-1)-1), 2^(b-1)-1]``."""
    q = torch.round(x / scale)
    if symmetric and restricted:
        return q.clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    if symmetric:
        return q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q + zero_point).clamp(0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    if zero_point is None:
        return q * scale
    return (q - zero_point) * scale


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[R, C]`` (signed or unsigned, each fitting in ``bits``) into ``uint8 [R, ceil(C*bits/8)]``."""
    if bits not in (2, 4):
        raise InvalidTensor(f"pack() handles 2- and 4-bit codes, got bits={bits}")
    if codes.dim() != 2:
        raise InvalidTensor(f"pack() expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    per_byte = 8 // bits
    r, c = codes.shape
    if codes.numel() and (int(codes.min()) < -(1 << (bits - 1)) or int(codes.max()) >= (1 << bits)):
        raise InvalidTensor(f"pack(): codes outside the {bits}-bit range [{-(1 << (bits - 1))}, {(1 << bits) - 1}]")
    fields = codes.to(torch.int16) & ((1 << bits) - 1)  # two's complement within the field
    pad = (-c) % per_byte
    if pad:
        fields = torch.nn.functional.pad(fields, (0, pad))
    fields = fields.reshape(r, -1, per_byte)
    out = torch.zeros(fields.shape[:2], dtype=torch.int16, device=codes.device)
    for k in range(per_byte):
        out |= fields[..., k] << (bits * k)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [R, B]`` -> ``int16 [R, count]`` codes (sign-extended when ``signed``)."""
    if bits not in (2, 4):
        raise InvalidTensor(f"unpack() handles 2- and 4-bit codes, got bits={bits}")
    per_byte = 8 // bits
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * per_byte < count:
        raise InvalidTensor(
            f"unpack(): expected uint8 [rows, >= {math.ceil(count / per_byte)}], got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    p = packed.to(torch.int16)
    mask = (1 << bits) - 1
    fields = torch.stack([(p >> (bits * k)) & mask for k in range(per_byte)], dim=-1)
    codes = fields.reshape(packed.shape[0], -1)[:, :count]
    if signed:
        codes = codes - ((codes >> (bits - 1)) << bits)  # sign-extend
    return codes


def _store(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.int8 if signed else torch.uint8)
    return pack(codes, bits)


def _load(stored: torch.Tensor, bits: int, count: int, signed: bool) -> torch.Tensor:
    if bits == 8:
        return stored[:, :count].to(torch.int16)
    return unpack(stored, bits, count, signed)


# ----------------------------------------------------------------------------------------------------
# NF4 and double quantization
# ----------------------------------------------------------------------------------------------------
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


def nf4_indices(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Index (0..15) of the NF4 code nearest to ``x / absmax``; ``absmax`` broadcasts against ``x``."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.bucketize((x / safe).clamp(-1, 1).contiguous(), _NF4_MIDPOINTS.to(x.device))


def _nf4_roundtrip(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return NF4_CODE.to(x.device)[nf4_indices(x, absmax[..., None])] * absmax[..., None]


@dataclass
class DoubleQuant:
    """Per-group scales stored as int8: ``scale ~= qscale * scale2[block] + offset`` (blocks along the flat order)."""

    qscale: torch.Tensor  # int8 [R, G]
    scale2: torch.Tensor  # float32 [ceil(R*G / block)]
    offset: torch.Tensor  # float32 scalar
    block: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.qscale, self.scale2, self.offset]


def double_quantize(scales: torch.Tensor, block: int) -> DoubleQuant:
    """Quantize positive per-group scales to int8 in blocks of ``block``; every reconstructed scale stays > 0."""
    shape = scales.shape
    flat = scales.reshape(-1).to(torch.float32)
    offset = flat.mean()
    centred = flat - offset
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, block)
    scale2 = blocks.abs().amax(dim=1) / 127.0
    scale2 = torch.where(scale2 == 0, torch.ones_like(scale2), scale2)
    s2 = scale2.repeat_interleave(block)[: flat.numel()]
    q = torch.round(centred / s2).clamp(-127, 127)
    # A tiny scale could round to a non-positive value: step it up one code (always enough, see docs).
    q = torch.where((q * s2 + offset <= 0) & (flat > 0), q + 1, q).clamp(-127, 127)
    return DoubleQuant(q.to(torch.int8).reshape(shape), scale2, offset, block)


def double_dequantize(dq: DoubleQuant) -> torch.Tensor:
    flat = dq.qscale.reshape(-1).to(torch.float32)
    s2 = dq.scale2.repeat_interleave(dq.block)[: flat.numel()]
    return (flat * s2 + dq.offset).reshape(dq.qscale.shape)


# ----------------------------------------------------------------------------------------------------
# Whole weights
# ----------------------------------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """A weight in its stored form. ``dequantize()`` gives back the float32 ``[N, K]`` approximation."""

    spec: QuantSpec
    shape: tuple[int, int]
    group: int  # elements per group along K
    qdata: torch.Tensor  # packed codes (uint8) or 8-bit codes (int8 / uint8), one row per output row
    scale: torch.Tensor | None  # float32 [R, G]; None when double-quantized
    zero_point: torch.Tensor | None = None  # asymmetric: stored like qdata, [R, G] codes
    double_quant: DoubleQuant | None = None

    @property
    def num_groups(self) -> int:
        return _num_groups(self.shape[1], self.group)

    def scales(self) -> torch.Tensor:
        """Per-group float32 scales ``[R, G]`` (reconstructed when double-quantized); an empty tensor for a
        GGML format, whose scales are inside ``qdata``'s blocks."""
        if self.spec.format.ggml:
            return torch.empty(0, dtype=torch.float32, device=self.qdata.device)
        if self.double_quant is not None:
            return double_dequantize(self.double_quant)
        return self.scale

    def codes(self) -> torch.Tensor:
        """Integer codes ``[N, K]`` (int16): signed for symmetric int, unsigned otherwise, NF4 indices for nf4,
        the stored codes of a GGML format (q8_0's signed)."""
        if self.spec.format.ggml:
            return ggml.decode(ggml.ggml_type(self.spec.format.value), self.qdata).q.reshape(self.shape).to(torch.int16)
        signed = self.spec.format is NumberFormat.INT and self.spec.symmetric
        return _load(self.qdata, self.spec.bits, self.shape[1], signed)

    def zero_points(self) -> torch.Tensor | None:
        if self.zero_point is None:
            return None
        return _load(self.zero_point, self.spec.bits, self.num_groups, signed=False)

    def dequantize(self) -> torch.Tensor:
        return dequantize_stored(self.qdata, self.scales(), self.zero_point, self.spec.format.value,
                                 self.spec.bits, self.group, self.shape[1], self.spec.symmetric)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is stored, by name (what a module registers as buffers)."""
        out = {"qdata": self.qdata}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        if self.double_quant is not None:
            out["qscale"], out["scale2"], out["scale_offset"] = self.double_quant.tensors()
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def stored_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The dtype and shape of every tensor :func:`quantize_weight` stores for a ``[N, K]`` weight and ``spec``,
    by the names of :meth:`QuantizedWeight.tensors` (what a saved checkpoint must hold for that layer)."""
    n, k = shape
    if spec.format.ggml:
        t = ggml.ggml_type(ggml_layer_spec(spec, k).format.value)
        return {"qdata": (torch.uint8, ggml.stored_shape(t, shape))}
    g = _group_size(spec, k)
    rows = 1 if spec.granularity is Granularity.PER_TENSOR else n
    groups = 1 if spec.granularity is Granularity.PER_TENSOR else _num_groups(k, g)
    signed = spec.format is NumberFormat.INT and spec.symmetric

    def stored(r: int, c: int, is_signed: bool) -> tuple[torch.dtype, tuple[int, ...]]:
        if spec.bits == 8:
            return (torch.int8 if is_signed else torch.uint8), (r, c)
        return torch.uint8, (r, -(-c * spec.bits // 8))

    out = {"qdata": stored(n, k, signed)}
    if spec.double_quant:
        out["qscale"] = (torch.int8, (rows, groups))
        out["scale2"] = (torch.float32, (-(-rows * groups // spec.double_quant_block),))
        out["scale_offset"] = (torch.float32, ())
    else:
        out["scale"] = (torch.float32, (rows, groups))
    if spec.format is NumberFormat.INT and not spec.symmetric:
        out["zero_point"] = stored(rows, groups, False)
    return out


def dequantize_stored(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str,
                      bits: int, group: int, k: int, symmetric: bool) -> torch.Tensor:
    """Float32 ``[N, K]`` weight from its stored tensors (``scale`` already reconstructed if double-quantized;
    unused for a GGML format)."""
    if fmt in ggml.GGML_TYPES:
        return ggml.dequantize(qdata, fmt, k)
    num_groups = _num_groups(k, group)
    scale = expand_groups(scale.to(torch.float32), group, k)
    if fmt == NumberFormat.NF4.value:
        return NF4_CODE.to(qdata.device)[unpack(qdata, 4, k, signed=False).long()] * scale
    codes = _load(qdata, bits, k, symmetric).to(torch.float32)
    zp = None
    if zero_point is not None:
        zp = expand_groups(_load(zero_point, bits, num_groups, False).to(torch.float32), group, k)
    return dequantize_codes(codes, scale, zp)


def _check_weight(w: torch.Tensor, name: str) -> torch.Tensor:
    """The weight as float32, after checking it is a finite, non-empty 2-D float tensor."""
    if not isinstance(w, torch.Tensor):
        raise InvalidTensor(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise InvalidTensor(f"{name}: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise InvalidTensor(f"{name}: expected a floating-point weight, got {w.dtype}")
    if w.numel() == 0:
        raise InvalidTensor(f"{name}: weight is empty (shape {tuple(w.shape)})")
    w = w.detach().to(torch.float32, copy=False)  # checked after the cast: float64 values can overflow it
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise InvalidTensor(f"{name}: weight has {bad} NaN/inf value(s) in float32; fix, rescale or exclude this layer")
    return w


_ROW_CHUNK_ELEMS = 1 << 22  # rows are processed in chunks of about this many elements to bound memory


def quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantization of a ``[N, K]`` weight to ``spec`` (the reference)."""
    if not isinstance(spec, QuantSpec):
        raise InvalidTensor(f"{name}: spec must be a QuantSpec, got {type(spec).__name__}")
    w = _check_weight(w, name)
    if spec.format.ggml:
        return _quantize_ggml(w, spec, name)
    n, k = w.shape
    g = _group_size(spec, k)
    nf4 = spec.format is NumberFormat.NF4

    if spec.granularity is Granularity.PER_TENSOR:
        lo, hi = observe_range(w.reshape(1, 1, -1), spec)  # [1, 1]
        ranges = [(lo, hi)]
    else:
        ranges = []
        rows = max(1, _ROW_CHUNK_ELEMS // k)
        for r0 in range(0, n, rows):
            parts = [observe_range(p, spec) for p in _split_groups(w[r0 : r0 + rows], g)]
            ranges.append((torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)))
    lo = torch.cat([r[0] for r in ranges], 0)
    hi = torch.cat([r[1] for r in ranges], 0)

    if nf4:
        absmax = torch.maximum(lo.abs(), hi.abs())
        dq = None
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        if spec.double_quant:
            dq = double_quantize(scale, spec.double_quant_block)
            scale_used = double_dequantize(dq)
        else:
            scale_used = scale
        codes = nf4_indices(w, expand_groups(scale_used, g, k))
        return QuantizedWeight(spec, (n, k), g, pack(codes, 4), None if dq else scale, None, dq)

    scale, zp = qparams_from_range(lo, hi, spec.bits, spec.symmetric, spec.restricted_range)
    codes = quantize_codes(w, expand_groups(scale, g, k), None if zp is None else expand_groups(zp, g, k),
                           spec.bits, spec.symmetric, spec.restricted_range)
    codes = codes.to(torch.int16)
    stored_zp = None if zp is None else _store(zp.to(torch.int16), spec.bits, signed=False)
    return QuantizedWeight(spec, (n, k), g, _store(codes, spec.bits, spec.symmetric), scale, stored_zp)


def ggml_layer_spec(spec: QuantSpec, k: int, name: str = "weight") -> QuantSpec:
    """The GGML spec a layer with input size ``k`` is stored in: ``spec``, or llama.cpp's fallback type
    (:func:`qexport.ggml.resolve`) with the same observer. Raises :class:`InvalidTensor` when no type fits."""
    t = ggml.resolve(spec.format.value, k)
    if t is None:
        block = ggml.ggml_type(spec.format.value).block
        raise InvalidTensor(f"{name}: {spec.format.value} stores rows in blocks of {block} and K={k} fits neither it "
                            "nor its fallback; keep this layer in float (llama.cpp writes it as f16)")
    if t.name == spec.format.value:
        return spec
    return QuantSpec(format=t.name, observer=spec.observer, percentile=spec.percentile)


def _quantize_ggml(w: torch.Tensor, spec: QuantSpec, name: str) -> QuantizedWeight:
    n, k = w.shape
    spec = ggml_layer_spec(spec, k, name)
    t = ggml.ggml_type(spec.format.value)
    rows = max(1, _ROW_CHUNK_ELEMS // k)
    data = [ggml.quantize(w[r0 : r0 + rows], t, lambda v: observe_range(v, spec), name)
            for r0 in range(0, n, rows)]
    return QuantizedWeight(spec, (n, k), t.block, torch.cat(data, 0), None)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """``dequantize(quantize(w))`` in the dtype of ``w``: the float reference of what a quantized layer computes."""
    return quantize_weight(w, spec, name).dequantize().to(w.dtype)
