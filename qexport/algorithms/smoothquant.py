"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 quantization.

The inputs of an LLM's linears have a few channels whose magnitude is tens to hundreds of times the rest,
on every token. An int8 activation grid (one scale per token, or one per tensor) is sized by those
channels, so the others keep only a few codes. The weights have no such outliers. For the linears that
share one input x, dividing channel j of x by ``s_j`` and multiplying input column j of their weights by
``s_j`` leaves the float function unchanged, and with

    s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)

(maxima over the calibration tokens, and over the output rows of all the linears that read x) the
difficulty is shared between the two: ``alpha = 0.5`` equalises the scaled channel maxima of x and w.
Channels where either maximum is 0 keep ``s_j = 1``.

The inverse scale is folded into the operation that produces x, exactly as AWQ folds its own scales (the
groups and the fold are :func:`qexport.algorithms.awq.scale_groups` and
:func:`qexport.algorithms.awq.fold_scales`, read from the architecture table): the norm before q/k/v_proj
and before the MLP's input linears, the output rows of v_proj before o_proj (the scale is then shared by the
query heads that read one kv head, so the statistic of a kv channel is the maximum over those heads), and
the output rows of up_proj before down_proj (whose input, ``act(gate) * up``, holds the largest outliers of
a gated MLP). No multiply is inserted: the model keeps its structure, so the compile back-end and the ONNX
lowering see ordinary linears. The statistics come from one float pass over the calibration batches
(each fold only rescales the input of its own group, so the folds do not affect each other's
statistics); the float model's logits are then checked on one batch, and when the folds changed them
beyond float rounding every fold is undone, with a warning. The weights are then rounded to nearest in
the recipe's format; activations are quantized as the recipe's rules say (per token at run time, or per
tensor with scales calibrated afterwards by :func:`qexport.calibrate`).

SmoothQuant needs a family of the architecture table (as AWQ does); layers to quantize outside the decoder
blocks are rounded to nearest without smoothing.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from qexport.algorithms.awq import (ScaleGroup, _relative_change, decoder_blocks, fold_scales, scale_groups,
                                    warn_outside_blocks)
from qexport.algorithms.common import LayerTask, _call_model, finite_tasks, model_logits, round_to_nearest
from qexport.algorithms.registry import Option, integer_grids_only, register
from qexport.errors import InvalidConfig, QExportError
from qexport.formats import QuantizedWeight
from qexport.models.architectures import architecture, describe

__all__ = ["smooth_scales", "smooth_model", "block_groups", "fold_block", "AbsMax", "quantize_model_smoothquant",
           "SMOOTH_RTOL", "OPTIONS"]

log = logging.getLogger(__name__)

SMOOTH_RTOL = 1e-4  # the folds may change the float logits by this much (relative norm): float rounding
MIN_SCALE = 1e-5  # smallest scale kept (a channel that is almost 0 in x but not in w)

