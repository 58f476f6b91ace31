"""fuse_attention: attention written out by hand -> ``scaled_dot_product_attention``.

Matched (on the torch-level graph), reading backwards from the final matmul::

    scores = q @ k.transpose(-2, -1)            # transpose of the last two dims (also 2,3 on 4-D / mT)
    scores = scores * c   |  scores / c          # optional, c a Python number
    scores = scores + mask                       # optional additive float mask
    probs  = softmax(scores, dim=-1)             # F.softmax / torch.softmax / Tensor.softmax
    probs  = probs.to(dtype)                     # optional cast
    probs  = dropout(probs, p, training=False)   # optional; p == 0 or not training
    out    = probs @ v

Repeated K/V heads (grouped-query attention's ``repeat_kv``) are passed through unchanged. Each
intermediate must have no other user (if the attention weights are also returned, nothing is fused),
softmax must run over the last dimension, and the scale must be a constant. Counters: ``sdpa`` (fused),
with skip reasons for every softmax that looked like attention but was not fused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from qexport.passes.graph_utils import TRANSPOSE_FUNCS, arg, is_call, is_matmul, is_softmax, replace_matches
from qexport.passes.pass_manager import PassResult

DROPOUT_FUNCS = {F.dropout, torch.dropout}
CAST_METHODS = {"to", "type", "float", "type_as"}


def _rank(node) -> int | None:
    """Rank from dynamo's example values, aot's fake values, or ShapeProp's tensor_meta; None if unknown."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return val.dim()
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_last_two_transpose(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "transpose" or is_call(node, TRANSPOSE_FUNCS):
        d0, d1 = sorted(int(d) for d in node.args[1:3])
        rank = _rank(node)
        if (d0, d1) == (-2, -1):
            return True
        return rank is not None and (d0, d1) in {(rank - 2, rank - 1), (-2, rank - 1), (rank - 2, -1)}
    return node.op == "call_function" and node.target is getattr and node.args[1] == "mT"


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = arg(node, 1, "dim")
    if node.op == "call_method":  # x.softmax(dim)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim == -1:
        return True
    rank = _rank(node.args[0])
    return rank is not None and dim == rank - 1


def _match(node: fx.Node):
    """For a final matmul ``node``, the pieces of the attention it ends, or a reason it is not one."""
    probs = node.args[0]
    v = node.args[1]
    if not isinstance(probs, fx.Node):
        return None
    cur = probs
    # dropout, cast (in either order), back to softmax
    for _ in range(3):
        if is_call(cur, DROPOUT_FUNCS):
            p = arg(cur, 1, "p", 0.5)
            training = arg(cur, 2, "training", True)
            if p and training:
                return "dropout is active (training) between softmax and matmul"
            if not _single_user(cur):
                return "dropout output has other users"
            cur = cur.args[0]
        elif cur.op == "call_method" and cur.target in CAST_METHODS:
            if not _single_user(cur):
                return "cast output has other users"
            cur = cur.args[0]
        else:
            break
    if not is_softmax(cur):
        return None
    softmax = cur
    if not _softmax_dim_is_last(softmax):
        return "softmax is not over the last dimension"
    if not _single_user(softmax):
        return "attention weights have other users (returned or reused)"
    cur = softmax.args[0]
    mask = None
    scale = 1.0
    if isinstance(cur, fx.Node) and is_call(cur, {operator.add, torch.add}, {"add"}):
        a, b = cur.args[0], cur.args[1]
        if not _single_user(cur):
            return "masked scores have other users"
        if isinstance(a, fx.Node) and (is_matmul(a) or is_call(a, {operator.mul, operator.truediv, torch.mul, torch.div},
                                                                 {"mul", "div"})):
            cur, mask = a, b
        else:
            cur, mask = b, a
        if not isinstance(mask, fx.Node):
            return "mask is not a tensor"
    if isinstance(cur, fx.Node) and is_call(cur, {operator.mul, torch.mul, operator.truediv, torch.div}, {"mul", "div"}):
        a, c = cur.args[0], cur.args[1]
        div = cur.target in (operator.truediv, torch.div) or cur.target == "div"
        if isinstance(a, (int, float)) and not div:
            a, c = c, a
        if not isinstance(c, (int, float)) or not isinstance(a, fx.Node):
            return "scale is not a constant number"
        if not _single_user(cur):
            return "scaled scores have other users"
        scale = 1.0 / float(c) if div else float(c)
        cur = a
    if not (isinstance(cur, fx.Node) and is_matmul(cur)):
        return "softmax input is not a matmul of queries and keys"
    if not _single_user(cur):
        return "raw scores have other users"
    q, kt = cur.args[0], cur.args[1]
    if not _is_last_two_transpose(kt):
        return "keys are not transposed over the last two dimensions"
    k = kt.args[0]
    if not (_rank(q) in (None, 3, 4) and _rank(k) in (None, 3, 4) and _rank(v) in (None, 3, 4)):
        return "queries/keys/values are not 3-D or 4-D"
    return q, k, v, mask, scale


def fuse_attention(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("fuse_attention")

    def build(g: fx.Graph, node: fx.Node, parts) -> fx.Node:
        q, k, v, mask, scale = parts
        return g.call_function(F.scaled_dot_product_attention, (q, k, v),
                               {"attn_mask": mask, "dropout_p": 0.0, "scale": scale})

    replace_matches(gm, result, is_matmul, _match, build, "sdpa")
    return result
