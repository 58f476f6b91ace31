"""fuse_gqa: grouped-query attention's ``repeat_kv`` copies removed, SDPA told ``enable_gqa=True``.

Hugging Face's sdpa attention repeats each key / value head ``n_rep`` times before
``scaled_dot_product_attention`` whenever there is a mask (Llama, Mistral, Qwen2 ...)::

    k = key[:, :, None, :, :].expand(b, kv, n_rep, L, d).reshape(b, kv * n_rep, L, d)   # same for value
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, ...)

SDPA computes exactly this with ``enable_gqa=True`` and the ``kv``-head tensors (query head ``h`` reads
key / value head ``h // n_rep``, which is what ``repeat_kv``'s interleaved copy gives), and ONNX's
``Attention`` (opset 23, the ONNX Runtime target's lowering) reads grouped heads as they are. Matched on the
torch-level graph; the copies are removed when nothing else reads them. Counter: ``gqa`` (one per SDPA call).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from qexport.passes.graph_utils import arg, erase_unused, is_call, node_value
from qexport.passes.pass_manager import PassResult

SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _repeated(node) -> tuple[fx.Node, int] | None:
    """``(x, n_rep)`` when ``node`` is ``x[:, :, None, :, :].expand(b, kv, n_rep, L, d).reshape(b, kv * n_rep, L, d)``
    of a 4-D ``x``."""
    if not (isinstance(node, fx.Node) and is_call(node, {torch.reshape}, {"reshape", "view"})):
        return None
    exp = node.args[0]
    if not (isinstance(exp, fx.Node) and is_call(exp, (), {"expand"})):
        return None
    item = exp.args[0]
    if not (isinstance(item, fx.Node) and item.op == "call_function" and item.target is operator.getitem):
        return None
    x, idx = item.args
    full = slice(None, None, None)
    if idx not in ((full, full, None, full, full), (full, full, None)):
        return None
    xv, ev, rv = node_value(x), node_value(exp), node_value(node)
    if not all(isinstance(v, torch.Tensor) for v in (xv, ev, rv)) or xv.dim() != 4 or ev.dim() != 5:
        return None
    n_rep = ev.shape[2]
    if not isinstance(n_rep, int) or n_rep < 1 or rv.dim() != 4 or rv.shape[1] != xv.shape[1] * n_rep:
        return None
    # only the new axis may be broadcast (sizes compared as text: symbolic sizes are the same symbol)
    same = lambda a, b: [str(d) for d in a] == [str(d) for d in b]  # noqa: E731
    if not (same([ev.shape[i] for i in (0, 1, 3, 4)], xv.shape) and same([rv.shape[0], *rv.shape[2:]],
                                                                         [xv.shape[0], *xv.shape[2:]])):
        return None
    return x, n_rep


def fuse_gqa(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("fuse_gqa")
    g = gm.graph
    for node in list(g.nodes):
        if not is_call(node, SDPA) or node.kwargs.get("enable_gqa"):
            continue
        key, value = arg(node, 1, "key"), arg(node, 2, "value")
        rk, rv = _repeated(key), _repeated(value)
        if rk is None and rv is None:
            continue
        if rk is None or rv is None or rk[1] != rv[1]:
            result.skip(node.name, "key and value are not repeated alike")
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for pos, name, new in ((1, "key", rk[0]), (2, "value", rv[0])):
            if len(args) > pos:
                args[pos] = new
            else:
                kwargs[name] = new
        node.args, node.kwargs = tuple(args), {**kwargs, "enable_gqa": True}
        erase_unused(g, [key, value])
        result.count("gqa")
    g.lint()
    gm.recompile()
    return result
