"""convert: replace annotated float ops by the canonical quantized form.

* weight-only linear / matmul -> ``qexport.qlinear(x, packed weight constants ...)``
* dynamic W8A8 -> ``qexport.quantize_per_token(x)`` then ``qexport.qlinear_a8``
* LLM.int8() (an activation spec with ``outlier_threshold``) -> ``qexport.qlinear_llm_int8``
* static W8A8 -> ``qexport.quantize_per_tensor(x, calibrated scale)`` then ``qexport.qlinear_a8``;
  the observer inserted by ``prepare`` is removed
* conv -> the same conv on ``qexport.dequantize_weight(...)`` (weights stored packed)
* embedding lookup -> ``qexport.qembedding(indices, packed table constants ...)``

A weight that several annotated nodes read with one spec (a tied embedding and lm_head) is quantized once
and its constants are shared.

Packed weights, scales and zero points become buffers of the GraphModule (``get_attr`` constants); a
double-quantized NF4 scale becomes a ``qexport.double_dequantize`` node on constants, which ``fold``
evaluates once. A layer whose weight cannot be quantized (NaN/inf) stays float, with a warning.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qexport.ops  # noqa: F401  (registers torch.ops.qexport.*)
from qexport.config import Granularity
from qexport.errors import QExportError
from qexport.formats import quantize_weight
from qexport.modules import activation_qparams
from qexport.passes.context import QuantContext, act_range_for
from qexport.passes.graph_utils import register_constant
from qexport.passes.pass_manager import PassResult
from qexport.passes.prepare import ActObserver

Q = torch.ops.qexport


def _const(gm: fx.GraphModule, graph: fx.Graph, prefix: str, tensor: torch.Tensor) -> fx.Node:
    return graph.get_attr(register_constant(gm, prefix, tensor))


def _unwrap_observer(gm: fx.GraphModule, x):
    if isinstance(x, fx.Node) and x.op == "call_module" and isinstance(gm.get_submodule(x.target), ActObserver):
        return x.args[0], x
    return x, None


def convert(gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
    result = PassResult("convert")
    g = gm.graph
    shared: dict[tuple, tuple] = {}  # (weight parameter, spec) -> (QuantizedWeight, {tensor name: constant})
    for node in list(g.nodes):
        ann = node.meta.get("qexport")
        if ann is None:
            continue
        x, observer = _unwrap_observer(gm, node.args[ann.input_index])
        key = (id(ann.weight_key), ann.weight_spec) if ann.weight_key is not None else None
        try:
            if key in shared:
                qw, consts = shared[key]
            else:
                qw, consts = quantize_weight(ann.weight, ann.weight_spec, name=ann.module_path), {}
                if key is not None:
                    shared[key] = (qw, consts)
        except QExportError as e:
            warnings.warn(f"qexport: {ann.module_path} stays float: {e}", stacklevel=2)
            result.skip(ann.module_path, str(e))
            if observer is not None:
                observer.replace_all_uses_with(x)
                g.erase_node(observer)
            del node.meta["qexport"]
            continue
        prefix = f"qx_{ann.module_path or node.name}"
        def const(suffix: str, tensor: torch.Tensor) -> fx.Node:
            if suffix not in consts:
                consts[suffix] = register_constant(gm, f"{prefix}_{suffix}", tensor)
            return g.get_attr(consts[suffix])

        with g.inserting_before(node):
            qdata = const("qdata", qw.qdata)
            if qw.double_quant is not None:
                dq = qw.double_quant
                scale = g.call_function(Q.double_dequantize.default, (
                    _const(gm, g, f"{prefix}_qscale", dq.qscale), _const(gm, g, f"{prefix}_scale2", dq.scale2),
                    _const(gm, g, f"{prefix}_scale_offset", dq.offset), dq.block))
            else:  # (a GGML format's scales are inside its blocks: an empty tensor)
                scale = const("scale", qw.scales())
            zp = const("zero_point", qw.zero_point) if qw.zero_point is not None else None
            bias = ann.bias
            if isinstance(bias, torch.Tensor):
                bias = _const(gm, g, f"{prefix}_bias", bias.detach())
            spec = qw.spec  # the stored format: a GGML K-quant may fall back to another type on this layer's K
            wargs = (spec.format.value, spec.bits, qw.group, qw.shape[1], spec.symmetric)

            if ann.kind == "conv":
                out = _convert_conv(gm, g, node, ann, qdata, scale, zp, wargs)
                result.count("conv")
            elif ann.kind == "embedding":
                out = g.call_function(Q.qembedding.default, (x, qdata, scale, zp, *wargs))
                if ann.weight.dtype != torch.float32:
                    out = g.call_method("to", (out, ann.weight.dtype))
                result.count("embedding")
            elif ann.act_spec is None:
                out = g.call_function(Q.qlinear.default, (x, qdata, scale, zp, bias, *wargs))
                out.meta["qexport_layer"] = ann.module_path
                if "example_value" in node.meta:  # the same shape and dtype as the float linear's output
                    out.meta["example_value"] = node.meta["example_value"]
                result.count("qlinear")
            else:
                out = _convert_w8a8(gm, g, x, ann, qdata, scale, bias, wargs, prefix, result)
        out.meta.update({k: v for k, v in node.meta.items() if k not in ("qexport", "val", "example_value")})
        node.replace_all_uses_with(out)
        g.erase_node(node)
        if observer is not None:
            observer.replace_all_uses_with(x)
            g.erase_node(observer)
        result.count("layers")
    gm.delete_all_unused_submodules()
    return result


def _convert_w8a8(gm, g, x, ann, qdata, scale, bias, wargs, prefix, result):
    a = ann.act_spec
    if a.outlier_threshold is not None:
        y = g.call_function(Q.qlinear_llm_int8.default, (x, qdata, scale, bias, a.outlier_threshold))
        result.count("llm_int8")
        return g.call_method("type_as", (y, x))
    if a.dynamic:
        quant = Q.quantize_per_token if a.granularity is Granularity.PER_TOKEN else Q.quantize_per_tensor_dynamic
        t = g.call_function(quant.default, (x,))
        xq = g.call_function(operator.getitem, (t, 0))
        xs = g.call_function(operator.getitem, (t, 1))
        zp = 0
        result.count("w8a8_dynamic")
    else:
        rng = act_range_for(ann.weight_key)
        if not rng.observed:
            result.skip(ann.module_path, "no calibration data reached this layer: weights only")
            y = g.call_function(Q.qlinear.default, (x, qdata, scale, None, bias, *wargs))
            y.meta["qexport_layer"] = ann.module_path
            return y
        s, zp = activation_qparams(rng.lo, rng.hi, a)
        xs = _const(gm, g, f"{prefix}_act_scale", s)
        xq = g.call_function(Q.quantize_per_tensor.default, (x, xs, zp))
        result.count("w8a8_static")
    y = g.call_function(Q.qlinear_a8.default, (xq, xs, zp, qdata, scale, bias))
    y.meta["qexport_layer"] = ann.module_path
    return g.call_method("type_as", (y, x))


def _convert_conv(gm, g, node, ann, qdata, scale, zp, wargs):
    w = g.call_function(Q.dequantize_weight.default, (qdata, scale, zp, *wargs))
    w = g.call_method("reshape", (w, tuple(ann.weight_key.shape)))
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        fn = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
        bias = _const(gm, g, f"qx_{ann.module_path}_bias", mod.bias.detach()) if mod.bias is not None else None
        if mod.padding_mode != "zeros":
            raise QExportError(f"{ann.module_path}: conv padding_mode {mod.padding_mode!r} is not supported")
        return g.call_function(fn, (node.args[0], w, bias, mod.stride, mod.padding, mod.dilation, mod.groups))
    args = list(node.args)
    args[1] = w
    return g.call_function(node.target, tuple(args), dict(node.kwargs))
