"""Triton weight-only GEMV / small-M GEMM over a weight repacked once for the GPU's memory system.

The kernels of :mod:`qexport.kernels.triton.gemm` read the stored layout (``qdata [N, K * bits / 8]`` bytes,
``scale [N, G]``): neighbouring lanes walk along K inside one output row, so a warp's loads are one or two
bytes wide and the scales of a tile are G floats apart. That is correct but far from the bandwidth limit at
decode (M = 1), where the weight bytes are nearly all the traffic (``docs/gpu-h100.md``: 0.14 TB/s on an
H100). :func:`repack` writes the same codes once, at load or compile time (the stored format is unchanged):

``codes``  ``[ceil(K / P), N]`` int32, ``P = 32 / bits`` codes per word (8 for int4, 16 for int2): word
           ``(w, n)`` holds the unsigned codes of inputs ``w * P .. w * P + P - 1`` of output feature ``n``,
           input ``w * P + j`` at bits ``j * bits``. N is the contiguous axis, so the lanes that own
           neighbouring output features read neighbouring 32-bit words: a warp reads whole 128-byte lines,
           and each thread, owning ``BLOCK_N / (32 * num_warps)`` features, loads them as one vector;
``scale``  ``[G, N]`` float32 and ``zero`` ``[G, N]`` float32 (asymmetric codes; symmetric ones are stored
           offset by ``2^(bits-1)``, which the kernel subtracts as a constant): the parameters of one group
           of a tile are one contiguous row segment, next to the codes they scale in the K loop.

``w = (u - zero) * scale`` is exact in float32 (``u - zero`` is a small integer), as the reference's
``(q - zero_point) * scale``, then rounded to the dtype of ``x``.

The kernel is a GEMV for ``M <= BLOCK_M`` (one program owns ``BLOCK_N`` features and every row of x, so
each weight word is read once) with split-K (``split_k`` programs share one output tile's K range and add
float32 partial sums atomically into a zeroed workspace), which fills the GPU at M = 1 where N / BLOCK_N
programs alone leave most SMs idle. Stream-K is not written: split-K's fixed slices cover the same case.

Tile sizes: :func:`packed_blocks` (a fixed heuristic), or the best of a timed sweep (:func:`tune`) stored in
a per-shape table (:data:`TUNED`, saved as JSON with :func:`save_table` and read back with
:func:`load_table`). ``examples/bench_kernels.py`` measures this kernel beside the stored-layout one, torch's
``_weight_int4pack_mm`` and fp16 cuBLAS. On CPU the kernels run only in Triton's interpreter
(``TRITON_INTERPRET=1``), which checks numerics, never speed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from qexport.errors import InvalidConfig, InvalidTensor

__all__ = ["PackedWeight", "PackedBlocks", "repack", "qlinear_packed", "packed_blocks", "tune", "TUNED",
           "save_table", "load_table"]


@dataclass(frozen=True)
class PackedWeight:
    """A weight-only int4 / int2 linear's codes and parameters in the GEMV layout (module docstring)."""

    codes: torch.Tensor  # [ceil(K / P), N] int32
    scale: torch.Tensor  # [G, N] float32
    zero: torch.Tensor | None  # [G, N] float32, or None for symmetric codes (zero 2^(bits-1))
    bits: int
    group: int
    k: int
    n: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


