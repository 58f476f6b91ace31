"""Round to nearest (``rtn``): every weight on its grid, no data. The default algorithm of a recipe.

:func:`qexport.quantize` rounds rtn recipes itself, layer by layer, so that tied weights are stored once;
:func:`quantize_model_rtn` is the same rounding in the form every registered algorithm takes. Its options
are the rotation's (:data:`~qexport.algorithms.rotate.ROTATE_OPTIONS`), applied before any rounding.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from qexport.algorithms.common import LayerTask
from qexport.algorithms.registry import register
from qexport.algorithms.rotate import ROTATE_OPTIONS
from qexport.errors import QExportError
from qexport.formats import QuantizedWeight, quantize_weight

__all__ = ["quantize_model_rtn"]


@register("rtn", options=ROTATE_OPTIONS, needs_data=False, doc="round to nearest, no calibration data")
def quantize_model_rtn(model: nn.Module, tasks: list[LayerTask], batches: Any = None,
                       options: Mapping[str, Any] | None = None, progress: bool = False
                       ) -> dict[str, QuantizedWeight | QExportError]:
    """Every task's weight rounded to nearest (the model is left as it is); ``batches`` are not used."""
    results: dict[str, QuantizedWeight | QExportError] = {}
    for t in tasks:
        try:
            results[t.name] = quantize_weight(t.module.weight, t.spec, name=t.name)
        except QExportError as e:
            results[t.name] = e
    return results
