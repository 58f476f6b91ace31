"""fuse_rmsnorm: RMSNorm written out by hand -> ``torch.nn.functional.rms_norm`` (float32 graphs, ONNX targets).

Matched on the torch-level graph, reading backwards from the final multiply (LlamaRMSNorm's form)::

    h = x.to(torch.float32)                      # optional cast
    v = h.pow(2).mean(-1, keepdim=True)          # pow(h, 2) or h * h; torch.mean or Tensor.mean
    y = h * torch.rsqrt(v + eps)                 # eps a Python number
    y = y.to(dtype)                              # optional cast
    out = weight * y                             # or y * weight; weight 1-D over the last dim

Every intermediate must have no other user, and ``h``, ``weight`` and ``out`` must be float32 (the
fused op computes in float32, as the pattern does). ``torch.onnx.export`` writes ``F.rms_norm`` as one
``RMSNormalization`` node (opset 23); on a SmolLM2 decode step that removes ~370 of ~2600 nodes. Not run for
inductor, which fuses the elementwise chain itself. Counters: ``rms_norm`` (fused), with skip reasons for
every rsqrt that looked like a norm but was not fused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qexport.passes.graph_utils import arg, is_call, node_value, replace_matches
from qexport.passes.pass_manager import PassResult

CAST_METHODS = {"to", "type", "float"}
MUL = ({operator.mul, torch.mul}, {"mul"})


def _skip_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in CAST_METHODS \
            and len(node.users) == 1:
        node = node.args[0]
    return node


def _is_square_of(node, h) -> bool:
    if is_call(node, {operator.pow, torch.pow}, {"pow"}):
        return node.args[0] is h and node.args[1] == 2
    return is_call(node, *MUL) and node.args[0] is h and node.args[1] is h


def _is_last_dim_mean(node) -> bool:
    if not is_call(node, {torch.mean}, {"mean"}):
        return False
    dim = arg(node, 1, "dim")
    keep = arg(node, 2, "keepdim", False)
    x = node_value(node.args[0])
    rank = x.dim() if x is not None else None
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return bool(keep) and len(dims) == 1 and (dims[0] == -1 or (rank is not None and dims[0] == rank - 1))


def _match(out: fx.Node, gm: fx.GraphModule):
    """``(h, weight, eps, nodes to erase)`` for a final multiply, None when it is no RMSNorm, or a reason."""
    if len(out.args) != 2 or not all(isinstance(a, fx.Node) for a in out.args):
        return None
    for weight, y in (out.args, out.args[::-1]):
        z = _skip_casts(y)
        if not (is_call(z, *MUL) and len(z.users) == 1):
            continue
        for h0, r in (z.args, z.args[::-1]):
            if not (isinstance(r, fx.Node) and is_call(r, {torch.rsqrt}, {"rsqrt"})):
                continue
            a = r.args[0]
            if not (isinstance(a, fx.Node) and is_call(a, {operator.add, torch.add}, {"add"})
                    and isinstance(a.args[1], (int, float))):
                return None
            v = a.args[0]
            if not (isinstance(v, fx.Node) and _is_last_dim_mean(v)):
                return None
            if not (isinstance(v.args[0], fx.Node) and _is_square_of(v.args[0], h0)):
                return None
            if any(len(n.users) != 1 for n in (r, a, v, v.args[0])):
                return "an intermediate of the norm has other users"
            vals = [node_value(h0), node_value(weight, gm), node_value(out)]
            if any(t is None for t in vals):
                return "unknown dtypes or shapes"
            if any(t.dtype != torch.float32 for t in vals):
                return "not float32"
            if vals[1].dim() != 1 or vals[1].shape[0] != vals[0].shape[-1]:
                return "the weight is not one value per element of the last dimension"
            return h0, weight, float(a.args[1])
    return None


def fuse_rmsnorm(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("fuse_rmsnorm")

    def build(g: fx.Graph, node: fx.Node, parts) -> fx.Node:
        h, weight, eps = parts
        return g.call_function(torch.nn.functional.rms_norm, (h, (node_value(h).shape[-1],), weight, eps))

    replace_matches(gm, result, lambda n: is_call(n, *MUL), lambda n: _match(n, gm), build, "rms_norm")
    gm.graph.lint()
    gm.recompile()
    return result
