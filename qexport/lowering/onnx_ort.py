"""Lower a converted (canonical quantized) FX graph to ONNX and run it in ONNX Runtime.

Two steps:

1. ``torch.onnx.export(dynamo=True)`` with a translation for each ``qexport`` op. Weight-consuming ops
   become nodes of the ``qexport`` ONNX domain that carry their packed-weight initializers; activation
   quantization becomes standard ONNX (per-token scales: ReduceMax / Div / Round / Clip / Cast; int8 x
   int8 products: ``MatMulInteger``).
2. A rewrite of every ``qexport``-domain node into what ONNX Runtime runs fast: weight-only int8 / int4 /
   int2 linears into ``com.microsoft.MatMulNBits`` (see :mod:`qexport.lowering.ort_matmul`); NF4 linears
   (double-quantized scales are folded to float by then) into ``com.microsoft.MatMulBnb4``, or, where its
   block layout does not fit, the standard-ONNX lookup form (``Gather`` of the code book, times the
   scale, ``MatMul``); quantized embeddings into ``com.microsoft.GatherBlockQuantized`` on MatMulNBits'
   codes, which a tied ``lm_head`` shares (:mod:`qexport.lowering.embedding`; a float table where its blocks
   do not fit); int8 weights of W8A8 layers into ``[K, N]`` initializers for ``MatMulInteger``;
   anything else without an ORT kernel (integer group sizes that are not multiples of 16, conv weights)
   into a float initializer, recorded in the report.

Before export, :class:`OrtGraph` rewrites its copy of the graph for this target (fewer, larger ONNX
nodes: ORT pays a few microseconds per node, and a SmolLM2 decode step has ~2600 of them):
``fuse_rmsnorm`` (hand-written RMSNorm -> ``qexport::rms_norm`` -> one ``SimplifiedLayerNormalization``),
``fuse_rotate_half`` (rotary embeddings' slice / neg / concat -> one ``MatMul``), ``fuse_gqa`` (``repeat_kv``
copies before SDPA removed, ``enable_gqa=True``: with opset 23 each attention is one grouped-query ``Attention``
node) and ``static_sizes`` (symbolic reshape / expand sizes -> ``-1``, so shapes are constants).

:class:`OrtGraph` exports a graph traced with symbolic sizes once, with dynamic axes, and a static graph
once per input shape signature, and caches the sessions.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.lowering.llm_int8 import OP_TYPE as LLM_INT8_OP, SCHEMA as LLM_INT8_SCHEMA, lower_llm_int8
from qexport.passes.fuse_gqa import fuse_gqa
from qexport.passes.fuse_rmsnorm import fuse_rmsnorm
from qexport.passes.fuse_rotate_half import fuse_rotate_half
from qexport.passes.static_sizes import static_sizes

__all__ = ["OrtGraph", "export_graph", "freeze_parameters"]

DOMAIN = "qexport"
_F32, _I8 = 1, 3  # onnx.TensorProto.FLOAT, INT8
MS_DOMAIN = "com.microsoft"
ATTENTION_OPSET = 23  # ONNX Attention (grouped-query, masks), RotaryEmbedding, RMSNormalization


def _translations():
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_schemas()
    qx = Opset(DOMAIN, 1)
    Q = torch.ops.qexport

    def qlinear(x, qdata, scale, zero_point, bias, fmt: str, bits: int, group: int, in_features: int,
                symmetric: bool):
        return qx.QLinear(x, qdata, scale, zero_point, bias, fmt=fmt, bits=bits, group=group,
                          in_features=in_features, symmetric=int(symmetric))

    def dequantize_weight(qdata, scale, zero_point, fmt: str, bits: int, group: int, in_features: int,
                          symmetric: bool):
        return qx.DequantizeWeight(qdata, scale, zero_point, fmt=fmt, bits=bits, group=group,
                                   in_features=in_features, symmetric=int(symmetric))

    def qembedding(indices, qdata, scale, zero_point, fmt: str, bits: int, group: int, dim: int, symmetric: bool):
        return qx.QEmbedding(indices, qdata, scale, zero_point, fmt=fmt, bits=bits, group=group, in_features=dim,
                             symmetric=int(symmetric))

    def quantize_per_token(x):
        xf = op.Cast(x, to=_F32)
        amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
        scale = op.Max(op.Div(amax, op.Constant(value_float=127.0)),
                       op.Constant(value_float=float(torch.finfo(torch.float32).tiny)))
        q = op.Clip(op.Round(op.Div(xf, scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
        return op.Cast(q, to=_I8), scale

    def quantize_per_tensor_dynamic(x):
        xf = op.Cast(x, to=_F32)
        scale = op.Max(op.Div(op.ReduceMax(op.Abs(xf), keepdims=0), op.Constant(value_float=127.0)),
                       op.Constant(value_float=float(torch.finfo(torch.float32).tiny)))
        q = op.Clip(op.Round(op.Div(xf, scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
        return op.Cast(q, to=_I8), scale

    def quantize_per_tensor(x, scale, zero_point: int):
        q = op.Add(op.Round(op.Div(op.Cast(x, to=_F32), scale)), op.Constant(value_float=float(zero_point)))
        return op.Cast(op.Clip(q, op.Constant(value_float=-128.0), op.Constant(value_float=127.0)), to=_I8)

    def qlinear_a8(xq, x_scale, x_zero_point: int, wq, w_scale, bias):
        return qx.QLinearA8(xq, x_scale, wq, w_scale, bias, x_zero_point=x_zero_point)

    def rms_norm(x, weight, eps: float):
        return qx.RMSNorm(x, weight, epsilon=eps)

    def rotate_half(x):
        return qx.RotateHalf(x)

    def qlinear_llm_int8(x, wq, w_scale, bias, threshold: float):
        return qx.QLinearLLMInt8(x, wq, w_scale, bias, threshold=threshold)

    return {
        Q.qlinear.default: qlinear,
        Q.dequantize_weight.default: dequantize_weight,
        Q.qembedding.default: qembedding,
        Q.quantize_per_token.default: quantize_per_token,
        Q.quantize_per_tensor_dynamic.default: quantize_per_tensor_dynamic,
        Q.quantize_per_tensor.default: quantize_per_tensor,
        Q.qlinear_a8.default: qlinear_a8,
        Q.rms_norm.default: rms_norm,
        Q.rotate_half.default: rotate_half,
        Q.qlinear_llm_int8.default: qlinear_llm_int8,
    }


_SCHEMAS = {  # op -> (inputs as (name, type, optional), attributes as (name, type))
    "QLinear": ([("x", "T", False), ("qdata", "Q", False), ("scale", "T", False), ("zero_point", "Q", True),
                 ("bias", "T", True)],
                [("fmt", "STRING"), ("bits", "INT"), ("group", "INT"), ("in_features", "INT"), ("symmetric", "INT")]),
    "DequantizeWeight": ([("qdata", "Q", False), ("scale", "T", False), ("zero_point", "Q", True)],
                         [("fmt", "STRING"), ("bits", "INT"), ("group", "INT"), ("in_features", "INT"),
                          ("symmetric", "INT")]),
    "QEmbedding": ([("indices", "I", False), ("qdata", "Q", False), ("scale", "T", False), ("zero_point", "Q", True)],
                   [("fmt", "STRING"), ("bits", "INT"), ("group", "INT"), ("in_features", "INT"),
                    ("symmetric", "INT")]),
    "QLinearA8": ([("xq", "Q", False), ("x_scale", "T", False), ("wq", "Q", False), ("w_scale", "T", False),
                   ("bias", "T", True)], [("x_zero_point", "INT")]),
    "RMSNorm": ([("x", "T", False), ("weight", "T", False)], [("epsilon", "FLOAT")]),
    "RotateHalf": ([("x", "T", False)], []),
    LLM_INT8_OP: LLM_INT8_SCHEMA,
}


def _register_schemas() -> None:
    """ONNX schemas for the qexport domain, so onnxscript can record these ops (they never reach a runtime)."""
    from onnx import defs

    OpSchema = defs.OpSchema
    for name, (inputs, attrs) in _SCHEMAS.items():
        try:
            defs.get_schema(name, 1, DOMAIN)
            continue
        except Exception:  # not registered yet
            pass
        opt = OpSchema.FormalParameterOption
        types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float"),
                 ("Q", ["tensor(uint8)", "tensor(int8)"], "stored codes")]
        if any(t == "I" for _, t, _ in inputs):
            types.append(("I", ["tensor(int64)", "tensor(int32)"], "indices"))
        schema = OpSchema(
            name, DOMAIN, 1,
            inputs=[OpSchema.FormalParameter(n, t, param_option=opt.Optional if o else opt.Single)
                    for n, t, o in inputs],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=types,
            attributes=[OpSchema.Attribute(n, getattr(OpSchema.AttrType, t), "") for n, t in attrs],
        )
        defs.register_schema(schema)


@dataclass
class LoweringReport:
    matmulnbits: int = 0
    matmulinteger: int = 0
    rms_norm: int = 0
    llm_int8: int = 0  # LLM.int8() linears: MatMulInteger for the regular columns + float MatMul for outliers
    matmulbnb4: int = 0  # NF4 linears as com.microsoft.MatMulBnb4
    nf4_lookup: int = 0  # NF4 linears in the standard-ONNX lookup form (MatMulBnb4's blocks did not fit)
    attention: int = 0  # scaled_dot_product_attention calls exported as one ONNX Attention node (opset 23)
    gather_block_quantized: int = 0  # quantized embeddings as com.microsoft.GatherBlockQuantized
    float_fallback: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"matmulnbits": self.matmulnbits, "matmulinteger": self.matmulinteger, "rms_norm": self.rms_norm,
                "llm_int8": self.llm_int8,
                "matmulbnb4": self.matmulbnb4, "nf4_lookup": self.nf4_lookup, "attention": self.attention,
                "gather_block_quantized": self.gather_block_quantized,
                "float_fallback": [{"node": n, "reason": r} for n, r in self.float_fallback]}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _node_parts(node) -> tuple[dict[str, Any], str, list[str]]:
    """A qexport-domain node's attributes, a name for what it becomes, and its inputs padded to five."""
    return _attrs(node), node.name or node.output[0], list(node.input) + [""] * (5 - len(node.input))


