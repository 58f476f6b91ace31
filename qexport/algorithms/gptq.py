"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error
over the columns not yet quantized so that the layer's output on calibration inputs changes least.

For a linear layer with calibration inputs X (``[tokens, K]``), the Hessian of the output error
``||X W^T - X Q^T||^2`` with respect to a row of W is ``H = 2 X^T X / tokens``. The columns are quantized in
order; after column j is rounded, its error ``e_j = (w_j - q_j) / [H^-1]_jj`` is subtracted from the
remaining columns through row j of the upper Cholesky factor of ``H^-1``. As in the reference
implementation:

- damping: ``percdamp`` (default 0.01) x the mean of diag(H) is added to the diagonal. When H + damping is
  still not positive definite (or its inverse has no Cholesky factor) the damping is multiplied by 10
  until it is, with a warning; a layer whose Hessian has NaN/inf values is rounded to nearest, with a
  warning.
- dead columns (diag(H) = 0: inputs always zero) get H_jj = 1 and weight 0 in that column.
- lazy batch updates: columns are processed in blocks of ``block_size`` (128); within a block the updates
  are applied column by column, to the rest of the weight once per block.
- act-order (``act_order``, on by default): columns are processed by decreasing diag(H). A group's
  columns are then not contiguous in time, so its scale and zero point are fixed beforehand from the
  original weight by the spec's observer, as RTN does ("static groups"); this keeps qexport's stored
  layout (contiguous groups along K, one scale per group, no permutation index) and costs nothing at
  inference. Without act-order, a group's range is chosen when its first column is reached, from the
  columns as updated so far, including the part beyond the current lazy block (the reference reads that
  part before this block's updates reach it); ``static_groups`` fixes it beforehand instead. Per-tensor
  ranges are static.
  On SmolLM2-135M at int4 g128, act-order is what makes GPTQ beat RTN in perplexity (docs/gptq-awq.md).

Models are processed decoder block by decoder block (see :mod:`qexport.algorithms.common`): the inputs
of block i are the outputs of blocks 0..i-1 already quantized. With ``true_sequential`` (default) the
linears of a block are quantized in the order they run, in stages of linears that share one input
(q/k/v, then o, then gate/up, then down in a Llama block), each stage calibrated on the inputs produced by
the stages already quantized. Models without recognisable blocks (a plain ``nn.Sequential`` of linears is
recognised: each child is a block) are calibrated in one pass over the float model.

One forward per block: when the calibration windows fit one batch (:func:`one_batch`: all of a block's
activations for them under :data:`ONE_PASS_BYTES`), each block runs once, and each linear is quantized in its
own forward pre-hook from the Hessian of the input it is being called with; the forward then goes on with the
quantized weight. A linear's input at that moment is produced by the linears before it, already quantized, so
this is the true-sequential order without running the block again for each stage, and the forward's output is
the next block's input. Otherwise (the windows in several batches) each stage runs the block on every batch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from qexport.algorithms.common import (
    BlockInput,
    LayerTask,
    StopForward,
    build_quantized_weight,
    check_weight,
    find_blocks,
    finite_tasks,
    for_each_block,
    group_ranges,
    group_size,
    not_counted,
    run_block,
    run_model,
    set_weight,
    split_by_block,
)
from qexport import ggml
from qexport.algorithms.registry import Option, integer_or_ggml_grids, register
from qexport.algorithms.rotate import ROTATE_OPTIONS
from qexport.config import Granularity, QuantSpec
from qexport.errors import QExportError
from qexport.formats import (
    QuantizedWeight,
    dequantize_codes,
    ggml_layer_spec,
    observe_range,
    qparams_from_range,
    quantize_codes,
    quantize_weight,
)

__all__ = ["gptq_quantize", "gptq_block", "quantize_model_gptq", "HessianAccumulator", "OPTIONS", "one_batch",
           "widest"]

MAX_DAMP_TRIES = 12
ONE_PASS_BYTES = 4 * 2**30  # estimated activations of one block's forward over every calibration window at once
HESSIAN_ROWS = 4096  # rows of X per float32 X^T X product, summed in float64

# The recipe options of algorithm 'gptq' (a recipe stores all of them, defaults filled in)
OPTIONS: dict[str, Option] = {
    "percdamp": Option(0.01, float, 0.0, 1.0, "damping added to the Hessian diagonal, as a fraction of its mean"),
    "act_order": Option(True, bool, doc="quantize columns by decreasing Hessian diagonal (group ranges are then "
                                        "fixed from the weights beforehand: static groups)"),
    "static_groups": Option(False, bool, doc="fix every group's range from the weights before any update "
                                             "(always so with act_order)"),
    "block_size": Option(128, int, 1, None, "columns per lazy-update block"),
    "true_sequential": Option(True, bool, doc="within a decoder block, quantize the linears in the order they "
                                              "run, each seeing the inputs of the already quantized ones"),
    **ROTATE_OPTIONS,
}


