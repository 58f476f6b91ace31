"""What the algorithms share: building stored weights from codes, group ranges, rounding a layer to nearest
(:func:`round_to_nearest`), a model's logits (:func:`model_logits`), and walking a model block by block.

Stored format
    GPTQ and AWQ end with integer codes, per-group scales and (asymmetric) zero points in exactly the
    layout of :func:`qexport.formats.quantize_weight`; :func:`build_quantized_weight` stores them as a
    :class:`~qexport.formats.QuantizedWeight`, whose ``dequantize()`` gives back ``(codes - zp) * scale``
    bit for bit.

Block-by-block execution
    A model is run once on the calibration batches up to its first decoder block, whose inputs (positional
    and keyword arguments: hidden states, attention mask, rotary embeddings, ...) are kept. Each block is
    then processed on those inputs and run once more, quantized, to give the next block's inputs; only one
    block's activations are held at a time. :func:`find_blocks` finds the blocks (the ``nn.ModuleList`` or
    ``nn.Sequential`` holding the most layers to quantize) and checks on a probe batch that each block's
    output is the next block's input; when that fails the caller falls back to one pass over the whole model.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from qexport.config import Granularity, NumberFormat, QuantSpec
from qexport.errors import InvalidConfig, InvalidTensor, QExportError
from qexport.formats import (
    QuantizedWeight,
    dequantize_codes,
    expand_groups,
    observe_range,
    pack,
    qparams_from_range,
    quantize_codes,
    quantize_weight,
)

__all__ = [
    "LayerTask",
    "group_size",
    "group_ranges",
    "build_quantized_weight",
    "quantize_with_qparams",
    "check_weight",
    "fake_quantize_fast",
    "set_weight",
    "round_to_nearest",
    "model_logits",
    "Blocks",
    "find_blocks",
    "capture_block_inputs",
    "run_block",
    "StopForward",
    "CalibrationWork",
    "counting_work",
    "counted_forward",
    "not_counted",
]


@dataclass
class LayerTask:
    """One linear layer to quantize: its module name, the module and the weight spec of its rule."""

    name: str
    module: nn.Linear
    spec: QuantSpec


# ----------------------------------------------------------------------------------------------------
# Groups, ranges and stored weights
# ----------------------------------------------------------------------------------------------------
def group_size(spec: QuantSpec, k: int) -> int:
    """Elements per group along K (per-channel and per-tensor: the whole row)."""
    return spec.group_size if spec.granularity is Granularity.GROUP else k


def group_ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group range ``(lo, hi)``, each ``[R, G]``, of a float32 ``[N, K]`` weight by ``spec``'s observer.

    The same ranges :func:`qexport.formats.quantize_weight` observes (last group partial when g does not
    divide K; ``R = 1`` for per-tensor).
    """
    n, k = w.shape
    if spec.granularity is Granularity.PER_TENSOR:
        return observe_range(w.reshape(1, 1, -1), spec)
    g = group_size(spec, k)
    full = (k // g) * g
    los, his = [], []
    if full:
        lo, hi = observe_range(w[:, :full].reshape(n, k // g, g), spec)
        los.append(lo)
        his.append(hi)
    if full < k:
        lo, hi = observe_range(w[:, full:].reshape(n, 1, k - full), spec)
        los.append(lo)
        his.append(hi)
    return torch.cat(los, 1), torch.cat(his, 1)


def _expand(p: torch.Tensor | None, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor | None:
    if p is None:
        return None
    n, k = shape
    if spec.granularity is Granularity.PER_TENSOR:
        return p.reshape(1, 1).expand(n, k)
    return expand_groups(p, group_size(spec, k), k)


def quantize_with_qparams(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float, integral) and dequantized values of ``w`` for given per-group ``scale`` / ``zero_point``."""
    s = _expand(scale, spec, tuple(w.shape))
    z = _expand(zero_point, spec, tuple(w.shape))
    codes = quantize_codes(w, s, z, spec.bits, spec.symmetric, spec.restricted_range)
    return codes, dequantize_codes(codes, s, z)


def build_quantized_weight(spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor | None) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from integer codes ``[N, K]``, scales ``[R, G]`` and zero points ``[R, G]``.

    ``codes`` and ``zero_point`` hold integral values (any dtype) inside the spec's grid; ``scale`` is
    float32. The result is laid out exactly as :func:`qexport.formats.quantize_weight` lays out its own.
    """
    if spec.format is not NumberFormat.INT:
        raise InvalidTensor(f"build_quantized_weight handles integer formats, not {spec.describe()}")
    n, k = codes.shape
    g = group_size(spec, k)
    groups = 1 if spec.granularity is Granularity.PER_TENSOR else math.ceil(k / g)
    rows = 1 if spec.granularity is Granularity.PER_TENSOR else n
    if tuple(scale.shape) != (rows, groups):
        raise InvalidTensor(f"scale has shape {tuple(scale.shape)}, expected {(rows, groups)} for {spec.describe()}")
    if spec.symmetric != (zero_point is None):
        raise InvalidTensor("symmetric grids take no zero point; asymmetric grids need one")
    codes = codes.round().to(torch.int16)
    if int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax:
        raise InvalidTensor(f"codes outside [{spec.qmin}, {spec.qmax}] for {spec.describe()}")

    def store(c: torch.Tensor, signed: bool) -> torch.Tensor:
        if spec.bits == 8:
            return c.to(torch.int8 if signed else torch.uint8)
        return pack(c, spec.bits)

    stored_zp = None
    if zero_point is not None:
        stored_zp = store(zero_point.round().to(torch.int16), signed=False)
    return QuantizedWeight(spec, (n, k), g, store(codes, spec.symmetric), scale.to(torch.float32).contiguous(),
                           stored_zp)


def fake_quantize_fast(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``quantize_weight(w, spec).dequantize()`` without packing (float32 ``[N, K]`` in and out).

    llama.cpp's block formats go through their own codec (their two-level scales have no shortcut)."""
    if spec.format.ggml:
        return quantize_weight(w, spec).dequantize()
    scale, zero = qparams_from_range(*group_ranges(w, spec), spec.bits, spec.symmetric, spec.restricted_range)
    return quantize_with_qparams(w, spec, scale, zero)[1]


def set_weight(module: nn.Linear, value: torch.Tensor) -> None:
    """Give ``module`` a new weight parameter (never writes into a tensor another module may share)."""
    module.weight = nn.Parameter(value.to(module.weight.dtype), requires_grad=False)


def round_to_nearest(task: LayerTask, results: dict) -> None:
    """Round ``task``'s weight to nearest: its stored weight (or the error that keeps it float) goes into
    ``results``, and the module gets the dequantized weight, so that later layers see its quantized output."""
    try:
        qw = quantize_weight(task.module.weight, task.spec, name=task.name)
    except QExportError as e:
        results[task.name] = e
        return
    set_weight(task.module, qw.dequantize())
    results[task.name] = qw


def check_weight(w: torch.Tensor, name: str) -> torch.Tensor:
    """The weight as a float32 copy, after checking that it is finite (as ``quantize_weight`` does)."""
    w = w.detach().to(torch.float32, copy=True)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise InvalidTensor(f"{name}: weight has {bad} NaN/inf value(s) in float32; fix, rescale or exclude this layer")
    return w


# ----------------------------------------------------------------------------------------------------
# Running a model block by block
# ----------------------------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised by a hook to end a forward pass early (its data has been collected)."""


@dataclass
class CalibrationWork:
    """What an algorithm's calibration forwards cost: their floating-point operations (as torch's
    ``FlopCounterMode`` counts them: matmuls and attention, the hooks' Hessian products included)
    and the seconds spent in them. The rest of an algorithm's time (GPTQ's column loop, AWQ's search) is not in
    ``seconds``."""

    flops: int = 0
    seconds: float = 0.0
    forwards: int = 0

    def to_dict(self, total_seconds: float) -> dict[str, Any]:
        """The summary ``quantize()`` reports: total time, the forwards' share, and the rate they reached."""
        return {"seconds": round(total_seconds, 2), "forward_seconds": round(self.seconds, 2),
                "forwards": self.forwards, "forward_flops": self.flops,
                "forward_gflop_per_s": round(self.flops / 1e9 / self.seconds, 1) if self.seconds > 0 else None}


_WORK: list[CalibrationWork] = []  # the counter of the algorithm running, if any
_IN_FORWARD = [False]  # a forward inside a counted one is counted once
_PAUSED = [0.0]  # seconds of the counted forward running spent in not_counted()


@contextmanager
def counting_work(work: CalibrationWork | None = None) -> Iterator[CalibrationWork]:
    """Count the calibration forwards (:func:`run_block`, whole-model runs) made inside the block, into ``work``
    (a new one by default)."""
    work = CalibrationWork() if work is None else work
    _WORK.append(work)
    try:
        yield work
    finally:
        _WORK.pop()


def _cpu_attention_flops() -> dict:
    """torch counts the attention kernels it has formulas for; its CPU flash attention gets the same formula."""
    from torch.utils.flop_counter import sdpa_flop_count

    def formula(query, key, value, *args, out_shape=None, **kwargs):  # shapes, as FlopCounterMode passes them
        return sdpa_flop_count(query, key, value)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: formula} if op is not None else {}


@contextmanager
def counted_forward() -> Iterator[None]:
    if not _WORK or _IN_FORWARD[0]:
        yield
        return
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: not at qexport's import

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    _IN_FORWARD[0] = True
    _PAUSED[0] = 0.0
    t0 = time.perf_counter()
    try:
        with counter:
            yield
    finally:
        _IN_FORWARD[0] = False
        work = _WORK[-1]
        work.seconds += time.perf_counter() - t0 - _PAUSED[0]
        work.flops += counter.get_total_flops()
        work.forwards += 1


@contextmanager
def not_counted() -> Iterator[None]:
    """Inside a counted forward, work that is not the forward's (a hook quantizing a layer): neither counted nor
    timed as the forward's, and not slowed by the counter."""
    if not _IN_FORWARD[0]:
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes

    t0 = time.perf_counter()
    try:
        with _disable_current_modes():
            yield
    finally:
        _PAUSED[0] += time.perf_counter() - t0


def _call_model(model: nn.Module, batch: torch.Tensor) -> Any:
    param = next(model.parameters(), None)
    if param is not None and batch.device != param.device:
        batch = batch.to(param.device)
    config = getattr(model, "config", None)
    with counted_forward():
        if batch.dtype in (torch.int64, torch.int32) and config is not None and hasattr(config, "use_cache"):
            return model(input_ids=batch, use_cache=False)  # a Hugging Face model: no KV cache to build
        return model(batch)


def model_logits(model: nn.Module, batch: torch.Tensor, who: str | None = None) -> torch.Tensor:
    """The logits of ``model`` on ``batch``: the output's ``logits``, its first element, or the output itself.

    ``who`` (e.g. ``"allocate()"``): the caller needs a causal LM, so anything but a ``[batch, seq, vocab]``
    tensor is an InvalidConfig naming it."""
    out = _call_model(model, batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if who is not None and (not isinstance(logits, torch.Tensor) or logits.dim() != 3):
        raise InvalidConfig(f"{who} needs a causal LM whose output has logits [batch, seq, vocab]")
    return logits


@dataclass
class Blocks:
    """The decoder blocks of a model: ``container[i]`` is block i; ``prefix`` names the container."""

    prefix: str
    modules: list[nn.Module]


def _block_candidates(model: nn.Module, names: set[str]) -> list[tuple[str, list[nn.Module]]]:
    """Containers (ModuleList / Sequential) with their number of layers to quantize, most first."""
    found = []
    for cname, cont in model.named_modules():
        if not isinstance(cont, (nn.ModuleList, nn.Sequential)) or len(cont) == 0:
            continue
        prefix = f"{cname}." if cname else ""
        count = sum(1 for n in names if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit())
        if count:
            found.append((count, cname, list(cont)))
    found.sort(key=lambda t: -t[0])  # stable: among equals the outermost comes first
    return [(c, m) for _, c, m in found]


@torch.no_grad()
def find_blocks(model: nn.Module, names: Iterable[str], probe: torch.Tensor) -> Blocks | None:
    """The container of decoder blocks, checked on ``probe`` (one calibration sequence); None when not found.

    The check: during one forward pass every block runs exactly once, in order, and block i+1's first
    input is block i's output.
    """
    names = set(names)
    _WORK.append(CalibrationWork())  # finding the blocks is not calibration work
    try:
        return _find_blocks(model, names, probe)
    finally:
        _WORK.pop()


def _find_blocks(model: nn.Module, names: set[str], probe: torch.Tensor) -> Blocks | None:
    for cname, mods in _block_candidates(model, names)[:1]:
        calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        hooks = []

        def hook(i):
            def fn(mod, args, kwargs, out):
                x = args[0] if args else kwargs.get("hidden_states")
                y = out[0] if isinstance(out, (tuple, list)) else out
                calls.append((i, x, y))
            return fn

        for i, m in enumerate(mods):
            hooks.append(m.register_forward_hook(hook(i), with_kwargs=True))
        try:
            _call_model(model, probe)
        finally:
            for h in hooks:
                h.remove()
        order = [c[0] for c in calls]
        ok = order == list(range(len(mods))) and all(
            isinstance(calls[i][1], torch.Tensor) and isinstance(calls[i][2], torch.Tensor) for i in range(len(calls))
        ) and all(calls[i + 1][1].shape == calls[i][2].shape and torch.equal(calls[i + 1][1], calls[i][2])
                  for i in range(len(calls) - 1))
        if ok:
            return Blocks(f"{cname}." if cname else "", mods)
        warnings.warn(
            f"qexport: the blocks of {cname or 'the model'!r} do not run one after another on the previous block's "
            "output; calibrating the whole model in one pass instead", stacklevel=3,
        )
    return None


@dataclass
class BlockInput:
    """The arguments one calibration batch passes to a block (``args[0]``/``hidden_states``: the hidden states)."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, h: torch.Tensor) -> "BlockInput":
        if self.args:
            return BlockInput((h, *self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": h})


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]) -> list[BlockInput]:
    """Run ``model`` on each batch up to ``first_block`` and return what each batch passes to it."""
    captured: list[BlockInput] = []

    def pre(mod, args, kwargs):
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise StopForward

    h = first_block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in batches:
            try:
                _call_model(model, b)
            except StopForward:
                pass
    finally:
        h.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    with counted_forward():
        out = block(*inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_model(model: nn.Module, batches: list[torch.Tensor]) -> Iterator[None]:
    """Run ``model`` on each batch (hooks collect what they need); yields after each batch."""
    for b in batches:
        try:
            _call_model(model, b)
        except StopForward:
            pass
        yield


def finite_tasks(tasks: list[LayerTask], results: dict) -> list[LayerTask]:
    """The tasks whose weights are finite; each other one gets its error in ``results`` (it stays float)."""
    todo = []
    for t in tasks:
        try:
            check_weight(t.module.weight, t.name)
            todo.append(t)
        except InvalidTensor as e:
            results[t.name] = e
    return todo


def split_by_block(blocks: Blocks, tasks: list[LayerTask]) -> tuple[dict[int, list[LayerTask]], list[LayerTask]]:
    """Tasks grouped by the index of the block holding them, and the tasks outside every block."""
    by_block: dict[int, list[LayerTask]] = {}
    rest = []
    for t in tasks:
        head = t.name[len(blocks.prefix):].split(".")[0] if t.name.startswith(blocks.prefix) else ""
        if head.isdigit() and int(head) < len(blocks.modules):
            by_block.setdefault(int(head), []).append(t)
        else:
            rest.append(t)
    return by_block, rest


@torch.no_grad()
def for_each_block(model: nn.Module, blocks: Blocks, by_block: dict[int, list[LayerTask]],
                   batches: list[torch.Tensor], fn, desc: str, progress: bool = False) -> None:
    """Call ``fn(block, tasks, inputs)`` for every block holding tasks, in order.

    ``inputs`` are the block's inputs on the calibration batches, computed by the blocks before it as ``fn``
    left them (quantized), unless ``fn`` returns the next block's inputs itself (a list of
    :class:`BlockInput`); blocks after the last one holding tasks are never run.
    """
    if not by_block:
        return
    inputs = capture_block_inputs(model, blocks.modules[0], batches)
    last = max(by_block)
    iterator = range(last + 1)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, unit="block", leave=False, disable=None)
    for i in iterator:
        block = blocks.modules[i]
        given = fn(block, by_block[i], inputs) if i in by_block else None
        if i < last:
            inputs = given if given is not None else [inp.with_hidden(run_block(block, inp)) for inp in inputs]