def _weight_format(a: dict[str, Any]) -> tuple[str, int, int, int, bool]:
    """``(fmt, bits, group, in_features, symmetric)`` of a QLinear / DequantizeWeight node's attributes."""
    fmt = a["fmt"].decode() if isinstance(a["fmt"], bytes) else a["fmt"]
    return fmt, a["bits"], a["group"], a["in_features"], bool(a["symmetric"])


ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 fp32 activations ... 4 int8 activations


def check_accuracy_level(level, what: str) -> None:
    """InvalidConfig naming ``what`` unless ``level`` is None or a MatMulNBits accuracy level."""
    if level is not None and level not in ACCURACY_LEVELS:
        raise InvalidConfig(f"{what} must be 0 (fp32), 1, 2, 3 or 4 (int8 activations), got {level!r}")


def matmulnbits_accuracy(bits: int, accuracy_level: int | None) -> int:
    """MatMulNBits ``accuracy_level`` for a weight of ``bits`` bits: the one asked for, or by default 4 (int8
    activations) for 8-bit weights, whose fp32-activation kernel is ~40x slower, and 0 (fp32 activations, the
    reference numerics) for 4- and 2-bit weights. Measured on SmolLM2 (README): level 4 costs +0.25%
    perplexity with int8 weights and +0.97% with int4 g128."""
    if accuracy_level is not None:
        return accuracy_level
    return 4 if bits == 8 else 0


