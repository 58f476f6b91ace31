"""Weight-only quantized linears as ONNX Runtime ``com.microsoft.MatMulNBits`` nodes.

MatMulNBits takes a weight ``[N, K]`` as ``uint8 [N, ceil(K/bs), bs*bits/8]`` (unsigned codes, little end
first within each byte: the same order as :mod:`qexport.formats`), float scales ``[N * ceil(K/bs)]`` and
optional packed zero points ``uint8 [N, ceil(ceil(K/bs)*bits/8)]`` (absent: ``2^(bits-1)``). ``bs`` must be a
power of two >= 16, so qexport groups map as follows:

* g in 16, 32, 64, 128: one block per group (a partial last group is padded with the zero point's code,
  which dequantizes to 0 and adds nothing);
* otherwise (per-channel, groups of 256, 576, ...): blocks of ``bs``, the largest of 128, 64, 32, 16 that
  divides g, each repeating its group's scale and zero point. Numerics are unchanged. A group size that is
  not a multiple of 16 has no MatMulNBits form.

Symmetric codes ``q`` in [-2^(b-1), 2^(b-1)-1] become ``q + 2^(b-1)`` with the default zero point.
"""

from __future__ import annotations

import torch

from qexport.errors import UnsupportedOp
from qexport.formats import _load, pack

__all__ = ["matmulnbits_tensors", "block_size_for"]


def block_size_for(group: int) -> int:
    """The MatMulNBits block size for a qexport group: the largest of 128, 64, 32, 16 that divides it."""
    for bs in (128, 64, 32, 16):
        if group % bs == 0:
            return bs
    raise UnsupportedOp(f"group size {group} is not a multiple of 16: no MatMulNBits block size fits")


def matmulnbits_tensors(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str,
                        bits: int, group: int, k: int, symmetric: bool):
    """(B uint8 [N, nb, blob], scales float32 [N*nb], zero_points uint8 or None, block_size) for MatMulNBits."""
    if fmt != "int" or bits not in (2, 4, 8):
        raise UnsupportedOp(f"MatMulNBits has no {fmt}{bits} weights")
    n = qdata.shape[0]
    bs = block_size_for(group)
    nb = -(-k // bs)  # blocks per row; the last one may be padded
    block_group = torch.arange(nb) // (group // bs)  # the qexport group of each block
    codes = _load(qdata, bits, k, symmetric)  # int16 [N, K]
    if symmetric:  # signed codes -> unsigned with MatMulNBits' default zero point 2^(b-1)
        codes = codes + 2 ** (bits - 1)
        zp_blocks, pad = None, 2 ** (bits - 1)
    else:  # per-tensor parameters have one row: give every row its copy
        zp_blocks = _load(zero_point, bits, -(-k // group), False).expand(n, -1)[:, block_group]
        pad = zp_blocks[:, -1:]
    full = torch.empty(n, nb * bs, dtype=torch.int16)
    full[:, :k] = codes
    full[:, k:] = pad  # padding dequantizes to exactly 0
    b = (pack(full, bits) if bits < 8 else full.to(torch.uint8)).reshape(n, nb, bs * bits // 8)
    scales = scale.to(torch.float32).expand(n, -1)[:, block_group].contiguous().reshape(-1)
    zps = None
    if zp_blocks is not None:
        zps = (zp_blocks if bits == 8 else pack(zp_blocks, bits)).to(torch.uint8).contiguous()
    return b.numpy(), scales.numpy(), (None if zps is None else zps.numpy()), bs
