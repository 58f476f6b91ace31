"""State shared by the passes of one graph: the recipe, the mode, real parameter values, observers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from qexport.config import Granularity, NumberFormat, QuantSpec, Recipe, Rule

MODES = ("dynamic", "static", "weight_only")

DYNAMIC_ACT = QuantSpec(bits=8, granularity=Granularity.PER_TOKEN, dynamic=True)
STATIC_ACT = QuantSpec(bits=8, granularity=Granularity.PER_TENSOR)


class ActRange:
    """Running min / max of one layer's input, shared by every graph that contains the layer."""

    def __init__(self) -> None:
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        self.lo = torch.minimum(self.lo, x.amin().cpu())
        self.hi = torch.maximum(self.hi, x.amax().cpu())
        self.batches += 1

    @property
    def observed(self) -> bool:
        return self.batches > 0


# weight tensor -> ActRange of the input of the layer that owns it (weak: dies with the model)
_ACT_RANGES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def act_range_for(weight: torch.Tensor) -> ActRange:
    if weight not in _ACT_RANGES:
        _ACT_RANGES[weight] = ActRange()
    return _ACT_RANGES[weight]


@dataclass
class Annotation:
    """What ``annotate`` decided for one node: which layer it is and how to quantize it."""

    kind: str  # "linear" | "matmul" | "conv"
    module_path: str
    weight: torch.Tensor  # the real float weight, in the layout the op uses ([N, K] for linear)
    weight_spec: QuantSpec
    act_spec: QuantSpec | None
    bias: Any = None  # fx.Node, a tensor, or None
    input_index: int = 0  # which argument of the node is the activation
    weight_key: torch.Tensor | None = None  # the parameter object itself (keys the shared observers)


@dataclass
class QuantContext:
    recipe: Recipe
    mode: str | None = None
    placeholders: dict[fx.Node, torch.Tensor] = field(default_factory=dict)

    def effective_rule(self, rule: Rule) -> tuple[QuantSpec, QuantSpec | None]:
        """The (weight, activation) specs of ``rule`` after the ``mode`` option is applied."""
        w, a = rule.weight, rule.activation
        int8_weights = w.format is NumberFormat.INT and w.bits == 8
        if self.mode == "weight_only":
            return w, None
        if self.mode == "dynamic" and int8_weights:
            return w, a if (a is not None and a.dynamic) else DYNAMIC_ACT
        if self.mode == "static" and int8_weights:
            return w, a if (a is not None and not a.dynamic) else STATIC_ACT
        return w, a