def _last_dim(graph, name: str) -> int:
    """The static last dimension of value ``name`` (from the exporter's shape annotations)."""
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        if v.name == name:
            dims = v.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return dims[-1].dim_value
    raise UnsupportedOp(f"the last dimension of {name!r} is not known statically")


def _rewrite(model, report: LoweringReport, accuracy_level: int | None = None):
    """Replace every qexport-domain node by standard / ORT contrib ops (see the module docstring)."""
    from onnx import helper, numpy_helper

    from qexport.formats import dequantize_stored
    from qexport.lowering.embedding import SharedNBitsWeights, gbq_block, gbq_lookup, matmulnbits_node
    from qexport.lowering.ort_matmul import BNB4_NF4, matmulbnb4_tensors, matmulnbits_tensors, nf4_lookup
    from qexport.lowering.qdq import _rank

    g = model.graph
    inits = {i.name: i for i in g.initializer}

    def value(name):
        if not name:
            return None
        if name not in inits:
            raise UnsupportedOp(f"input {name!r} of a quantized node is not a constant")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def add_init(name, array):
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        g.initializer.append(t)
        inits[name] = t
        return name

    def add_tensor(t):
        g.initializer.append(t)
        inits[t.name] = t

    new_nodes = []
    # quantized embeddings in the GatherBlockQuantized form, by weight inputs: a linear reading the same weight
    # (a tied lm_head) is a MatMulNBits node on the same initializers (qexport.lowering.embedding)
    gbq_keys = {tuple(_node_parts(n)[2][1:4]) for n in g.node if n.domain == DOMAIN and n.op_type == "QEmbedding"
                and gbq_block(*_weight_format(_attrs(n))[:4]) is not None}
    nbits_for = SharedNBitsWeights(add_tensor)

    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        a, name, ins = _node_parts(node)
        if node.op_type == "QLinear" and tuple(ins[1:4]) in gbq_keys:
            fmt, bits, group, k, sym = _weight_format(a)
            w = nbits_for(name, tuple(ins[1:4]), value(ins[1]), value(ins[2]), value(ins[3]), fmt, bits, group, k, sym)
            out = node.output[0] if not ins[4] else f"{name}_mm"
            new_nodes.append(matmulnbits_node(name, ins[0], out, w, matmulnbits_accuracy(bits, accuracy_level)))
            if ins[4]:
                new_nodes.append(helper.make_node("Add", [out, ins[4]], [node.output[0]], name=f"{name}_bias"))
            report.matmulnbits += 1
        elif node.op_type == "QEmbedding":
            fmt, bits, group, k, sym = _weight_format(a)
            qdata, scale, zp = value(ins[1]), value(ins[2]), value(ins[3])
            key = tuple(ins[1:4])
            if key in gbq_keys:
                w = nbits_for(name, key, qdata, scale, zp, fmt, bits, group, k, sym)
                nodes, tensors, _ = gbq_lookup(name, ins[0], node.output[0], _rank(g, ins[0]), w)
                for t in tensors:
                    add_tensor(t)
                new_nodes.extend(nodes)
                report.gather_block_quantized += 1
            else:  # 2-bit codes (INT2 needs opset 25) or groups that are not a multiple of 16: a float table
                table = add_init(f"{name}_table", dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym).numpy())
                new_nodes.append(helper.make_node("Gather", [table, ins[0]], [node.output[0]], name=f"{name}_Gather"))
                report.float_fallback.append((name, f"{fmt}{bits} embedding rows in groups of {group}: no "
                                                    "GatherBlockQuantized form; float table"))
        elif node.op_type in ("QLinear", "DequantizeWeight"):
            fmt, bits, group, k, sym = _weight_format(a)
            qdata, scale, zp = value(ins[1]), value(ins[2]), value(ins[3])
            if node.op_type == "QLinear" and fmt == "nf4":
                out = node.output[0] if not ins[4] else f"{name}_mm"
                n = qdata.shape[0]
                try:
                    b, absmax, bs = matmulbnb4_tensors(qdata, scale, group, k)
                    new_nodes.append(helper.make_node(
                        "MatMulBnb4", [ins[0], add_init(f"{name}_B", b), add_init(f"{name}_absmax", absmax)], [out],
                        name=f"{name}_MatMulBnb4", domain=MS_DOMAIN, K=k, N=n, block_size=bs, quant_type=BNB4_NF4))
                    report.matmulbnb4 += 1
                except UnsupportedOp:  # block layout: the standard lookup form, same numerics
                    nodes, tensors, w = nf4_lookup(name, qdata, scale, group, k, uint4=False)  # opset 18 graph
                    for t in tensors:
                        g.initializer.append(t)
                        inits[t.name] = t
                    new_nodes.extend(nodes)
                    new_nodes.append(helper.make_node("MatMul", [ins[0], w], [out], name=f"{name}_MatMul"))
                    report.nf4_lookup += 1
                if ins[4]:
                    new_nodes.append(helper.make_node("Add", [out, ins[4]], [node.output[0]], name=f"{name}_bias"))
            elif node.op_type == "QLinear":
                try:
                    b, s, z, bs = matmulnbits_tensors(qdata, scale, zp, fmt, bits, group, k, sym)
                    n = qdata.shape[0]
                    mm_in = [ins[0], add_init(f"{name}_B", b), add_init(f"{name}_scales", s)]
                    if z is not None:
                        mm_in.append(add_init(f"{name}_zp", z))
                    out = node.output[0] if not ins[4] else f"{name}_mm"
                    new_nodes.append(helper.make_node("MatMulNBits", mm_in, [out], name=f"{name}_MatMulNBits",
                                                      domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=bs,
                                                      accuracy_level=matmulnbits_accuracy(bits, accuracy_level)))
                    report.matmulnbits += 1
                except UnsupportedOp as e:
                    w = dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym)
                    out = node.output[0] if not ins[4] else f"{name}_mm"
                    new_nodes.append(helper.make_node("MatMul", [ins[0], add_init(f"{name}_WT", w.t().numpy())],
                                                      [out], name=f"{name}_MatMul"))
                    report.float_fallback.append((name, str(e)))
                if ins[4]:
                    new_nodes.append(helper.make_node("Add", [out, ins[4]], [node.output[0]], name=f"{name}_bias"))
            else:  # conv weights: no ORT kernel takes packed ones
                w = dequantize_stored(qdata, scale, zp, fmt, bits, group, k, sym)
                new_nodes.append(helper.make_node("Identity", [add_init(f"{name}_W", w.numpy())], [node.output[0]]))
                report.float_fallback.append((name, "conv weights are dequantized at lowering"))
        elif node.op_type == "QLinearA8":
            xq, xs, wq, ws, bias = ins
            wt = value(wq).t().contiguous().numpy()
            zp = int(a.get("x_zero_point", 0))
            mm_in = [xq, add_init(f"{name}_WT", wt)]
            if zp:
                mm_in.append(add_init(f"{name}_xzp", np.array(zp, dtype=np.int8)))
            acc = f"{name}_acc"
            new_nodes.append(helper.make_node("MatMulInteger", mm_in, [acc], name=f"{name}_MatMulInteger"))
            accf = f"{name}_accf"
            new_nodes.append(helper.make_node("Cast", [acc], [accf], to=1))
            y1 = f"{name}_y1"
            new_nodes.append(helper.make_node("Mul", [accf, xs], [y1]))
            wsv = add_init(f"{name}_ws", value(ws).reshape(-1).numpy().astype(np.float32))
            out = node.output[0] if not bias else f"{name}_y2"
            new_nodes.append(helper.make_node("Mul", [y1, wsv], [out]))
            if bias:
                new_nodes.append(helper.make_node("Add", [out, bias], [node.output[0]]))
            report.matmulinteger += 1
        elif node.op_type == LLM_INT8_OP:  # two matmuls: int8 regular columns, float outlier columns
            nodes, decomposed = lower_llm_int8(name, name, ins, node.output[0], a["threshold"], value, add_init,
                                               report.float_fallback)
            new_nodes.extend(nodes)
            report.llm_int8 += decomposed
        elif node.op_type == "RMSNorm":  # ORT's kernel, registered in the ONNX domain
            new_nodes.append(helper.make_node("SimplifiedLayerNormalization", ins[:2], [node.output[0]],
                                              name=f"{name}_SimplifiedLayerNormalization", axis=-1,
                                              epsilon=a["epsilon"], stash_type=1))
            report.rms_norm += 1
        elif node.op_type == "RotateHalf":  # x @ P, P the signed permutation [x1, x2] -> [-x2, x1]
            d = _last_dim(g, ins[0])
            h = d // 2
            perm = np.zeros((d, d), dtype=np.float32)
            perm[np.arange(h) + h, np.arange(h)] = -1.0
            perm[np.arange(h), np.arange(h) + h] = 1.0
            p_name = f"rotate_half_{d}"
            if p_name not in inits:
                add_init(p_name, perm)
            new_nodes.append(helper.make_node("MatMul", [ins[0], p_name], [node.output[0]], name=f"{name}_MatMul"))
        else:
            raise UnsupportedOp(f"no ONNX lowering for qexport op {node.op_type}")
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    model.opset_import.extend([helper.make_opsetid(MS_DOMAIN, 1)])
    for i, imp in enumerate(list(model.opset_import)):
        if imp.domain == DOMAIN:
            del model.opset_import[i]
    return model


