"""Helpers shared by the passes: recognising ops, finding the parameter behind a node, naming modules.

The passes run on the torch-level FX graph that dynamo hands to a back-end (parameters are placeholders
whose source names give the module path) and on graphs from ``torch.fx.symbolic_trace`` (parameters are
``get_attr`` nodes or ``call_module`` nodes of ``nn.Linear`` / ``nn.Conv2d``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

LINEAR_FUNCS = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
CONV_FUNCS = {torch.conv1d, torch.conv2d, F.conv1d, F.conv2d}
SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.ops.aten.softmax.int}
TRANSPOSE_FUNCS = {torch.transpose, torch.ops.aten.transpose.int}
EMBEDDING_FUNCS = {F.embedding}  # (input, weight, padding_idx, max_norm, ...)
EMBEDDING_WEIGHT_FIRST = {torch.embedding, torch.ops.aten.embedding.default}  # (weight, indices, ...)


def is_call(node: fx.Node, funcs=(), methods=()) -> bool:
    if node.op == "call_function":
        return node.target in funcs
    if node.op == "call_method":
        return node.target in methods
    return False


def is_linear(node: fx.Node) -> bool:
    return is_call(node, LINEAR_FUNCS)


def is_matmul(node: fx.Node) -> bool:
    return is_call(node, MATMUL_FUNCS, MATMUL_METHODS)


def is_conv(node: fx.Node) -> bool:
    return is_call(node, CONV_FUNCS)


def embedding_args(node: fx.Node):
    """``(indices, weight, input index of indices)`` of an embedding lookup call, or None for other nodes."""
    if is_call(node, EMBEDDING_FUNCS):
        if arg(node, 3, "max_norm") is not None:
            return None  # renormalizes its weight at lookup time: no fixed table to quantize
        return node.args[0], node.args[1], 0
    if is_call(node, EMBEDDING_WEIGHT_FIRST):
        return node.args[1], node.args[0], 1
    return None


def is_softmax(node: fx.Node) -> bool:
    return is_call(node, SOFTMAX_FUNCS, {"softmax"})


def node_value(node, gm: fx.GraphModule | None = None):
    """The example (or constant) tensor of ``node``: dynamo's / aot's meta, or a get_attr's value in ``gm``."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    meta = node.meta.get("tensor_meta")  # from ShapeProp
    if val is None and meta is not None and hasattr(meta, "dtype"):
        val = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
    if val is None and node.op == "get_attr" and gm is not None:
        val = gm
        for part in node.target.split("."):
            val = getattr(val, part, None)
    return val if isinstance(val, torch.Tensor) else None


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_MODULES_RE = re.compile(r"_modules\['([^']+)'\]")
_ATTR_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def module_path_of_param(node: fx.Node) -> tuple[str, str] | None:
    """``(module path, attribute)`` of the parameter a placeholder / get_attr node stands for, or None."""
    if node.op == "get_attr":
        path, _, attr = str(node.target).rpartition(".")
        return path, attr
    if node.op != "placeholder":
        return None
    src = _source_name(node)
    if src and ("_parameters[" in src or "_buffers[" in src):
        parts = _MODULES_RE.findall(src)
        attr = re.findall(r"_(?:parameters|buffers)\['([^']+)'\]", src)
        return ".".join(parts), attr[-1] if attr else ""
    if src and src.startswith("L['self']"):
        parts = [a or b for a, b in _ATTR_RE.findall(src[len("L['self']"):])]
        if len(parts) >= 1:
            return ".".join(parts[:-1]), parts[-1]
    # fall back to dynamo's placeholder naming: l_self_modules_a_modules_b_parameters_weight_
    m = re.fullmatch(r"l_+self_+modules_(.*)_(parameters|buffers)_(.*?)_?", str(node.target).lower())
    if m:
        return m.group(1).replace("_modules_", "."), m.group(3)
    return None


@dataclass
class ParamRef:
    node: fx.Node
    tensor: torch.Tensor
    module_path: str
    attr: str


def resolve_param(gm: fx.GraphModule, node, placeholders: dict[fx.Node, torch.Tensor]) -> ParamRef | None:
    """The real parameter tensor behind ``node`` (a placeholder with a known value, or a get_attr), or None."""
    if not isinstance(node, fx.Node):
        return None
    located = module_path_of_param(node)
    if located is None:
        return None
    if node.op == "get_attr":
        tensor = gm.get_parameter(node.target) if _is_param(gm, node.target) else _get_attr(gm, node.target)
    else:
        tensor = placeholders.get(node)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return None
    return ParamRef(node, tensor, located[0], located[1])


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def register_constant(gm: fx.GraphModule, prefix: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer of ``gm`` under a fresh name and return the name."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", prefix)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor)
    return name


def placeholder_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, torch.Tensor]:
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: v for n, v in zip(nodes, example_inputs) if isinstance(v, torch.Tensor)}


def erase_unused(graph: fx.Graph, roots) -> int:
    """Erase ``roots`` and, transitively, their inputs once nothing uses them; returns the count.

    Unlike ``Graph.eliminate_dead_code`` this touches only the given chain, so side-effecting nodes
    elsewhere in dynamo's graph (vmap plumbing, autocast enter/exit) are never removed.
    """
    erased = 0
    stack = [n for n in roots if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node.graph is not graph or node.users or node.op in ("placeholder", "output"):
            continue
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def replace_matches(gm: fx.GraphModule, result, candidate, match, build, counter: str) -> None:
    """The match / check / rewrite loop of a fusion pass. For every node where ``candidate(node)`` holds,
    ``match(node)`` returns None (not this pattern: left alone), a string (a look-alike: recorded in ``result``
    as the skip reason) or the matched parts, from which ``build(graph, node, parts)`` makes the replacement
    node, inserted before ``node``; ``node`` is then replaced, what only it used is erased, and ``counter`` of
    ``result`` (a :class:`~qexport.passes.pass_manager.PassResult`) goes up by one."""
    g = gm.graph
    for node in list(g.nodes):
        if not candidate(node):
            continue
        parts = match(node)
        if parts is None:
            continue
        if isinstance(parts, str):
            result.skip(node.name, parts)
            continue
        with g.inserting_before(node):
            fused = build(g, node, parts)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        erase_unused(g, [node])
        result.count(counter)


def drop_unused_constants(gm: fx.GraphModule, prefixes=("qx_",)) -> int:
    """Erase ``get_attr`` nodes nothing uses, then delete the passes' constants (top-level buffers whose
    names start with ``prefixes``) no node reads any more; returns how many were deleted."""
    g = gm.graph
    erase_unused(g, [n for n in g.nodes if n.op == "get_attr" and not n.users])
    used = {n.target for n in g.nodes if n.op == "get_attr"}
    dropped = 0
    for name in [n for n, _ in gm.named_buffers() if "." not in n and n.startswith(tuple(prefixes))]:
        if name not in used:
            delattr(gm, name)
            dropped += 1
    return dropped


def constant_value(gm: fx.GraphModule, a):
    """The value of a ``get_attr`` node in ``gm`` (a non-node argument as it is); ``KeyError`` for any other node."""
    if isinstance(a, fx.Node):
        if a.op != "get_attr":
            raise KeyError(a.name)
        return _get_attr(gm, str(a.target))
    return a


def op_packet(node: fx.Node):
    """The op packet of a call (``torch.ops.qexport.x`` whether the graph holds ``x`` or ``x.default``)."""
    return getattr(node.target, "overloadpacket", node.target)
