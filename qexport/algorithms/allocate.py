"""Automatic mixed precision: measure how much each linear layer suffers from each candidate format, then
pick one format per layer that minimises the summed damage within a byte budget.

    from qexport.algorithms import calibration_tokens
    calib = calibration_tokens(text, tok, samples=4, seq_len=512)
    recipe = qexport.allocate(model, calib, bits_per_weight=3.0)      # a Recipe with one rule per layer
    qexport.quantize(model, recipe)

Sensitivity
    ``s[layer, format]`` estimates the increase of the calibration loss (mean next-token cross-entropy, in
    nats) when only that layer is quantized to that format with round-to-nearest. Two ways to get it:

    ``'fisher'`` (default, cheap): one forward + backward per calibration sequence gives the diagonal
    empirical Fisher ``F`` of every weight (mean of squared per-sequence gradients, times the tokens per
    sequence, which turns the per-sequence average back into a per-token Fisher); then for each format
    ``s = 1/2 * sum(F * (Q(W) - W)^2)``, the second-order Taylor term of the loss. The first-order term is
    left out (the float model sits near a minimum of its training loss, and its gradient on a few sequences
    is mostly noise). Cost: a few backward passes, then one RTN quantization per (layer, format).

    ``'loss'`` (exact, costly): quantize the layer, run the model, measure the loss, restore the layer.
    Every block's output on the calibration batches is recorded once, and the blocks before the one that
    holds the layer replay those outputs instead of running, so a layer of block i costs the blocks from i
    to the end plus the head. One run per (layer, format). Used to validate the proxy.

Both are deterministic for a given calibration set (drawn with a seed by ``calibration_tokens``).

Allocation
    A multiple-choice knapsack: choose one format per layer, minimising ``sum s`` subject to
    ``sum bytes <= target``. Bytes are exact: the codes, scales and zero points :func:`qexport.quantize`
    stores for that layer and format (plus its float bias), so they add up to
    ``qexport.model_size(quantized).quantized_bytes``. It is solved by dynamic programming over the bytes
    above each layer's smallest format, counted in units of their greatest common divisor: then the answer
    is optimal. When that table would be too large, costs are rounded up to a coarser unit ``u``; the answer
    still fits the target, and is at least as good as the optimum for ``target - n_layers * u`` bytes
    (rounding up costs at most ``u`` per layer); left-over bytes are then spent greedily.
    Summing per-layer sensitivities assumes layers do not interact, which holds less well as more layers
    go to 2 bits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qexport.config import DEFAULT_EXCLUDE, Observer, QuantSpec, Recipe, Rule, match_pattern
from qexport.errors import CalibrationError, InvalidConfig
from qexport.presets import get_preset

__all__ = [
    "DEFAULT_CANDIDATES",
    "METHODS",
    "Sensitivity",
    "Allocation",
    "allocate",
    "plan_allocation",
    "measure_sensitivity",
    "layer_bytes",
    "solve_mckp",
    "parse_size",
]

# int8 per-channel, int4 g128, int4 g64, int2 g64: the formats of the presets w8, w4g128, w4g64, w2g64
DEFAULT_CANDIDATES: tuple[QuantSpec, ...] = (
    QuantSpec(bits=8, granularity="per_channel", symmetric=True),
    QuantSpec(bits=4, group_size=128, symmetric=False),
    QuantSpec(bits=4, group_size=64, symmetric=False),
    QuantSpec(bits=2, group_size=64, symmetric=False),
)
METHODS = ("fisher", "loss")
MAX_DP_CELLS = 1 << 25  # (budget units + 1) x layers of the knapsack table (one byte each)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
def resolve_candidates(candidates: Iterable[QuantSpec | str] | None) -> tuple[QuantSpec, ...]:
    """QuantSpecs from specs or names of single-rule presets (``"w8"``, ``"w4g128"``, ``"w2g64"`` ...)."""
    if candidates is None:
        return DEFAULT_CANDIDATES
    if isinstance(candidates, (str, QuantSpec)):
        candidates = [candidates]
    out: list[QuantSpec] = []
    for c in candidates:
        if isinstance(c, str):
            preset = get_preset(c)
            if len(preset.rules) != 1 or preset.rules[0].weight is None or preset.rules[0].activation is not None:
                raise InvalidConfig(f"candidate {c!r} is not a single weight-only format; use e.g. w8, w4g128, "
                                    "w4g64, w2g64, nf4-dq, or give QuantSpecs")
            c = preset.rules[0].weight
        if not isinstance(c, QuantSpec):
            raise InvalidConfig(f"a candidate must be a QuantSpec or a preset name, got {c!r}")
        if c.dynamic:
            raise InvalidConfig(f"candidate {c.describe()} is an activation format, not a weight format")
        if c not in out:
            out.append(c)
    if not out:
        raise InvalidConfig("no candidate formats: give at least one, e.g. ['w8', 'w4g128', 'w2g64']")
    return tuple(out)


def parse_size(text: str | int) -> int:
    """Bytes from ``"60MB"``, ``"57.2MiB"``, ``"1.5e7"``, ``"800kB"`` or an integer (decimal and binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kKMG]i?B|B)?\s*", str(text))
        if not m:
            raise InvalidConfig(f"target size {text!r} is not a size: write e.g. 60MB, 57MiB, 800kB or a byte count")
        scale = {None: 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9,
                 "KiB": 2**10, "kiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)]
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise InvalidConfig(f"target size must be positive, got {text!r}")
    return value


def _linears(model: nn.Module, exclude: Sequence[str], layers: Sequence[str] | None) -> list[tuple[str, nn.Linear]]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not any(match_pattern(p, n) for p in exclude)]
    if layers is not None:
        names = {n for n, _ in found}
        missing = [n for n in layers if n not in names]
        if missing:
            raise InvalidConfig(f"layer(s) {missing[:3]} are not linear layers of the model outside exclude")
        found = [(n, m) for n, m in found if n in set(layers)]
    if not found:
        raise InvalidConfig("the model has no nn.Linear layer to allocate formats to (all excluded or none)")
    return found