@dataclass(frozen=True)
class PackedBlocks:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def repack(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group: int,
           in_features: int, symmetric: bool) -> PackedWeight:
    """The stored ``qexport::qlinear`` weight (:mod:`qexport.formats`, format ``int``) in the GEMV layout."""
    from qexport.formats import _load

    if bits not in (2, 4):
        raise InvalidConfig(f"repack: {bits}-bit codes have no packed GEMV layout (int4 and int2 only)")
    k, n = int(in_features), qdata.shape[0]
    if group % 16:
        raise InvalidConfig(f"repack: groups of {group} are not a multiple of 16 (the smallest K tile)")
    per_word = 32 // bits
    num_groups = -(-k // group)
    if scale.dim() != 2 or scale.shape[0] not in (1, n) or scale.shape[1] != num_groups:
        raise InvalidTensor(f"repack: scale must be [{n} or 1, {num_groups}], got {tuple(scale.shape)}")
    codes = _load(qdata, bits, k, symmetric).to(torch.int64)  # [N, K], signed when symmetric
    if symmetric:
        codes = codes + (1 << (bits - 1))
    words = -(-k // per_word)
    full = torch.zeros((n, words * per_word), dtype=torch.int64, device=qdata.device)
    full[:, :k] = codes
    shifts = torch.arange(per_word, device=qdata.device, dtype=torch.int64) * bits
    packed = (full.reshape(n, words, per_word) << shifts).sum(-1)  # < 2^32
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    scale_t = scale.to(torch.float32).expand(n, -1).t().contiguous()
    zero_t = None
    if not symmetric:
        zp = _load(zero_point, bits, num_groups, False).to(torch.float32)
        zero_t = zp.expand(n, -1).t().contiguous()
    return PackedWeight(packed.t().contiguous(), scale_t, zero_t, bits, group, k, n)


@triton.jit
def _packed_gemv_kernel(x_ptr, y_ptr, b_ptr, c_ptr, s_ptr, z_ptr, M, N, K, group, stride_xm, stride_ym,
                        BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
                        USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        split_k, SPLIT: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N), split_k)``, ``BLOCK_M >= M``, ``group % BLOCK_K == 0`` (one group per tile)."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * split_k):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # the P inputs of one word are read by the same address (one load per lane group), N contiguous
        words = tl.load(c_ptr + (offs_k // PER_WORD).to(tl.int64)[:, None] * N + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0)
        u = ((words >> ((offs_k % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
        g = k0 // group
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
        if HAS_ZP:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0)
            w = (u - z[None, :]) * s[None, :]
        else:
            w = (u - (1 << (BITS - 1))) * s[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = w.to(x_ptr.dtype.element_ty)  # as the reference: the weight in the dtype of x
        if USE_DOT:
            if IEEE_FP32:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(y_ptr.dtype.element_ty)
            acc += bias.to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_mask)


def _largest_divisor_block(group: int, k: int, want: int) -> int:
    """The largest power of two <= ``want`` (at least 16) dividing ``group``, shrunk towards K."""
    b = want
    while b > 16 and (group % b or b > max(16, triton.next_power_of_2(k))):
        b //= 2
    return b


def packed_blocks(m: int, n: int, k: int, group: int) -> PackedBlocks:
    """The fixed heuristic (when the shape has no :data:`TUNED` entry): BLOCK_N = 128 (each of 4 warps' lanes
    owns one feature: 32-bit loads across a 128-byte line), BLOCK_K = 128 (within one group), split-K 8 for
    layers of 4M weights or more at M <= 4; the ``tl.dot`` path with BLOCK_M = 16 for 5 <= M <= 16.
    Not measured on a GPU yet."""
    bm = max(1, triton.next_power_of_2(m))
    if m > 16:
        raise InvalidConfig(f"the packed GEMV takes M <= 16 rows, got {m}; use the stored-layout GEMM")
    bk = _largest_divisor_block(group, k, 128)
    if bm <= 4:
        return PackedBlocks(bm, max(32, 128 // bm), bk, split_k=8 if k * n >= 1 << 22 else 1)
    return PackedBlocks(16, 64, bk)


TUNED: dict[str, PackedBlocks] = {}  # "N,K,M-bucket,group" -> the best blocks of a timed sweep (tune)


def _key(m: int, n: int, k: int, group: int) -> str:
    return f"{n},{k},{max(1, triton.next_power_of_2(m))},{group}"


def qlinear_packed(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
                   blocks: PackedBlocks | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` in ``x.dtype`` for a repacked weight, ``x [..., K]`` with at most 16 rows."""
    if x.shape[-1] != w.k:
        raise InvalidTensor(f"qlinear_packed: expected an input [..., {w.k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidTensor(f"qlinear_packed: input dtype {x.dtype}; use float16, bfloat16 or float32")
    for name, t in (("codes", w.codes), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise InvalidTensor(f"qlinear_packed: {name} is on {t.device} but the input is on {x.device}")
    x2 = x.reshape(-1, w.k).contiguous()
    m = x2.shape[0]
    b = blocks or TUNED.get(_key(m, w.n, w.k, w.group)) or packed_blocks(m, w.n, w.k, w.group)
    if b.block_m < m or w.group % b.block_k:
        raise InvalidConfig(f"qlinear_packed: blocks {b} do not fit M = {m} and groups of {w.group}")
    y = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], w.n)
    common = dict(M=m, N=w.n, K=w.k, group=w.group, stride_xm=x2.stride(0), BITS=w.bits, HAS_ZP=w.zero is not None,
                  IEEE_FP32=x.dtype == torch.float32, USE_DOT=b.block_m >= 16, BLOCK_M=b.block_m,
                  BLOCK_N=b.block_n, BLOCK_K=b.block_k, num_warps=b.num_warps, num_stages=b.num_stages)
    zero = w.zero if w.zero is not None else w.scale
    grid = (triton.cdiv(w.n, b.block_n), b.split_k)
    if b.split_k > 1:  # float32 partial sums meet in a zeroed workspace; bias (rounded to x's dtype) and cast after
        ws = torch.zeros((m, w.n), dtype=torch.float32, device=x.device)
        _packed_gemv_kernel[grid](x2, ws, ws, w.codes, w.scale, zero, stride_ym=ws.stride(0), HAS_BIAS=False,
                                  split_k=b.split_k, SPLIT=True, **common)
        if bias is not None:
            ws += bias.to(x.dtype).to(torch.float32)
        y.copy_(ws)
    else:
        _packed_gemv_kernel[grid](x2, y, bias if bias is not None else y, w.codes, w.scale, zero,
                                  stride_ym=y.stride(0), HAS_BIAS=bias is not None, split_k=1, SPLIT=False, **common)
    return y.reshape(*x.shape[:-1], w.n)


def _candidates(m: int, k: int, group: int) -> list[PackedBlocks]:
    bm = max(1, triton.next_power_of_2(m))
    out = []
    for bn in ((32, 64, 128, 256) if bm <= 4 else (32, 64)):
        for bk in (32, 64, 128, 256):
            if group % bk or bk > max(16, triton.next_power_of_2(k)):
                continue
            for split in ((1, 2, 4, 8, 16) if bm <= 4 else (1,)):
                for warps in (1, 2, 4):
                    out.append(PackedBlocks(max(bm, 16) if bm > 4 else bm, bn, bk, split, warps))
    return out


def _time(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def tune(x: torch.Tensor, w: PackedWeight, repeats: int = 20, candidates: list[PackedBlocks] | None = None
         ) -> tuple[PackedBlocks, list[tuple[PackedBlocks, float]]]:
    """Time every candidate launch on ``x`` (after one warm-up each); store the fastest in :data:`TUNED` for
    this shape and return ``(best, [(blocks, seconds), ...])``. On a GPU this is the autotuning step; in the
    CPU interpreter the times are meaningless and only the mechanics are exercised."""
    m = x.reshape(-1, w.k).shape[0]
    cands = candidates or _candidates(m, w.k, w.group)
    if not cands:
        raise InvalidConfig(f"tune: no tile fits groups of {w.group} and K = {w.k}")
    times = [(b, _time(lambda b=b: qlinear_packed(x, w, blocks=b), repeats)) for b in cands]
    best = min(times, key=lambda t: t[1])[0]
    TUNED[_key(m, w.n, w.k, w.group)] = best
    return best, times


def save_table(path: str | os.PathLike, device: str, overwrite: bool = False) -> None:
    """Write :data:`TUNED` as JSON (``{"device": ..., "table": {key: blocks}}``), atomically; an existing file
    is replaced only with ``overwrite``."""
    from qexport._io import atomic_write_text

    atomic_write_text(path, json.dumps({"device": device, "table": {k: asdict(v) for k, v in TUNED.items()}},
                                       indent=1) + "\n", overwrite=overwrite)


def load_table(path: str | os.PathLike) -> str:
    """Read a table written by :func:`save_table` into :data:`TUNED`; returns the device it was tuned on."""
    data = json.loads(open(path).read())
    TUNED.update({k: PackedBlocks(**v) for k, v in data["table"].items()})
    return data["device"]