class HessianAccumulator:
    """``H = 2 X^T X / tokens`` of a layer's inputs, accumulated in float64 over calls."""

    def __init__(self, k: int):
        self.sum = torch.zeros(k, k, dtype=torch.float64)
        self.tokens = 0

    def add_xtx(self, xtx: torch.Tensor, tokens: int) -> None:
        self.sum += xtx
        self.tokens += tokens

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        for rows in x.split(HESSIAN_ROWS):
            self.add_xtx((rows.T @ rows).to(torch.float64), rows.shape[0])

    @property
    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.tokens, 1))


def _shared_xtx(cache: dict[int, tuple[torch.Tensor, HessianAccumulator]], x: torch.Tensor) -> HessianAccumulator:
    """X^T X of a layer's input ``x``, computed once for the layers fed the same tensor (q/k/v); ``cache`` maps
    id(x) to (x, its accumulator)."""
    cached = cache.get(id(x))
    if cached is None or cached[0] is not x:
        acc = HessianAccumulator(x.shape[-1])
        acc.add(x.detach())
        cached = (x, acc)
        cache[id(x)] = cached
    return cached[1]


def _inverse_cholesky(h: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (float32), with more damping when needed (warned)."""
    mean_diag = float(h.diagonal().mean())
    if not math.isfinite(mean_diag) or not torch.isfinite(h).all():
        raise _HessianError(f"{name}: the Hessian has NaN/inf values (the calibration activations do)")
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damp = percdamp * mean_diag
    for attempt in range(MAX_DAMP_TRIES):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    warnings.warn(
                        f"qexport: gptq: {name}: the Hessian is not positive definite with damping {percdamp:g} x "
                        f"mean(diag); used {damp / mean_diag:.3g} x mean(diag). More or more varied calibration "
                        f"data avoids this", stacklevel=4,
                    )
                return upper.to(torch.float32)
        damp = max(damp * 10.0, 1e-4 * mean_diag)
    raise _HessianError(f"{name}: the Hessian stays singular even with damping {damp / mean_diag:.3g} x mean(diag)")


class _HessianError(QExportError):
    pass


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, percdamp: float = 0.01,
                  block_size: int = 128, act_order: bool = True, static_groups: bool = False,
                  name: str = "weight") -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ of one ``[N, K]`` weight given the Hessian ``[K, K]`` of its inputs.

    Returns the stored weight and its dequantized float32 values (equal to ``qweight.dequantize()``).
    Raises :class:`~qexport.errors.InvalidTensor` for a non-finite weight; a Hessian that cannot be
    inverted even with large damping raises :class:`~qexport.errors.QExportError` (the caller rounds the
    layer to nearest instead).
    """
    w = check_weight(weight, name)
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise QExportError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match the weight's K={k}")
    h = hessian.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    per_tensor = spec.granularity is Granularity.PER_TENSOR
    grid = None
    if spec.format.ggml:  # llama.cpp's blocks: a block's two-level scales are fixed when GPTQ reaches it
        spec = ggml_layer_spec(spec, k, name)
        grid = ggml.Grid(ggml.ggml_type(spec.format.value), n, k, lambda v: observe_range(v, spec))
    g = group_size(spec, k)
    num_groups = 1 if per_tensor else math.ceil(k / g)
    static = act_order or static_groups or per_tensor
    if grid is not None:
        scale = zero = None
        if static:
            grid.fit_all(w)
    elif static:
        scale, zero = qparams_from_range(*group_ranges(w, spec), spec.bits, spec.symmetric, spec.restricted_range)
    else:
        scale = torch.ones(n, num_groups, dtype=torch.float32)
        zero = None if spec.symmetric else torch.zeros(n, num_groups, dtype=torch.float32)

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_cholesky(h, percdamp, name)
    orig_col = perm if perm is not None else torch.arange(k)
    col_group = torch.zeros(k, dtype=torch.long) if per_tensor else orig_col // g

    codes = torch.empty_like(w)
    deq = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % g == 0:
                # the group's range from its columns as updated so far: the part in this block is up to date
                # in w1; the part beyond it still lacks this block's updates, applied here
                c_end = min(c + g, k)
                cols = w1[:, i : min(c_end, i2) - i1]
                if c_end > i2:
                    beyond = w[:, i2:c_end] - err1 @ hinv[i1:i2, i2:c_end]
                    cols = torch.cat([cols, beyond], 1)
                if grid is not None:
                    grid.fit(c // g, cols)
                else:
                    lo, hi = observe_range(cols[:, None, :], spec)
                    s, z = qparams_from_range(lo[:, 0], hi[:, 0], spec.bits, spec.symmetric, spec.restricted_range)
                    scale[:, c // g] = s
                    if zero is not None:
                        zero[:, c // g] = z
            col = w1[:, i]
            if grid is not None:
                q, dq = grid.round(int(orig_col[c]), col)
            else:
                j = int(col_group[c])
                s = scale[:, j] if scale.shape[0] == n else scale[0, j].expand(n)
                z = None if zero is None else (zero[:, j] if zero.shape[0] == n else zero[0, j].expand(n))
                q = quantize_codes(col, s, z, spec.bits, spec.symmetric, spec.restricted_range)
                dq = dequantize_codes(q, s, z)
            codes[:, c] = q
            deq[:, c] = dq
            e = (col - dq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        codes, deq = codes[:, inv], deq[:, inv]
    if grid is not None:
        return QuantizedWeight(spec, (n, k), g, grid.encode(codes), None), deq
    qweight = build_quantized_weight(spec, codes, scale, zero)
    return qweight, deq


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------
class _Collector:
    """Forward pre-hooks that accumulate each task's Hessian; a stage's last layer can stop the forward."""

    def __init__(self, tasks: list[LayerTask], stop_after: str | None = None):
        self.acc = {t.name: HessianAccumulator(t.module.in_features) for t in tasks}
        self._xtx: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}  # a batch's inputs: _shared_xtx
        self._hooks = [t.module.register_forward_pre_hook(self._hook(t.name, t.name == stop_after)) for t in tasks]

    def _hook(self, name: str, stop: bool):
        def fn(mod, args):
            xtx = _shared_xtx(self._xtx, args[0])
            self.acc[name].add_xtx(xtx.sum, xtx.tokens)
            if stop:
                raise StopForward
        return fn

    def next_batch(self) -> None:
        self._xtx.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._xtx.clear()


def _stages(block: nn.Module, tasks: list[LayerTask], probe: BlockInput) -> tuple[list[list[LayerTask]], bool]:
    """Tasks grouped by the order they run on ``probe`` (consecutive layers fed the same tensor share a stage).

    Also returns whether every task runs at most once per forward (then a stage's forward can stop early).
    Tasks that never run are left out.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [t.module.register_forward_pre_hook(lambda m, a, n=t.name: calls.append((n, a[0]))) for t in tasks]
    try:
        run_block(block, probe)
    finally:
        for h in hooks:
            h.remove()
    by_name = {t.name: t for t in tasks}
    once = len({n for n, _ in calls}) == len(calls)
    stages: list[list[LayerTask]] = []
    seen: set[str] = set()
    prev = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if stages and x is prev:
            stages[-1].append(by_name[name])
        else:
            stages.append([by_name[name]])
        prev = x
    return stages, once


def _quantize_task(task: LayerTask, acc: HessianAccumulator, options: Mapping[str, Any],
                   results: dict[str, QuantizedWeight | QExportError]) -> None:
    mod = task.module
    try:
        if acc.tokens == 0:
            raise _HessianError(f"{task.name}: no calibration data reached this layer")
        qw, deq = gptq_quantize(mod.weight, acc.hessian, task.spec, percdamp=options["percdamp"],
                                block_size=options["block_size"], act_order=options["act_order"],
                                static_groups=options["static_groups"], name=task.name)
    except _HessianError as e:
        warnings.warn(f"qexport: gptq: {e}; rounding this layer to nearest instead", stacklevel=4)
        try:
            qw = quantize_weight(mod.weight, task.spec, name=task.name)
        except QExportError as e2:
            results[task.name] = e2
            return
        deq = qw.dequantize()
    except QExportError as e:
        results[task.name] = e
        return
    set_weight(mod, deq)  # later layers see this layer quantized
    results[task.name] = qw


def widest(tasks: list[LayerTask]) -> int:
    """The largest input or output size of the tasks' linears (what :func:`one_batch` sizes a forward by)."""
    return max((max(t.module.in_features, t.module.out_features) for t in tasks), default=0)


def one_batch(batches: list[torch.Tensor], width: int) -> list[torch.Tensor]:
    """The calibration batches of token ids as one batch, when they stack and a block's forward over all of them
    fits :data:`ONE_PASS_BYTES` (estimated as four float32 activations of ``width``, the widest layer, per
    token); otherwise as they are."""
    if len(batches) < 2 or any(b.dtype not in (torch.int64, torch.int32) or b.dim() != 2 or
                               b.shape[1:] != batches[0].shape[1:] for b in batches):
        return batches
    tokens = sum(b.numel() for b in batches)
    return [torch.cat(batches)] if tokens * width * 4 * 4 <= ONE_PASS_BYTES else batches


class _RanTwice(Exception):
    """A linear ran twice in one forward: its second input was not in its Hessian (the block is staged instead)."""


def _gptq_one_forward(block: nn.Module, tasks: list[LayerTask], inp: BlockInput, options: Mapping[str, Any],
                      results: dict) -> list[BlockInput] | None:
    """GPTQ of the block's tasks in one forward (see the module docstring); returns the next block's input, or
    None, with the block as it was, when a linear runs twice in a forward."""
    seen: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}  # the inputs' Hessians: _shared_xtx
    ran: set[str] = set()
    originals = {t.name: t.module.weight for t in tasks}  # set_weight gives a module a new parameter

    def hook(task: LayerTask):
        def fn(mod, args):
            if task.name in ran:
                raise _RanTwice
            acc = _shared_xtx(seen, args[0])
            ran.add(task.name)
            with not_counted():
                _quantize_task(task, acc, options, results)
        return fn

    hooks = [t.module.register_forward_pre_hook(hook(t)) for t in tasks]
    try:
        out = run_block(block, inp)
    except _RanTwice:
        for t in tasks:
            t.module.weight = originals[t.name]
            results.pop(t.name, None)
        return None
    finally:
        for h in hooks:
            h.remove()
    for t in tasks:  # never ran on calibration data
        if t.name not in ran:
            _quantize_task(t, HessianAccumulator(t.module.in_features), options, results)
    return [inp.with_hidden(out)]


def gptq_block(block: nn.Module, tasks: list[LayerTask], inputs: list[BlockInput], options: Mapping[str, Any],
               results: dict) -> list[BlockInput] | None:
    """GPTQ of one decoder block's tasks on its calibration inputs (also AWQ's ``rounding="gptq"``). Returns the
    next block's inputs when the block ran once on all of them (one batch), else None."""
    if options["true_sequential"] and len(inputs) == 1:
        given = _gptq_one_forward(block, tasks, inputs[0], options, results)
        if given is not None:
            return given
    if options["true_sequential"]:
        stages, once = _stages(block, tasks, inputs[0])
    else:
        stages, once = [tasks], False
    staged = {t.name for s in stages for t in s}
    for stage in stages:
        collector = _Collector(stage, stop_after=stage[-1].name if once else None)
        try:
            for inp in inputs:
                try:
                    run_block(block, inp)
                except StopForward:
                    pass
                collector.next_batch()
        finally:
            collector.remove()
        for t in stage:
            _quantize_task(t, collector.acc[t.name], options, results)
    for t in tasks:  # never ran on calibration data
        if t.name not in staged:
            _quantize_task(t, HessianAccumulator(t.module.in_features), options, results)
    return None


def _one_pass(model: nn.Module, tasks: list[LayerTask], batches: list[torch.Tensor], options: Mapping[str, Any],
              results: dict, stop_after: str | None = None) -> None:
    collector = _Collector(tasks, stop_after)
    try:
        for _ in run_model(model, batches):
            collector.next_batch()
    finally:
        collector.remove()
    for t in tasks:
        _quantize_task(t, collector.acc[t.name], options, results)


@register("gptq", options=OPTIONS, needs_data=True, check=integer_or_ggml_grids,
          doc="GPTQ: column-by-column rounding, each column's error spread over the rest (calibration data)")
@torch.no_grad()
def quantize_model_gptq(model: nn.Module, tasks: list[LayerTask], batches: list[torch.Tensor],
                        options: Mapping[str, Any], progress: bool = False
                        ) -> dict[str, QuantizedWeight | QExportError]:
    """GPTQ of every task's weight; returns name -> stored weight (or the error that keeps it float).

    The float weights of quantized layers are replaced by their dequantized values as the algorithm goes
    (later layers are calibrated on what earlier quantized layers produce); the caller swaps in QLinear
    modules.
    """
    results: dict[str, QuantizedWeight | QExportError] = {}
    todo = finite_tasks(tasks, results)
    if not todo:
        return results
    blocks = find_blocks(model, [t.name for t in todo], batches[0][:1])
    if blocks is None:
        _one_pass(model, todo, batches, options, results)
        return results
    by_block, rest = split_by_block(blocks, todo)
    merged = one_batch(batches, widest([t for ts in by_block.values() for t in ts]))
    for_each_block(model, blocks, by_block, merged,
                   lambda block, block_tasks, inputs: gptq_block(block, block_tasks, inputs, options, results),
                   "gptq", progress)
    if rest:  # layers outside the blocks (e.g. a quantized lm_head): one pass over the partly quantized model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if len(rest) == 1 and head is not None and rest[0].module is head:  # it runs last: stop at its input,
            _one_pass(model, rest, merged, options, results, stop_after=rest[0].name)  # never the logits
        else:
            _one_pass(model, rest, batches, options, results)
    return results
