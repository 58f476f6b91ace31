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
from qexport.passes.graph_utils import constant_value, drop_unused_constants, erase_unused, op_packet, register_constant
from qexport.passes.pass_manager import PassResult

Q = torch.ops.qexport
FOLDABLE = {Q.double_dequantize}


def _same_constant(gm, a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "get_attr":
        return a.target == b.target or torch.equal(constant_value(gm, a), constant_value(gm, b))
    return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b


def fold(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("fold")
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if op_packet(node) in FOLDABLE:
            try:
                args = [constant_value(gm, a) for a in node.args]
            except KeyError:
                result.skip(node.name, "an input is not constant")
                continue
            value = node.target(*args)
            with g.inserting_before(node):
                const = g.get_attr(register_constant(gm, f"{node.name}_folded", value))
            node.replace_all_uses_with(const)
            erase_unused(g, [node])
            result.count("scales_folded")
        elif op_packet(node) is Q.quantize_per_tensor:
            src, scale, zp = node.args
            if isinstance(src, fx.Node) and src.op == "call_function" and op_packet(src) is Q.dequantize_activation:
                q, s2, z2 = src.args
                if _same_constant(gm, scale, s2) and zp == z2:
                    node.replace_all_uses_with(q)
                    erase_unused(g, [node])
                    result.count("qdq_pairs_removed")
                else:
                    result.skip(node.name, "dequantize -> quantize with different parameters (a real requantize)")
    dropped = drop_unused_constants(gm, ("qx_", "double_dequantize"))
    if dropped:
        result.count("constants_removed", dropped)
    return result