# The recipe options of algorithm 'smoothquant' (a recipe stores all of them, defaults filled in)
OPTIONS: dict[str, Option] = {
    "alpha": Option(0.5, float, 0.0, 1.0, "migration strength: s_j = max|x_j|^alpha / max|w_j|^(1-alpha) "
                                          "(0: no smoothing, 1: all of the activation range into the weights)"),
}


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = x_j ** alpha / w_j ** (1 - alpha)`` per channel (float32); 1 where ``x_j`` or ``w_j`` is 0.

    ``x_absmax``: max |activation| of each input channel over the calibration tokens; ``w_absmax``: max |weight|
    of each input channel over the output rows of the linears that read it.
    """
    x = x_absmax.to(torch.float32)
    w = w_absmax.to(torch.float32)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    dead = (x <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(MIN_SCALE))


def _per_prev_channel_max(group: ScaleGroup, per_input: torch.Tensor) -> torch.Tensor:
    """A per-input-channel statistic reduced (max) to one value per channel of ``group.prev``.

    The input channels that share a ``prev`` channel are found through ``group.tie`` itself, so this holds
    for any tie (identity, grouped-query heads).
    """
    if group.tie is None:
        return per_input
    n_prev = group.n_prev
    index = group.tie(torch.arange(n_prev, dtype=torch.float32)).round().long()
    out = torch.zeros(n_prev, dtype=per_input.dtype)
    return out.scatter_reduce(0, index, per_input, reduce="amax", include_self=True)


class AbsMax:
    """max |x| of each input channel of ``linears``, over every forward while it is entered (hooks)."""

    def __init__(self, linears: list[nn.Module]):
        self.linears, self.stats, self.hooks = linears, {}, []

    def _hook(self, mod, args):
        x = args[0].detach()
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).to(torch.float32).cpu()
        prev = self.stats.get(id(mod))
        self.stats[id(mod)] = m if prev is None else torch.maximum(prev, m)

    def __enter__(self) -> dict[int, torch.Tensor]:
        self.hooks = [lin.register_forward_pre_hook(self._hook) for lin in self.linears]
        return self.stats

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def _input_absmax(model: nn.Module, linears: list[nn.Linear], batches: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """max |x| of each input channel of each linear in ``linears`` over all calibration batches."""
    with AbsMax(linears) as stats:
        for b in batches:
            _call_model(model, b)
    return stats


def block_groups(block: nn.Module, facts, i: int, linears: set[int] | None = None, warn: bool = True
                 ) -> list[ScaleGroup]:
    """The scale groups of decoder block ``i`` to smooth (those holding a linear whose ``id`` is in ``linears``;
    all when None), row folds first: they rescale output rows of v_proj / up_proj, which the norm-fed groups
    also read, so those groups' weight maxima are taken after them (the activation maxima do not depend on
    the order)."""
    groups, notes = scale_groups(block, facts)
    for note in notes if warn else ():
        warnings.warn(f"qexport: smoothquant: block {i}: {note}", stacklevel=4)
    groups = [g for g in groups if linears is None or any(id(lin) in linears for lin in g.linears)]
    return sorted(groups, key=lambda g: g.prev_kind != "rows")


def fold_block(groups: list[ScaleGroup], x_stats: dict[int, torch.Tensor], alpha: float
               ) -> list[torch.Tensor | None]:
    """Each group's scales from its activation maxima (``x_stats``) and its weights' (after the folds before
    it), folded in order; returns them (None for a group that never ran on the calibration data)."""
    out: list[torch.Tensor | None] = []
    for g in groups:
        x_max = x_stats.get(id(g.linears[0]))
        if x_max is None:
            out.append(None)
            continue
        w_max = torch.stack([lin.weight.detach().abs().amax(0).to(torch.float32).cpu() for lin in g.linears]).amax(0)
        s = smooth_scales(_per_prev_channel_max(g, x_max), _per_prev_channel_max(g, w_max), alpha)
        fold_scales(g, s.to(g.prev.weight.device))
        out.append(s)
        log.debug("smoothquant %s: scales in [%.3g, %.3g]", g.key, float(s.min()), float(s.max()))
    return out


def summarize(alpha: float, scales: list[torch.Tensor | None], change: float | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"alpha": alpha, "groups": 0, "max_scale": 1.0, "min_scale": 1.0}
    done = [s for s in scales if s is not None]
    if done:
        flat = torch.cat(done)
        summary.update(groups=len(done), max_scale=float(flat.max()), min_scale=float(flat.min()),
                       relative_change=change)
    return summary


def changed_too_much(change: float) -> bool:
    """Whether the folds changed the float logits beyond float rounding (then they are undone, with a warning)."""
    if change <= SMOOTH_RTOL:
        return False
    warnings.warn(f"qexport: smoothquant: the folded scales changed the float model's output by {change:.2g} "
                  "(relative); left unsmoothed", stacklevel=4)
    return True


@torch.no_grad()
def smooth_model(model: nn.Module, blocks: list[nn.Module], batches: list[torch.Tensor], alpha: float,
                 linears: set[int] | None = None) -> dict[str, Any]:
    """Fold SmoothQuant scales into every decoder block of ``blocks`` (in place); returns a summary.

    Only the scale groups holding at least one linear whose ``id`` is in ``linears`` are smoothed (all
    when None). The float model's output on ``batches[0]`` is checked before and after; when it moved
    beyond float rounding (:data:`SMOOTH_RTOL`) all folds are undone and a warning says so.
    """
    facts = describe(model, architecture(model, "algorithm 'smoothquant'", "use algorithm 'rtn' for this model"))
    plan = [block_groups(block, facts, i, linears) for i, block in enumerate(blocks)]
    if not any(plan):
        return summarize(alpha, [], None)
    x_stats = _input_absmax(model, [g.linears[0] for groups in plan for g in groups], batches)
    probe = batches[0][:1]
    before = model_logits(model, probe)
    touched = []
    for g in (g for groups in plan for g in groups):
        touched += [g.prev.weight] + ([g.prev.bias] if getattr(g.prev, "bias", None) is not None else [])
        touched += [lin.weight for lin in g.linears]
    saved = [t.detach().clone() for t in touched]
    scales = [s for groups in plan for s in fold_block(groups, x_stats, alpha)]
    change = _relative_change(model_logits(model, probe).float(), before.float())
    if changed_too_much(change):
        for t, v in zip(touched, saved):
            t.copy_(v)
        return summarize(alpha, [], None)
    return summarize(alpha, scales, change)


def check_recipe(recipe) -> None:
    """A smoothquant recipe: integer weight grids, and some rule that quantizes activations."""
    integer_grids_only(recipe)
    if not any(r.activation is not None for r in recipe.rules):
        raise InvalidConfig(
            f"recipe {recipe.name!r}: algorithm 'smoothquant' moves activation outliers into int8 weights, but no "
            "rule quantizes activations: give a rule an activation spec (as in 'w8a8-dynamic'), or use 'rtn'"
        )


@register("smoothquant", options=OPTIONS, needs_data=True, check=check_recipe,
          doc="SmoothQuant: activation outliers moved into the weights by folded scales, then round to nearest "
              "(calibration data)")
@torch.no_grad()
def quantize_model_smoothquant(model: nn.Module, tasks: list[LayerTask], batches: list[torch.Tensor],
                               options: Mapping[str, Any], progress: bool = False
                               ) -> dict[str, QuantizedWeight | QExportError]:
    """SmoothQuant scales folded into the float model, then every task's weight rounded to nearest.

    Returns name -> stored weight (or the error that keeps that layer float). Changes the float model on
    the way: norm weights and the rows of v_proj / up_proj absorb the inverse scales.
    """
    results: dict[str, QuantizedWeight | QExportError] = {}
    todo = finite_tasks(tasks, results)
    if not todo:
        return results
    blocks, by_block, rest, _ = decoder_blocks(model, todo, batches[0][:1], "smoothquant", "rtn")
    summary = smooth_model(model, [blocks.modules[i] for i in sorted(by_block)], batches, options["alpha"],
                           {id(t.module) for t in todo})
    log.info("smoothquant: %s", summary)
    warn_outside_blocks("smoothquant", rest, " without smoothing")
    for t in todo:
        round_to_nearest(t, results)
    return results
