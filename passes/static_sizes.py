"""static_sizes: symbolic sizes in reshape / view / expand replaced by -1 where that means the same.

A graph traced with dynamic shapes carries sizes such as the KV length as SymInt values: grouped-query
attention's ``repeat_kv`` is ``x[:, :, None].expand(b, kv, n_rep, L, d).reshape(b, kv * n_rep, L, d)``
with ``L`` symbolic. Exported to ONNX, each such size becomes a chain of Shape / Gather / Unsqueeze /
Concat nodes computed at run time. Rewritten here (ONNX Runtime target):

- ``reshape`` / ``view`` with exactly one symbolic size and no ``-1``: that size becomes ``-1`` (the
  element count fixes it);
- ``expand``: a symbolic size equal to the input's size in the same (right-aligned) dimension becomes
  ``-1`` (keep that dimension).

The shapes are then constants. Counters: ``reshape``, ``expand``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qexport.passes.graph_utils import is_call
from qexport.passes.pass_manager import PassResult

RESHAPE = ({torch.reshape}, {"reshape", "view"})
EXPAND = ((), {"expand"})


def _sizes(node: fx.Node) -> tuple[list, bool] | None:
    """The size arguments of a reshape/view/expand call and whether they came as one tuple."""
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0]), True
    if "size" in node.kwargs or "shape" in node.kwargs:
        return None
    return rest, False


def _sym(value) -> object | None:
    """The sympy expression of a SymInt node's value (None for anything else)."""
    if isinstance(value, fx.Node):
        v = value.meta.get("example_value", value.meta.get("val"))
        if isinstance(v, torch.SymInt):
            return v.node.expr
    return None


def _rewrite(node: fx.Node, sizes: list, packed: bool) -> None:
    x = node.args[0]
    node.args = (x, tuple(sizes)) if packed else (x, *sizes)


def static_sizes(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("static_sizes")
    for node in list(gm.graph.nodes):
        reshape, expand = is_call(node, *RESHAPE), is_call(node, *EXPAND)
        if not (reshape or expand) or not node.args:
            continue
        got = _sizes(node)
        if got is None:
            continue
        sizes, packed = got
        if any(isinstance(s, fx.Node) and _sym(s) is None for s in sizes):
            result.skip(node.name, "a size argument is not a number or a symbolic size (a shape tuple)")
            continue
        symbolic = [i for i, s in enumerate(sizes) if isinstance(s, fx.Node)]
        if not symbolic:
            continue
        if reshape:
            if len(symbolic) != 1 or -1 in sizes:
                result.skip(node.name, "more than one size is unknown")
                continue
            sizes[symbolic[0]] = -1
            _rewrite(node, sizes, packed)
            result.count("reshape")
            continue
        x = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(x, torch.Tensor):
            continue
        offset = len(sizes) - x.dim()
        changed = False
        for i in symbolic:
            j = i - offset
            expr = _sym(sizes[i])
            if j >= 0 and expr is not None and isinstance(x.shape[j], torch.SymInt) and x.shape[j].node.expr == expr:
                sizes[i] = -1
                changed = True
        if changed:
            _rewrite(node, sizes, packed)
            result.count("expand")
        if any(isinstance(s, fx.Node) for s in sizes):
            result.skip(node.name, "a symbolic expand size is not the input's size")
    gm.graph.lint()
    gm.recompile()
    return result
