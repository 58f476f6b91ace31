"""fuse_kv_attention: ``scaled_dot_product_attention`` and its KV-cache update -> ``torch.onnx.ops.attention``.

Matched on the torch-level graph after :func:`fuse_gqa` (which removes ``repeat_kv`` and sets ``enable_gqa``)::

    k = cat((past_k, k_new), -2); v = cat((past_v, v_new), -2)     # the cache update (optional)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, enable_gqa=...)   # 4-D q / k / v

becomes ONNX's ``Attention`` (opset 23) in its torch form, ``attention(q, k_new, v_new, mask, past_k, past_v,
scale=s)``, whose outputs are the attention and the present key / value (``concat(past, new)``, what the
``cat`` nodes gave their other users: the model's returned cache). Grouped-query heads are read as they are.
Without a cache update the node takes ``q, k, v`` alone. Not fused, with a reason: dropout, ``is_causal``
together with a past (SDPA aligns that mask top-left, ONNX bottom-right), inputs that are not 4-D.

Where the heads are split and merged around it as in Hugging Face's attention (``x.view(b, s, -1, d).transpose(1,
2)`` of each projection, the rotary embeddings of :func:`qexport.passes.fuse_rotary.fuse_rotary` on q and k, and
``out.transpose(1, 2).reshape(b, s, -1)``), the node reads the projections as they are, ``[batch, seq, heads *
head_dim]``, with ``q_num_heads`` / ``kv_num_heads``, and the rotations become 3-D ``RotaryEmbedding`` nodes with
``num_heads``: the reshapes and transposes go (SmolLM2 w4g128 in ONNX Runtime's optimized graph: 520 nodes instead
of 793). The cache keeps its ``[batch, kv_heads, seq, head_dim]`` layout.

Run by the ONNX targets only, after :func:`fuse_gqa`. On SmolLM2 each layer's attention, grouped-query head
mapping and cache update become one node. Counters: ``attention``, ``with_past``, ``heads_3d``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qexport.passes.fuse_gqa import SDPA
from qexport.passes.graph_utils import arg, erase_unused, is_call, node_value
from qexport.passes.pass_manager import PassResult

CAT = {torch.cat, torch.concat, torch.concatenate}
TRANSPOSE_1_2 = ((1, 2), (2, 1))


def _is_transpose_1_2(node) -> bool:
    return (isinstance(node, fx.Node) and is_call(node, {torch.transpose}, {"transpose"})
            and tuple(node.args[1:3]) in TRANSPOSE_1_2)


def _split_heads(t, rotary):
    """``(x, heads, rotation)`` when ``t`` is ``x.view(b, s, heads, d).transpose(1, 2)`` of a 3-D ``x`` ``[b, s,
    heads * d]``, possibly rotated (``rotary_embedding(., cos, sin)``, then ``rotation`` is that node); else None."""
    rotation = None
    if isinstance(t, fx.Node) and is_call(t, {rotary}) and len(t.args) == 3 and not t.kwargs:
        rotation, t = t, t.args[0]
    if not (_is_transpose_1_2(t) and len(t.users) == 1):
        return None
    view = t.args[0]
    if not (isinstance(view, fx.Node) and is_call(view, {torch.reshape}, {"view", "reshape"})
            and len(view.users) == 1):
        return None
    x = view.args[0]
    xv, vv = node_value(x), node_value(view)
    if xv is None or vv is None or xv.dim() != 3 or vv.dim() != 4 or not isinstance(vv.shape[2], int):
        return None
    if [str(d) for d in xv.shape[:2]] != [str(d) for d in vv.shape[:2]] or xv.shape[2] != vv.shape[2] * vv.shape[3]:
        return None
    return x, vv.shape[2], rotation


def _merged_heads(sdpa: fx.Node) -> fx.Node | None:
    """The node ``sdpa.transpose(1, 2)[.contiguous()].reshape(b, s, heads * d)`` (after reshapes that keep the
    shape, as transformers' sdpa integration writes one): the attention back in the ``[batch, seq, hidden]``
    layout, where it is the only reader; else None."""
    n = sdpa
    while len(n.users) == 1 and is_call(next(iter(n.users)), {torch.reshape}, {"reshape", "view"}):
        r, shape = next(iter(n.users)), [str(d) for d in getattr(node_value(n), "shape", ())]
        if not shape or [str(d) for d in getattr(node_value(r), "shape", ())] != shape:
            break
        n = r
    if len(n.users) != 1 or not _is_transpose_1_2(next(iter(n.users))):
        return None
    n = next(iter(n.users))
    while len(n.users) == 1 and is_call(next(iter(n.users)), (), {"contiguous"}):
        n = next(iter(n.users))
    r = next(iter(n.users)) if len(n.users) == 1 else None
    if r is None or not is_call(r, {torch.reshape}, {"reshape", "view"}):
        return None
    rv, ov = node_value(r), node_value(sdpa)
    ok = rv is not None and ov is not None and rv.dim() == 3 and rv.shape[2] == ov.shape[1] * ov.shape[3]
    return r if ok else None


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
    from torch.onnx.ops import attention, rotary_embedding

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
        heads = [_split_heads(t, rotary_embedding) for t in (q, k, v)]
        merged = _merged_heads(node)
        flat = (merged is not None and all(h is not None for h in heads) and heads[2][2] is None
                and heads[0][2] is not None and heads[1][2] is not None
                and heads[0][2].args[1:] == heads[1][2].args[1:])  # q and k rotated by the same cos / sin
        with g.inserting_before(node):
            if flat:  # the projections as they are: [batch, seq, heads * head_dim]
                (q3, hq, rq), (k3, hkv, rk), (v3, _, _) = heads
                q = g.call_function(rotary_embedding, (q3, *rq.args[1:]), {"num_heads": hq})
                k = g.call_function(rotary_embedding, (k3, *rk.args[1:]), {"num_heads": hkv})
                v, kwargs = v3, {**kwargs, "q_num_heads": hq, "kv_num_heads": hkv}
            fused = g.call_function(attention, (q, k, v, mask, past_k, past_v), kwargs)
            out = g.call_function(operator.getitem, (fused, 0))
            if past_k is not None:
                present_k = g.call_function(operator.getitem, (fused, 1))
                present_v = g.call_function(operator.getitem, (fused, 2))
        if flat:
            out.meta.update(merged.meta)
            merged.replace_all_uses_with(out)
            erase_unused(g, [merged])  # the merge, the SDPA node and the 4-D chains only it read
            result.count("heads_3d")
        else:
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
