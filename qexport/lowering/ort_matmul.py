"""Weight-only quantized linears as ONNX Runtime contrib ops (``com.microsoft.MatMulNBits`` for integer
grids, ``com.microsoft.MatMulBnb4`` for NF4), and NF4's standard-ONNX lookup form (:func:`nf4_lookup`).

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

NF4 (with or without double quantization) has two forms, chosen by the lowerings:

* ``MatMulBnb4`` (ONNX Runtime's CPU and CUDA kernel for bitsandbytes' 4-bit weights): same code book bit
  for bit, 4 bits per weight and one float absmax per block in the session. Used for ONNX Runtime wherever
  a block size of 16 .. 256 divides both the group and K (:func:`bnb4_block_size`; every NF4 layer of
  SmolLM2 with g64).
* the lookup form (:func:`nf4_lookup`): standard ONNX only, for runtimes without ``com.microsoft`` ops and
  for the layouts MatMulBnb4 cannot express. ONNX Runtime folds it into a float weight when the session
  starts.
"""

from __future__ import annotations

import torch

from qexport.errors import UnsupportedOp
from qexport.formats import _load, pack

__all__ = ["matmulnbits_tensors", "block_size_for", "bnb4_block_size", "matmulbnb4_tensors", "nf4_lookup"]


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


# ----------------------------------------------------------------------------------------------------
# NF4: ONNX Runtime's MatMulBnb4, and a standard-ONNX lookup form
# ----------------------------------------------------------------------------------------------------
BNB4_BLOCKS = (256, 128, 64, 32, 16)  # the block sizes MatMulBnb4's CPU kernel implements
BNB4_NF4 = 1  # MatMulBnb4's quant_type for NF4 (0 is FP4)


def bnb4_block_size(group: int, k: int) -> int:
    """The MatMulBnb4 block size for an NF4 weight with groups of ``group`` along K: the largest of 256 .. 16
    that divides both the group and K.

    MatMulBnb4 blocks run over the flat ``[N, K]`` weight, so a block must not straddle two rows (it divides
    K) nor two qexport groups (it divides g; a partial last group is then a whole number of blocks too).
    """
    g = min(group, k)
    for bs in BNB4_BLOCKS:
        if g % bs == 0 and k % bs == 0:
            return bs
    raise UnsupportedOp(f"NF4 group size {group} on K={k}: no MatMulBnb4 block size (16, 32, 64, 128, 256) "
                        "divides both")


def matmulbnb4_tensors(qdata: torch.Tensor, scale: torch.Tensor, group: int, k: int):
    """(B uint8 [N*K/2], absmax float32 [N*K/bs], block_size) for ``com.microsoft.MatMulBnb4`` (quant_type 1).

    MatMulBnb4 (ONNX Runtime's bitsandbytes kernel) holds the weight ``[N, K]`` as the flat row-major list
    of its 4-bit indices into the NF4 table, two per byte with the *first* element in the *high* nibble
    (qexport packs it in the low nibble), and one float absmax per block of ``block_size`` consecutive
    elements. Its NF4 table is the published QLoRA one, which is ``qexport.formats.NF4_CODE`` bit for bit,
    and it dequantizes as ``table[index] * absmax`` in float32: exactly :func:`qexport.formats.dequantize_stored`.
    ``scale`` is the per-group scale ``[R, G]`` as the reference uses it (double-quantized scales already
    reconstructed, as ``QuantizedWeight.scales()`` does), so double quantization costs nothing here.
    """
    n = qdata.shape[0]
    bs = bnb4_block_size(group, k)
    idx = _load(qdata, 4, k, signed=False).reshape(-1)  # [N*K] indices 0..15
    b = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)
    block_group = (torch.arange(k // bs) * bs) // group  # the qexport group of each block of a row
    absmax = scale.to(torch.float32).expand(n, -1)[:, block_group].contiguous().reshape(-1)
    return b.numpy(), absmax.numpy(), bs


def nf4_lookup(name: str, qdata: torch.Tensor, scale: torch.Tensor, group: int, k: int, uint4: bool = True):
    """Standard ONNX for an NF4 weight ``W^T [K, N]``: ``Gather(code book, indices) * scale``.

    Returns ``(nodes, initializers, output name)``. The indices are a UINT4 ``[K, N]`` initializer (4 bits
    per weight, as stored; opset 21), or with ``uint4=False`` a UINT8 one (any opset: the compile target's
    graphs are opset 18), ``Cast`` to INT32 for ``Gather`` on the 16-entry float table; the per-group
    scale is a Mul by ``[N]`` (per-channel), a scalar (per-tensor), or, for groups along K, ``[G, N]``
    gathered to ``[K, N]`` by each row's group (a partial last group needs nothing special). Every op is
    standard, so any ONNX runtime reads it; ONNX Runtime constant-folds the whole chain into a float weight
    at session start (the file stays 4-bit; memory in the session does not), which is why ONNX Runtime
    targets use :func:`matmulbnb4_tensors` wherever its block layout fits.
    """
    from onnx import TensorProto, helper, numpy_helper

    from qexport.formats import NF4_CODE, pack

    n = qdata.shape[0]
    idx_t = _load(qdata, 4, k, signed=False).t().contiguous()  # [K, N]
    wi = TensorProto()
    wi.name, wi.data_type = f"{name}_Widx", TensorProto.UINT4 if uint4 else TensorProto.UINT8
    wi.dims.extend([k, n])
    if uint4:  # ONNX's 4-bit order: low nibble first, as qexport packs
        wi.raw_data = pack(idx_t.reshape(1, -1), 4).numpy().tobytes()
    else:
        wi.raw_data = idx_t.to(torch.uint8).numpy().tobytes()
    inits = [wi, numpy_helper.from_array(NF4_CODE.numpy(), f"{name}_nf4_code")]
    nodes = [helper.make_node("Cast", [wi.name], [f"{name}_Widx32"], to=TensorProto.INT32, name=f"{name}_Cast"),
             helper.make_node("Gather", [f"{name}_nf4_code", f"{name}_Widx32"], [f"{name}_Wn"], axis=0,
                              name=f"{name}_Gather")]
    scale = scale.to(torch.float32)
    if scale.numel() == 1 and n > 1:  # per-tensor
        s_name = f"{name}_Ws"
        inits.append(numpy_helper.from_array(scale.reshape(()).numpy(), s_name))
    elif group >= k:  # per-channel: broadcast [N] over [K, N]
        s_name = f"{name}_Ws"
        inits.append(numpy_helper.from_array(scale.reshape(n).numpy(), s_name))
    else:  # groups along K: [G, N] gathered to [K, N]
        s_name = f"{name}_Wsk"
        inits.append(numpy_helper.from_array(scale.expand(n, -1).t().contiguous().numpy(), f"{name}_Ws"))
        inits.append(numpy_helper.from_array((torch.arange(k) // group).numpy(), f"{name}_Wgroup"))
        nodes.append(helper.make_node("Gather", [f"{name}_Ws", f"{name}_Wgroup"], [s_name], axis=0,
                                      name=f"{name}_scale_Gather"))
    out = f"{name}_W"
    nodes.append(helper.make_node("Mul", [f"{name}_Wn", s_name], [out], name=f"{name}_scale_Mul"))
    return nodes, inits, out
