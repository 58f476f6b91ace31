"""Quantized embedding lookups (``qexport::qembedding``) in ONNX, reading the same initializers as a tied
``lm_head``.

Two forms (:data:`FORMS`), measured on SmolLM2's tied 49152 x 576 table with ``examples/embedding_bench.py``
(docs/embedding.md):

* ``gbq``: ONNX Runtime's contrib ops. The weight is stored as ``com.microsoft.MatMulNBits`` takes it: codes
  ``B`` uint8 ``[N, blocks, block_bytes]`` (unsigned, little end first), scales ``[N, blocks]``, zero points
  packed as MatMulNBits packs them (:func:`qexport.lowering.ort_matmul.matmulnbits_tensors`). A tied ``lm_head``
  is that ``MatMulNBits`` node; the lookup is ``com.microsoft.GatherBlockQuantized`` on the same ``B``
  (``gather_axis=0, quantize_axis=2``, one block per scale), its scales (and 8-bit zero points) reshaped to
  ``[N, blocks, 1]`` (a small copy ONNX Runtime folds at session start), then a ``Reshape`` to ``[..., K]``
  (and a ``Slice`` when the last block is padded). Asymmetric 4-bit zero points are stored a second time for
  GatherBlockQuantized, one byte per group (it wants them unpacked). It takes 4- and 8-bit codes whose groups
  are a multiple of 16 (per-row scales included, as MatMulNBits blocks that repeat the row's scale).
* ``standard``: ONNX only, for runtimes without ``com.microsoft`` ops. The weight is the ``[K, N]`` initializers
  of a QDQ ``lm_head`` (``DequantizeLinear -> MatMul``, :mod:`qexport.lowering.qdq`); the lookup gathers
  along axis 1: ``Gather`` of the codes (``Cast`` to 8 bits first for 4- and 2-bit codes, which ``Gather``
  does not take), ``Transpose``, ``Gather`` of the scales and zero points, and a ``DequantizeLinear`` blocked
  along the hidden dimension. ONNX Runtime does not fuse a ``DequantizeLinear -> MatMul`` whose initializers
  another node also reads, so when the ``lm_head`` shares them the lookup reads private copies made by
  ``Cast`` nodes that ONNX Runtime folds at session start (codes widened to 8 or 16 bits, scales to float64 and
  back): stored once in the file, a second, wider copy in the session.

``auto`` (:data:`DEFAULT_FORM`): ``gbq`` where it takes the weight, else ``standard``. Both compute
``(q - zero_point) * scale`` in float32: :func:`qexport.formats.dequantize_stored` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qexport.errors import InvalidConfig, UnsupportedOp

__all__ = ["StoredWeight", "NBitsWeight", "SharedNBitsWeights", "FORMS", "DEFAULT_FORM", "check_form", "gbq_block",
           "nbits_weight", "matmulnbits_node", "gbq_lookup", "standard_lookup"]

FORMS = ("auto", "gbq", "standard")
DEFAULT_FORM = "auto"
MS_DOMAIN = "com.microsoft"
_T_INT8, _T_UINT8, _T_INT16, _T_UINT16, _T_FLOAT, _T_DOUBLE, _T_INT64 = 3, 2, 5, 4, 1, 11, 7  # onnx.TensorProto


def check_form(form: str) -> str:
    if form not in FORMS:
        raise InvalidConfig(f"embedding_form={form!r} is not valid; allowed: {', '.join(FORMS)}")
    return form


# ----------------------------------------------------------------------------------------------------
# gbq: MatMulNBits' layout, GatherBlockQuantized
# ----------------------------------------------------------------------------------------------------
def gbq_block(fmt: str, bits: int, group: int, k: int) -> int | None:
    """The block size GatherBlockQuantized and MatMulNBits share for this weight, or None where they cannot."""
    from qexport.lowering.ort_matmul import block_size_for

    if fmt != "int" or bits not in (4, 8):
        return None
    try:
        return block_size_for(min(group, k))
    except UnsupportedOp:
        return None


@dataclass(frozen=True)
class NBitsWeight:
    """Initializer names of a weight in MatMulNBits' layout (``b`` ``[N, blocks, block_bytes]``, ``scales``
    ``[N, blocks]``, ``zero_points`` MatMulNBits' packing or None), with GatherBlockQuantized's own zero points
    (``gbq_zero_points``, 4-bit asymmetric only: one byte per block)."""

    b: str
    scales: str
    zero_points: str | None
    gbq_zero_points: str | None
    bits: int
    block: int
    k: int
    n: int
    blocks: int


def nbits_weight(name: str, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str,
                 bits: int, group: int, k: int, symmetric: bool):
    """``(NBitsWeight, [TensorProto])`` of a stored weight (qexport's ``qdata`` / per-group ``scale`` /
    ``zero_point``)."""
    from onnx import numpy_helper

    from qexport.formats import unpack
    from qexport.lowering.ort_matmul import matmulnbits_tensors

    b, s, z, bs = matmulnbits_tensors(qdata, scale, zero_point, fmt, bits, group, k, symmetric)
    n, nb = b.shape[0], b.shape[1]
    tensors = [numpy_helper.from_array(b, f"{name}_B"), numpy_helper.from_array(s.reshape(n, nb), f"{name}_scales")]
    zp = gbq_zp = None
    if z is not None:
        tensors.append(numpy_helper.from_array(z, f"{name}_zp"))
        zp = tensors[-1].name
        if bits == 4:  # MatMulNBits packs two per byte along the blocks; GatherBlockQuantized wants one per byte
            blocks = unpack(torch.from_numpy(z), 4, nb, signed=False).to(torch.uint8)
            tensors.append(numpy_helper.from_array(blocks.reshape(n, nb, 1).numpy(), f"{name}_gbq_zp"))
            gbq_zp = tensors[-1].name
    return NBitsWeight(tensors[0].name, tensors[1].name, zp, gbq_zp, bits, bs, k, n, nb), tensors


class SharedNBitsWeights:
    """The MatMulNBits-layout initializers of each weight a gbq embedding shares, made once per weight (``key``)
    and handed to ``add`` (the embedding and the tied linear emitters of :mod:`qexport.lowering.core`)."""

    def __init__(self, add) -> None:
        self._add, self._made = add, {}

    def __call__(self, name: str, key: tuple, qdata, scale, zp, fmt: str, bits: int, group: int, k: int,
                 sym: bool) -> NBitsWeight:
        if key not in self._made:
            w, tensors = nbits_weight(name, qdata, scale, zp, fmt, bits, group, k, sym)
            for t in tensors:
                self._add(t)
            self._made[key] = w
        return self._made[key]


def matmulnbits_node(name: str, x: str, out: str, w: NBitsWeight, accuracy_level: int):
    from onnx import helper

    ins = [x, w.b, w.scales] + ([w.zero_points] if w.zero_points else [])
    return helper.make_node("MatMulNBits", ins, [out], name=f"{name}_MatMulNBits", domain=MS_DOMAIN, K=w.k, N=w.n,
                            bits=w.bits, block_size=w.block, accuracy_level=accuracy_level)


def gbq_lookup(name: str, ids: str, out: str, rank: int, w: NBitsWeight):
    """``(nodes, initializers, description)``: the rows ``ids`` (of rank ``rank``) of ``w`` as float32."""
    from onnx import helper, numpy_helper

    shape3 = numpy_helper.from_array(np.array([w.n, w.blocks, 1], dtype=np.int64), f"{name}_blocks_shape")
    flat = numpy_helper.from_array(np.array([0] * rank + [-1], dtype=np.int64), f"{name}_rows_shape")
    inits = [shape3, flat]
    nodes = [helper.make_node("Reshape", [w.scales, shape3.name], [f"{name}_scales3"], name=f"{name}_scales_Reshape")]
    ins = [w.b, ids, f"{name}_scales3"]
    if w.gbq_zero_points:
        ins.append(w.gbq_zero_points)
    elif w.zero_points:  # 8-bit: MatMulNBits' [N, blocks] bytes are GatherBlockQuantized's [N, blocks, 1]
        nodes.append(helper.make_node("Reshape", [w.zero_points, shape3.name], [f"{name}_zp3"],
                                      name=f"{name}_zp_Reshape"))
        ins.append(f"{name}_zp3")
    nodes.append(helper.make_node("GatherBlockQuantized", ins, [f"{name}_blocks"], name=f"{name}_GatherBlockQuantized",
                                  domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=w.block, bits=w.bits))
    padded = w.blocks * w.block != w.k
    rows = f"{name}_rows" if padded else out
    nodes.append(helper.make_node("Reshape", [f"{name}_blocks", flat.name], [rows], name=f"{name}_Reshape"))
    if padded:  # the last block is padded to the block size: cut the row back to K
        lim = [numpy_helper.from_array(np.array([v], dtype=np.int64), f"{name}_{t}") for t, v in
               (("start", 0), ("end", w.k), ("axis", -1))]
        inits += lim
        nodes.append(helper.make_node("Slice", [rows] + [t.name for t in lim], [out], name=f"{name}_Slice"))
    kind = f"int{w.bits}" + (" + zero point" if w.zero_points else "")
    return nodes, inits, f"com.microsoft.GatherBlockQuantized {kind} block {w.block}"


# ----------------------------------------------------------------------------------------------------
# standard: Gather + DequantizeLinear on a QDQ MatMul's [K, N] initializers
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredWeight:
    """The initializers of a quantized weight ``[N, K]`` in the layout of a QDQ ``MatMul``: codes ``[K, N]``
    (ONNX INT8 / UINT8 / INT4 / UINT4 / INT2 / UINT2), scale (and zero point) a scalar (``kind``
    'per_tensor'), ``[N]`` ('per_channel') or ``[G, N]`` ('blocked', groups of ``group`` along K)."""

    codes: str
    scale: str
    zero_point: str | None
    bits: int
    signed: bool
    group: int
    k: int
    kind: str


def standard_lookup(name: str, ids: str, out: str, rank: int, w: StoredWeight, private: bool):
    """``(nodes, description)``: the rows ``ids`` (of rank ``rank``) of ``w`` as float32, in standard ONNX.
    ``private``: read copies of the initializers (made by Cast nodes ONNX Runtime folds), so that a QDQ
    ``lm_head`` reading the originals is still fused into MatMulNBits."""
    from onnx import helper

    perm = [*range(1, rank + 1), 0]  # [K, *ids] -> [*ids, K]
    nodes = []
    wide = w.bits < 8 or private  # sub-byte codes for Gather; a private copy of 8-bit ones: 16 bits
    to = (_T_INT8 if w.signed else _T_UINT8) if w.bits < 8 else (_T_INT16 if w.signed else _T_UINT16)
    zp_to = _T_UINT8 if w.bits < 8 else _T_UINT16

    def cast(src: str, tag: str, dtype: int) -> str:
        nodes.append(helper.make_node("Cast", [src], [f"{name}_{tag}_c"], name=f"{name}_{tag}_Cast", to=dtype))
        return f"{name}_{tag}_c"

    def gather(src: str, tag: str, axis: int) -> str:
        nodes.append(helper.make_node("Gather", [src, ids], [f"{name}_{tag}_rows"], name=f"{name}_{tag}_Gather",
                                      axis=axis))
        return f"{name}_{tag}_rows"

    def rows_last(src: str, tag: str) -> str:
        nodes.append(helper.make_node("Transpose", [src], [f"{name}_{tag}_t"], name=f"{name}_{tag}_Transpose",
                                      perm=perm))
        return f"{name}_{tag}_t"

    q = rows_last(gather(cast(w.codes, "codes", to) if wide else w.codes, "codes", 1), "codes")
    params = {"scale": (cast(w.scale, "scale", _T_DOUBLE) if private else w.scale, _T_DOUBLE if private else None)}
    if w.zero_point:
        params["zero_point"] = (cast(w.zero_point, "zero_point", zp_to) if wide else w.zero_point, None)
    dq_in, attrs = [q], {}
    for tag, (src, back) in params.items():
        if w.kind == "per_tensor":
            rows = src
        elif w.kind == "per_channel":  # [N] -> [*ids] -> [*ids, 1]
            axes = f"{name}_axes"
            if not any(n.output[0] == axes for n in nodes):
                nodes.append(helper.make_node("Constant", [], [axes], name=f"{name}_axes_Constant",
                                              value=helper.make_tensor(axes, _T_INT64, [1], [-1])))
            nodes.append(helper.make_node("Unsqueeze", [gather(src, tag, 0), axes], [f"{name}_{tag}_u"],
                                          name=f"{name}_{tag}_Unsqueeze"))
            rows = f"{name}_{tag}_u"
        else:  # [G, N] -> [G, *ids] -> [*ids, G]
            rows = rows_last(gather(src, tag, 1), tag)
        dq_in.append(cast(rows, f"{tag}_rows", _T_FLOAT) if back else rows)
    if w.kind != "per_tensor":
        attrs = {"axis": -1, "block_size": w.k if w.kind == "per_channel" else w.group}
    nodes.append(helper.make_node("DequantizeLinear", dq_in, [out], name=f"{name}_DequantizeLinear", **attrs))
    kind = f"int{w.bits}" if w.signed else f"uint{w.bits} + zero point"
    how = {"per_tensor": "per-tensor", "per_channel": "per-row"}.get(w.kind, f"block {w.group}")
    return nodes, f"Gather + DequantizeLinear {kind} {how}"