def _symbolic_dims(v) -> dict[int, Any]:
    return {d: s for d, s in enumerate(v.shape) if not isinstance(s, int)} if isinstance(v, torch.Tensor) else {}


def tensor_only(gm: fx.GraphModule) -> tuple[list[int], tuple | None]:
    """Make ``gm`` take tensors only: each symbolic-size (SymInt) input is re-derived from the tensor input
    that carries it (``aten.sym_size``). Returns the indices of the kept inputs and ``dynamic_shapes`` for
    export (None when the graph has static shapes). Raises UnsupportedOp when a size cannot be re-derived.
    """
    from torch.export import Dim

    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value") for n in ph]
    sym_inputs = [i for i, v in enumerate(values) if isinstance(v, torch.SymInt)]
    dynamic = bool(sym_inputs) or any(_symbolic_dims(v) for v in values)
    if not dynamic:
        return list(range(len(ph))), None
    where = {}
    for i, v in enumerate(values):
        for d, s in _symbolic_dims(v).items():
            where.setdefault(str(s), (ph[i], d))
    last = ph[-1]
    for i in sym_inputs:
        sym = str(values[i].node.expr)
        if sym not in where:
            raise UnsupportedOp(f"size {sym} of the graph is not the size of any tensor input")
        src, d = where[sym]
        with gm.graph.inserting_after(last):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (src, d))
        ph[i].replace_all_uses_with(size)
        gm.graph.erase_node(ph[i])
    gm.recompile()
    keep = [i for i in range(len(ph)) if i not in sym_inputs]
    dyn = tuple({d: Dim.DYNAMIC for d in _symbolic_dims(values[i])} or None for i in keep)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(gm.forward).parameters.values())
    return keep, ((dyn,) if varargs else dyn)


