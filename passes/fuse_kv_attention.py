"""fuse_kv_attention: ``scaled_dot_product_attention`` and its KV-cache update -> ``torch.onnx.ops.attention``.

Matched on the torch-level graph after :func:`fuse_gqa` (which removes ``repeat_kv`` and sets ``enable_gqa``)::

    k = cat((past_k, k_new), -2); v = cat((past_v, v_new), -2)     # the cache update (optional)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, enable_gqa=...)   # 4-D q / k / v

becomes ONNX's ``Attention`` (opset 23) in its torch form, ``attention(q, k_new, v_new, mask, past_k, past_v,
scale=s)``, whose outputs are the attention and the present key / value (``concat(past, new)``, what the
``cat`` nodes gave their other users: the model's returned cache). Grouped-query heads are read as they are.
Without a cache update the node takes ``q, k, v`` alone. Not fused, with a reason: dropout, ``is_causal``
together with a past (SDPA aligns that mask top-left, ONNX bottom-right), inputs that are not 4-D.

Run by the ONNX targets only, after :func:`fuse_gqa`. On SmolLM2 each layer's attention, grouped-query head
mapping and cache update become one node. Counters: ``attention``, ``with_past``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qexport.passes.fuse_gqa import SDPA
from qexport.passes.graph_utils import arg, erase_unused, is_call, node_value
from qexport.passes.pass_manager import PassResult

CAT = {torch.cat, torch.concat, torch.concatenate}


def _cache_update(node) -> tuple[fx.Node, fx.Node] | None:
    """``(past, new)`` when ``node`` is ``cat((past, new), -2)`` of 4-D tensors."""
    if not (isinstance(node, fx.Node) and is_call(node, CAT)):
        return None
    parts, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-2, 2)):
        return None
    vals = [node_value(p) for p in parts]
    if any(v is None or v.dim() != 4 for v in vals):
        return None
    return parts[0], parts[1]


def _match(node: fx.Node, order: dict[fx.Node, int]):
    """``(q, k, v, mask, past_k, past_v, is_causal, scale)`` of an SDPA call, or the reason it is not fused."""
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask, dropout = arg(node, 3, "attn_mask"), arg(node, 4, "dropout_p", 0.0)
    is_causal, scale = bool(arg(node, 5, "is_causal", False)), arg(node, 6, "scale")
    if dropout not in (0, 0.0):
        return "dropout"
    if any(node_value(t) is None or node_value(t).dim() != 4 for t in (q, k, v)):
        return "query, key and value are not all 4-D with known shapes"
    if scale is not None and not isinstance(scale, (int, float)):
        return "the scale is not a number"
    ck, cv = _cache_update(k), _cache_update(v)
    if (ck is None) != (cv is None):
        return "only one of key and value is a cache update"
    if ck is not None and is_causal:
        return "is_causal with a past: SDPA aligns the causal mask top-left, ONNX's Attention bottom-right"
    if ck is None:
        return q, k, v, mask, None, None, is_causal, scale
    if any(order[u] < order[node] for t in (k, v) for u in t.users if u is not node):
        return "the updated cache is read before the attention"
    return q, ck[1], cv[1], mask, ck[0], cv[0], is_causal, scale


def fuse_kv_attention(gm: fx.GraphModule, ctx=None) -> PassResult:
    from torch.onnx.ops import attention

    result = PassResult("fuse_kv_attention")
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for node in list(g.nodes):
        if not is_call(node, SDPA):
            continue
        m = _match(node, order)
        if isinstance(m, str):
            result.skip(node.name, m)
            continue
        q, k, v, mask, past_k, past_v, is_causal, scale = m
        key, value = arg(node, 1, "key"), arg(node, 2, "value")
        kwargs = {"is_causal": is_causal, **({"scale": float(scale)} if scale is not None else {})}
        with g.inserting_before(node):
            fused = g.call_function(attention, (q, k, v, mask, past_k, past_v), kwargs)
            out = g.call_function(operator.getitem, (fused, 0))
            if past_k is not None:
                present_k = g.call_function(operator.getitem, (fused, 1))
                present_v = g.call_function(operator.getitem, (fused, 2))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        if past_k is not None:  # the cache update's other users (the returned cache) read the present outputs
            present_k.meta.update(key.meta)
            present_v.meta.update(value.meta)
            key.replace_all_uses_with(present_k)
            value.replace_all_uses_with(present_v)
            erase_unused(g, [key, value])
            result.count("with_past")
        result.count("attention")
    g.lint()
    gm.recompile()
    return result
