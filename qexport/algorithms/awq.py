"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, folded into the preceding operation,
and a per-group clipping search; the weights are then rounded to nearest in qexport's format (or by GPTQ).

For the linears that share one input x, scaling input channel c of their weights by ``s_c`` and dividing
x_c by ``s_c`` leaves the float function unchanged, but channels with large activations get a finer
grid. Per decoder block, four groups are scaled (names from the architecture table,
:mod:`qexport.models.architectures`; Llama's shown):

=================  ==========================  =====================================  ======================
group              linears                     1/s folded into                        error measured on
=================  ==========================  =====================================  ======================
attention input    q_proj, k_proj, v_proj      the norm before them (weight, bias)    attention output
attention output   o_proj                      v_proj output rows (see below)         o_proj output
MLP input          gate_proj, up_proj          the norm before them                   MLP output
MLP output         down_proj                   up_proj output rows                    down_proj output
=================  ==========================  =====================================  ======================

Other layouts: Gemma's norms multiply by ``1 + w`` (that product absorbs the scale), LayerNorm (OPT) has
a bias that is divided too, Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` absorb the output scales in their
v rows / up rows, and an MLP without a gate (OPT's ``fc1`` -> ReLU -> ``fc2``) has no MLP-output group.

Scale search: ``s = mean|x|^alpha`` over the calibration tokens (``duo_scaling``: divided by
``mean|w|^(1-alpha)``, w normalised per group), normalised by ``sqrt(max(s) min(s))``, for
``alpha = i / n_grid, i = 0 .. n_grid-1``; the alpha whose round-to-nearest weights give the least mean
squared error of the group's output on the search tokens wins (alpha = 0 is plain RTN, so the search
never picks something worse than RTN on those tokens). The search tokens are the first calibration
batches (of 8 sequences) that hold at least ``search_tokens`` tokens; the four groups are searched on the
float block, then all folded, as in the reference implementation.

Folding o_proj's scales into v_proj: o_proj's input channel ``(head h, d)`` is the attention-weighted sum
of v_proj channel ``(kv head h // n_rep, d)``; scaling that v channel by ``1/s`` scales every query head
that reads it. So o_proj's scales are tied across the ``n_rep`` query heads of each kv head (the statistic
is their mean) and folded exactly, with or without grouped-query attention. When the head layout cannot
be read from the attention module, o_proj gets no scales (a warning says so). No explicit multiply is
ever inserted: the model keeps its structure, so the compile back-end and the ONNX lowering see ordinary
linears. Every fold is checked numerically (the folded operation's output on calibration data must be
unchanged up to float rounding); one that is not is undone, with a warning.

Clipping (``clip``, on by default; not for q_proj and k_proj, whose errors the softmax amplifies, as in
the reference): for each weight group, the range of the spec's observer is shrunk by ``f`` in
``1, 1 - 1/clip_grid, ..., 1 - max_shrink``; the f with the least output error of that group on the
search tokens (exact, through the group's block of X^T X) is kept. Scales and zero points come from the
clipped range and the codes are rounded (and clamped) to it, which is exactly qexport's stored layout.

llama.cpp's block formats (``gguf-*`` presets): the scale search rounds each candidate with the format's own
codec, and the layers are then rounded by it (its two-level scales are chosen per block, as llama.cpp's
quantizer does), without the clipping search; ``rounding="gptq"`` works as for integer grids.

Rounding (``rounding``): ``"rtn"`` (default) is the clipping search and round to nearest above;
``"gptq"`` quantizes the scaled block with GPTQ instead (its default options: act-order, damping 1%,
true-sequential stages; Hessians from the block's inputs after the folds), without the clipping search.
The scales change which channels get a fine grid; GPTQ then corrects each column's rounding error on the
columns not yet quantized (preset ``w4g128-awq-gptq``).

Blocks are processed in order; each block's inputs are the outputs of the previous blocks, quantized
(``block_inputs="float"``: the float model's hidden states, as in the reference implementation).
AWQ needs a family of the architecture table; for other models use GPTQ. Layers to quantize outside the
blocks (a quantized ``lm_head``) are rounded to nearest.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qexport.algorithms.common import (
    BlockInput,
    LayerTask,
    build_quantized_weight,
    check_weight,
    counted_forward,
    fake_quantize_fast,
    find_blocks,
    finite_tasks,
    for_each_block,
    group_ranges,
    group_size,
    quantize_with_qparams,
    round_to_nearest,
    run_block,
    set_weight,
    split_by_block,
)
from qexport.algorithms.gptq import OPTIONS as GPTQ_OPTIONS
from qexport.algorithms.gptq import gptq_block
from qexport.algorithms.registry import Option, integer_or_ggml_grids, register
from qexport.config import Granularity, QuantSpec
from qexport.errors import QExportError, UnsupportedOp
from qexport.formats import QuantizedWeight, qparams_from_range
from qexport.models.architectures import ModelFacts, architecture, describe

__all__ = ["quantize_model_awq", "decoder_blocks", "scale_groups", "fold_scales", "search_clip", "ScaleGroup",
           "OPTIONS"]

log = logging.getLogger(__name__)

FOLD_RTOL = 1e-4  # a fold may change the folded operation's output by this much (relative), float rounding

# The recipe options of algorithm 'awq' (a recipe stores all of them, defaults filled in). No rotation: AWQ's
# scales are folded between up_proj and down_proj, which the online rotation separates.
OPTIONS: dict[str, Option] = {
    "n_grid": Option(20, int, 1, 1000, "points of the alpha grid (alpha = i / n_grid, i = 0 .. n_grid-1)"),
    "duo_scaling": Option(False, bool, doc="s = mean|x|^alpha / mean|w|^(1-alpha) instead of mean|x|^alpha"),
    "clip": Option(True, bool, doc="search a clipping ratio of each group's range (not for q_proj / k_proj)"),
    "clip_grid": Option(20, int, 1, 1000, "clip ratios tried: 1 - i / clip_grid"),
    "max_shrink": Option(0.5, float, 0.0, 0.95, "the smallest clip ratio tried is 1 - max_shrink"),
    "search_tokens": Option(4096, int, 1, None, "calibration tokens (whole sequences) on which the scale and "
                                                "clip searches measure output error"),
    "rounding": Option("rtn", str, choices=("rtn", "gptq"),
                       doc="how the scaled weights are rounded: 'rtn' (to nearest, after the clipping search) or "
                           "'gptq' (GPTQ with its default options on the scaled block; no clipping search)"),
    "block_inputs": Option("quantized", str, choices=("quantized", "float"),
                           doc="each block's calibration inputs: the outputs of the blocks before it "
                               "'quantized' (default), or 'float' (the float model's, as in the reference "
                               "implementation)"),
}


# ----------------------------------------------------------------------------------------------------
# The scale groups of a decoder block, from the architecture table
# ----------------------------------------------------------------------------------------------------
@dataclass
class ScaleGroup:
    """Linears that share one input, and where the inverse of their input scales is folded.

    ``prev_kind``: ``'norm'`` (divide a norm's effective weight ``norm_offset + w``, and its bias) or
    ``'rows'`` (divide the output rows ``rows`` of the linear ``prev``: all of them when None, a slice of a
    fused ``qkv_proj`` / ``gate_up_proj``). ``tie`` maps a scale per ``prev`` channel to a scale per input
    channel of the linears (identity when None); ``untie`` reduces a per-input-channel statistic to ``prev``
    channels. ``inspect``: the module whose output error the search measures and the key of its input
    (``'attn'``: the attention module, called as the block called it); ``check``: the same for the module
    whose output a ``'rows'`` fold must leave unchanged.
    """

    key: str
    linears: list[nn.Linear]
    prev: nn.Module
    prev_kind: str
    inspect: tuple[nn.Module, str]
    check: tuple[nn.Module, str] | None = None
    rows: slice | None = None
    norm_offset: float = 0.0
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None
    untie: Callable[[torch.Tensor], torch.Tensor] | None = None

    def full(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.tie is None else self.tie(s)

    @property
    def n_prev(self) -> int:
        """Channels of ``prev`` that take a scale."""
        if self.prev_kind == "norm":
            return self.prev.weight.shape[0]
        return len(range(self.prev.out_features)[self.rows or slice(None)])

    @property
    def single_linear(self) -> bool:
        """The search measures one linear's output (the group's only linear), from its input alone."""
        return len(self.linears) == 1 and self.inspect[0] is self.linears[0]


def decoder_blocks(model: nn.Module, todo: list[LayerTask], probe: torch.Tensor, algorithm: str, instead: str):
    """``(blocks, by_block, rest, facts)`` for an algorithm that folds scales into decoder blocks (AWQ,
    SmoothQuant): the blocks must be those of a family in :data:`~qexport.models.architectures.ARCHITECTURES`
    and run in order; :class:`UnsupportedOp`, naming ``instead``, otherwise."""
    arch = architecture(model, f"algorithm {algorithm!r}", f"use algorithm {instead!r} for this model")
    facts = describe(model, arch)
    blocks = find_blocks(model, [t.name for t in todo], probe)
    if blocks is None or blocks.prefix != arch.layers + ".":
        raise UnsupportedOp(
            f"algorithm {algorithm!r} folds scales into the decoder blocks of {arch.family} ({arch.layers}), which "
            f"did not run one after another on the calibration data here; use algorithm {instead!r} for this model"
        )
    by_block, rest = split_by_block(blocks, todo)
    return blocks, by_block, rest, facts


def warn_outside_blocks(algorithm: str, rest: list[LayerTask], how: str = "") -> None:
    """Warn, at the caller of :func:`qexport.quantize`, that the layers ``rest`` (outside the decoder blocks)
    are rounded to nearest ``how``."""
    if rest:
        warnings.warn(f"qexport: {algorithm}: {len(rest)} layer(s) outside the decoder blocks ({rest[0].name}, ...) "
                      f"are rounded to nearest{how}", stacklevel=4)


def scale_groups(block: nn.Module, facts: ModelFacts) -> tuple[list[ScaleGroup], list[str]]:
    """The scale groups of one decoder block (attention input and output, MLP input and output), and notes
    on groups left out."""
    arch = facts.arch
    attn, mlp = arch.attention(block), arch.mlp_module(block)
    qkv = [attn.get_submodule(n) for n in arch.qkv]
    o = attn.get_submodule(arch.o)
    mlp_in = [mlp.get_submodule(n) for n in arch.mlp_in]
    down = mlp.get_submodule(arch.mlp_out)
    offset = 1.0 if arch.norm == "rms_1p" else 0.0
    groups = [ScaleGroup("attn_in", qkv, block.get_submodule(arch.attn_norm), "norm", (attn, "attn"),
                         norm_offset=offset)]
    notes = []
    kv, hd = facts.kv_heads, facts.head_dim
    n_rep = facts.heads // kv
    v_rows = slice((facts.heads + kv) * hd, (facts.heads + 2 * kv) * hd) if arch.fused_qkv else None
    v_out = kv * hd
    if o.in_features != v_out * n_rep or (not arch.fused_qkv and qkv[2].out_features != v_out):
        notes.append(f"{arch.o}: the attention head layout ({facts.heads} heads, {kv} kv heads of {hd}) does not "
                     "match the projections, so its scales cannot be folded into the values")
    else:
        groups.append(ScaleGroup(
            "attn_out", [o], qkv[-1], "rows", (o, "attn_out"), check=(attn, "attn"), rows=v_rows,
            tie=None if n_rep == 1 else (lambda s: s.view(kv, 1, hd).expand(kv, n_rep, hd).reshape(-1)),
            untie=None if n_rep == 1 else (lambda x: x.view(kv, n_rep, hd).mean(1).reshape(-1)),
        ))
    inspect_mlp = (mlp, "mlp_in") if arch.mlp else (mlp_in[0], "mlp_in")
    groups.append(ScaleGroup("mlp_in", mlp_in, block.get_submodule(arch.mlp_norm), "norm", inspect_mlp,
                             norm_offset=offset))
    if arch.gated:
        up = mlp_in[-1]
        inter = down.in_features
        rows = slice(inter, 2 * inter) if arch.fused_gate_up else None
        if up.out_features == (2 * inter if arch.fused_gate_up else inter):
            groups.append(ScaleGroup("mlp_out", [down], up, "rows", (down, "mlp_out"), check=(mlp, "mlp_in"),
                                     rows=rows))
    return groups, notes


# ----------------------------------------------------------------------------------------------------
# Calibration data of one block
# ----------------------------------------------------------------------------------------------------
@dataclass
class _BlockData:
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum over tokens of |x| per channel
    tokens: dict[str, int] = field(default_factory=dict)
    search: list[dict[str, Any]] = field(default_factory=list)  # per search batch: inputs of each group

    def mean_abs(self, key: str) -> torch.Tensor:
        return self.abs_sum[key] / max(self.tokens[key], 1)


@torch.no_grad()
def _collect(block: nn.Module, groups: list[ScaleGroup], attn: nn.Module, inputs: list[BlockInput],
             search_batches: int, outputs: list | None = None) -> _BlockData:
    """The groups' input statistics and search windows, from one forward of the float block over ``inputs``
    (its outputs, as the next block's inputs, appended to ``outputs`` when given)."""
    data = _BlockData()
    state = {"batch": 0}
    hooks = []

    def stat_hook(key):
        def fn(mod, args):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            data.abs_sum[key] = data.abs_sum.get(key, 0) + x2.abs().sum(0)
            data.tokens[key] = data.tokens.get(key, 0) + x2.shape[0]
            if state["batch"] < search_batches:
                data.search[state["batch"]][key] = x
        return fn

    def attn_hook(mod, args, kwargs):
        if state["batch"] < search_batches:
            data.search[state["batch"]]["attn"] = (args, kwargs)

    for g in groups:
        hooks.append(g.linears[0].register_forward_pre_hook(stat_hook(g.key)))
    hooks.append(attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        for i, inp in enumerate(inputs):
            state["batch"] = i
            if i < search_batches:
                data.search.append({"block_in": inp.hidden})
            out = run_block(block, inp)
            if outputs is not None:
                outputs.append(inp.with_hidden(out))
    finally:
        for h in hooks:
            h.remove()
    return data


def _inspect(target: tuple[nn.Module, str], batch: dict[str, Any]) -> torch.Tensor:
    module, key = target
    with counted_forward():
        if key == "attn":
            args, kwargs = batch["attn"]
            out = module(*args, **kwargs)
        else:
            out = module(batch[key])
    return (out[0] if isinstance(out, (tuple, list)) else out).to(torch.float32)


def _output_error(target: tuple[nn.Module, str], data: _BlockData, refs: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for batch, ref in zip(data.search, refs):
        diff = _inspect(target, batch) - ref
        total += float(diff.pow(2).sum())
        count += diff.numel()
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------
# Scale search and folding
# ----------------------------------------------------------------------------------------------------
def _weight_mean(linears: list[nn.Linear], specs: list[QuantSpec]) -> torch.Tensor:
    """Mean over the rows of all linears of |w| / (max |w| of its group): per input channel."""
    parts = []
    for lin, spec in zip(linears, specs):
        w = lin.weight.detach().to(torch.float32)
        lo, hi = group_ranges(w, spec)
        absmax = torch.maximum(lo.abs(), hi.abs())
        k = w.shape[1]
        full = absmax.expand(w.shape[0], -1) if absmax.shape[0] == 1 else absmax
        parts.append(w.abs() / (full.repeat_interleave(group_size(spec, k), dim=1)[:, :k] + 1e-6))
    return torch.cat(parts).mean(0)


@torch.no_grad()
def _search_scale(group: ScaleGroup, specs: list[QuantSpec | None], data: _BlockData,
                  options: Mapping[str, Any]) -> tuple[torch.Tensor, float, float]:
    """Best per-``prev``-channel scale, its alpha, and the search's error ratio (best / alpha=0)."""
    x_mean = data.mean_abs(group.key)
    if group.untie is not None:
        x_mean = group.untie(x_mean)
    quantized = [(lin, spec) for lin, spec in zip(group.linears, specs) if spec is not None]
    w_mean = None
    if options["duo_scaling"]:
        w_mean = _weight_mean([lin for lin, _ in quantized], [sp for _, sp in quantized])
        if group.untie is not None:
            w_mean = group.untie(w_mean)
    originals = [lin.weight.data for lin, _ in quantized]
    single = group.single_linear and len(quantized) == 1
    if single:
        # one linear: the mean squared output error is sum((dW G) * dW) / (tokens * rows), G = X^T X, which
        # is much cheaper per candidate than running the layer again
        x = torch.cat([b[group.key].reshape(-1, originals[0].shape[1]) for b in data.search])
        x = x.to(torch.float32)
        gram, denom = x.T @ x, x.shape[0] * originals[0].shape[0]
    else:
        refs = [_inspect(group.inspect, b) for b in data.search]
    best = (math.inf, None, 0.0)
    base = None
    try:
        for i in range(options["n_grid"]):
            alpha = i / options["n_grid"]
            s = x_mean.pow(alpha)
            if w_mean is not None:
                s = s / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            full = group.full(s)
            for (lin, spec), w0 in zip(quantized, originals):
                w = w0.to(torch.float32) * full[None, :]
                lin.weight.data = (fake_quantize_fast(w, spec) / full[None, :]).to(w0.dtype)
            if single:
                d = originals[0].to(torch.float32) - quantized[0][0].weight.data.to(torch.float32)
                err = float(((d @ gram) * d).sum()) / denom
            else:
                err = _output_error(group.inspect, data, refs)
            if base is None:
                base = err
            if err < best[0]:
                best = (err, s, alpha)
    finally:
        for (lin, _), w0 in zip(quantized, originals):
            lin.weight.data = w0
    ratio = best[0] / base if base else 1.0
    return best[1], best[2], ratio


@torch.no_grad()
def fold_scales(group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the output of ``group.prev`` by ``s`` and multiply the linears' input columns by it (exact in float)."""
    full = group.full(s)
    prev = group.prev
    if group.prev_kind == "norm":
        if group.norm_offset:  # the norm multiplies by (offset + w): that product is what gets divided
            prev.weight.copy_((prev.weight.double() + group.norm_offset) / s.double() - group.norm_offset)
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        rows = group.rows or slice(None)
        prev.weight[rows].div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias[rows].div_(s.to(prev.bias.dtype))
    for lin in group.linears:
        lin.weight.mul_(full.to(lin.weight.dtype)[None, :])


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def _fold_checked(group: ScaleGroup, s: torch.Tensor, data: _BlockData) -> bool:
    """Fold, then check that the folded operation still computes the same; undo it when it does not."""
    touched = [group.prev.weight] + ([group.prev.bias] if getattr(group.prev, "bias", None) is not None else [])
    touched += [lin.weight for lin in group.linears]
    saved = [t.detach().clone() for t in touched]
    probe = data.search[0]
    if group.prev_kind == "norm":
        x = probe["block_in"]  # the identity norm'(x) * s = norm(x) holds for any x; a real hidden state will do
        before = group.prev(x).to(torch.float32)
        fold_scales(group, s)
        after = group.prev(x).to(torch.float32) * s
    else:
        before = _inspect(group.check, probe)
        fold_scales(group, s)
        after = _inspect(group.check, probe)
    change = _relative_change(after, before)
    if change <= FOLD_RTOL:
        return True
    for t, v in zip(touched, saved):
        t.copy_(v)
    warnings.warn(f"qexport: awq: folding the {group.key} scales changed the output by {change:.2g} (relative); "
                  "left unscaled", stacklevel=4)
    return False


# ----------------------------------------------------------------------------------------------------
# Clipping search
# ----------------------------------------------------------------------------------------------------
def _gram_blocks(x: torch.Tensor, g: int) -> list[torch.Tensor]:
    """``X_j^T X_j`` for each group j of columns of ``x`` ``[T, K]`` (float64 accumulation)."""
    k = x.shape[1]
    return [(x[:, a : a + g].T @ x[:, a : a + g]) for a in range(0, k, g)]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, clip_grid: int = 20, max_shrink: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scale and zero point from the shrink ratio of each group's range with least output error.

    ``w``: float32 ``[N, K]``; ``x``: float32 inputs ``[T, K]``. The error of group j of row n for a
    candidate is ``d G_j d^T`` with ``d`` the rounding error of that group and ``G_j = X_j^T X_j``.
    """
    n, k = w.shape
    g = group_size(spec, k)
    lo, hi = group_ranges(w, spec)
    grams = _gram_blocks(x, g)
    best_err = torch.full(lo.shape, math.inf)
    best_f = torch.ones(lo.shape)
    for i in range(int(round(max_shrink * clip_grid)) + 1):
        f = 1.0 - i / clip_grid
        scale, zero = qparams_from_range(lo * f, hi * f, spec.bits, spec.symmetric, spec.restricted_range)
        _, deq = quantize_with_qparams(w, spec, scale, zero)
        d = w - deq
        err = torch.stack([((d[:, j * g : (j + 1) * g] @ gram) * d[:, j * g : (j + 1) * g]).sum(1)
                           for j, gram in enumerate(grams)], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    return qparams_from_range(lo * best_f, hi * best_f, spec.bits, spec.symmetric, spec.restricted_range)


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------
_GPTQ_DEFAULTS = {name: opt.default for name, opt in GPTQ_OPTIONS.items()}


@torch.no_grad()
def _awq_block(block: nn.Module, facts: ModelFacts, tasks: list[LayerTask], inputs: list[BlockInput],
               options: Mapping[str, Any], results: dict, notes: set[str]) -> list[BlockInput] | None:
    """AWQ of one block; returns the next block's inputs when they are the float block's outputs."""
    nxt = [] if options["block_inputs"] == "float" else None  # the float block's outputs, from the same forward
    spec_of = {id(t.module): t for t in tasks}
    groups, group_notes = scale_groups(block, facts)
    notes.update(group_notes)
    tokens_per_batch = inputs[0].hidden.shape[:-1].numel()
    search_batches = min(len(inputs), max(1, math.ceil(options["search_tokens"] / tokens_per_batch)))
    data = _collect(block, groups, facts.arch.attention(block), inputs, search_batches, nxt)

    # 1. scales, searched on the float block; 2. folded (each fold checked)
    input_scale: dict[int, torch.Tensor] = {}  # id(linear) -> per-input-channel scale applied to its weight
    chosen = []
    for group in groups:
        specs = [spec_of[id(lin)].spec if id(lin) in spec_of else None for lin in group.linears]
        if all(sp is None for sp in specs) or group.key not in data.abs_sum:
            continue
        s, alpha, ratio = _search_scale(group, specs, data, options)
        log.debug("awq %s: alpha %.2f, output error x%.3f of RTN's", group.key, alpha, ratio)
        chosen.append((group, s))
    for group, s in chosen:
        if _fold_checked(group, s, data):
            for lin in group.linears:
                input_scale[id(lin)] = group.full(s)

    # 3a. rounding="gptq": GPTQ on the scaled block, with Hessians of the inputs as they now are
    if options["rounding"] == "gptq":
        gptq_block(block, tasks, inputs, _GPTQ_DEFAULTS, results)
        return nxt
    # 3. clipping and rounding, layer by layer; inputs are those the search saw, divided by the folded scales
    key_of = {id(lin): g.key for g in groups for lin in g.linears}
    # q and k are not clipped (the softmax amplifies their errors); a fused qkv_proj holds both. llama.cpp's
    # block formats choose their own scales (as llama.cpp's quantizer does): rounded to nearest
    no_clip = {id(lin) for lin in groups[0].linears[:2]}
    for t in tasks:
        lin, spec = t.module, t.spec
        key = key_of.get(id(lin))
        if (not options["clip"] or key is None or id(lin) in no_clip or spec.format.ggml
                or spec.granularity is Granularity.PER_TENSOR):
            round_to_nearest(t, results)
            continue
        x = torch.cat([b[key].reshape(-1, b[key].shape[-1]) for b in data.search]).float()
        if id(lin) in input_scale:
            x = x / input_scale[id(lin)][None, :]
        try:
            w = check_weight(lin.weight, t.name)
        except QExportError as e:
            results[t.name] = e
            continue
        scale, zero = search_clip(w, x, spec, options["clip_grid"], options["max_shrink"])
        codes, deq = quantize_with_qparams(w, spec, scale, zero)
        results[t.name] = build_quantized_weight(spec, codes, scale, zero)
        set_weight(lin, deq)
    return nxt


@register("awq", options=OPTIONS, needs_data=True, check=integer_or_ggml_grids,
          doc="AWQ: activation-aware per-channel scales folded into the model, then clipping (calibration data)")
@torch.no_grad()
def quantize_model_awq(model: nn.Module, tasks: list[LayerTask], batches: list[torch.Tensor],
                       options: Mapping[str, Any], progress: bool = False) -> dict[str, QuantizedWeight | QExportError]:
    """AWQ of every task's weight; returns name -> stored weight (or the error that keeps it float).

    Changes the float model on the way: norm weights and the rows of v_proj / up_proj absorb the inverse
    scales, and the weights of quantized layers are replaced by their dequantized values.
    """
    results: dict[str, QuantizedWeight | QExportError] = {}
    todo = finite_tasks(tasks, results)
    if not todo:
        return results
    blocks, by_block, rest, facts = decoder_blocks(model, todo, batches[0][:1], "awq", "gptq")
    notes: set[str] = set()
    for_each_block(model, blocks, by_block, batches,
                   lambda block, block_tasks, inputs: _awq_block(block, facts, block_tasks, inputs, options, results,
                                                                 notes),
                   "awq", progress)
    for note in sorted(notes):
        warnings.warn(f"qexport: awq: {note}", stacklevel=3)
    warn_outside_blocks("awq", rest)
    for t in rest:
        round_to_nearest(t, results)
    return results