def export_graph(gm: fx.GraphModule, example_inputs, accuracy_level: int | None = None, dynamic_shapes=None):
    """ONNX model (with ORT contrib ops) of ``gm`` at the shapes of ``example_inputs``, and its report.

    Opset 23, where the exporter writes ``scaled_dot_product_attention`` (what the ``fuse_attention`` pass and
    Hugging Face's sdpa attention produce) as one ``Attention`` node instead of ~10 MatMul / Softmax / mask
    nodes."""
    report = LoweringReport()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes, dynamo=True,
                                 opset_version=ATTENTION_OPSET, custom_translation_table=_translations(),
                                 optimize=False, verbose=False, report=False)
    model = _rewrite(prog.model_proto, report, accuracy_level)
    report.attention = sum(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in model.graph.node)
    return model, report


def freeze_parameters(gm: fx.GraphModule, example_inputs) -> set[int]:
    """Turn the placeholders that stand for module parameters and buffers into constants of ``gm``.

    Dynamo passes a model's parameters to a back-end as graph inputs. Exported as ONNX inputs they would be
    converted and validated on every call (hundreds per step for an LLM) and ONNX Runtime could neither
    constant-fold nor pre-pack them. Frozen, they become initializers, as with inductor's freezing: the
    values read at compile time are the ones used. Returns the input positions that were frozen.
    """
    from qexport.passes.graph_utils import module_path_of_param, register_constant

    frozen = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or module_path_of_param(node) is None:
            continue
        name = register_constant(gm, f"frozen_{node.name}", value.detach())
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(name)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        frozen.add(i)
    gm.recompile()
    return frozen


