"""Step 2 of the ONNX lowering: every ``qexport``-domain node into what one target runs, one emitter table per
target.

Both ONNX paths run the same two steps: ``torch.onnx.export`` with :func:`qexport.lowering.translate.translations`
(each weight-consuming ``qexport`` op becomes one ``qexport``-domain node carrying its stored weight), then
:func:`lower`. ``qexport export`` (:mod:`qexport.export.onnx`) and the compile back-end's ONNX Runtime target
(:mod:`qexport.lowering.onnx_ort`) call :func:`lower` with ``target='ort'`` and so write the same nodes and
initializers for the same graph.

:data:`EMITTERS` maps each target to a table ``{qexport op type: emitter}``; a weight-only linear is further
dispatched on its number format by :data:`LINEAR_FORMS` (a format with no entry stays float, with a report
entry). An emitter reads one node (:class:`QNode`, its stored weight as a :class:`Weight`) and appends
nodes and initializers through the :class:`Lowering` it is handed, whose methods are the pieces every target
shares: initializers, a ``MatMul`` with its bias ``Add``, QDQ weight initializers, the float fallback, the
report; :meth:`Lowering.finish` prunes what feeds nothing and sets the opset / IR version once.

``'ort'`` (ONNX Runtime, CPU and CUDA):

* weight-only integer linears: standard QDQ, a ``DequantizeLinear`` of the int8 / int4 / int2 ``[K, N]`` codes
  (:mod:`qexport.lowering.qdq`) feeding a ``MatMul``, which ONNX Runtime fuses into ``com.microsoft.MatMulNBits``
  at session start; its accuracy level is the session option ``session.qdq_matmulnbits_accuracy_level``
  (:func:`ort_session_config`). A linear that reads the weight of an embedding in the GatherBlockQuantized form
  (a tied ``lm_head``) is a ``MatMulNBits`` node on the embedding's initializers (:mod:`qexport.lowering.embedding`);
* NF4: ``com.microsoft.MatMulBnb4`` where its blocks fit (:func:`qexport.lowering.ort_matmul.matmulbnb4_tensors`),
  else, and with ``nf4_form='lookup'``, the standard lookup form (:func:`qexport.lowering.ort_matmul.nf4_lookup`);
* quantized embeddings: ``com.microsoft.GatherBlockQuantized`` where its kernel takes the codes, else, and with
  ``embedding_form='standard'``, ``Gather`` + ``DequantizeLinear``;
* W8A8: ``MatMulInteger(x_q, W_q^T)``, ``Cast``, times ``x_scale * w_scale`` (the form ONNX Runtime fuses into
  ``MatMulIntegerToFloat``; with QDQ on both inputs it would pick a u8s8 kernel that saturates on CPUs without
  VNNI), a bias added by ``Sum`` (an ``Add`` is folded into the fused kernel, which scales it wrongly in ORT
  1.32); LLM.int8(): :mod:`qexport.lowering.llm_int8`;

``'tensorrt'``: TensorRT's QDQ rules (:mod:`qexport.lowering.tensorrt_rules`, the same refusals as the
pre-export check and the graph lint): symmetric INT8 / INT4 weights, scales made positive
(:func:`qexport.lowering.qdq.positive_scales`), static activations as ``QuantizeLinear -> DequantizeLinear``;
NF4 and embeddings stay float (report entries).

Everything without a quantized form (conv weights, formats without an emitter) is dequantized once into a
float initializer and listed with the reason. Numerics equal :func:`qexport.formats.dequantize_stored` up to
float summation order.

The rewrite edits the exporter's ``onnx.ModelProto`` with ``onnx.helper`` rather than an ``onnx_ir`` model:
the weights must be packed bit-exactly anyway (sub-byte ``raw_data``, MatMulNBits / MatMulBnb4 layouts), the
shared node builders (:mod:`~qexport.lowering.embedding`, :mod:`~qexport.lowering.ort_matmul`,
:mod:`~qexport.lowering.llm_int8`) produce protos, and both callers hold a proto; an ``onnx_ir`` round trip
would re-serialize every initializer of a several-hundred-MB model for a dead-code pass of a dozen lines.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.lowering import llm_int8 as _llm_int8
from qexport.lowering import tensorrt_rules as trt
from qexport.lowering.translate import DOMAIN

__all__ = ["lower", "LoweringReport", "Lowering", "QNode", "Weight", "EMITTERS", "LINEAR_FORMS", "TARGETS",
           "NF4_FORMS", "BLOCKED_OPSET", "INT2_OPSET", "MS_DOMAIN", "ort_session_config", "check_accuracy_level",
           "matmulnbits_accuracy"]

MS_DOMAIN = "com.microsoft"
TARGETS = ("ort", "tensorrt")
NF4_FORMS = ("auto", "lookup")  # auto: MatMulBnb4 where its blocks fit, else lookup; lookup: standard ONNX only
BLOCKED_OPSET = 21  # blocked DequantizeLinear, INT4 / UINT4 initializers
INT2_OPSET = 25  # INT2 / UINT2
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 fp32 activations ... 4 int8 activations
_F32, _I64 = 1, 7  # onnx.TensorProto.FLOAT, INT64


# ----------------------------------------------------------------------------------------------------
# ONNX Runtime's MatMulNBits accuracy level
# ----------------------------------------------------------------------------------------------------
def check_accuracy_level(level, what: str) -> None:
    """InvalidConfig naming ``what`` unless ``level`` is None or a MatMulNBits accuracy level."""
    if level is not None and level not in ACCURACY_LEVELS:
        raise InvalidConfig(f"{what} must be 0 (fp32), 1, 2, 3 or 4 (int8 activations), got {level!r}")


def matmulnbits_accuracy(bits: int, accuracy_level: int | None) -> int:
    """MatMulNBits ``accuracy_level`` for a weight of ``bits`` bits: the one asked for, or by default 4 (int8
    activations) for 8-bit weights, whose fp32-activation kernel is ~40x slower, and 0 (fp32 activations, the
    reference numerics) for 4- and 2-bit weights. Measured on SmolLM2 (docs/results.md): level 4 costs +0.25%
    perplexity with int8 weights and +0.97% with int4 g128."""
    if accuracy_level is not None:
        return accuracy_level
    return 4 if bits == 8 else 0


def ort_session_config(weight_bits: set[int] | list[int], accuracy_level: int | None = None) -> dict[str, str]:
    """ONNX Runtime session config entries for a lowered model with these weight bit widths.

    ``session.qdq_matmulnbits_accuracy_level`` sets the accuracy level of the MatMulNBits nodes that ORT fuses
    from ``DequantizeLinear -> MatMul``: ``accuracy_level`` when given, else 4 when every weight is 8-bit (the
    fp32-activation 8-bit kernel is far slower), else 0 (fp32 activations, the reference numerics; level 4 runs
    the int4 kernels about twice as fast, a SmolLM2 w4g128 decode step ~1.5x, for about +1% perplexity:
    :func:`matmulnbits_accuracy`)
    """
    check_accuracy_level(accuracy_level, "MatMulNBits accuracy level")
    bits = set(weight_bits)
    level = matmulnbits_accuracy(8 if bits == {8} else min(bits or {4}), accuracy_level)
    return {"session.qdq_matmulnbits_accuracy_level": str(level)}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoweringReport:
    """How each quantized layer was lowered: ``layers`` maps a module name to a one-line description;
    ``float_fallback`` lists ``(module name, reason)`` for the layers whose weight was dequantized. The
    counters count layers by form (``matmulnbits``: integer weight-only linears, QDQ ``MatMul`` that ONNX
    Runtime fuses into MatMulNBits, or MatMulNBits on a tied embedding's initializers)."""

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
    matmulnbits: int = 0
    matmulinteger: int = 0  # W8A8 linears (MatMulInteger chain, or QDQ MatMul for TensorRT)
    matmulbnb4: int = 0  # NF4 linears as com.microsoft.MatMulBnb4
    nf4_lookup: int = 0  # NF4 linears in the standard-ONNX lookup form
    gather_block_quantized: int = 0  # quantized embeddings as com.microsoft.GatherBlockQuantized
    llm_int8: int = 0  # LLM.int8() linears decomposed (MatMulInteger + float MatMul of the outlier columns)
    attention: int = 0  # ONNX Attention nodes (opset 23) in the lowered graph

    COUNTERS = ("matmulnbits", "matmulinteger", "matmulbnb4", "nf4_lookup", "gather_block_quantized", "llm_int8",
                "attention")

    def to_dict(self) -> dict[str, Any]:
        d = {"target": self.target, "opset": self.opset, "layers": dict(self.layers),
             "float_fallback": [{"layer": n, "reason": r} for n, r in self.float_fallback], "notes": self.notes,
             "counts": {c: getattr(self, c) for c in self.COUNTERS}}
        if self.target == "tensorrt":
            d["tensorrt_saturation"] = {"groups": self.total_groups, "negated": self.negated_groups,
                                        "saturated_groups": self.saturated_groups,
                                        "saturated_codes": self.saturated_codes}
        return d


# ----------------------------------------------------------------------------------------------------
# What an emitter reads
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QNode:
    """A ``qexport``-domain node: ``ins`` padded with ``''`` to five inputs, ``out`` its output, ``name`` the
    prefix of what it becomes."""

    op_type: str
    name: str
    ins: list[str]
    out: str
    attrs: dict[str, Any]

    @classmethod
    def of(cls, node) -> "QNode":
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return cls(node.op_type, node.name or node.output[0], list(node.input) + [""] * (5 - len(node.input)),
                   node.output[0], attrs)

    @property
    def weight_inputs(self) -> tuple[str, str, str]:
        """The (qdata, scale, zero point) inputs: one key per stored weight (a tied pair shares it)."""
        return tuple(self.ins[0:3] if self.op_type == "DequantizeWeight" else self.ins[1:4])

    @property
    def format(self) -> tuple[str, int, int, int, bool]:
        """``(fmt, bits, group, in_features, symmetric)`` of a weight node's attributes."""
        a = self.attrs
        fmt = a["fmt"].decode() if isinstance(a["fmt"], bytes) else a["fmt"]
        return fmt, a["bits"], a["group"], a["in_features"], bool(a["symmetric"])


@dataclass
class Weight:
    """A stored weight as :mod:`qexport.formats` keeps it (``qdata`` ``[N, ...]``, per-group ``scale`` ``[R, G]``
    float, ``zero_point`` or None), the module it belongs to, and whether its scales were reconstructed from
    double quantization."""

    layer: str
    key: tuple[str, str, str]
    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    fmt: str
    bits: int
    group: int
    k: int
    symmetric: bool
    reconstructed: bool = False

    @property
    def n(self) -> int:
        return self.qdata.shape[0]

    @property
    def per_tensor(self) -> bool:
        return self.scale.numel() == 1 and self.n > 1

    @property
    def args(self) -> tuple:
        """``(qdata, scale, zero_point, fmt, bits, group, k, symmetric)``: what formats / ort_matmul take."""
        return self.qdata, self.scale, self.zero_point, self.fmt, self.bits, self.group, self.k, self.symmetric

    def dequantized(self) -> torch.Tensor:
        from qexport.formats import dequantize_stored

        return dequantize_stored(*self.args)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Integer codes ``[N, K]`` and zero point codes ``[R, G]`` (or None), unpacked."""
        from qexport.formats import _load

        zp = None if self.zero_point is None else _load(self.zero_point, self.bits, -(-self.k // self.group), False)
        return _load(self.qdata, self.bits, self.k, self.symmetric), zp


def _module_name(qdata_input: str) -> str:
    """``m.model.layers.0.mlp.up_proj.qdata`` -> ``model.layers.0.mlp.up_proj`` (the exporter names
    initializers after the module path, under the wrapper's attribute)."""
    name = qdata_input.rsplit(".", 1)[0] if qdata_input.endswith(".qdata") else qdata_input
    return name.split(".", 1)[1] if name.startswith("m.") else name


def _value_info(graph, name: str):
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return v.type.tensor_type.shape.dim
    return None


# ----------------------------------------------------------------------------------------------------
# The pieces every target shares
# ----------------------------------------------------------------------------------------------------
class Lowering:
    """One rewrite of a model's ``qexport``-domain nodes for ``target``: the state emitters write into."""

    def __init__(self, model, target: str, scales: dict[str, torch.Tensor] | None, nf4_form: str,
                 embedding_form: str, layer_names: dict[tuple[str, str], str] | None, accuracy_level: int | None):
        from qexport.lowering.embedding import SharedNBitsWeights, check_form, gbq_block

        if target not in TARGETS:
            raise InvalidConfig(f"unknown ONNX target {target!r}; choose one of {', '.join(TARGETS)}")
        if nf4_form not in NF4_FORMS:
            raise InvalidConfig(f"nf4_form={nf4_form!r} is not valid; allowed: {', '.join(NF4_FORMS)}")
        check_form(embedding_form)
        check_accuracy_level(accuracy_level, "MatMulNBits accuracy level")
        self.model, self.graph, self.target = model, model.graph, target
        self.nf4_form, self.embedding_form, self.accuracy_level = nf4_form, embedding_form, accuracy_level
        self.scales, self.names = scales or {}, layer_names or {}
        self.report = LoweringReport(target=target)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.nodes: list = []
        self.embedding_bits: set[int] = set()
        self.nf4_float: list[str] = []  # TensorRT: NF4 layers kept float (one warning for all of them)
        self._stored: dict[tuple, Any] = {}
        self.shared_nbits = SharedNBitsWeights(self.add)
        qnodes = [QNode.of(n) for n in self.graph.node if n.domain == DOMAIN]
        self.linear_keys = {q.weight_inputs for q in qnodes if q.op_type == "QLinear"}
        # 8-bit linears beside 4- / 2-bit ones: the session's accuracy level (0 by default) would run them on
        # MatMulNBits' fp32-activation 8-bit kernel, ~40x slower than its level-4 one, so they are written as
        # MatMulNBits nodes with their own level (matmulnbits_accuracy)
        bits = {q.format[1] for q in qnodes if q.op_type == "QLinear" and q.format[0] == "int"}
        self.own_level_8bit = (target == "ort" and accuracy_level is None and 8 in bits
                               and matmulnbits_accuracy(min(bits), None) != matmulnbits_accuracy(8, None))
        # embeddings in the GatherBlockQuantized form, by weight: a linear reading one is MatMulNBits on it
        self.gbq_keys = set()
        for q in qnodes:
            if q.op_type != "QEmbedding" or target != "ort" or embedding_form == "standard":
                continue
            fmt, bits, group, k, _ = q.format
            if gbq_block(fmt, bits, group, k) is not None:
                self.gbq_keys.add(q.weight_inputs)
            elif embedding_form == "gbq":
                raise InvalidConfig(f"embedding_form='gbq': GatherBlockQuantized takes 4- and 8-bit codes in groups "
                                    f"of a multiple of 16, not {_format_name(fmt, bits)} groups of {group} on {k}; "
                                    "use 'auto' or 'standard'")

    # --- initializers and nodes ---
    def value(self, name: str) -> torch.Tensor | None:
        from onnx import numpy_helper

        if not name:
            return None
        if name not in self.inits:
            raise UnsupportedOp(f"input {name!r} of a quantized node is not a constant")
        return torch.from_numpy(numpy_helper.to_array(self.inits[name]).copy())

    def add(self, tensor) -> str:
        """Add an initializer (a TensorProto) once; returns its name."""
        if tensor.name not in self.inits:
            self.graph.initializer.append(tensor)
            self.inits[tensor.name] = tensor
        return tensor.name

    def add_array(self, name: str, array) -> str:
        from onnx import numpy_helper

        return self.add(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def node(self, op: str, ins: list[str], out: str, name: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, ins, [out], name=name, domain=domain, **attrs))
        return out

    def extend(self, nodes, tensors=()) -> None:
        for t in tensors:
            self.add(t)
        self.nodes.extend(nodes)

    def with_bias(self, q: QNode, bias: str, emit: Callable[[str], Any], op: str = "Add") -> None:
        """``emit(out)`` writes the product into ``out``; then ``+ bias`` (an ``op`` node) when there is one, into
        ``q.out``."""
        out = q.out if not bias else f"{q.name}_mm"
        emit(out)
        if bias:
            self.node(op, [out, bias], q.out, f"{q.name}_bias")

    def matmul(self, q: QNode, x: str, w: str, bias: str) -> None:
        self.with_bias(q, bias, lambda out: self.node("MatMul", [x, w], out, f"{q.name}_MatMul"))

    # --- weights ---
    def layer_of(self, op_type: str, qdata: str) -> str:
        return self.names.get((op_type, qdata)) or _module_name(qdata)

    def weight(self, q: QNode) -> Weight:
        """The stored weight ``q`` reads. A layer given in ``scales`` (double-quantized scales, computed in the
        exported graph, or folded into a constant by the ONNX optimizer with ONNX's float arithmetic) takes those:
        what the PyTorch path computes, bit for bit."""
        fmt, bits, group, k, sym = q.format
        key = q.weight_inputs
        layer = self.layer_of(q.op_type, key[0])
        given = layer in self.scales
        scale = self.scales[layer].to(torch.float32) if given else self.value(key[1])
        return Weight(layer, key, self.value(key[0]), scale, self.value(key[2]), fmt, bits, group, k, sym, given)

    def stored_weight(self, name: str, layer: str, codes, scale, zp_codes, bits: int, signed: bool, group: int,
                      k: int, key: tuple | None = None):
        """The QDQ ``[K, N]`` initializers (:func:`qexport.lowering.qdq.weight_initializers`) of a weight, made
        once per ``key`` (a tied embedding and lm_head read the same ones); scales made positive for TensorRT."""
        from qexport.lowering.qdq import positive_scales, weight_initializers

        if key is not None and key in self._stored:
            return self._stored[key]
        if self.target == "tensorrt" and signed:
            self.report.total_groups += scale.numel()
            if bool((scale < 0).any()):
                codes, scale = positive_scales(codes, scale, bits, group, k, layer, self.report)
        w, tensors = weight_initializers(name, codes, scale, zp_codes, bits, signed, group, k)
        self.extend([], tensors)
        if key is not None:
            self._stored[key] = w
        return w

    def dequantize_linear(self, name: str, w) -> str:
        """``DequantizeLinear`` of a stored QDQ weight ``w`` (StoredWeight): the float ``[K, N]`` weight."""
        attrs = {"per_tensor": {}, "per_channel": {"axis": 1}, "blocked": {"axis": 0, "block_size": w.group}}[w.kind]
        ins = [w.codes, w.scale] + ([w.zero_point] if w.zero_point else [])
        return self.node("DequantizeLinear", ins, f"{name}_W", f"{name}_DequantizeLinear", **attrs)

    def kept_float(self, layer: str, reason: str, how: str) -> None:
        """Record in the report that ``layer`` stays float (``how``: its form in the graph) and why."""
        self.report.float_fallback.append((layer, reason))
        self.report.layers[layer] = how

    def float_linear(self, q: QNode, w: Weight, reason: str) -> None:
        """The float fallback: ``x @ W^T`` with ``W`` dequantized once at lowering, listed in the report."""
        self.kept_float(w.layer, reason, f"float MatMul ({reason})")
        self.matmul(q, q.ins[0], self.add_array(f"{q.name}_WT", w.dequantized().t().contiguous().numpy()), q.ins[4])

    # --- the rewrite ---
    def run(self):
        table = EMITTERS[self.target]
        for node in self.graph.node:
            if node.domain != DOMAIN:
                self.nodes.append(node)
                continue
            emit = table.get(node.op_type)
            if emit is None:
                raise UnsupportedOp(f"no ONNX lowering for qexport op {node.op_type} (target {self.target})")
            emit(self, QNode.of(node))
        return self.finish()

    def finish(self):
        """Drop what feeds no graph output (the replaced nodes' inputs, a float layer's unused codes), then the
        opset (21, or 25 for 2-bit types) and IR version the new nodes need, and the warnings."""
        from onnx import helper

        g, report, model = self.graph, self.report, self.model
        prune(g, self.nodes)
        exported = max((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), default=0)
        report.opset = max(exported, INT2_OPSET if 2 in report.weight_bits | self.embedding_bits else BLOCKED_OPSET)
        imports = [imp for imp in model.opset_import if imp.domain not in (DOMAIN, "", "ai.onnx", MS_DOMAIN)]
        if any(n.domain == MS_DOMAIN for n in g.node):
            imports.append(helper.make_opsetid(MS_DOMAIN, 1))
        del model.opset_import[:]
        model.opset_import.extend([helper.make_opsetid("", report.opset), *imports])
        known = [imp for imp in model.opset_import if imp.domain != MS_DOMAIN]  # onnx knows only its own domains
        model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(known))
        report.attention = sum(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in g.node)
        if self.nf4_float:
            warnings.warn(f"{len(self.nf4_float)} NF4 layer(s) stay float in the TensorRT export (TensorRT has no NF4 "
                          f"form; first: {self.nf4_float[0]}); use a TensorRT-ready int recipe "
                          f"({trt.RESTRICTED_PRESETS}) to quantize them", stacklevel=3)
        if report.negated_groups:
            report.notes.insert(0, (
                f"TensorRT: {report.negated_groups} of {report.total_groups} symmetric weight groups had a negative "
                f"scale and were negated; {report.saturated_groups} groups had a code saturated "
                f"({report.saturated_codes} codes, one quantization step each). Use a restricted-range recipe "
                f"({trt.RESTRICTED_PRESETS}, restricted_range=true) for an exact TensorRT export"))
            warnings.warn(report.notes[0], stacklevel=3)
        return model, report


def prune(graph, nodes=None, inputs: bool = False) -> None:
    """Set ``graph``'s nodes to those of ``nodes`` (default: its own) that some graph output needs, in order, and
    drop the initializers (and with ``inputs`` the graph inputs) nothing reads any more."""
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(list(graph.node if nodes is None else nodes)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    keep = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if inputs:
        kept = [i for i in graph.input if i.name in needed]
        del graph.input[:]
        graph.input.extend(kept)


def _format_name(fmt: str, bits: int) -> str:
    return f"int{bits}" if fmt == "int" else fmt


def _how(w: Weight) -> str:
    return "per-tensor" if w.per_tensor else ("per-channel" if w.group >= w.k else f"block {w.group}")


# ----------------------------------------------------------------------------------------------------
# Weight-only linears, by number format
# ----------------------------------------------------------------------------------------------------
def _qdq_int_linear(lw: Lowering, q: QNode, w: Weight) -> None:
    """``DequantizeLinear`` (int / uint 8, 4, 2; per-tensor, per-channel or blocked) -> ``MatMul``."""
    codes, zp = w.codes()
    stored = lw.stored_weight(q.name, w.layer, codes, w.scale, zp, w.bits, w.symmetric, w.group, w.k, key=w.key)
    lw.matmul(q, q.ins[0], lw.dequantize_linear(q.name, stored), q.ins[4])
    lw.report.layers[w.layer] = (f"DequantizeLinear {'int' if w.symmetric else 'uint'}{w.bits} {_how(w)}"
                                 f"{'' if w.symmetric else ' + zero point'} -> MatMul")
    lw.report.weight_bits.add(w.bits)
    lw.report.matmulnbits += 1


def _ort_int_linear(lw: Lowering, q: QNode, w: Weight) -> None:
    """QDQ (fused by ONNX Runtime into MatMulNBits), or MatMulNBits on a GatherBlockQuantized embedding's codes."""
    from qexport.lowering.embedding import matmulnbits_node

    own_level = w.bits == 8 and lw.own_level_8bit
    if w.key not in lw.gbq_keys and not own_level:
        return _qdq_int_linear(lw, q, w)
    nb = lw.shared_nbits(q.name, w.key, *w.args)
    level = matmulnbits_accuracy(w.bits, lw.accuracy_level)
    lw.with_bias(q, q.ins[4], lambda out: lw.nodes.append(matmulnbits_node(q.name, q.ins[0], out, nb, level)))
    why = ("its initializers read by the tied embedding's GatherBlockQuantized" if w.key in lw.gbq_keys else
           "its own level: the session's level is for the 4- / 2-bit layers")
    lw.report.layers[w.layer] = (f"com.microsoft.MatMulNBits int{w.bits} block {nb.block} accuracy level {level}"
                                 f"{'' if w.symmetric else ' + zero point'} ({why})")
    lw.report.weight_bits.add(w.bits)
    lw.report.matmulnbits += 1


def _ort_nf4_linear(lw: Lowering, q: QNode, w: Weight) -> None:
    """``com.microsoft.MatMulBnb4`` where its blocks fit, else (and with ``nf4_form='lookup'``) the lookup form."""
    from qexport.lowering.ort_matmul import BNB4_NF4, matmulbnb4_tensors, nf4_lookup

    dq = " (double-quantized scales reconstructed)" if w.reconstructed else ""
    try:
        if lw.nf4_form == "lookup":
            raise UnsupportedOp("the lookup form was asked for")
        b, absmax, bs = matmulbnb4_tensors(w.qdata, w.scale, w.group, w.k)
    except UnsupportedOp:
        nodes, tensors, wf = nf4_lookup(q.name, w.qdata, w.scale, w.group, w.k)
        lw.extend(nodes, tensors)
        lw.matmul(q, q.ins[0], wf, q.ins[4])
        lw.report.layers[w.layer] = f"Gather nf4 code book (UINT4 indices) * scale{dq} -> MatMul"
        lw.report.nf4_lookup += 1
        return
    ins = [q.ins[0], lw.add_array(f"{q.name}_B", b), lw.add_array(f"{q.name}_absmax", absmax)]
    lw.with_bias(q, q.ins[4], lambda out: lw.node("MatMulBnb4", ins, out, f"{q.name}_MatMulBnb4", MS_DOMAIN,
                                                  K=w.k, N=w.n, block_size=bs, quant_type=BNB4_NF4))
    lw.report.layers[w.layer] = f"com.microsoft.MatMulBnb4 nf4 block {bs}{dq}"
    lw.report.matmulbnb4 += 1


def _trt_nf4_linear(lw: Lowering, q: QNode, w: Weight) -> None:
    """TensorRT has no code-book dequantization: float, with one warning for all such layers."""
    lw.nf4_float.append(w.layer)
    lw.float_linear(q, w, "nf4 weights have no TensorRT form (no code-book dequantization in its QDQ rules)")


LinearEmitter = Callable[[Lowering, QNode, Weight], None]
LINEAR_FORMS: dict[str, dict[str, LinearEmitter]] = {  # target -> number format -> emitter
    "ort": {"int": _ort_int_linear, "nf4": _ort_nf4_linear},
    "tensorrt": {"int": _qdq_int_linear, "nf4": _trt_nf4_linear},
}


def _linear(lw: Lowering, q: QNode) -> None:
    """``QLinear``: the emitter of the weight's number format (:data:`LINEAR_FORMS`); none: float."""
    w = lw.weight(q)
    if lw.target == "tensorrt":
        trt.check_weight(w.layer, w.fmt, w.bits, w.symmetric, w.group, w.k, w.per_tensor)
    emit = LINEAR_FORMS[lw.target].get(w.fmt)
    if emit is None:
        return lw.float_linear(q, w, f"{_format_name(w.fmt, w.bits)} weights have no ONNX QDQ form")
    emit(lw, q, w)


def _conv_weight(lw: Lowering, q: QNode) -> None:
    """``DequantizeWeight`` (conv weights): no runtime takes packed ones; a float initializer."""
    w = lw.weight(q)
    reason = "conv weights are dequantized at export"
    lw.kept_float(w.layer, reason, f"float ({reason})")
    lw.node("Identity", [lw.add_array(f"{q.name}_W", w.dequantized().numpy())], q.out, f"{q.name}_Identity")


# ----------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------
def _rank(lw: Lowering, name: str) -> int:
    dims = _value_info(lw.graph, name)
    if dims is None:
        raise UnsupportedOp(f"the rank of {name!r} is not known")
    return len(dims)


def _ort_embedding(lw: Lowering, q: QNode) -> None:
    """GatherBlockQuantized where it takes the codes (unless ``embedding_form='standard'``), else Gather +
    DequantizeLinear on the QDQ initializers (:mod:`qexport.lowering.embedding`)."""
    from qexport.lowering.embedding import gbq_lookup, standard_lookup

    w = lw.weight(q)
    if w.fmt != "int":
        return _float_embedding(lw, q, f"{w.fmt} tables have no ONNX form: dequantized at export")
    if w.key in lw.gbq_keys:
        nb = lw.shared_nbits(q.name, w.key, *w.args)
        nodes, tensors, how = gbq_lookup(q.name, q.ins[0], q.out, _rank(lw, q.ins[0]), nb)
        lw.extend(nodes, tensors)
        lw.report.gather_block_quantized += 1
    else:
        codes, zp = w.codes()
        stored = lw.stored_weight(q.name, w.layer, codes, w.scale, zp, w.bits, w.symmetric, w.group, w.k, key=w.key)
        nodes, how = standard_lookup(q.name, q.ins[0], q.out, _rank(lw, q.ins[0]), stored, w.key in lw.linear_keys)
        lw.extend(nodes)
    lw.report.layers[w.layer] = how
    lw.embedding_bits.add(w.bits)


def _float_embedding(lw: Lowering, q: QNode,
                     reason: str = "TensorRT target: quantized embeddings are dequantized at export") -> None:
    """A float table: for TensorRT (no quantized gather in its QDQ rules) and for formats with no ONNX form."""
    w = lw.weight(q)
    lw.kept_float(w.layer, reason, f"float Gather ({reason})")
    table = lw.add_array(f"{q.name}_table", w.dequantized().numpy())
    lw.node("Gather", [table, q.ins[0]], q.out, f"{q.name}_Gather")


# ----------------------------------------------------------------------------------------------------
# Quantized activations
# ----------------------------------------------------------------------------------------------------
def _a8_parts(lw: Lowering, q: QNode):
    """``(layer, x zero point, int8 weight [N, K], float32 w_scale [N], static)`` of a ``QLinearA8`` node."""
    xq, wq = q.ins[0], q.ins[2]
    static = xq in lw.producers and lw.producers[xq].op_type == "QuantizeLinear"
    w_scale = lw.value(q.ins[3]).reshape(-1).to(torch.float32)
    return _module_name(wq), int(q.attrs.get("x_zero_point", 0)), lw.value(wq), w_scale, static


def _ort_a8(lw: Lowering, q: QNode) -> None:
    """``MatMulInteger(x_q, W_q^T [, x_zp])``, ``Cast``, ``* (x_scale * w_scale)``: MatMulIntegerToFloat in ORT."""
    layer, zp, w_int, w_scale, static = _a8_parts(lw, q)
    name, xs = q.name, q.ins[1]
    mm_in = [q.ins[0], lw.add_array(f"{name}_WT", w_int.t().contiguous().numpy())]
    if zp:
        mm_in.append(lw.add_array(f"{name}_xzp", np.array(zp, dtype=np.int8)))

    def emit(out: str) -> None:
        acc = lw.node("MatMulInteger", mm_in, f"{name}_acc", f"{name}_MatMulInteger")
        accf = lw.node("Cast", [acc], f"{name}_accf", f"{name}_Cast", to=_F32)
        scales = lw.node("Mul", [xs, lw.add_array(f"{name}_ws", w_scale.numpy())], f"{name}_scales",
                         f"{name}_scale_product")
        lw.node("Mul", [accf, scales], out, f"{name}_rescale")

    # the bias as Sum, not Add: ONNX Runtime 1.32 folds an Add into the fused MatMulIntegerToFloat and then scales
    # the bias by the per-token activation scale; a Sum stays a node of its own
    lw.with_bias(q, q.ins[4], emit, op="Sum")
    how = "QuantizeLinear (static scale)" if static else "in-graph symmetric scale (dynamic)"
    lw.report.layers[layer] = f"int8 activation, {how} x int8 weight -> MatMulInteger"
    lw.report.weight_bits.add(8)
    lw.report.matmulinteger += 1


def _trt_a8(lw: Lowering, q: QNode) -> None:
    """``QuantizeLinear -> DequantizeLinear`` on a static symmetric activation, per-channel int8 weight, MatMul."""
    layer, zp, w_int, w_scale, static = _a8_parts(lw, q)
    trt.check_activation(layer, dynamic=not static, symmetric=not zp)
    x_dq = lw.node("DequantizeLinear", [q.ins[0], q.ins[1], lw.add_array(f"{q.name}_xzp", np.array(0, np.int8))],
                   f"{q.name}_x", f"{q.name}_x_DequantizeLinear")
    k = w_int.shape[1]
    stored = lw.stored_weight(q.name, layer, w_int.to(torch.int16), w_scale[:, None], None, 8, True, k, k)
    lw.matmul(q, x_dq, lw.dequantize_linear(q.name, stored), q.ins[4])
    lw.report.layers[layer] = ("QuantizeLinear/DequantizeLinear int8 activation (static scale), "
                               "DequantizeLinear int8 per-channel weight -> MatMul")
    lw.report.weight_bits.add(8)
    lw.report.matmulinteger += 1


def _ort_llm_int8(lw: Lowering, q: QNode) -> None:
    """LLM.int8(): :func:`qexport.lowering.llm_int8.llm_int8_nodes`; float (warning, report) where it cannot."""
    x, wq_name, ws_name, bias = q.ins[:4]
    layer, threshold = _module_name(wq_name), q.attrs["threshold"]
    wq, ws = lw.value(wq_name), lw.value(ws_name)
    lw.report.weight_bits.add(8)
    try:
        lw.extend(_llm_int8.llm_int8_nodes(q.name, x, wq, ws, bias, q.out, threshold, lw.add_array))
    except UnsupportedOp as e:
        reason = f"LLM.int8() decomposition not lowered ({e}); float MatMul of the dequantized weight"
        warnings.warn(f"qexport: {layer} stays float: {reason}", stacklevel=4)
        lw.kept_float(layer, reason, "float MatMul (LLM.int8() decomposition not lowered)")
        w = wq.to(torch.float32) * ws.to(torch.float32).reshape(-1, 1)
        lw.matmul(q, x, lw.add_array(f"{q.name}_WT_float", w.t().contiguous().numpy()), bias)
        return
    lw.report.layers[layer] = (f"LLM.int8(): outlier columns (|x| >= {threshold:g}) float MatMul + the rest int8 "
                               "per-token x int8 weight -> MatMulInteger")
    lw.report.llm_int8 += 1


def _trt_llm_int8(lw: Lowering, q: QNode) -> None:
    trt.check_activation(_module_name(q.ins[1]), dynamic=True, symmetric=True, llm_int8=True)


Emitter = Callable[[Lowering, QNode], None]
_COMMON: dict[str, Emitter] = {"QLinear": _linear, "DequantizeWeight": _conv_weight}
EMITTERS: dict[str, dict[str, Emitter]] = {  # target -> qexport op type -> emitter
    "ort": {**_COMMON, "QEmbedding": _ort_embedding, "QLinearA8": _ort_a8, _llm_int8.OP_TYPE: _ort_llm_int8},
    "tensorrt": {**_COMMON, "QEmbedding": _float_embedding, "QLinearA8": _trt_a8, _llm_int8.OP_TYPE: _trt_llm_int8},
}


def lower(model, target: str = "ort", scales: dict[str, torch.Tensor] | None = None, nf4_form: str = "auto",
          embedding_form: str = "auto", layer_names: dict[tuple[str, str], str] | None = None,
          accuracy_level: int | None = None):
    """Rewrite every ``qexport``-domain node of ``model`` (an ``onnx.ModelProto`` exported with
    :func:`qexport.lowering.translate.translations`) for ``target`` (:data:`TARGETS`), in place.

    ``scales`` maps a layer (module name) to its per-group float32 scales ``[R, G]``, for the layers whose scales
    are not graph constants (double-quantized NF4 scales are computed in the exported graph;
    ``QuantizedWeight.scales()`` reconstructs them exactly as the PyTorch path does). ``nf4_form`` (:data:`NF4_FORMS`)
    and ``embedding_form`` (:data:`qexport.lowering.embedding.FORMS`) choose ONNX Runtime's forms of NF4 weights
    and quantized embeddings; ``accuracy_level`` is that of a MatMulNBits node written directly (a tied
    ``lm_head``; default by its bits). ``layer_names`` maps ``(op type, qdata initializer)`` to a module name
    where the initializer's own name does not tell (a tied embedding and lm_head share one).

    Returns ``(model, LoweringReport)``. Raises UnsupportedOp for an op without an emitter and for a layer the
    target cannot run (TensorRT: :mod:`qexport.lowering.tensorrt_rules`).
    """
    return Lowering(model, target, scales, nf4_form, embedding_form, layer_names, accuracy_level).run()
