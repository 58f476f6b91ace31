"""fold: evaluate what is constant once, and remove quantize / dequantize pairs that do nothing.

* scale computations on constants (``qexport.double_dequantize`` of an NF4 double-quantized scale, and
  any other op in ``FOLDABLE``) are run once and replaced by a constant (counter ``scales_folded``);
* ``quantize_per_tensor(dequantize_activation(q, s, z), s, z)`` is ``q`` itself (``qdq_pairs_removed``);
* constants no node uses any more are dropped from the module (``constants_removed``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import qexport.ops  # noqa: F401
from qexport.passes.graph_utils import erase_unused, register_constant
from qexport.passes.pass_manager import PassResult

Q = torch.ops.qexport
FOLDABLE = {Q.double_dequantize}


def _op(node: fx.Node):
    """The op packet of a call (``torch.ops.qexport.x`` whether the graph holds ``x`` or ``x.default``)."""
    return getattr(node.target, "overloadpacket", node.target)


def _const_value(gm: fx.GraphModule, a):
    if isinstance(a, fx.Node):
        if a.op != "get_attr":
            raise KeyError(a.name)
        obj = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part)
        return obj
    return a


def _same_constant(gm, a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "get_attr":
        return a.target == b.target or torch.equal(_const_value(gm, a), _const_value(gm, b))
    return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b


def fold(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("fold")
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if _op(node) in FOLDABLE:
            try:
                args = [_const_value(gm, a) for a in node.args]
            except KeyError:
                result.skip(node.name, "an input is not constant")
                continue
            value = node.target(*args)
            with g.inserting_before(node):
                const = g.get_attr(register_constant(gm, f"{node.name}_folded", value))
            node.replace_all_uses_with(const)
            erase_unused(g, [node])
            result.count("scales_folded")
        elif _op(node) is Q.quantize_per_tensor:
            src, scale, zp = node.args
            if isinstance(src, fx.Node) and src.op == "call_function" and _op(src) is Q.dequantize_activation:
                q, s2, z2 = src.args
                if _same_constant(gm, scale, s2) and zp == z2:
                    node.replace_all_uses_with(q)
                    erase_unused(g, [node])
                    result.count("qdq_pairs_removed")
                else:
                    result.skip(node.name, "dequantize -> quantize with different parameters (a real requantize)")
    erase_unused(g, [n for n in g.nodes if n.op == "get_attr" and not n.users])
    used = {n.target for n in g.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_buffers() if "." not in n and n.startswith(("qx_", "double_dequantize"))]:
        if name not in used:
            delattr(gm, name)
            result.count("constants_removed")
    return result
