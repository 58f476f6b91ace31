"""LLM.int8() (Dettmers et al. 2022): int8 matmul with a float path for outlier feature columns.

Semantics (those of bitsandbytes' ``Linear8bitLt`` with int8 weights, ``has_fp16_weights=False``):

* **Weights** are stored once, as int8 per output channel, symmetric: qexport's usual int8 grid
  (``QuantSpec(bits=8)``, row-wise absmax; see :mod:`qexport.formats`).
* **Outlier columns** are found at run time, per call: input feature column ``k`` is an outlier when some
  token of the input has ``|x[t, k]| >= threshold`` (all tokens of the call: batch and sequence flattened,
  as bitsandbytes does, so one row's result can depend on the other rows of its batch).
* **Outlier part**, in float: ``x[:, outliers] @ W_deq[:, outliers].T``, with ``W_deq`` the dequantized int8
  weight (bitsandbytes dequantizes the same columns of its int8 weight).
* **Regular part**, int8: the outlier columns of ``x`` are set to 0 and every token (row) is quantized to
  symmetric int8 with its own scale ``max|row| / 127`` (``qexport::quantize_per_token``); ``int8 x int8`` with
  int32 accumulation, times the per-token and per-channel weight scales (``qexport::qlinear_a8``).
* ``y = regular + outlier + bias``, in float32.

One choice differs from bitsandbytes in a detail: here a token's scale is the absmax over the regular columns
only; bitsandbytes leaves out only the outlier *elements* (``|x| >= threshold``), so a small value of an
outlier column can still set its row's scale. Leaving the whole column out is what the float path implies
(those columns are not computed in int8), and with ``threshold = inf`` both reduce to plain per-token W8A8.
qexport's int8 weight grid maps each row's extreme to -128 (all 256 codes) where bitsandbytes uses
``absmax / 127``; both are row-wise absmax, symmetric.

The canonical op is ``qexport::qlinear_llm_int8`` (:mod:`qexport.ops`); this module holds its reference
implementation and :func:`counting_outliers` / :func:`outlier_columns`, a measurement of how many columns are outliers in a model.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["outlier_mask", "reference_linear", "OutlierStats", "counting_outliers", "outlier_columns"]


def outlier_mask(x: Tensor, threshold: float) -> Tensor:
    """Boolean ``[K]``: the input feature columns where some token has ``|x| >= threshold``."""
    if x.numel() == 0:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0) >= threshold


def reference_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """LLM.int8() linear (see the module docstring): ``x [..., K]``, int8 ``wq [N, K]``, ``w_scale [N, 1]``
    (or one scale) -> float32 ``[..., N]``. Built from the same ops as per-token W8A8, so that with no
    outlier column it is bit-identical to it."""
    from qexport import ops

    xf = x.to(torch.float32)
    mask = outlier_mask(xf, threshold)
    regular = xf.masked_fill(mask, 0.0) if bool(mask.any()) else xf
    xq, xs = ops.quantize_per_token(regular)
    y = ops.qlinear_a8(xq, xs, 0, wq, w_scale, bias)
    cols = mask.nonzero().reshape(-1)
    if cols.numel():
        w_cols = wq[:, cols].to(torch.float32) * w_scale.to(torch.float32).reshape(-1, 1)  # [N, n_out]
        y = y + xf[..., cols] @ w_cols.t()
    return y


# ----------------------------------------------------------------------------------------------------
# Measuring outliers in a model
# ----------------------------------------------------------------------------------------------------
@dataclass
class OutlierStats:
    """Outlier columns of each linear layer's input, counted per forward call (one call: every token of a
    batch, as the decomposition sees them). ``counts[layer][t]`` sums the columns at threshold ``t`` over
    ``calls[layer]`` calls; ``in_features[layer]`` is K."""

    thresholds: tuple[float, ...]
    counts: dict[str, dict[float, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_features: dict[str, int] = field(default_factory=dict)

    def mean(self, layer: str, threshold: float) -> float:
        """Average number of outlier columns per call of ``layer`` at ``threshold``."""
        return self.counts[layer][threshold] / self.calls[layer] if self.calls[layer] else 0.0

    def mean_over_layers(self, threshold: float, suffix: str = "") -> float:
        """Average of :meth:`mean` over the layers whose name ends with ``suffix`` (all layers by default)."""
        layers = [n for n in self.calls if n.endswith(suffix)]
        return sum(self.mean(n, threshold) for n in layers) / len(layers) if layers else 0.0

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds),
                "layers": {n: {"in_features": self.in_features[n], "calls": self.calls[n],
                               "mean_outlier_columns": {str(t): self.mean(n, t) for t in self.thresholds}}
                           for n in self.calls}}


@contextlib.contextmanager
def counting_outliers(model: nn.Module, thresholds: Sequence[float] = (6.0,),
                      exclude: Sequence[str] = ("lm_head",)) -> Iterator[OutlierStats]:
    """While active, count in the returned :class:`OutlierStats` the input columns that LLM.int8() treats as
    outliers at each threshold, for every linear layer (``nn.Linear`` or :class:`~qexport.modules.QLinear`)
    of ``model`` whose name contains no ``exclude`` string; each forward call of a layer is one count.

    The hooks only read the inputs, so this works on a float model as well as a quantized one: it tells,
    before quantizing, how much of a model the float path would take at a given threshold, and it can wrap
    another measurement (a perplexity run) instead of needing its own pass over the data.
    """
    from qexport.modules import QLinear

    stats = OutlierStats(tuple(float(t) for t in thresholds))

    def hook(name: str):
        def record(module, args):
            x = args[0]
            colmax = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0)
            for t in stats.thresholds:
                stats.counts[name][t] += int((colmax >= t).sum())
            stats.calls[name] += 1
            stats.in_features[name] = x.shape[-1]
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in model.named_modules()
               if isinstance(mod, (nn.Linear, QLinear)) and not any(e in name for e in exclude)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def outlier_columns(model: nn.Module, batches: Iterable[Tensor], thresholds: Sequence[float] = (6.0,),
                    exclude: Sequence[str] = ("lm_head",)) -> OutlierStats:
    """:func:`counting_outliers` over ``batches`` of token ids (``[B, L]`` or ``[L]``), one forward call each."""
    with counting_outliers(model, thresholds, exclude) as stats:
        for batch in batches:
            model(input_ids=batch if batch.dim() == 2 else batch.unsqueeze(0), use_cache=False)
    return stats
