"""annotate: decide which nodes get which QuantSpec, from the recipe's module-name patterns.

Candidates are ``linear`` calls (functional or ``nn.Linear`` modules), ``matmul`` / ``bmm`` with a 2-D
parameter as right operand, ``conv1d`` / ``conv2d``, and embedding lookups (``F.embedding`` of a parameter),
which a recipe reaches only by a rule that names them (:meth:`qexport.config.Recipe.rule_for`). The decision
is stored in ``node.meta["qexport"]`` (an :class:`~qexport.passes.context.Annotation`), with the module path,
so later passes and reports can name the layer.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from qexport.passes.context import Annotation, QuantContext
from qexport.passes.graph_utils import arg, embedding_args, is_conv, is_linear, is_matmul, resolve_param
from qexport.passes.pass_manager import PassResult


def _candidate(gm: fx.GraphModule, node: fx.Node, ctx: QuantContext):
    """(kind, ParamRef-like (tensor, path), bias, weight as [N, K]) or a skip reason string, or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Linear):
            return "linear", node.target, mod.weight, "bias" if mod.bias is not None else None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            return "conv", node.target, mod.weight, None
        return None
    if is_linear(node):
        ref = resolve_param(gm, node.args[1], ctx.placeholders)
        if ref is None:
            return "linear weight is not a parameter of the model"
        return "linear", ref.module_path, ref.tensor, arg(node, 2, "bias")
    if is_conv(node):
        ref = resolve_param(gm, node.args[1], ctx.placeholders)
        if ref is None:
            return "conv weight is not a parameter of the model"
        return "conv", ref.module_path, ref.tensor, None
    emb = embedding_args(node)
    if emb is not None:
        ref = resolve_param(gm, emb[1], ctx.placeholders)
        if ref is None or ref.tensor.dim() != 2:
            return "embedding table is not a 2-D parameter of the model"
        return "embedding", ref.module_path, ref.tensor, None
    if is_matmul(node):
        ref = resolve_param(gm, node.args[1], ctx.placeholders)
        if ref is None:
            if resolve_param(gm, node.args[0], ctx.placeholders) is not None:
                return "matmul with the parameter on the left is not supported"
            return "matmul of two activations (attention scores); not quantized"
        if ref.tensor.dim() != 2:
            return f"matmul with a {ref.tensor.dim()}-D parameter is not supported"
        return "matmul", ref.module_path, ref.tensor, None
    return None


def annotate(gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
    result = PassResult("annotate")
    for node in gm.graph.nodes:
        found = _candidate(gm, node, ctx)
        if found is None:
            continue
        if isinstance(found, str):
            result.skip(node.name, found)
            continue
        kind, path, param, bias = found
        weight = param.detach()
        rule = ctx.recipe.rule_for(path, embedding=kind == "embedding")
        if rule is None or rule.weight is None:
            result.skip(path or node.name, "excluded or no rule matches" if rule is None else "recipe keeps it float")
            continue
        w_spec, a_spec = ctx.effective_rule(rule)
        input_index = 0
        if kind == "embedding":
            if not (w_spec.format.value == "int" or w_spec.format.ggml) or w_spec.double_quant:
                result.skip(path, f"embeddings are stored as integer grids or GGML blocks, not {w_spec.describe()}")
                continue
            a_spec, input_index = None, embedding_args(node)[2]
        if kind == "conv":
            if a_spec is not None:
                result.skip(path, "activation quantization of conv is not supported; weights only")
                a_spec = None
            weight = weight.reshape(weight.shape[0], -1)
        if kind == "matmul":
            weight = weight.t()  # x @ W == linear(x, W.T)
        if node.op == "call_module" and bias == "bias":
            bias = gm.get_submodule(node.target).bias
        node.meta["qexport"] = Annotation(kind, path, weight, w_spec, a_spec, bias, input_index, weight_key=param)
        result.count(kind)
        if a_spec is not None:
            result.count("act_dynamic" if a_spec.dynamic else "act_static")
    return result
