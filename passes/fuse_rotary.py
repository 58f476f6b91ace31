"""fuse_rotary: rotary position embeddings written out -> ``torch.onnx.ops.rotary_embedding`` (ONNX targets).

Matched on the torch-level graph, in the form of Hugging Face's ``apply_rotary_pos_emb`` (Llama, Mistral,
Qwen2 / 3, Gemma, Phi-3 without partial rotary)::

    c = cos.unsqueeze(1); s = sin.unsqueeze(1)                 # cos, sin: [batch, seq, d]
    out = x * c + cat((-x[..., d // 2:], x[..., :d // 2]), -1) * s     # x: [batch, heads, seq, d]

and only where ``cos`` / ``sin`` repeat their first half, which the pass checks on the graph: each must be
``cos`` / ``sin`` of ``cat((f, f), -1)`` up to casts and a scaling by a number (Hugging Face's rotary
modules). The replacement, ONNX's ``RotaryEmbedding`` (opset 23) in its torch form, takes that half:
``rotary_embedding(x, cos[..., :d // 2], sin[..., :d // 2])``, the halves sliced once per ``cos`` for all
layers. The arithmetic is the same (``x1 * c - x2 * s``, ``x2 * c + x1 * s``). On SmolLM2 this is one node
per rotation instead of eight.

Run by the ONNX targets only (the compile back-end's ONNX Runtime target and ``qexport export`` for ONNX
Runtime); inductor fuses the elementwise chain itself and TensorRT's export keeps opset 21. Counter:
``rotary``; skip reasons for additions that look like a rotation but are not fused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qexport.passes.graph_utils import arg, is_call, node_value, replace_matches
from qexport.passes.pass_manager import PassResult

MUL = ({operator.mul, torch.mul}, {"mul"})
ADD = ({operator.add, torch.add}, {"add"})
CASTS = {"to", "type", "float"}


def _half_slice(node, x, first: bool, half: int) -> bool:
    """``node`` is ``x[..., :half]`` (``first``) or ``x[..., half:]``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[0] is x):
        return False
    idx = node.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)):
        return False
    s = idx[1]
    if s.step not in (None, 1):
        return False
    return (s.start in (None, 0) and s.stop == half) if first else (s.start == half and s.stop is None)


def _rotated_half_of(node) -> fx.Node | None:
    """``x`` when ``node`` is ``cat((-x[..., h:], x[..., :h]), -1)`` of a tensor ``x`` with last dimension 2h."""
    if not (isinstance(node, fx.Node) and is_call(node, {torch.cat, torch.concat, torch.concatenate})):
        return None
    parts, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim == -1):
        return None
    neg, x1 = parts
    if not (isinstance(neg, fx.Node) and is_call(neg, {operator.neg, torch.neg}, {"neg"})):
        return None
    x2 = neg.args[0]
    x = x2.args[0] if isinstance(x2, fx.Node) and x2.args else None
    val = node_value(x)
    if val is None or not isinstance(val.shape[-1], int) or val.shape[-1] % 2:
        return None
    half = val.shape[-1] // 2
    return x if _half_slice(x1, x, True, half) and _half_slice(x2, x, False, half) else None


def _unsqueezed(node) -> fx.Node | None:
    """``t`` when ``node`` is ``t.unsqueeze(1)`` (or ``torch.unsqueeze(t, 1)``)."""
    if isinstance(node, fx.Node) and is_call(node, {torch.unsqueeze}, {"unsqueeze"}) and arg(node, 1, "dim") == 1:
        return node.args[0]
    return None


def _repeats_its_half(node, fn) -> bool:
    """``node`` is ``fn(cat((f, f), -1))`` up to casts and multiplication by a number (``fn`` cos or sin)."""
    while isinstance(node, fx.Node):
        if node.op == "call_method" and node.target in CASTS:
            node = node.args[0]
        elif is_call(node, *MUL) and any(isinstance(a, (int, float)) for a in node.args[:2]):
            node = next(a for a in node.args[:2] if isinstance(a, fx.Node))
        elif is_call(node, {fn}, {fn.__name__}):
            inner = node.args[0]
            if not (isinstance(inner, fx.Node) and is_call(inner, {torch.cat, torch.concat, torch.concatenate})):
                return False
            parts, dim = arg(inner, 0, "tensors"), arg(inner, 1, "dim", 0)
            return isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] is parts[1] and dim in (-1, 2)
        else:
            return False
    return False


def _match(add: fx.Node):
    """``(x, cos, sin)`` for an addition that is a rotation of ``x``, None when it is no rotation, or a reason."""
    if len(add.args) != 2 or not all(isinstance(a, fx.Node) and is_call(a, *MUL) for a in add.args):
        return None
    for m1, m2 in (add.args, add.args[::-1]):
        for x, c in (m1.args[:2], m1.args[1::-1]):
            for r, s in (m2.args[:2], m2.args[1::-1]):
                if not isinstance(r, fx.Node) or _rotated_half_of(r) is not x:
                    continue
                cos, sin = _unsqueezed(c), _unsqueezed(s)
                xv = node_value(x)
                if cos is None or sin is None or xv is None or xv.dim() != 4:
                    return "not a [batch, heads, seq, head_dim] input with cos / sin unsqueezed at dimension 1"
                if not (_repeats_its_half(cos, torch.cos) and _repeats_its_half(sin, torch.sin)):
                    return "cos / sin are not shown to repeat their first half"
                cv = node_value(cos)
                if cv is None or cv.dim() != 3 or cv.shape[-1] != xv.shape[-1]:
                    return "cos does not cover the whole head dimension (partial rotary)"
                return x, cos, sin
    return None


def fuse_rotary(gm: fx.GraphModule, ctx=None) -> PassResult:
    from torch.onnx.ops import rotary_embedding

    result = PassResult("fuse_rotary")
    g = gm.graph
    halves: dict[fx.Node, fx.Node] = {}  # cos / sin -> its first half, sliced once for every layer

    def half(t: fx.Node, x: fx.Node, at: fx.Node) -> fx.Node:
        """``t[..., :d/2]`` with the batch of ``x``, made before ``at``, the first rotation that reads ``t``: later
        ones reuse it (position ids of batch 1 give one cos for every row; ONNX's RotaryEmbedding wants one per
        row)."""
        if t not in halves:
            with g.inserting_before(at):
                h = g.call_function(operator.getitem, (t, (Ellipsis, slice(None, node_value(t).shape[-1] // 2, None))))
                if str(node_value(t).shape[0]) != str(node_value(x).shape[0]):
                    h = g.call_method("expand", (h, g.call_method("size", (x, 0)), -1, -1))
            halves[t] = h
        return halves[t]

    def build(g: fx.Graph, node: fx.Node, parts) -> fx.Node:
        x, cos, sin = parts
        return g.call_function(rotary_embedding, (x, half(cos, x, node), half(sin, x, node)))

    replace_matches(gm, result, lambda n: is_call(n, *ADD), _match, build, "rotary")
    g.lint()
    gm.recompile()
    return result
