"""Lower the canonical quantized form to standard ONNX QDQ (DequantizeLinear / QuantizeLinear + MatMul).

This is the export counterpart of :mod:`qexport.lowering.onnx_ort`: the same ``torch.onnx.export`` with the
same translation of each ``qexport`` op into a ``qexport``-domain node (:func:`translations`), then a
rewrite of those nodes into standard ONNX that any runtime reads and that ONNX Runtime and TensorRT fuse
themselves:

* weight-only int8 / int4 / int2 linear (``QLinear`` node): the integer codes become a ``[K, N]``
  initializer of ONNX type INT8 / UINT8 / INT4 / UINT4 / INT2 / UINT2 (signed when symmetric, unsigned with
  a zero point otherwise) and a ``DequantizeLinear`` feeds a plain ``MatMul``:

  - per-channel: ``axis=1`` (the output channel of ``[K, N]``), scale ``[N]``;
  - groups along K: blocked, ``axis=0, block_size=g`` (opset 21), scale ``[ceil(K/g), N]``;
  - per-tensor: one scale.

  ONNX Runtime 1.32 fuses ``DequantizeLinear -> MatMul`` into ``com.microsoft.MatMulNBits`` for every one of
  these (its accuracy level comes from the session option ``session.qdq_matmulnbits_accuracy_level``, see
  :func:`ort_session_config`). 2-bit types need opset 25; the graph's opset is raised only then.
* W8A8 with a static (calibrated) per-tensor activation scale (``QLinearA8`` fed by ``QuantizeLinear``),
  TensorRT target: ``QuantizeLinear -> DequantizeLinear`` on the activation (int8, zero point 0),
  ``DequantizeLinear`` (per-channel) on the weight, ``MatMul``. ONNX Runtime target: ``QuantizeLinear`` and
  then the ``MatMulInteger`` form below. (Given QDQ on both inputs, ORT converts the int8 activation to
  uint8 for a u8s8 kernel that, on AVX2 CPUs without VNNI, saturates int16 pair sums with full-range int8
  weights: logits were off by 6% on a tiny model; the s8s8 ``MatMulIntegerToFloat`` is exact.)
* W8A8, ONNX Runtime target: a dynamic activation is quantized exactly as ``qexport::quantize_per_token``
  / ``quantize_per_tensor_dynamic`` do (standard ops, symmetric int8), a static one by ``QuantizeLinear``;
  ``MatMulInteger`` with the int8 weight, ``Cast``, times ``x_scale * w_scale``; ONNX Runtime fuses that
  into ``MatMulIntegerToFloat``. (ONNX's ``DynamicQuantizeLinear`` is per-tensor asymmetric uint8: a different
  quantizer than the recipe's, so it is not used; a TensorRT-target graph never has dynamic activations.)
* LLM.int8() (``QLinearLLMInt8``), ONNX Runtime target: the outlier columns from ``ReduceMax(Abs(x))`` over
  the tokens, ``Where`` to zero them, per-token int8 quantization, ``MatMulInteger`` + scales for the rest,
  and a float ``MatMul`` of the gathered outlier columns with the same int8 weight's rows dequantized; the
  two are added (:mod:`qexport.lowering.llm_int8`). TensorRT target: refused, like dynamic W8A8.
* NF4 weights (with or without double quantization: the scales are reconstructed to float at export, which
  is exactly what the PyTorch path computes). ONNX Runtime target, ``nf4_form='auto'`` (default):
  ``com.microsoft.MatMulBnb4``, ONNX Runtime's kernel for bitsandbytes' NF4, whose code book, nibble order
  and block layout express qexport's NF4 bit for bit (:func:`qexport.lowering.ort_matmul.matmulbnb4_tensors`),
  4 bits per weight in the session too; where its blocks do not fit (a group or K that no block size of
  16 .. 256 divides) and with ``nf4_form='lookup'``: the standard lookup form, ``Gather`` of the 16-entry
  code book by UINT4 indices, times the per-group scale, ``MatMul``
  (:func:`qexport.lowering.ort_matmul.nf4_lookup`), for runtimes without ORT's contrib ops. TensorRT has
  no code-book dequantization in its QDQ rules: NF4 layers stay float there, with a warning and a report
  entry.
* TensorRT needs positive scales. Restricted-range symmetric weights (``QuantSpec.restricted_range``,
  presets ``w8-trt`` / ``w4g128-trt``) have them and are exported exactly. Full-range symmetric groups with
  a negative scale are negated (:func:`positive_scales`), which saturates one code per such group: the
  export warns and the report says how many groups and codes.
* quantized embeddings (``QEmbedding`` node), :mod:`qexport.lowering.embedding`: ONNX Runtime target,
  ``embedding_form='auto'`` (default): ``com.microsoft.GatherBlockQuantized`` on the codes of a
  ``com.microsoft.MatMulNBits`` weight, which a tied ``lm_head`` is (one initializer for both); ``'standard'``:
  ``Gather`` + blocked ``DequantizeLinear`` on the QDQ ``lm_head``'s initializers. TensorRT: a float table.
* everything without a QDQ form (conv weights; for TensorRT also asymmetric and 2-bit weights, which
  :func:`lower_qdq` refuses) stays float: its weight is dequantized once into a float initializer and the
  layer is listed, with the reason, in the report.

Numerics equal the reference of :mod:`qexport.formats` up to float rounding (a DequantizeLinear computes
``(q - zp) * scale`` exactly as :func:`qexport.formats.dequantize_stored`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import warnings

import numpy as np
import torch

from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.lowering.embedding import StoredWeight
from qexport.lowering.onnx_ort import DOMAIN, MS_DOMAIN, _node_parts, _translations, _weight_format

__all__ = ["QdqReport", "translations", "lower_qdq", "ort_session_config", "check_tensorrt_weight", "positive_scales",
           "TARGETS", "NF4_FORMS"]

TARGETS = ("ort", "tensorrt")
NF4_FORMS = ("auto", "lookup")  # auto: MatMulBnb4 where its blocks fit, else lookup; lookup: standard ONNX only
RESTRICTED_PRESETS = "w4g128-trt, w8-trt"
BLOCKED_OPSET = 21  # blocked DequantizeLinear, INT4 / UINT4 initializers
INT2_OPSET = 25  # INT2 / UINT2


@dataclass
class QdqReport:
    """How each quantized layer was lowered: ``layers`` maps a module name to a one-line description;
    ``float_fallback`` lists ``(module name, reason)`` for the layers whose weight was dequantized."""

    target: str = "ort"
    opset: int = BLOCKED_OPSET
    layers: dict[str, str] = field(default_factory=dict)
    float_fallback: list[tuple[str, str]] = field(default_factory=list)
    weight_bits: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    negated_groups: int = 0  # TensorRT target: full-range symmetric groups whose scale was negated ...
    saturated_groups: int = 0  # ... of which this many had a code pushed out of range (saturated)
    saturated_codes: int = 0
    total_groups: int = 0  # symmetric weight groups lowered for TensorRT

    def to_dict(self) -> dict[str, Any]:
        d = {"target": self.target, "opset": self.opset, "layers": dict(self.layers),
             "float_fallback": [{"layer": n, "reason": r} for n, r in self.float_fallback], "notes": self.notes}
        if self.target == "tensorrt":
            d["tensorrt_saturation"] = {"groups": self.total_groups, "negated": self.negated_groups,
                                        "saturated_groups": self.saturated_groups,
                                        "saturated_codes": self.saturated_codes}
        return d


def translations():
    """The translation table of :mod:`qexport.lowering.onnx_ort`, except that a static activation
    quantization (``qexport::quantize_per_tensor``) becomes a standard ``QuantizeLinear`` (int8 zero point),
    so that the QDQ rewrite can pair it with a ``DequantizeLinear``."""
    from onnx import numpy_helper
    from onnxscript import opset18 as op

    table = dict(_translations())

    def quantize_per_tensor(x, scale, zero_point: int):
        zp = op.Constant(value=numpy_helper.from_array(np.array(zero_point, dtype=np.int8), "zp"))
        return op.QuantizeLinear(op.Cast(x, to=1), scale, zp)

    table[torch.ops.qexport.quantize_per_tensor.default] = quantize_per_tensor
    return table


def ort_session_config(weight_bits: set[int] | list[int], accuracy_level: int | None = None) -> dict[str, str]:
    """ONNX Runtime session config entries for a QDQ model with these weight bit widths.

    ``session.qdq_matmulnbits_accuracy_level`` sets the accuracy level of the MatMulNBits nodes that ORT fuses
    from ``DequantizeLinear -> MatMul`` (ORT's default 4: int8 activations). ``accuracy_level`` when given,
    else the compile back-end's choice (:func:`qexport.lowering.onnx_ort.matmulnbits_accuracy`): 4 when every
    weight is 8-bit (the fp32-activation 8-bit kernel is far slower), else 0 (fp32 activations, the reference
    numerics; level 4 runs the int4 kernels about twice as fast, a SmolLM2 w4g128 decode step ~1.5x, for +0.9%
    perplexity, README).
    """
    from qexport.lowering.onnx_ort import check_accuracy_level, matmulnbits_accuracy

    check_accuracy_level(accuracy_level, "MatMulNBits accuracy level")
    if accuracy_level is not None:
        return {"session.qdq_matmulnbits_accuracy_level": str(accuracy_level)}
    bits = set(weight_bits)
    level = matmulnbits_accuracy(8, None) if bits == {8} else matmulnbits_accuracy(min(bits or {4}), None)
    return {"session.qdq_matmulnbits_accuracy_level": str(level)}


def _format_name(fmt: str, bits: int) -> str:
    return f"int{bits}" if fmt == "int" else fmt


def _onnx_type(bits: int, signed: bool) -> int:
    from onnx import TensorProto as T

    return {(8, True): T.INT8, (8, False): T.UINT8, (4, True): T.INT4, (4, False): T.UINT4,
            (2, True): T.INT2, (2, False): T.UINT2}[(bits, signed)]


def _int_tensor(name: str, codes: torch.Tensor, bits: int, signed: bool):
    """A TensorProto of ONNX type int/uint ``bits`` holding integer ``codes`` (any shape), packed as ONNX packs
    sub-byte types: consecutive elements of the flat order, the first one in the low bits."""
    from onnx import TensorProto

    from qexport.formats import pack

    t = TensorProto()
    t.name = name
    t.dims.extend(codes.shape)
    t.data_type = _onnx_type(bits, signed)
    flat = codes.reshape(1, -1)
    if bits == 8:
        t.raw_data = flat.to(torch.int8 if signed else torch.uint8).numpy().tobytes()
    else:
        t.raw_data = pack(flat, bits).numpy().tobytes()
    return t


def positive_scales(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int, k: int, layer: str,
                    report: QdqReport) -> tuple[torch.Tensor, torch.Tensor]:
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
    tensors = [_int_tensor(f"{name}_Wq", codes.t().contiguous(), bits, signed),
               numpy_helper.from_array(np.ascontiguousarray(s.to(torch.float32).numpy()), f"{name}_Ws")]
    if z is not None:
        tensors.append(_int_tensor(f"{name}_Wzp", z, bits, False))
    w = StoredWeight(tensors[0].name, tensors[1].name, tensors[2].name if z is not None else None, bits, signed,
                     group, k, kind)
    return w, tensors


def _rank(graph, name: str) -> int:
    """The rank of value ``name`` (a graph input or a value with a shape annotation)."""
    for v in list(graph.input) + list(graph.value_info):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    raise UnsupportedOp(f"the rank of {name!r} is not known")


def _module_name(qdata_input: str) -> str:
    """``m.model.layers.0.mlp.up_proj.qdata`` -> ``model.layers.0.mlp.up_proj`` (the exporter names
    initializers after the module path, under the wrapper's attribute)."""
    name = qdata_input.rsplit(".", 1)[0] if qdata_input.endswith(".qdata") else qdata_input
    return name.split(".", 1)[1] if name.startswith("m.") else name


def check_tensorrt_weight(layer: str, fmt: str, bits: int, symmetric: bool, group: int, k: int,
                           per_tensor: bool) -> None:
    """TensorRT's QDQ rules for a weight; raises UnsupportedOp naming the layer and what to use instead.

    NF4 passes: it has no TensorRT form, and :func:`lower_qdq` keeps such a layer float (with a warning and
    a report entry) rather than refusing the whole export."""
    if fmt == "nf4":
        return
    if fmt != "int":
        raise UnsupportedOp(f"{layer}: {fmt} weights have no TensorRT QDQ form; use an int recipe "
                            f"({RESTRICTED_PRESETS})")
    if bits == 2:
        raise UnsupportedOp(f"{layer}: TensorRT has no 2-bit weights; use {RESTRICTED_PRESETS}")
    if not symmetric:
        raise UnsupportedOp(f"{layer}: TensorRT needs symmetric weights (zero point 0), this recipe is asymmetric; "
                            f"use a TensorRT-ready symmetric recipe ({RESTRICTED_PRESETS})")
    if bits == 4 and (per_tensor or group >= k):
        raise UnsupportedOp(f"{layer}: TensorRT runs int4 weights only blocked (groups along K); "
                            "use a grouped recipe (w4g128-trt)")


def lower_qdq(model, target: str = "ort", scales: dict[str, torch.Tensor] | None = None, nf4_form: str = "auto",
              embedding_form: str = "auto", layer_names: dict[tuple[str, str], str] | None = None,
              accuracy_level: int | None = None):
    """Rewrite every ``qexport``-domain node of ``model`` (an ``onnx.ModelProto`` exported with
    :func:`translations`) into standard QDQ ONNX for ``target`` (``'ort'`` or ``'tensorrt'``), in place.

    ``scales`` maps a layer (module name) to its per-group float32 scales ``[R, G]``: used for the layers
    whose scales are not graph constants (double-quantized NF4 scales are computed in the exported graph;
    ``QuantizedWeight.scales()`` reconstructs them exactly as the PyTorch path does). ``nf4_form`` chooses
    the ONNX Runtime form of NF4 weights (:data:`NF4_FORMS`, module docstring), ``embedding_form`` that of
    quantized embeddings (:mod:`qexport.lowering.embedding`: with ``'gbq'``, a tied ``lm_head`` becomes a
    ``MatMulNBits`` node at ``accuracy_level``, default by its bits, reading the embedding's initializers).
    ``layer_names`` maps ``(op type, qdata initializer)`` to a module name where the initializer's own name
    does not tell (a tied embedding and lm_head share one, named after either). The nodes left without a
    consumer are removed.

    Returns ``(model, QdqReport)``. Raises UnsupportedOp for a layer that the target cannot run
    (TensorRT: dynamic activations, asymmetric or 2-bit weights).
    """
    from onnx import helper, numpy_helper

    from qexport.formats import _load, dequantize_stored
    from qexport.lowering.embedding import SharedNBitsWeights, check_form, gbq_block, gbq_lookup, matmulnbits_node
    from qexport.lowering.embedding import standard_lookup
    from qexport.lowering.onnx_ort import matmulnbits_accuracy
    from qexport.lowering.ort_matmul import BNB4_NF4, matmulbnb4_tensors, nf4_lookup

    if target not in TARGETS:
        raise UnsupportedOp(f"unknown ONNX target {target!r}; choose one of {', '.join(TARGETS)}")
    if nf4_form not in NF4_FORMS:
        raise InvalidConfig(f"nf4_form={nf4_form!r} is not valid; allowed: {', '.join(NF4_FORMS)}")
    check_form(embedding_form)
    report = QdqReport(target=target)
    embedding_bits: set[int] = set()
    given_scales = scales or {}  # (``scales`` is reused as a node name below)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def value(name: str):
        if not name:
            return None
        if name not in inits:
            raise UnsupportedOp(f"input {name!r} of a quantized node is not a constant")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def add(tensor):
        g.initializer.append(tensor)
        inits[tensor.name] = tensor
        return tensor.name

    def add_array(name: str, array):
        return add(numpy_helper.from_array(np.ascontiguousarray(array), name))

    new_nodes = []
    nf4_float: list[str] = []  # TensorRT: NF4 layers kept float (one warning for all of them)
    names = layer_names or {}
    # Weights (their qdata, scale, zero point inputs) that a linear reads, and those a quantized embedding reads
    # in the gbq form: a linear reading one of these is a MatMulNBits node on the embedding's initializers.
    linear_keys = {tuple(_node_parts(n)[2][1:4]) for n in g.node if n.domain == DOMAIN and n.op_type == "QLinear"}
    gbq_keys = set()
    for n in g.node:
        if n.domain == DOMAIN and n.op_type == "QEmbedding" and target == "ort" and embedding_form != "standard":
            a, _, ins = _node_parts(n)
            fmt, bits, group, k, _ = _weight_format(a)
            if gbq_block(fmt, bits, group, k) is not None:
                gbq_keys.add(tuple(ins[1:4]))
            elif embedding_form == "gbq":
                raise InvalidConfig(f"embedding_form='gbq': GatherBlockQuantized takes 4- and 8-bit codes in groups "
                                    f"of a multiple of 16, not {_format_name(fmt, bits)} groups of {group} on {k}; "
                                    "use 'auto' or 'standard'")
    nbits_for = SharedNBitsWeights(add)

    def matmul(x: str, w: str, bias: str, out: str, name: str) -> None:
        mm_out = out if not bias else f"{name}_mm"
        new_nodes.append(helper.make_node("MatMul", [x, w], [mm_out], name=f"{name}_MatMul"))
        if bias:
            new_nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{name}_bias"))

    stored: dict[tuple, StoredWeight] = {}  # the (qdata, scale, zero point) inputs of a node -> initializers

    def stored_weight(name: str, layer: str, codes, scale, zp_codes, bits: int, signed: bool, group: int, k: int,
                      key: tuple | None = None) -> StoredWeight:
        """The ``[K, N]`` initializers of a weight, made once per ``key`` (the quantized node's weight inputs:
        a tied embedding and lm_head read the same ones)."""
        if key is not None and key in stored:
            return stored[key]
        if target == "tensorrt" and signed:
            report.total_groups += scale.numel()
            if bool((scale < 0).any()):
                codes, scale = positive_scales(codes, scale, bits, group, k, layer, report)
        w, tensors = weight_initializers(name, codes, scale, zp_codes, bits, signed, group, k)
        for t in tensors:
            add(t)
        if key is not None:
            stored[key] = w
        return w

    def weight_dq(name: str, layer: str, codes, scale, zp_codes, bits: int, signed: bool, group: int, k: int,
                  key: tuple | None = None) -> str:
        """DequantizeLinear of a ``[K, N]`` weight from codes ``[N, K]`` and per-group ``scale`` ``[R, G]``."""
        w = stored_weight(name, layer, codes, scale, zp_codes, bits, signed, group, k, key)
        attrs = {"per_tensor": {}, "per_channel": {"axis": 1}, "blocked": {"axis": 0, "block_size": group}}[w.kind]
        dq_in = [w.codes, w.scale] + ([w.zero_point] if w.zero_point else [])
        out = f"{name}_W"
        new_nodes.append(helper.make_node("DequantizeLinear", dq_in, [out], name=f"{name}_DequantizeLinear", **attrs))
        return out

    def float_weight(name: str, layer: str, w: torch.Tensor, reason: str) -> str:
        report.float_fallback.append((layer, reason))
        report.layers[layer] = f"float MatMul ({reason})"
        return add_array(f"{name}_WT", w.t().contiguous().numpy())

    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        a, name, ins = _node_parts(node)
        if node.op_type in ("QLinear", "DequantizeWeight"):
            layer = names.get((node.op_type, ins[1])) or _module_name(ins[1] if node.op_type == "QLinear" else ins[0])
            q_ins = ins[1:4] if node.op_type == "QLinear" else ins[0:3]
            fmt, bits, group, k, sym = _weight_format(a)
            qdata, zp = value(q_ins[0]), value(q_ins[2])
            try:
                scale = value(q_ins[1])
            except UnsupportedOp:  # scales computed in the graph (double quantization)
                if layer not in given_scales:
                    raise
                scale = given_scales[layer].to(torch.float32)
            if node.op_type == "DequantizeWeight":  # conv weights: no QDQ MatMul form
                w = dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym)
                report.float_fallback.append((layer, "conv weights are dequantized at export"))
                report.layers[layer] = "float (conv weights are dequantized at export)"
                new_nodes.append(helper.make_node("Identity", [add_array(f"{name}_W", w.numpy())], [node.output[0]]))
                continue
            per_tensor = scale is not None and scale.numel() == 1 and qdata.shape[0] > 1
            if target == "tensorrt":
                check_tensorrt_weight(layer, fmt, bits, sym, group, k, per_tensor)
            if fmt == "nf4" and target == "tensorrt":
                reason = "nf4 weights have no TensorRT form (no code-book dequantization in its QDQ rules)"
                nf4_float.append(layer)
                w = float_weight(name, layer, dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym), reason)
            elif fmt == "nf4":
                dq = " (double-quantized scales reconstructed)" if layer in given_scales else ""
                try:
                    if nf4_form == "lookup":
                        raise UnsupportedOp("the lookup form was asked for")
                    b, absmax, bs = matmulbnb4_tensors(qdata, scale, group, k)
                except UnsupportedOp:
                    nodes, tensors, w = nf4_lookup(name, qdata, scale, group, k)
                    for t in tensors:
                        add(t)
                    new_nodes.extend(nodes)
                    report.layers[layer] = f"Gather nf4 code book (UINT4 indices) * scale{dq} -> MatMul"
                else:
                    out = node.output[0] if not ins[4] else f"{name}_mm"
                    new_nodes.append(helper.make_node(
                        "MatMulBnb4", [ins[0], add_array(f"{name}_B", b), add_array(f"{name}_absmax", absmax)],
                        [out], name=f"{name}_MatMulBnb4", domain=MS_DOMAIN, K=k, N=qdata.shape[0], block_size=bs,
                        quant_type=BNB4_NF4))
                    if ins[4]:
                        new_nodes.append(helper.make_node("Add", [out, ins[4]], [node.output[0]], name=f"{name}_bias"))
                    report.layers[layer] = f"com.microsoft.MatMulBnb4 nf4 block {bs}{dq}"
                    continue
            elif tuple(q_ins) in gbq_keys:  # a tied lm_head: MatMulNBits on the embedding's initializers
                w = nbits_for(name, tuple(q_ins), qdata, scale, zp, fmt, bits, group, k, sym)
                out = node.output[0] if not ins[4] else f"{name}_mm"
                new_nodes.append(matmulnbits_node(name, ins[0], out, w, matmulnbits_accuracy(bits, accuracy_level)))
                if ins[4]:
                    new_nodes.append(helper.make_node("Add", [out, ins[4]], [node.output[0]], name=f"{name}_bias"))
                report.layers[layer] = (f"com.microsoft.MatMulNBits int{bits} block {w.block}"
                                        f"{'' if sym else ' + zero point'} (its initializers read by the tied "
                                        "embedding's GatherBlockQuantized)")
                report.weight_bits.add(bits)
                continue
            elif fmt == "int" and bits in (2, 4, 8):
                codes = _load(qdata, bits, k, sym)
                zcodes = None if zp is None else _load(zp, bits, -(-k // group), False)
                w = weight_dq(name, layer, codes, scale, zcodes, bits, sym, group, k, key=tuple(q_ins))
                how = "per-tensor" if per_tensor else ("per-channel" if group >= k else f"block {group}")
                report.layers[layer] = (f"DequantizeLinear {'int' if sym else 'uint'}{bits} {how}"
                                        f"{'' if sym else ' + zero point'} -> MatMul")
                report.weight_bits.add(bits)
            else:
                w = float_weight(name, layer, dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym),
                                 f"{_format_name(fmt, bits)} weights have no ONNX QDQ form")
            matmul(ins[0], w, ins[4], node.output[0], name)
        elif node.op_type == "QEmbedding":
            layer = names.get((node.op_type, ins[1])) or _module_name(ins[1])
            fmt, bits, group, k, sym = _weight_format(a)
            qdata, scale, zp = value(ins[1]), value(ins[2]), value(ins[3])
            if target == "tensorrt":  # no quantized gather in TensorRT's QDQ rules
                reason = "TensorRT target: quantized embeddings are dequantized at export"
                report.float_fallback.append((layer, reason))
                report.layers[layer] = f"float Gather ({reason})"
                w = dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym)
                table = add_array(f"{name}_table", w.numpy())
                new_nodes.append(helper.make_node("Gather", [table, ins[0]], [node.output[0]], name=f"{name}_Gather"))
                continue
            key = tuple(ins[1:4])
            if key in gbq_keys:
                w = nbits_for(name, key, qdata, scale, zp, fmt, bits, group, k, sym)
                nodes, tensors, how = gbq_lookup(name, ins[0], node.output[0], _rank(g, ins[0]), w)
                for t in tensors:
                    add(t)
            else:
                codes = _load(qdata, bits, k, sym)
                zcodes = None if zp is None else _load(zp, bits, -(-k // group), False)
                w = stored_weight(name, layer, codes, scale, zcodes, bits, sym, group, k, key=key)
                nodes, how = standard_lookup(name, ins[0], node.output[0], _rank(g, ins[0]), w, key in linear_keys)
            new_nodes.extend(nodes)
            report.layers[layer] = how
            embedding_bits.add(bits)
        elif node.op_type == "QLinearA8":
            xq, xs, wq, ws, bias = ins
            layer = _module_name(wq)
            zp = int(a.get("x_zero_point", 0))
            w_int = value(wq)  # int8 [N, K], symmetric per-channel
            w_scale = value(ws).reshape(-1).to(torch.float32)
            static = xq in producers and producers[xq].op_type == "QuantizeLinear"
            if target == "tensorrt":
                if not static:
                    raise UnsupportedOp(f"{layer}: dynamic activation quantization has no TensorRT QDQ form; use a "
                                        "static recipe (w8a8-static) or a weight-only one (w8, w4g128-sym)")
                if zp:
                    raise UnsupportedOp(f"{layer}: TensorRT needs a symmetric activation scale (zero point 0); "
                                        "calibrate with a symmetric activation spec")
                x_dq = f"{name}_x"
                new_nodes.append(helper.make_node(
                    "DequantizeLinear", [xq, xs, add_array(f"{name}_xzp", np.array(0, dtype=np.int8))], [x_dq],
                    name=f"{name}_x_DequantizeLinear"))
                w = weight_dq(name, layer, w_int.to(torch.int16), w_scale[:, None], None, 8, True, w_int.shape[1],
                              w_int.shape[1])
                matmul(x_dq, w, bias, node.output[0], name)
                report.layers[layer] = ("QuantizeLinear/DequantizeLinear int8 activation (static scale), "
                                        "DequantizeLinear int8 per-channel weight -> MatMul")
            else:
                wt = add_array(f"{name}_WT", w_int.t().contiguous().numpy())
                mm_in = [xq, wt] + ([add_array(f"{name}_xzp", np.array(zp, dtype=np.int8))] if zp else [])
                acc, accf, scales = f"{name}_acc", f"{name}_accf", f"{name}_scales"
                new_nodes.append(helper.make_node("MatMulInteger", mm_in, [acc], name=f"{name}_MatMulInteger"))
                new_nodes.append(helper.make_node("Cast", [acc], [accf], to=1, name=f"{name}_Cast"))
                # acc * (x_scale * w_scale): the form ORT fuses into MatMulIntegerToFloat
                new_nodes.append(helper.make_node("Mul", [xs, add_array(f"{name}_ws", w_scale.numpy())], [scales],
                                                  name=f"{name}_scale_product"))
                out = node.output[0] if not bias else f"{name}_y2"
                new_nodes.append(helper.make_node("Mul", [accf, scales], [out], name=f"{name}_rescale"))
                if bias:
                    new_nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{name}_bias"))
                how = "QuantizeLinear (static scale)" if static else "in-graph symmetric scale (dynamic)"
                report.layers[layer] = f"int8 activation, {how} x int8 weight -> MatMulInteger"
            report.weight_bits.add(8)
        elif node.op_type == "QLinearLLMInt8":
            from qexport.lowering.llm_int8 import lower_llm_int8

            layer = _module_name(ins[1])
            if target == "tensorrt":
                raise UnsupportedOp(f"{layer}: LLM.int8() quantizes activations at run time (outlier columns and "
                                    "per-token scales), which has no TensorRT QDQ form; use a static recipe "
                                    "(w8a8-static) or a weight-only one (w8, w4g128-sym)")
            nodes, decomposed = lower_llm_int8(name, layer, ins, node.output[0], a["threshold"], value, add_array,
                                               report.float_fallback)
            new_nodes.extend(nodes)
            report.layers[layer] = ("LLM.int8(): outlier columns (|x| >= {:g}) float MatMul + the rest int8 "
                                    "per-token x int8 weight -> MatMulInteger".format(a["threshold"])
                                    if decomposed else "float MatMul (LLM.int8() decomposition not lowered)")
            report.weight_bits.add(8)
        else:
            raise UnsupportedOp(f"no ONNX QDQ lowering for qexport op {node.op_type}")
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(new_nodes):  # drop what feeds nothing (e.g. the double dequantization of a float layer)
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(live))
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    exported = max((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), default=0)
    report.opset = max(exported, INT2_OPSET if 2 in report.weight_bits | embedding_bits else BLOCKED_OPSET)
    if nf4_float:
        warnings.warn(f"{len(nf4_float)} NF4 layer(s) stay float in the TensorRT export (TensorRT has no NF4 form; "
                      f"first: {nf4_float[0]}); use a TensorRT-ready int recipe ({RESTRICTED_PRESETS}) to quantize "
                      "them", stacklevel=2)
    if report.negated_groups:
        report.notes.insert(0, (
            f"TensorRT: {report.negated_groups} of {report.total_groups} symmetric weight groups had a negative "
            f"scale and were negated; {report.saturated_groups} groups had a code saturated ({report.saturated_codes} "
            f"codes, one quantization step each). Use a restricted-range recipe ({RESTRICTED_PRESETS}, "
            "restricted_range=true) for an exact TensorRT export"))
        warnings.warn(report.notes[0], stacklevel=2)
    imports = [imp for imp in model.opset_import if imp.domain not in (DOMAIN, "", "ai.onnx", MS_DOMAIN)]
    if any(n.domain == MS_DOMAIN for n in g.node):
        imports.append(helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", report.opset), *imports])
    known = [imp for imp in model.opset_import if imp.domain != MS_DOMAIN]  # onnx knows only its own domains
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(known))
    return model, report
