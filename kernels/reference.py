"""Reference kernels: dequantize the stored weight to float, then an ordinary matmul.

Slow but exact with respect to :mod:`qexport.formats`; the oracle for every faster implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qexport.formats import QuantizedWeight


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias`` computed in the dtype of ``x``."""
    w = weight.dequantize().to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