# ----------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------
_BYTES_CACHE: dict[tuple, int] = {}


def layer_bytes(linear: nn.Linear, spec: QuantSpec) -> int:
    """Bytes :func:`qexport.quantize` stores for ``linear`` in ``spec``: codes, scales, zero points (and NF4
    double-quantization tensors) plus the float bias, as :func:`qexport.model_size` counts them.

    Found by quantizing a zero weight of the same shape, so it follows the storage layout of
    :func:`qexport.formats.quantize_weight` exactly (the observer does not change what is stored).
    """
    from qexport.formats import quantize_weight

    shape = tuple(linear.weight.shape)
    key = (shape, spec)
    if key not in _BYTES_CACHE:
        probe = dataclasses.replace(spec, observer=Observer.MINMAX)
        _BYTES_CACHE[key] = quantize_weight(torch.zeros(shape), probe).nbytes
    bias = linear.bias
    return _BYTES_CACHE[key] + (bias.numel() * bias.element_size() if bias is not None else 0)


# ----------------------------------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """Estimated loss increase ``values[i][j]`` (nats) of quantizing only layer ``names[i]`` to ``candidates[j]``."""

    names: list[str]
    candidates: list[QuantSpec]
    values: list[list[float]]
    method: str
    base_loss: float  # calibration loss of the float model (nats per token)
    tokens: int  # calibration tokens predicted
    seconds: float = 0.0

    def value(self, name: str, spec: QuantSpec) -> float:
        return self.values[self.names.index(name)][self.candidates.index(spec)]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base_loss": self.base_loss, "tokens": self.tokens, "seconds": self.seconds,
                "candidates": [c.to_dict() for c in self.candidates],
                "layers": {n: v for n, v in zip(self.names, self.values)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sensitivity":
        try:
            return cls(names=list(d["layers"]), candidates=[QuantSpec.from_dict(c) for c in d["candidates"]],
                       values=[[float(x) for x in v] for v in d["layers"].values()], method=d["method"],
                       base_loss=float(d["base_loss"]), tokens=int(d["tokens"]), seconds=float(d.get("seconds", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidConfig(f"not a sensitivity table ({type(e).__name__}: {e})") from None

    def to_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        from qexport._io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n", overwrite=overwrite)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Sensitivity":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidConfig(f"sensitivity file {str(path)!r} cannot be read: {e}") from None


def _batches(calibration, batch_size: int) -> list[torch.Tensor]:
    from qexport.algorithms.calibration import calibration_batches

    batches = calibration_batches(calibration, batch_size=batch_size)
    for b in batches:
        if b.is_floating_point() or b.dim() != 2 or b.shape[1] < 2:
            raise CalibrationError("allocate() measures next-token loss: give token ids [samples, seq_len >= 2]")
    return batches


def _nll_sum(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    from qexport.algorithms.common import model_logits

    logits = model_logits(model, batch, "allocate()")
    target = batch[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return nll, target.numel()


def _rtn_error(w: torch.Tensor, spec: QuantSpec, name: str) -> torch.Tensor:
    from qexport.formats import fake_quantize

    w32 = w.detach().to(torch.float32)
    return fake_quantize(w32, spec, name=name) - w32


def _fisher(model: nn.Module, layers: list[tuple[str, nn.Linear]], candidates: Sequence[QuantSpec],
            batches: list[torch.Tensor], progress: bool) -> tuple[list[list[float]], float, int]:
    """Diagonal empirical Fisher of each weight from per-sequence gradients, then 1/2 sum(F * dW^2)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for _, m in layers]
    for w in weights:
        w.requires_grad_(True)
    fisher = [torch.zeros(w.shape, dtype=torch.float32) for w in weights]
    total = 0.0
    tokens = 0
    seqs = [s[None] for b in batches for s in b]
    iterator = seqs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(seqs, desc="fisher", unit="seq", leave=False, disable=None)
    try:
        for seq in iterator:
            nll, count = _nll_sum(model, seq)
            grads = torch.autograd.grad(nll / count, weights, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f.add_(g.detach().float().cpu().square().mul_(count))  # per-token Fisher, see module doc
            total += float(nll.detach())
            tokens += count
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    n = len(seqs)
    values = []
    for (name, mod), f in zip(layers, fisher):
        f.div_(n)
        w = mod.weight.detach().cpu()
        values.append([0.5 * float((f * _rtn_error(w, spec, name).square()).sum()) for spec in candidates])
    return values, total / tokens, tokens


class _Replay(nn.Module):
    """Stands in for a block whose outputs on the calibration batches were recorded: returns them in turn."""

    def __init__(self, outputs: list[Any], state: dict):
        super().__init__()
        self.outputs = outputs
        self.state = state

    def forward(self, *args, **kwargs):
        return self.outputs[self.state["batch"]]


@torch.no_grad()
def _true_loss(model: nn.Module, layers: list[tuple[str, nn.Linear]], candidates: Sequence[QuantSpec],
               batches: list[torch.Tensor], progress: bool) -> tuple[list[list[float]], float, int]:
    """Loss increase measured by running the model with one layer quantized at a time (blocks before it replayed)."""
    from qexport.algorithms.common import find_blocks

    names = [n for n, _ in layers]
    blocks = find_blocks(model, names, batches[0][:1])
    state = {"batch": 0}
    recorded: list[list[Any]] = [[] for _ in (blocks.modules if blocks else [])]
    hooks = []
    if blocks is not None:
        for i, blk in enumerate(blocks.modules):
            hooks.append(blk.register_forward_hook(lambda mod, a, out, i=i: recorded[i].append(out)))

    def loss() -> tuple[float, int]:
        total, count = 0.0, 0
        for b, batch in enumerate(batches):
            state["batch"] = b
            nll, c = _nll_sum(model, batch)
            total += float(nll)
            count += c
        return total / count, count

    try:
        base, tokens = loss()
    finally:
        for h in hooks:
            h.remove()

    container = model.get_submodule(blocks.prefix[:-1]) if blocks is not None and blocks.prefix else None

    def block_of(name: str) -> int:
        if container is None or not name.startswith(blocks.prefix):
            return 0
        head = name[len(blocks.prefix):].split(".")[0]
        return int(head) if head.isdigit() and int(head) < len(blocks.modules) else 0

    iterator = layers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="layer loss", unit="layer", leave=False, disable=None)
    values = []
    for name, mod in iterator:
        first = block_of(name)
        for j in range(first):
            container[j] = _Replay(recorded[j], state)
        original = mod.weight
        try:
            row = []
            for spec in candidates:
                err = _rtn_error(original, spec, name)
                mod.weight = nn.Parameter((original.detach().float() + err.to(original.device)).to(original.dtype),
                                          requires_grad=False)
                row.append(loss()[0] - base)
            values.append(row)
        finally:
            mod.weight = original
            for j in range(first):
                container[j] = blocks.modules[j]
    return values, base, tokens


def measure_sensitivity(model: nn.Module, calibration, candidates: Iterable[QuantSpec | str] | None = None, *,
                        method: str = "fisher", exclude: Sequence[str] = DEFAULT_EXCLUDE,
                        layers: Sequence[str] | None = None, progress: bool = False) -> Sensitivity:
    """Sensitivity of every ``nn.Linear`` outside ``exclude`` (or only ``layers``) to every candidate format.

    ``calibration``: token ids ``[N, L]`` or a list of 1-D token tensors (``calibration_tokens``). See the
    module docstring for the two methods. The model is left as it was.
    """
    if method not in METHODS:
        raise InvalidConfig(f"unknown sensitivity method {method!r}; available: {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise InvalidConfig(f"allocate() expects a torch.nn.Module, got {type(model).__name__}")
    specs = resolve_candidates(candidates)
    found = _linears(model, exclude, layers)
    from qexport.algorithms.common import check_weight

    for name, mod in found:
        check_weight(mod.weight, name)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if method == "fisher":
            values, base, tokens = _fisher(model, found, specs, _batches(calibration, 1), progress)
        else:
            values, base, tokens = _true_loss(model, found, specs, _batches(calibration, 8), progress)
    finally:
        model.train(was_training)
    return Sensitivity([n for n, _ in found], list(specs), values, method, base, tokens,
                       round(time.perf_counter() - t0, 2))


# ----------------------------------------------------------------------------------------------------
# Multiple-choice knapsack
# ----------------------------------------------------------------------------------------------------
@dataclass
class KnapsackSolution:
    choice: list[int]  # chosen option per item
    cost: int
    value: float
    unit: int  # budget unit of the table; costs were exact multiples of it when ``exact``
    exact: bool  # True: optimal; False: at least as good as the optimum for budget - n_items * unit


def solve_mckp(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int,
               max_cells: int = MAX_DP_CELLS) -> KnapsackSolution:
    """Pick one option per item minimising the summed value with summed cost <= ``budget`` (see module doc).

    Raises :class:`InvalidConfig` when even the cheapest option of every item exceeds the budget.
    """
    import numpy as np

    n = len(costs)
    if n == 0 or len(values) != n or any(len(c) != len(v) or not c for c, v in zip(costs, values)):
        raise InvalidConfig("solve_mckp: every item needs the same number (>= 1) of costs and values")
    base = [min(c) for c in costs]
    slack = budget - sum(base)
    if slack < 0:
        raise InvalidConfig(f"the target of {budget} bytes is below the smallest possible size, {sum(base)} bytes "
                            "(every layer in its smallest candidate format): raise the target or add a smaller format")
    extra = [[int(x) - b for x in c] for c, b in zip(costs, base)]
    g = 0
    for row in extra:
        for x in row:
            g = math.gcd(g, x)
    unit = max(g, 1)
    if (slack // unit + 1) * n > max_cells:
        unit = max(unit, math.ceil(slack / max(max_cells // n - 1, 1)))
    exact = all(x % unit == 0 for row in extra for x in row)
    cap = slack // unit
    w = [[-(-x // unit) for x in row] for row in extra]  # rounded up: a rounded solution always fits

    inf = float("inf")
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, inf)
        for j, (wj, vj) in enumerate(zip(w[i], values[i])):
            if wj > cap:
                continue
            cand = dp[: cap + 1 - wj] + float(vj)
            better = cand < new[wj:]
            new[wj:][better] = cand[better]
            picks[i, wj:][better] = j
        dp = new
    b = int(np.argmin(dp))
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        j = int(picks[i, b])
        choice[i] = j
        b -= w[i][j]

    # spend what rounding left over: the best single switches that still fit, in exact bytes
    if not exact:
        left = slack - sum(extra[i][choice[i]] for i in range(n))
        while True:
            best = None
            for i in range(n):
                for j in range(len(costs[i])):
                    d = extra[i][j] - extra[i][choice[i]]
                    gain = values[i][choice[i]] - values[i][j]
                    if d <= left and gain > 0 and (best is None or gain > best[0]):
                        best = (gain, i, j, d)
            if best is None:
                break
            _, i, j, d = best
            choice[i] = j
            left -= d
    cost = sum(int(costs[i][choice[i]]) for i in range(n))
    value = float(sum(values[i][choice[i]] for i in range(n)))
    return KnapsackSolution(choice, cost, value, unit, exact)


# ----------------------------------------------------------------------------------------------------
# Allocation
# ----------------------------------------------------------------------------------------------------
@dataclass
class LayerAllocation:
    name: str
    shape: tuple[int, int]
    spec: QuantSpec
    bytes: int
    sensitivity: float
    options: dict[str, tuple[int, float]] = field(default_factory=dict)  # describe() -> (bytes, sensitivity)


@dataclass
class Allocation:
    """The chosen format of every layer, the recipe that applies them and how they were chosen."""

    recipe: Recipe
    layers: list[LayerAllocation]
    target_bytes: int
    total_bytes: int  # = model_size(quantize(model, recipe)).quantized_bytes
    params: int  # weight elements of the allocated layers
    predicted_loss_increase: float  # summed sensitivities of the choices (nats per token)
    sensitivity: Sensitivity
    optimal: bool
    unit: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.params

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.spec.describe()] = out.get(layer.spec.describe(), 0) + 1
        return out

    def table(self) -> str:
        """One line per layer: name, shape, chosen format, bytes, sensitivity of each candidate (chosen in [])."""
        specs = self.sensitivity.candidates
        head = ["layer", "shape", "format", "bytes"] + [f"s({c.describe()})" for c in specs]
        rows = []
        for layer in self.layers:
            cells = [layer.name, f"{layer.shape[0]}x{layer.shape[1]}", layer.spec.describe(), str(layer.bytes)]
            for c in specs:
                s = f"{layer.options[c.describe()][1]:.3g}"
                cells.append(f"[{s}]" if c == layer.spec else s)
            rows.append(cells)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        summary = (f"{len(self.layers)} layers, {self.total_bytes} bytes of {self.target_bytes} "
                   f"({self.bits_per_weight:.3f} bits/weight), predicted loss increase "
                   f"{self.predicted_loss_increase:.4g} nats ({self.sensitivity.method}); "
                   + ", ".join(f"{k}: {v}" for k, v in self.counts().items()))
        return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows), summary])

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(), "target_bytes": self.target_bytes, "total_bytes": self.total_bytes,
            "params": self.params, "bits_per_weight": self.bits_per_weight,
            "predicted_loss_increase": self.predicted_loss_increase, "optimal": self.optimal, "unit": self.unit,
            "method": self.sensitivity.method, "base_loss": self.sensitivity.base_loss,
            "sensitivity_seconds": self.sensitivity.seconds, "counts": self.counts(),
            "layers": [{"name": la.name, "shape": list(la.shape), "format": la.spec.describe(), "bytes": la.bytes,
                        "sensitivity": la.sensitivity} for la in self.layers],
        }


def plan_allocation(model: nn.Module, calibration=None, *, target_bytes: int | str | None = None,
                    bits_per_weight: float | None = None, candidates: Iterable[QuantSpec | str] | None = None,
                    method: str = "fisher", exclude: Sequence[str] = DEFAULT_EXCLUDE, algorithm: str = "rtn",
                    options: dict | None = None, name: str | None = None, sensitivity: Sensitivity | None = None,
                    progress: bool = False) -> Allocation:
    """Measure sensitivities (or use ``sensitivity``) and choose formats; see :func:`allocate`."""
    if (target_bytes is None) == (bits_per_weight is None):
        raise InvalidConfig("give exactly one of target_bytes (bytes of the quantized linears) or bits_per_weight")
    if bits_per_weight is not None and (isinstance(bits_per_weight, bool)
                                        or not isinstance(bits_per_weight, (int, float)) or bits_per_weight <= 0):
        raise InvalidConfig(f"bits_per_weight must be a positive number, got {bits_per_weight!r}")
    specs = resolve_candidates(candidates)
    found = _linears(model, exclude, None)
    if sensitivity is None:
        if calibration is None:
            raise CalibrationError("allocate() needs calibration data: token ids [N, L], e.g. "
                                   "qexport.algorithms.calibration_tokens(text, tokenizer, samples=4, seq_len=512)")
        sensitivity = measure_sensitivity(model, calibration, specs, method=method, exclude=exclude,
                                          progress=progress)
    else:
        missing = [n for n, _ in found if n not in sensitivity.names]
        absent = [c.describe() for c in specs if c not in sensitivity.candidates]
        if missing or absent:
            raise InvalidConfig(f"the sensitivity table lacks layer(s) {missing[:3]} or candidate(s) {absent}: "
                                "measure it again for this model and these candidates")
    params = sum(m.weight.numel() for _, m in found)
    budget = parse_size(target_bytes) if target_bytes is not None else int(math.floor(bits_per_weight * params / 8))
    costs = [[layer_bytes(m, c) for c in specs] for _, m in found]
    vals = [[sensitivity.value(n, c) for c in specs] for n, _ in found]
    try:
        sol = solve_mckp(costs, vals, budget)
    except InvalidConfig:
        smallest = sum(min(c) for c in costs)
        raise InvalidConfig(
            f"target of {budget} bytes ({8 * budget / params:.3f} bits/weight) is below the smallest size these "
            f"candidates allow, {smallest} bytes ({8 * smallest / params:.3f} bits/weight, every layer in its "
            "smallest format): raise the target or add a smaller candidate") from None
    layers = []
    for (n, m), c_row, v_row, j in zip(found, costs, vals, sol.choice):
        layers.append(LayerAllocation(n, tuple(m.weight.shape), specs[j], c_row[j], v_row[j],
                                      {s.describe(): (c, v) for s, c, v in zip(specs, c_row, v_row)}))
    bpw = 8.0 * sol.cost / params
    recipe = Recipe(
        name=name or f"auto-{bpw:.2f}bpw",
        description=(f"mixed precision from qexport allocate: {bpw:.3f} bits/weight in the linears, "
                     f"{sensitivity.method} sensitivity, candidates " + ", ".join(s.describe() for s in specs)),
        rules=tuple(Rule(la.name, la.spec) for la in layers),
        exclude=tuple(exclude), algorithm=algorithm, options=options,
    )
    return Allocation(recipe, layers, budget, sol.cost, params, sol.value, sensitivity, sol.exact, sol.unit)


def allocate(model: nn.Module, calibration=None, *, target_bytes: int | str | None = None,
             bits_per_weight: float | None = None, candidates: Iterable[QuantSpec | str] | None = None,
             method: str = "fisher", exclude: Sequence[str] = DEFAULT_EXCLUDE, algorithm: str = "rtn",
             options: dict | None = None, name: str | None = None, sensitivity: Sensitivity | None = None,
             progress: bool = False) -> Recipe:
    """A mixed-precision :class:`Recipe`: one rule per linear layer (its exact module name), formats chosen
    to minimise the summed sensitivity within the size target.

    Args:
        model: the float model (left unchanged).
        calibration: token ids ``[N, L]`` or a list of 1-D token tensors; a few sequences suffice
            (``calibration_tokens(text, tok, samples=4, seq_len=512)``).
        target_bytes: bytes of the quantized linears (codes + scales + zero points + bias), as
            ``model_size(q).quantized_bytes`` counts them; an int or a string like ``"60MB"``.
        bits_per_weight: or the same target as ``8 * bytes / weights`` of the allocated linears.
        candidates: formats to choose from (QuantSpecs or single-format preset names); default int8
            per-channel, int4 g128, int4 g64 and int2 g64 (asymmetric).
        method: ``'fisher'`` (default) or ``'loss'``; see the module docstring.
        exclude: layers that stay float (and are not counted).
        algorithm, options: the recipe's algorithm (``'rtn'``, ``'gptq'``, ``'awq'``) and its options; the
            sensitivities are measured with RTN either way.
        sensitivity: a :class:`Sensitivity` measured before (skips the measurement).

    Use :func:`plan_allocation` for the per-layer table and the byte count as well.
    """
    return plan_allocation(model, calibration, target_bytes=target_bytes, bits_per_weight=bits_per_weight,
                           candidates=candidates, method=method, exclude=exclude, algorithm=algorithm,
                           options=options, name=name, sensitivity=sensitivity, progress=progress).recipe
