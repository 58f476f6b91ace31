"""GGML's block formats (llama.cpp's GGUF tensor types) as reference numerics: quantize, encode, decode,
dequantize.

A weight ``[N, K]`` in a GGML type is stored as llama.cpp stores it: each row is cut into blocks of
``block`` elements along K (32 for the legacy types, 256 for the K-quants), and each block is written as
``type_size`` bytes holding its scale fields and its packed codes. The stored form here is exactly those
bytes, ``uint8 [N, K / block * type_size]``, so a GGUF file holds them as they are.

Every type dequantizes as ``w = c * S - M`` per sub-block (``M = 0`` for the symmetric types), where ``c``
is the code's value, ``S`` the sub-block's float32 scale and ``M`` its float32 offset, computed from the
stored fields with the operations, in the order, of llama.cpp's dequantizers (``gguf.quants``), so the
result is bit-identical to theirs:

=========  =====  =====  ==================================================================================
type       block  bytes  stored fields, per block                      ``S``, ``M``, code value ``c``
=========  =====  =====  ==================================================================================
q8_0       32     34     fp16 d, 32 int8 codes                          S = d, c = q in [-127, 127]
q4_0       32     18     fp16 d, 32 4-bit codes                         S = d, c = q - 8
q4_1       32     20     fp16 d, fp16 m, 32 4-bit codes                 S = d, M = -m, c = q
q5_0       32     22     fp16 d, 32 high bits, 32 low nibbles           S = d, c = q - 16
iq4_nl     32     18     fp16 d, 32 4-bit indices                       S = d, c = IQ4_NL_VALUES[q]
q2_k       256    84     16 x (4-bit scale, 4-bit min), 2-bit codes,    S = d * sc, M = dmin * m, c = q
                         fp16 d, fp16 dmin                              (sub-blocks of 16)
q3_k       256    110    high bits, 2-bit low codes, 16 6-bit scales    S = d * (sc - 32), c = q - 4
                         in 12 bytes, fp16 d                            (sub-blocks of 16)
q4_k       256    144    fp16 d, fp16 dmin, 8 x (6-bit scale, 6-bit     S = d * sc, M = dmin * m, c = q
                         min) in 12 bytes, 4-bit codes                  (sub-blocks of 32)
q6_k       256    210    4-bit low codes, 2-bit high codes, 16 int8     S = d * sc, c = q - 32
                         scales, fp16 d                                 (sub-blocks of 16)
=========  =====  =====  ==================================================================================

Round to nearest (:func:`quantize`) chooses each sub-block's range with a qexport observer and the codes
against the stored (fp16-rounded, integer-quantized) scales, so ``c`` always minimises the error for the
``S`` and ``M`` that are written. For the legacy types this is llama.cpp's rule up to how a half is rounded;
for the K-quants llama.cpp searches each sub-block's scale and minimum (``make_qkx2_quants``) where qexport
takes the observer's range, then quantizes the sub-block scales against the block's fp16 ``d`` and ``dmin``
as llama.cpp does. GPTQ uses :func:`block_params` and :func:`codes_for` to fix a block's scales when it
reaches the block and to round each column against them.

A row whose K is not a multiple of a K-quant's 256 cannot be stored in it; llama.cpp then writes the tensor
in a fallback type (:data:`FALLBACK`: q4_k -> q5_0, q6_k -> q8_0, q2_k and q3_k -> q4_0), and so does
:func:`resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qexport.errors import InvalidTensor

__all__ = ["GgmlType", "GGML_TYPES", "FALLBACK", "IQ4_NL_VALUES", "ggml_type", "resolve", "quantize",
           "block_params", "codes_for", "encode", "decode", "dequantize", "stored_shape"]

# The 16 values of IQ4_NL's non-linear grid (llama.cpp's kvalues_iq4nl).
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class GgmlType:
    """One GGML block format. ``qmax``: largest stored code; ``offset``: subtracted from the stored code to
    give its value (``c = q - offset``); ``scale_bits``: bits of a K-quant's quantized sub-block scale and
    min (0 for the legacy types, whose blocks have one fp16 scale)."""

    name: str
    ggml_id: int  # gguf.GGMLQuantizationType value
    block: int
    sub: int
    bits: int
    type_size: int
    qmax: int
    offset: int = 0
    has_min: bool = False
    scale_bits: int = 0

    @property
    def symmetric(self) -> bool:
        return not self.has_min

    @property
    def k_quant(self) -> bool:
        return self.block == 256

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block


GGML_TYPES: dict[str, GgmlType] = {t.name: t for t in (
    GgmlType("q8_0", 8, 32, 32, 8, 34, qmax=127),  # stored as int8: c = q in [-127, 127]
    GgmlType("q4_0", 2, 32, 32, 4, 18, qmax=15, offset=8),
    GgmlType("q4_1", 3, 32, 32, 4, 20, qmax=15, has_min=True),
    GgmlType("q5_0", 6, 32, 32, 5, 22, qmax=31, offset=16),
    GgmlType("iq4_nl", 20, 32, 32, 4, 18, qmax=15),
    GgmlType("q2_k", 10, 256, 16, 2, 84, qmax=3, has_min=True, scale_bits=4),
    GgmlType("q3_k", 11, 256, 16, 3, 110, qmax=7, offset=4, scale_bits=6),
    GgmlType("q4_k", 12, 256, 32, 4, 144, qmax=15, has_min=True, scale_bits=6),
    GgmlType("q6_k", 14, 256, 16, 6, 210, qmax=63, offset=32, scale_bits=8),
)}

# llama.cpp's fallback for a tensor whose rows are not a multiple of 256 (tensor_type_fallback in
# src/llama-quant.cpp of the llama.cpp llama-cpp-python 0.3.36 vendors; older ones sent q2_k to iq4_nl)
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0"}


def ggml_type(name: str) -> GgmlType:
    try:
        return GGML_TYPES[name]
    except KeyError:
        raise InvalidTensor(f"unknown GGML type {name!r}; known: {', '.join(GGML_TYPES)}") from None


def resolve(name: str, k: int) -> GgmlType | None:
    """The type a row of ``k`` elements is stored in: ``name``, its llama.cpp fallback when ``k`` is not a
    multiple of ``name``'s block, or None when neither fits (llama.cpp then keeps the tensor in fp16)."""
    t = ggml_type(name)
    if k % t.block == 0:
        return t
    fb = FALLBACK.get(name)
    if fb is not None and k % GGML_TYPES[fb].block == 0:
        return GGML_TYPES[fb]
    return None


