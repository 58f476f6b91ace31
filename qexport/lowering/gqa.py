"""ONNX Runtime's LLM form of an exported decoder: ``GroupQueryAttention`` over a shared KV buffer.

``qexport export`` writes attention as opset 23's standard ``Attention`` after two ``RotaryEmbedding`` nodes,
with a KV cache that grows by concatenation (``present = concat(past, new)``). ONNX Runtime's own LLM tooling
(onnxruntime-genai's model builder) writes ``com.microsoft.GroupQueryAttention`` instead, which rotates
query and key itself (``do_rotary``, from cos / sin tables of the whole context), reads one packed QKV
projection, and writes the new keys / values into a buffer of the full context length that past and present
share (onnxruntime-genai's ``past_present_share_buffer``), so no step copies the cache.

:func:`gqa_form` rewrites a lowered export (``onnx.ModelProto``, after :func:`qexport.lowering.core.lower`) into
that form, layer by layer, and refuses (:class:`~qexport.errors.UnsupportedOp`, with the reason) a graph it
does not recognise:

* each ``Attention(q', k', v, mask, past_key, past_value)`` whose ``q'`` and ``k'`` are ``RotaryEmbedding`` of
  the projections with the same cos / sin inputs becomes
  ``GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)``
  with ``do_rotary=1``. The cos / sin tables are the graph's own rotary subgraph evaluated by ONNX Runtime for
  positions ``0 .. max_length - 1``, so RoPE scaling baked into it carries over exactly;
* ``seqlens_k = sum(attention_mask, 1) - 1`` and ``total_sequence_length = attention_mask.shape[1]`` (int32)
  replace the mask subgraph; GroupQueryAttention's positions are ``0 ..`` per row, so the form assumes no
  left padding (what genai's and :class:`qexport.export.OnnxCausalLM`'s loops feed) and drops ``position_ids``;
* where the three projections are one input times a ``DequantizeLinear`` of initializers in the same layout
  (blocked or per-channel; or three float initializers) without bias, their ``[K, N]`` weights, scales and zero
  points are concatenated along N into one ``MatMul`` (ONNX Runtime fuses it into one ``MatMulNBits``) whose
  output is GroupQueryAttention's packed query. Concatenating output channels is exact: every group of a
  ``[K, N]`` weight lies in one column;
* a residual ``Add`` and the ``RMSNormalization`` after it become one ``com.microsoft.SkipSimplifiedLayerNormalization``
  (the same fp32 ``x / sqrt(mean(x^2) + eps) * weight``), which also returns the sum for the next residual.

The graph runs with a growing cache too (past of length P, present of length P + S: GroupQueryAttention
concatenates when past and present are different buffers), which is how the tests compare it with the
standard form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qexport.errors import UnsupportedOp
from qexport.lowering.core import prune

__all__ = ["gqa_form", "GqaForm", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"
_STD = ("", "ai.onnx")


@dataclass
class GqaForm:
    """What :func:`gqa_form` rewrote (the export report's ``attention_form`` entry)."""

    layers: int = 0
    qkv_packed: int = 0
    norms: int = 0
    max_length: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"form": "gqa", "op": "com.microsoft.GroupQueryAttention", "layers": self.layers,
                "qkv_packed": self.qkv_packed, "skip_norms": self.norms, "max_length": self.max_length,
                "shared_kv_buffer": True, "position_ids": "dropped: positions come from attention_mask",
                "notes": self.notes}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Producers, initializers and graph inputs of one ModelProto graph, for pattern matching."""

    def __init__(self, model):
        self.model, self.g = model, model.graph
        self.producers = {o: n for n in self.g.node for o in n.output}
        self.inits = {t.name: t for t in self.g.initializer}
        self.inputs = {i.name for i in self.g.input}

    def producer(self, name: str, op: str, domains=_STD):
        n = self.producers.get(name)
        return n if n is not None and n.op_type == op and n.domain in domains else None

    def ancestors(self, names) -> tuple[list, set[str], set[str]]:
        """(nodes in graph order, graph inputs, initializers) that ``names`` are computed from."""
        seen, stack, ins, inits = set(), list(names), set(), set()
        while stack:
            name = stack.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            if name in self.inputs:
                ins.add(name)
            elif name in self.inits:
                inits.add(name)
            elif name in self.producers:
                stack.extend(self.producers[name].input)
        nodes = [n for n in self.g.node if any(o in seen for o in n.output)]
        return nodes, ins, inits


def _rotary_tables(gr: _Graph, cos: str, sin: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's cos / sin inputs of RotaryEmbedding for positions ``0 .. max_length - 1``, ``[max_length, R/2]``:
    its own subgraph from ``position_ids``, run once in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import helper

    nodes, ins, inits = gr.ancestors([cos, sin])
    if ins != {"position_ids"}:
        raise UnsupportedOp(f"the rotary cos / sin tables are computed from {sorted(ins)}, not position_ids alone")
    f32 = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "rotary", [f32("position_ids", 7, [1, max_length])],
                              [f32(cos, 1, None), f32(sin, 1, None)], [gr.inits[i] for i in sorted(inits)])
    sub = helper.make_model(graph, opset_imports=list(gr.model.opset_import), ir_version=gr.model.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
    c, s = sess.run([cos, sin], {"position_ids": np.arange(max_length, dtype=np.int64)[None]})
    if c.ndim != 3 or c.shape[:2] != (1, max_length) or c.shape != s.shape:
        raise UnsupportedOp(f"the rotary tables have shape {list(c.shape)}, not [1, {max_length}, rotary_dim / 2]")
    return np.ascontiguousarray(c[0], dtype=np.float32), np.ascontiguousarray(s[0], dtype=np.float32)


def _projection(gr: _Graph, name: str):
    """``(x, weight parts, dq attrs)`` when ``name`` is ``MatMul(x, W)`` with ``W`` a float initializer
    (parts ``(W,)``) or ``DequantizeLinear`` of initializers (parts ``(codes, scale[, zero point])``); else None."""
    mm = gr.producer(name, "MatMul")
    if mm is None:
        return None
    x, w = mm.input
    if w in gr.inits:
        return x, (w,), None
    dq = gr.producer(w, "DequantizeLinear")
    if dq is None or not all(i in gr.inits for i in dq.input if i):
        return None
    return x, tuple(i for i in dq.input if i), _attrs(dq)


def _packed_qkv(gr: _Graph, q: str, k: str, v: str, layer: int) -> tuple[list, list] | None:
    """``(nodes, initializers)`` of one MatMul computing ``concat(q, k, v, -1)``, or None when the three
    projections do not share an input and a weight layout."""
    from onnx import helper, numpy_helper

    parts = [_projection(gr, n) for n in (q, k, v)]
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    kinds = {(len(p[1]), tuple(sorted((p[2] or {}).items()))) for p in parts}
    if len(kinds) != 1:
        return None
    arrays = [[numpy_helper.to_array(gr.inits[t]) for t in p[1]] for p in parts]
    dq = parts[0][2]
    per_channel = dq is not None and dq.get("axis", 1) == 1 and "block_size" not in dq
    blocked = dq is not None and dq.get("axis", 1) == 0 and "block_size" in dq
    if dq is not None and not (per_channel or blocked) or any(a.ndim != 2 for arrs in arrays for a in arrs[:1]):
        return None  # per-tensor scales (one per projection) cannot be concatenated
    # codes / float weights [K, N] and blocked scales / zero points [K / block, N] along N; per-channel ones [N]
    if any(a.ndim != (1 if per_channel and j else 2) for arrs in arrays for j, a in enumerate(arrs)):
        return None
    base = f"layers.{layer}.qkv_proj"
    inits = [numpy_helper.from_array(np.concatenate([a[i] for a in arrays], axis=arrays[0][i].ndim - 1),
                                     f"{base}.{role}")
             for i, role in enumerate(("weight", "scale", "zero_point")[:len(arrays[0])])]
    x = parts[0][0]
    if dq is None:
        return [helper.make_node("MatMul", [x, inits[0].name], [f"{base}.out"], name=f"{base}.MatMul")], inits
    dequantize = helper.make_node("DequantizeLinear", [t.name for t in inits], [f"{base}.W"],
                                  name=f"{base}.DequantizeLinear", **dq)
    return [dequantize, helper.make_node("MatMul", [x, f"{base}.W"], [f"{base}.out"], name=f"{base}.MatMul")], inits


def _mask_inputs(g) -> tuple[list, list, str, str]:
    """Nodes and initializers computing ``seqlens_k`` and ``total_sequence_length`` from ``attention_mask``."""
    from onnx import helper, numpy_helper

    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "gqa.one")
    idx = numpy_helper.from_array(np.array(1, dtype=np.int64), "gqa.axis1")
    n = helper.make_node
    nodes = [
        n("ReduceSum", ["attention_mask", one.name], ["gqa.mask_sum"], name="gqa.ReduceSum", keepdims=0),
        n("Sub", ["gqa.mask_sum", one.name], ["gqa.seqlens_k64"], name="gqa.Sub"),
        n("Cast", ["gqa.seqlens_k64"], ["gqa.seqlens_k"], name="gqa.Cast_seqlens", to=6),
        n("Shape", ["attention_mask"], ["gqa.mask_shape"], name="gqa.Shape"),
        n("Gather", ["gqa.mask_shape", idx.name], ["gqa.total64"], name="gqa.Gather", axis=0),
        n("Cast", ["gqa.total64"], ["gqa.total_sequence_length"], name="gqa.Cast_total", to=6),
    ]
    return nodes, [one, idx], "gqa.seqlens_k", "gqa.total_sequence_length"


def gqa_form(model, max_length: int, pack_qkv: bool = True):
    """Rewrite a lowered export ``model`` (changed in place and returned) into ONNX Runtime's LLM form (module
    docstring). Returns ``(model, GqaForm)``. Raises UnsupportedOp naming what does not match."""
    from onnx import helper, numpy_helper

    gr = _Graph(model)
    g = model.graph
    if "attention_mask" not in gr.inputs:
        raise UnsupportedOp("the graph has no attention_mask input")
    attns = [n for n in g.node if n.op_type == "Attention" and n.domain in _STD]
    if not attns:
        raise UnsupportedOp("no Attention node (exported without the ONNX fusions, or attention not fused)")
    info = GqaForm(max_length=max_length)
    replace: dict[int, list] = {}  # id of a node -> what stands in its place
    new_inits: list = []
    tables: dict[tuple[str, str], tuple[str, str]] = {}
    masks = {at.input[3] if len(at.input) > 3 else "" for at in attns}
    if len(masks) > 1:
        raise UnsupportedOp("the layers attend through different masks (sliding-window layers?); "
                            "GroupQueryAttention here reads one causal mask from attention_mask")
    mask = masks.pop()
    if mask and "attention_mask" not in gr.ancestors([mask])[1]:
        raise UnsupportedOp("the attention mask is not computed from the attention_mask input")
    mask_nodes, mask_inits, seqlens, total = _mask_inputs(g)
    for i, at in enumerate(attns):
        ins, a = list(at.input), _attrs(at)
        if len(ins) < 6 or len(at.output) < 3 or not (ins[4] in gr.inputs and ins[5] in gr.inputs):
            raise UnsupportedOp(f"{at.name}: Attention without past key / value graph inputs")
        extra = {k for k, v in a.items() if k not in ("q_num_heads", "kv_num_heads", "scale") and v not in (0, 0.0)}
        if "q_num_heads" not in a:
            raise UnsupportedOp(f"{at.name}: Attention on per-head (4-D) inputs, as after a query / key norm or a "
                                "partial rotation; GroupQueryAttention takes [batch, seq, hidden] projections")
        if extra:
            raise UnsupportedOp(f"{at.name}: Attention attributes {sorted(extra)} have no GroupQueryAttention form")
        rq, rk = gr.producer(ins[0], "RotaryEmbedding"), gr.producer(ins[1], "RotaryEmbedding")
        if rq is None or rk is None or list(rq.input[1:3]) != list(rk.input[1:3]) or len(rq.input) > 3 \
                and rq.input[3] or len(rk.input) > 3 and rk.input[3]:
            raise UnsupportedOp(f"{at.name}: query and key are not RotaryEmbedding of the projections with one "
                                "pair of cos / sin tables")
        ra, rka = _attrs(rq), _attrs(rk)
        if ra.get("interleaved", 0) != rka.get("interleaved", 0):
            raise UnsupportedOp(f"{at.name}: query and key rotate differently")
        key = (rq.input[1], rq.input[2])
        if key not in tables:
            cos, sin = _rotary_tables(gr, *key, max_length)
            names = (f"gqa.cos_cache{len(tables) or ''}", f"gqa.sin_cache{len(tables) or ''}")
            new_inits += [numpy_helper.from_array(cos, names[0]), numpy_helper.from_array(sin, names[1])]
            tables[key] = names
        q, k, v = rq.input[0], rk.input[0], ins[2]
        packed = _packed_qkv(gr, q, k, v, i) if pack_qkv else None
        pre = []
        if packed is not None:
            pre, inits = packed
            new_inits += inits
            q, k, v = pre[-1].output[0], "", ""
            info.qkv_packed += 1
        gqa = helper.make_node(
            "GroupQueryAttention", [q, k, v, ins[4], ins[5], seqlens, total, *tables[key]], list(at.output[:3]),
            name=f"layers.{i}.GroupQueryAttention", domain=MS_DOMAIN, num_heads=int(a["q_num_heads"]),
            kv_num_heads=int(a.get("kv_num_heads", a["q_num_heads"])), do_rotary=1,
            rotary_interleaved=int(ra.get("interleaved", 0)), **({"scale": float(a["scale"])} if "scale" in a else {}))
        replace[id(at)] = [*pre, gqa]
        info.layers += 1
    # a residual Add and the RMSNormalization after it -> SkipSimplifiedLayerNormalization
    skips = {}  # id of the Add -> the norm that reads it
    for n in g.node:
        if n.op_type == "RMSNormalization" and n.domain in _STD and _attrs(n).get("axis", -1) == -1:
            add = gr.producer(n.input[0], "Add")
            if add is not None and not any(i in gr.inits for i in add.input) and id(add) not in skips:
                skips[id(add)] = n
    fused = {id(norm) for norm in skips.values()}
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) in skips:  # in the Add's place: its sum is read by later nodes
            norm, a = skips[id(n)], _attrs(skips[id(n)])
            nodes.append(helper.make_node(
                "SkipSimplifiedLayerNormalization", [*n.input, norm.input[1]], [norm.output[0], "", "", n.output[0]],
                name=f"{norm.name or 'norm'}.skip", domain=MS_DOMAIN, epsilon=float(a.get("epsilon", 1e-5))))
            info.norms += 1
        elif id(n) in fused:
            continue
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(mask_nodes + nodes)
    g.initializer.extend(mask_inits + new_inits)
    prune(g, inputs=True)  # the mask and rotary subgraphs, the separate projections, position_ids
    for out in g.output:
        if out.name.startswith("present."):
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 4:
                dims[2].Clear()
                dims[2].dim_param = "total_sequence_length"
    if all(imp.domain != MS_DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, info