class OrtGraph:
    """Runs a converted graph in ONNX Runtime.

    Parameters and buffers are frozen into the ONNX model (:func:`freeze_parameters`). A graph that dynamo
    traced with symbolic sizes is exported once with dynamic axes (its SymInt inputs re-derived from tensor
    shapes); a static graph is exported once per input shape signature. Sessions are cached.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs, accuracy_level: int | None = None,
                 threads: int | None = None):
        # A copy of the graph: dynamo reads the placeholders of the GraphModule it handed over to decide
        # what to pass at run time, so that one must keep its placeholders.
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        self.gm = fx.GraphModule(gm, graph)
        self.accuracy_level = accuracy_level
        self.threads = threads or torch.get_num_threads()
        self.sessions: dict[tuple, Any] = {}
        self.reports: list[LoweringReport] = []
        frozen = freeze_parameters(self.gm, example_inputs)
        self.fusions = [fuse_rmsnorm(self.gm), fuse_rotate_half(self.gm), fuse_gqa(self.gm), static_sizes(self.gm)]
        live = [i for i in range(len(example_inputs)) if i not in frozen]
        keep, self.dynamic_shapes = tensor_only(self.gm)
        self.keep = [live[i] for i in keep]  # positions in the arguments dynamo passes

    def _session(self, args):
        import re

        import onnxruntime as ort

        model, report = export_graph(self.gm, args, self.accuracy_level, self.dynamic_shapes)
        self.reports.append(report)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: ORT warns about ops it merely could not constant-fold
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        # Inputs are named after the graph's placeholders (``args_N`` for a varargs forward), in order.
        feeds = []
        for pos, inp in enumerate(sess.get_inputs()):
            m = re.fullmatch(r"args_(\d+)", inp.name)
            feeds.append((inp.name, int(m.group(1)) if m else pos))
        return sess, feeds

    def __call__(self, *args):
        targs = [args[i] for i in self.keep]
        if any(not isinstance(a, torch.Tensor) for a in targs):
            raise UnsupportedOp("ONNX Runtime target: a non-tensor graph input that is not a size")
        key = ("dynamic",) if self.dynamic_shapes else tuple((tuple(a.shape), a.dtype) for a in targs)
        if key not in self.sessions:
            self.sessions[key] = self._session(targs)
        sess, feeds = self.sessions[key]
        outs = sess.run(None, {name: targs[i].detach().contiguous().numpy() for name, i in feeds})
        return tuple(torch.from_numpy(o) for o in outs)