def stored_shape(t: GgmlType, shape: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    return n, k // t.block * t.type_size


# ----------------------------------------------------------------------------------------------------
# Bit fields
# ----------------------------------------------------------------------------------------------------
def _unpack_fields(b: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """``uint8 [..., C * run]`` -> ``int32 [..., C * (8 // width) * run]``: byte ``l`` of chunk ``c`` holds, at
    bit ``f * width``, value ``c * (8 // width) * run + f * run + l`` (llama.cpp's nibble and crumb order)."""
    per = 8 // width
    x = b.to(torch.int32).reshape(*b.shape[:-1], -1, 1, run)
    shifts = torch.arange(0, 8, width, dtype=torch.int32).reshape(per, 1)
    return ((x >> shifts) & ((1 << width) - 1)).reshape(*b.shape[:-1], -1)


def _pack_fields(v: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """Inverse of :func:`_unpack_fields` (``v``: integers in ``[0, 2^width)``)."""
    per = 8 // width
    x = v.to(torch.int32).reshape(*v.shape[:-1], -1, per, run)
    shifts = torch.arange(0, 8, width, dtype=torch.int32).reshape(per, 1)
    return (x << shifts).sum(-2).to(torch.uint8).reshape(*v.shape[:-1], -1)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float16 ``[...]`` -> its little-endian bytes ``uint8 [..., 2]``."""
    return x.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8)


def _f16_value(b: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., 2]`` -> float32 ``[...]`` (the fp16 they hold)."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _pack_k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K's eight 6-bit scales and mins ``[..., 8]`` -> 12 bytes (llama.cpp's ``get_scale_min_k4`` layout)."""
    lo_sc, hi_sc, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    b0 = lo_sc | ((hi_sc >> 4) << 6)
    b1 = lo_m | ((hi_m >> 4) << 6)
    b2 = (hi_sc & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([b0, b1, b2], -1).to(torch.uint8)


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    b0, b1, b2 = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([b0 & 0x3F, (b2 & 0xF) | ((b0 >> 2) & 0x30)], -1)
    m = torch.cat([b1 & 0x3F, (b2 >> 4) | ((b1 >> 2) & 0x30)], -1)
    return sc, m


# ----------------------------------------------------------------------------------------------------
# Blocks: fields <-> bytes
# ----------------------------------------------------------------------------------------------------
@dataclass
class Blocks:
    """The decoded fields of ``[R, nb]`` blocks: ``d`` (and ``dmin``) float32 ``[R, nb]`` holding fp16 values;
    for the K-quants the integer sub-block scales ``sc`` (and mins ``m``) ``[R, nb, nsub]``; the stored codes
    ``q`` ``[R, nb, block]`` (int32; q8_0's are signed, the others unsigned)."""

    d: torch.Tensor
    q: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    m: torch.Tensor | None = None


def encode(t: GgmlType, blk: Blocks) -> torch.Tensor:
    """Fields -> bytes ``uint8 [R, nb * type_size]``."""
    r, nb = blk.d.shape
    q = blk.q.to(torch.int32)
    d = _f16_bytes(blk.d)
    if t.name == "q8_0":
        parts = [d, q.to(torch.int8).view(torch.uint8)]
    elif t.name in ("q4_0", "iq4_nl"):
        parts = [d, _pack_fields(q, 4, 16)]
    elif t.name == "q4_1":
        parts = [d, _f16_bytes(blk.dmin), _pack_fields(q, 4, 16)]
    elif t.name == "q5_0":
        high = ((q >> 4) & 1) << torch.arange(32, dtype=torch.int64)
        qh = high.sum(-1, keepdim=True)  # bit e holds the high bit of code e (a little-endian uint32)
        qh = ((qh >> torch.arange(0, 32, 8)) & 0xFF).to(torch.uint8)
        parts = [d, qh, _pack_fields(q & 0xF, 4, 16)]
    elif t.name == "q4_k":
        parts = [d, _f16_bytes(blk.dmin), _pack_k4_scales(blk.sc, blk.m), _pack_fields(q, 4, 32)]
    elif t.name == "q2_k":
        scales = (blk.sc | (blk.m << 4)).to(torch.uint8)
        parts = [scales, _pack_fields(q, 2, 32), d, _f16_bytes(blk.dmin)]
    elif t.name == "q3_k":
        sc = blk.sc + 32  # 6-bit: low nibbles in bytes 0-7, high crumbs in bytes 8-11
        parts = [_pack_fields(q >> 2, 1, 32), _pack_fields(q & 3, 2, 32), _pack_fields(sc & 0xF, 4, 8),
                 _pack_fields(sc >> 4, 2, 4), d]
    elif t.name == "q6_k":
        parts = [_pack_fields(q & 0xF, 4, 64), _pack_fields(q >> 4, 2, 32), blk.sc.to(torch.int8).view(torch.uint8), d]
    else:  # pragma: no cover - GGML_TYPES and this function list the same types
        raise InvalidTensor(f"no encoder for GGML type {t.name!r}")
    out = torch.cat([p.reshape(r, nb, -1) for p in parts], -1)
    assert out.shape[-1] == t.type_size, (t.name, out.shape)
    return out.reshape(r, nb * t.type_size)


def decode(t: GgmlType, data: torch.Tensor) -> Blocks:
    """Bytes ``uint8 [R, nb * type_size]`` -> fields (inverse of :func:`encode`)."""
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % t.type_size:
        raise InvalidTensor(f"{t.name}: expected uint8 [rows, blocks * {t.type_size}], got {data.dtype} "
                            f"{tuple(data.shape)}")
    b = data.reshape(data.shape[0], -1, t.type_size)
    if t.name == "q8_0":
        return Blocks(_f16_value(b[..., 0:2]), b[..., 2:].contiguous().view(torch.int8).to(torch.int32))
    if t.name in ("q4_0", "iq4_nl"):
        return Blocks(_f16_value(b[..., 0:2]), _unpack_fields(b[..., 2:], 4, 16))
    if t.name == "q4_1":
        return Blocks(_f16_value(b[..., 0:2]), _unpack_fields(b[..., 4:], 4, 16), dmin=_f16_value(b[..., 2:4]))
    if t.name == "q5_0":
        qh = (b[..., 2:6].to(torch.int64) << torch.arange(0, 32, 8)).sum(-1, keepdim=True)
        high = ((qh >> torch.arange(32)) & 1).to(torch.int32)
        return Blocks(_f16_value(b[..., 0:2]), _unpack_fields(b[..., 6:], 4, 16) | (high << 4))
    if t.name == "q4_k":
        sc, m = _unpack_k4_scales(b[..., 4:16])
        return Blocks(_f16_value(b[..., 0:2]), _unpack_fields(b[..., 16:], 4, 32), _f16_value(b[..., 2:4]), sc, m)
    if t.name == "q2_k":
        s = b[..., 0:16].to(torch.int32)
        return Blocks(_f16_value(b[..., 80:82]), _unpack_fields(b[..., 16:80], 2, 32), _f16_value(b[..., 82:84]),
                      s & 0xF, s >> 4)
    if t.name == "q3_k":
        q = _unpack_fields(b[..., 32:96], 2, 32) | (_unpack_fields(b[..., 0:32], 1, 32) << 2)
        sc = _unpack_fields(b[..., 96:104], 4, 8) | (_unpack_fields(b[..., 104:108], 2, 4) << 4)
        return Blocks(_f16_value(b[..., 108:110]), q, sc=sc - 32)
    if t.name == "q6_k":
        q = _unpack_fields(b[..., 0:128], 4, 64) | (_unpack_fields(b[..., 128:192], 2, 32) << 4)
        return Blocks(_f16_value(b[..., 208:210]), q, sc=b[..., 192:208].contiguous().view(torch.int8).to(torch.int32))
    raise InvalidTensor(f"no decoder for GGML type {t.name!r}")  # pragma: no cover


# ----------------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------------
def scales_and_mins(t: GgmlType, blk: Blocks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sub-block float32 ``S`` and ``M`` ``[R, nb, nsub]`` (``M`` None for symmetric types), computed as
    llama.cpp's dequantizers compute them."""
    if not t.k_quant:
        s = blk.d.unsqueeze(-1)
        return s, (None if blk.dmin is None else -blk.dmin.unsqueeze(-1))
    s = blk.d.unsqueeze(-1) * blk.sc.to(torch.float32)
    return s, (blk.dmin.unsqueeze(-1) * blk.m.to(torch.float32) if t.has_min else None)


def code_values(t: GgmlType, q: torch.Tensor) -> torch.Tensor:
    """The float32 value ``c`` of stored codes ``q``."""
    if t.name == "iq4_nl":
        return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)[q.long()]
    return (q - t.offset).to(torch.float32)


def _apply(t: GgmlType, c: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """``c * S - M`` per sub-block: ``c`` ``[R, nb, block]``, ``S`` / ``M`` ``[R, nb, nsub]``."""
    r, nb, _ = c.shape
    c = c.reshape(r, nb, -1, t.sub)
    w = s.unsqueeze(-1) * c
    if m is not None:
        w = w - m.unsqueeze(-1)
    return w.reshape(r, nb, t.block)


def dequantize(data: torch.Tensor, t: GgmlType | str, k: int | None = None) -> torch.Tensor:
    """Stored bytes -> float32 ``[R, K]``, bit-identical to ``gguf.quants.dequantize``."""
    t = ggml_type(t) if isinstance(t, str) else t
    blk = decode(t, data)
    w = _apply(t, code_values(t, blk.q), *scales_and_mins(t, blk)).reshape(data.shape[0], -1)
    if k is not None and w.shape[1] != k:
        raise InvalidTensor(f"{t.name}: the stored blocks hold {w.shape[1]} elements per row, expected {k}")
    return w


def _signed_extreme(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.where(hi.abs() > lo.abs(), hi, lo)


def _fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    """float32 values rounded to fp16 (as float32); a value beyond fp16's range is an error."""
    if bool((x.abs() > _FP16_MAX).any()):
        raise InvalidTensor(f"{what} exceeds fp16's range ({float(x.abs().max()):.3g} > {_FP16_MAX}): the weight "
                            "is too large for GGML's fp16 block scales; rescale it or keep the layer in float")
    return x.to(torch.float16).to(torch.float32)


def _int_scales(raw: torch.Tensor, top: torch.Tensor, levels: int, lo: int) -> torch.Tensor:
    """Sub-block scales ``raw`` as integers in ``[lo, levels]`` against the block scale ``top`` (0 where top is 0)."""
    safe = torch.where(top == 0, torch.ones_like(top), top)
    return torch.where(top == 0, 0.0, torch.round(raw / safe)).clamp(lo, levels).to(torch.int32)


def block_params(t: GgmlType, x: torch.Tensor, observe) -> Blocks:
    """The scale fields of blocks ``x`` ``[R, nb, block]`` (float32); ``observe(v [..., n]) -> (lo, hi)``
    gives each sub-block's (or legacy block's) range."""
    r, nb, _ = x.shape
    lo, hi = observe(x.reshape(r, nb, -1, t.sub))  # [R, nb, nsub]
    if t.name == "q8_0":
        return Blocks(_fp16(torch.maximum(lo.abs(), hi.abs()).squeeze(-1) / 127, f"{t.name} scale"))
    if t.name in ("q4_0", "q5_0"):
        return Blocks(_fp16(_signed_extreme(lo, hi).squeeze(-1) / -(t.offset), f"{t.name} scale"))
    if t.name == "iq4_nl":
        return Blocks(_fp16(_signed_extreme(lo, hi).squeeze(-1) / IQ4_NL_VALUES[0], f"{t.name} scale"))
    if t.name == "q4_1":
        lo, hi = lo.squeeze(-1), hi.squeeze(-1)
        return Blocks(_fp16((hi - lo) / t.qmax, f"{t.name} scale"), dmin=_fp16(lo, f"{t.name} minimum"))
    levels = (1 << t.scale_bits) - 1
    if t.has_min:  # q2_k, q4_k: unsigned codes over [lo, hi] with lo <= 0, stored as scale and -lo
        lo = lo.clamp(max=0.0)
        raw_s, raw_m = (hi.clamp(min=0.0) - lo) / t.qmax, -lo
        d = _fp16(raw_s.amax(-1) / levels, f"{t.name} scale")
        dmin = _fp16(raw_m.amax(-1) / levels, f"{t.name} minimum")
        return Blocks(d, dmin=dmin, sc=_int_scales(raw_s, d.unsqueeze(-1), levels, 0),
                      m=_int_scales(raw_m, dmin.unsqueeze(-1), levels, 0))
    raw_s = _signed_extreme(lo, hi) / -(t.offset)  # signed codes with the sub-block's extreme at -offset
    if t.name == "q3_k":  # 6-bit scales in [-32, 31]: the block's extreme sub-block scale at -32, as llama.cpp
        top = _signed_extreme(raw_s.amin(-1), raw_s.amax(-1))
        d = _fp16(top / -32, f"{t.name} scale")
        return Blocks(d, sc=_int_scales(raw_s, d.unsqueeze(-1), 31, -32))
    # q6_k: int8 sub-block scales
    d = _fp16(raw_s.abs().amax(-1) / 127, f"{t.name} scale")
    return Blocks(d, sc=_int_scales(raw_s, d.unsqueeze(-1), 127, -127))


def codes_for(t: GgmlType, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Stored codes (int32) of values ``x`` against sub-block scales ``S`` and offsets ``M`` (any shapes that
    broadcast): the code whose value ``c * S - M`` is nearest, ties to even (0 where ``S`` is 0)."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    y = (x if m is None else x + m) / safe
    if t.name == "iq4_nl":
        values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
        mids = (values[1:] + values[:-1]) / 2
        q = torch.bucketize(y.contiguous(), mids)
        return torch.where(s == 0, 8, q).to(torch.int32)  # index 8 holds the value nearest 0 (1)
    lo = -t.qmax if t.name == "q8_0" else 0
    q = (torch.round(y) + t.offset).clamp(lo, t.qmax)
    zero = t.offset  # the code of value 0
    return torch.where(s == 0, zero, q).to(torch.int32)


def _minmax(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return v.amin(-1), v.amax(-1)


def quantize(w: torch.Tensor, t: GgmlType | str, observe=_minmax, name: str = "weight") -> torch.Tensor:
    """Round to nearest of a float ``[N, K]`` weight into GGML type ``t``: the stored bytes."""
    t = ggml_type(t) if isinstance(t, str) else t
    n, k = w.shape
    if k % t.block:
        raise InvalidTensor(f"{name}: {t.name} stores rows in blocks of {t.block}, and K={k} is not a multiple; "
                            f"llama.cpp would write it as {FALLBACK.get(t.name, 'f16')}")
    x = w.to(torch.float32).reshape(n, -1, t.block)
    blk = block_params(t, x, observe)
    s, m = scales_and_mins(t, blk)
    sub = x.reshape(n, x.shape[1], -1, t.sub)
    blk.q = codes_for(t, sub, s.unsqueeze(-1), None if m is None else m.unsqueeze(-1)).reshape(x.shape)
    return encode(t, blk)


class Grid:
    """A layer's GGML blocks being filled column by column (GPTQ): :meth:`fit` fixes a block's scale fields
    from its columns, :meth:`round` rounds one column against them, :meth:`encode` writes the bytes.

    ``observe(v [..., n]) -> (lo, hi)`` chooses the sub-block ranges, as in :func:`quantize`."""

    def __init__(self, t: GgmlType, n: int, k: int, observe=_minmax):
        if k % t.block:
            raise InvalidTensor(f"{t.name}: K={k} is not a multiple of its block of {t.block}")
        self.t, self.n, self.k, self.observe = t, n, k, observe
        nb, nsub = k // t.block, t.block // t.sub
        zeros = lambda *shape: torch.zeros(n, *shape)  # noqa: E731
        self.blocks = Blocks(zeros(nb), dmin=zeros(nb) if t.has_min else None,
                             sc=zeros(nb, nsub).int() if t.k_quant else None,
                             m=zeros(nb, nsub).int() if t.k_quant and t.has_min else None)
        self.s = zeros(nb, nsub)
        self.m = zeros(nb, nsub) if t.has_min else None

    def fit(self, j: int, cols: torch.Tensor) -> None:
        """Fix block ``j``'s fields from its values ``cols`` ``[N, block]``."""
        self._set(slice(j, j + 1), block_params(self.t, cols.to(torch.float32).reshape(self.n, 1, -1), self.observe))

    def fit_all(self, w: torch.Tensor) -> None:
        """Fix every block's fields from the weight ``w`` ``[N, K]``, as round to nearest would."""
        blocks = w.to(torch.float32).reshape(self.n, -1, self.t.block)
        self._set(slice(None), block_params(self.t, blocks, self.observe))

    def _set(self, j: slice, blk: Blocks) -> None:
        for name in ("d", "dmin", "sc", "m"):
            if getattr(self.blocks, name) is not None:
                getattr(self.blocks, name)[:, j] = getattr(blk, name)
        s, m = scales_and_mins(self.t, blk)
        self.s[:, j] = s
        if self.m is not None:
            self.m[:, j] = m

    def round(self, col: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored codes (int32 ``[N]``) and dequantized values (float32) of column ``col``'s values ``x``."""
        j, sub = col // self.t.block, (col % self.t.block) // self.t.sub
        s = self.s[:, j, sub]
        m = None if self.m is None else self.m[:, j, sub]
        q = codes_for(self.t, x.to(torch.float32), s, m)
        w = s * code_values(self.t, q)
        return q, (w if m is None else w - m)

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """The bytes, given every column's stored codes ``[N, K]``."""
        self.blocks.q = codes.to(torch.int32).reshape(self.n, -1, self.t.block)
        return encode(self.t, self.blocks)
