"""prepare: insert observers for static activation quantization.

For every annotated node whose activation spec is static, an :class:`ActObserver` module is inserted on
its input: while calibrating, it records the running min / max (shared by every graph that contains the
same layer) and passes the tensor through unchanged. Dynamic activations need nothing here: their
scales are computed at run time by the quantize op that ``convert`` inserts.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from qexport.errors import InvalidConfig
from qexport.passes.context import ActRange, QuantContext, act_range_for
from qexport.passes.pass_manager import PassResult


class ActObserver(nn.Module):
    def __init__(self, act_range: ActRange, layer: str):
        super().__init__()
        self.act_range = act_range
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.act_range.update(x)
        return x

    def extra_repr(self) -> str:
        return f"layer={self.layer}, batches={self.act_range.batches}"


def prepare(gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
    result = PassResult("prepare")
    for node in list(gm.graph.nodes):
        ann = node.meta.get("qexport")
        if ann is None or ann.act_spec is None:
            continue
        if ann.act_spec.dynamic:
            result.count("dynamic")
            continue
        if ann.act_spec.static_fallback_ratio is not None:
            raise InvalidConfig(f"{ann.module_path}: static_fallback_ratio is applied by qexport.calibrate() on a "
                                "model quantized by qexport.quantize(); quantize and calibrate first, then "
                                "torch.compile the quantized model")
        x = node.args[ann.input_index]
        if isinstance(x, fx.Node) and x.op == "call_module" and isinstance(gm.get_submodule(x.target), ActObserver):
            continue  # idempotent: already observed
        name = f"qexport_observer_{len(list(gm.named_children()))}"
        gm.add_submodule(name, ActObserver(act_range_for(ann.weight_key), ann.module_path))
        with gm.graph.inserting_before(node):
            obs = gm.graph.call_module(name, (x,))
        node.update_arg(ann.input_index, obs)
        result.count("observers")
    return result
