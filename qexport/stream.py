"""Streamed quantization: a model whose float weights do not fit in memory, one decoder block at a time.

:func:`quantize_streamed` builds the model's skeleton on the meta device (no weights, as accelerate's
``init_empty_weights`` does), reads the small tensors outside the decoder blocks (final norm, rotary
frequencies) from the checkpoint's safetensors files, then for each decoder block in turn:

1. reads its tensors, one at a time (plain reads, no memory map), as float32;
2. runs the recipe's algorithm on it, on the calibration activations at its input;
3. runs it once more (quantized, as the in-memory algorithms do) to give the next block's inputs;
4. writes its stored tensors to the output folder's next shard, and puts the block back on the meta device.

The embedding and ``lm_head`` are read only when they are needed: to compute the first block's calibration
inputs, and at the end, to be quantized. The folder is then finished as
:func:`qexport.checkpoint.save_quantized` finishes one (config, manifest,
recipe, tokenizer), and renamed into place. Peak memory is about the larger of one block in float32 (with the
calibration activations at one block boundary) and the embedding with ``lm_head``, whatever the depth.

The result is bit-identical to loading the model, :func:`qexport.prepare.quantize_model` and
:func:`~qexport.checkpoint.save_quantized`: the algorithms below already work block by block, and the same
functions run here on the same inputs in the same order.

Streamed: round to nearest, GPTQ and AWQ (weights, dynamic activations, a quantized KV cache) on the families
of the architecture table (:mod:`qexport.models.architectures`), and rotation before round to nearest or GPTQ
(:class:`qexport.algorithms.rotate.RotationPlan`: its matrices made from the skeleton's shapes, each block
rotated as it is read, the embedding and ``lm_head`` when they are, the shared online rotation stored once).
SmoothQuant in two passes over the blocks: the first runs each float block on the calibration
activations for its statistics, folds its scales and runs the folded block on the probe window, and
checks the logits at the end as :func:`qexport.algorithms.smoothquant.smooth_model` does; the second reads
each block again, folds the same scales and rounds it. Not streamed: static activation scales (calibrated
on the whole quantized model after quantizing), refused with the way to run them in memory.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexport._io import OutputExists
from qexport._safetensors import SafetensorsFolder, TensorEntry
from qexport.checkpoint import _release_freed_memory
from qexport.errors import CheckpointError, InvalidConfig, UnsupportedOp

__all__ = ["quantize_streamed", "StreamResult", "STREAMED_ALGORITHMS", "write_random_llama", "peak_rss_bytes"]

STREAMED_ALGORITHMS = ("rtn", "gptq", "awq", "smoothquant")


@dataclass
class StreamResult:
    """What :func:`quantize_streamed` did: the folder written and its report, and the time and peak memory."""

    folder: Any  # qexport.checkpoint.SavedFolder
    report: Any  # qexport.api.QuantizationReport
    seconds: float
    blocks: int
    peak_rss_bytes: int | None
    spilled_bytes: int = 0  # calibration activations written to disk (0: kept in memory)


def _check_recipe(recipe) -> None:
    why = None
    if recipe.algorithm not in STREAMED_ALGORITHMS:
        why = f"algorithm {recipe.algorithm!r}"
    elif recipe.needs_calibration:
        why = "static activation scales (calibrated on the whole quantized model)"
    if why:
        raise UnsupportedOp(f"recipe {recipe.name!r} cannot be quantized block by block: {why}; quantize it in "
                            f"memory (without --stream), or use an algorithm of {', '.join(STREAMED_ALGORITHMS)}")


def _skeleton(path: Path):
    """The model built from its config on the meta device: every module, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types; report one line
        raise CheckpointError(f"could not read the config of {str(path)!r}: {str(e).splitlines()[0]}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    if parameter:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def _rebuild(root: nn.Module, owner: str, config) -> None:
    """A module whose buffers are computed, not stored (rotary frequencies, a scaled embedding's factor): built
    again, on the CPU."""
    mod = root.get_submodule(owner)
    if isinstance(getattr(mod, "scalar_embed_scale", None), float):  # transformers' *ScaledWordEmbedding
        mod._buffers["embed_scale"] = torch.tensor(mod.scalar_embed_scale)  # as its __init__ makes it
        return
    try:
        fresh = type(mod)(config=config)
    except TypeError:
        raise UnsupportedOp(f"{owner or type(root).__name__} ({type(mod).__name__}) has buffers the checkpoint does "
                            "not store and that qexport cannot rebuild; quantize this model in memory") from None
    parent, _, leaf = owner.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, fresh)


def _materialize(model: nn.Module, source: SafetensorsFolder, want, tied: bool = False) -> None:
    """Read the parameters and persistent buffers of ``model`` whose names ``want(name)`` accepts and that are
    still on the meta device, as float32; rebuild the modules whose buffers are computed, not stored. A tied
    ``lm_head`` (``tied``: the checkpoint stores the embedding only) is left to the caller."""
    stored = source.names
    rebuild = set()
    for kind, items in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in list(items):
            if t is None or t.device.type != "meta" or not want(name):
                continue
            if name in stored:
                value = source.get(name)
                _set_tensor(model, name, value.to(torch.float32) if value.is_floating_point() else value,
                            kind == "parameter")
            elif kind == "buffer":
                rebuild.add(name.rpartition(".")[0])
            elif not (tied and name.endswith("lm_head.weight")):
                raise CheckpointError(f"{str(source.folder)!r} lacks the tensor {name!r}")
    for owner in sorted(rebuild):
        _rebuild(model, owner, model.config)


def _release(block: nn.Module) -> None:
    """Every tensor of ``block`` back on the meta device (its bytes are in the output folder), but the online
    rotation that every block shares."""
    from qexport.algorithms.rotate import OnlineRotation

    for mod in block.modules():
        if isinstance(mod, OnlineRotation):
            continue
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None and v.device.type != "meta":
                    meta = torch.empty_like(v, device="meta")
                    store[k] = nn.Parameter(meta, requires_grad=False) if isinstance(v, nn.Parameter) else meta
    gc.collect()
    _release_freed_memory()


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (``getrusage``: kilobytes on Linux)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def quantize_streamed(model_dir: str | os.PathLike, recipe, out: str | os.PathLike, *, tokenizer=None,
                      calibration=None, force: bool = False, layout: str = "auto",
                      provenance: dict[str, Any] | None = None, progress: bool = False,
                      max_shard_bytes: int | None = None, max_activation_bytes: int | None = None) -> StreamResult:
    """Quantize the Hugging Face checkpoint folder ``model_dir`` (safetensors) block by block into the saved
    folder ``out`` (see the module docstring); returns a :class:`StreamResult`.

    Args are those of :func:`qexport.prepare.quantize_model` and :func:`qexport.checkpoint.save_quantized`;
    ``calibration``: token ids ``[N, L]`` (or a :class:`~qexport.prepare.CalibrationSet`), for GPTQ and AWQ.
    Each decoder block is written to a shard of its own (``max_shard_bytes`` splits one further). The
    calibration activations at a block boundary stay in memory up to ``max_activation_bytes`` (by default a
    quarter of the memory available when it starts) and are spilled to disk beyond (0: always).
    """
    from qexport.algorithms.common import (Blocks, CalibrationWork, LayerTask, counting_work,
                                           finite_tasks, run_block, split_by_block)
    from qexport.api import QuantizationReport, _algorithm_batches, _quantize_embedding, plan_layers
    from qexport.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, save_quantized
    from qexport.config import load_recipe
    from qexport.models.architectures import architecture, describe
    from qexport.prepare import _tokens

    t0 = time.perf_counter()
    recipe = load_recipe(recipe)
    _check_recipe(recipe)
    if layout not in ("auto", "compressed-tensors", "qexport"):
        raise InvalidConfig(f"layout={layout!r} is not valid; allowed: 'auto', 'compressed-tensors', 'qexport'")
    path = Path(model_dir).expanduser()
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise OutputExists(f"{str(out)!r} already exists; pass force=True / --force to replace it")
    tokens, cal_provenance = (None, None)
    if recipe.needs_data:
        from qexport.prepare import CalibrationSet

        tokens, cal_provenance = _tokens(calibration if calibration is not None else CalibrationSet(), tokenizer)
    batches = _algorithm_batches(recipe, tokens if recipe.algorithm_needs_data else None)

    source = SafetensorsFolder(path)
    model = _skeleton(path)
    arch = architecture(model, "streamed quantization", "quantize this model in memory (without --stream)")
    blocks = model.get_submodule(arch.layers)
    prefix = arch.layers + "."
    source_tied = bool(getattr(model.config, "tie_word_embeddings", False))
    rotation = _rotation_plan(model, recipe)
    # the embedding and lm_head (a vocabulary x hidden table each) stay on the meta device until they are needed
    in_tables = (f"{arch.embed}.", f"{arch.lm_head}.")

    def load_tables() -> None:
        _materialize(model, source, lambda name: name.startswith(in_tables), tied=source_tied)
        embed, head = model.get_submodule(arch.embed), model.get_submodule(arch.lm_head)
        if source_tied:
            head.weight = embed.weight
        if rotation is not None:
            rotation.rotate_tables(model)

    # the rest outside the blocks (final norm, rotary frequencies) now, on the CPU
    _materialize(model, source, lambda name: not name.startswith((prefix, *in_tables)))
    report = QuantizationReport(recipe=recipe.to_dict(), calibration=cal_provenance)
    if rotation is not None:
        rotation.fold_final_norm(model)
        report.rotation = rotation.report().to_dict()
    candidates, embeddings, tied = plan_layers(model, recipe, report)  # on the skeleton: a tie is one tensor
    rule_of = {name: rule for name, _, rule in candidates}
    by_block, rest = split_by_block(Blocks(prefix, list(blocks)), [LayerTask(name, mod, rule.weight)
                                                                     for name, mod, rule in candidates
                                                                     if name not in tied])
    if rest and recipe.algorithm == "gptq" and any(t.name != arch.lm_head for t in rest):
        raise UnsupportedOp(f"streamed GPTQ quantizes the decoder blocks and lm_head; {rest[0].name} is outside "
                            "them: quantize this model in memory (without --stream)")
    facts = describe(model, arch) if recipe.algorithm in ("awq", "smoothquant") else None
    work = CalibrationWork()
    out.parent.mkdir(parents=True, exist_ok=True)
    spill = None  # the calibration activations on disk, when they do not fit the budget
    budget = _spill_budget(max_activation_bytes)
    if batches and budget is not None and sum(b.numel() for b in batches) * model.config.hidden_size * 4 > budget:
        spill = ActivationSpill(Path(tempfile.mkdtemp(prefix=f".{out.name}.activations.", dir=out.parent)))
    if recipe.algorithm == "gptq" and spill is None:  # as quantize_model_gptq batches them (all in memory)
        from qexport.algorithms.gptq import one_batch, widest

        batches = one_batch(batches, widest([t for ts in by_block.values() for t in ts]))

    writer = ShardWriter(Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)),
                         max_shard_bytes or DEFAULT_SHARD_BYTES)
    results: dict[str, Any] = {}
    done: dict[str, Any] = {}  # linear -> its report line, added after the embeddings', as quantize() does
    written_once: set[int] = set()  # the online rotation every block shares: written with the first
    try:
        smooth, smooth_s = None, 0.0  # SmoothQuant's scales, block by block (its first pass)
        if recipe.algorithm == "smoothquant":
            t1 = time.perf_counter()
            with counting_work(work):
                smooth = _smoothquant_scales(model, source, arch, blocks, by_block, batches,
                                             recipe.options["alpha"], load_tables, spill)
            smooth_s = time.perf_counter() - t1
        n = len(blocks)
        last = max(by_block, default=-1)
        needs_inputs = recipe.algorithm not in ("rtn", "smoothquant")
        head_gptq = bool(rest) and recipe.algorithm == "gptq"
        run_to = n - 1 if head_gptq else last  # the blocks whose outputs are needed
        inputs, head_acc, chosen = None, None, None
        iterator = range(n)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"quantize {recipe.name}, streamed", unit="block", leave=False,
                            disable=None)
        algorithm_s = smooth_s  # time in the algorithm and its forwards, not in reading and writing
        for i in iterator:
            block = blocks[i]
            here = f"{prefix}{i}."
            _materialize(model, source, lambda name: name.startswith(here))
            if rotation is not None:
                rotation.rotate_layer(block)
            if smooth is not None and smooth.get(i):
                from qexport.algorithms.awq import fold_scales
                from qexport.algorithms.smoothquant import block_groups

                for g, s in zip(block_groups(block, facts, i, _finite_ids(by_block.get(i, [])), warn=False), smooth[i]):
                    if s is not None:
                        fold_scales(g, s)
            t1 = time.perf_counter()
            with counting_work(work):
                if needs_inputs and i == 0:
                    load_tables()
                    inputs = _capture(model, block, batches, spill)
                    for t in (model.get_submodule(arch.embed), model.get_submodule(arch.lm_head)):
                        _release(t)
                tasks = by_block.get(i, [])
                given = None
                if tasks and recipe.algorithm == "gptq":
                    from qexport.algorithms.gptq import gptq_block

                    given = gptq_block(block, finite_tasks(tasks, results), inputs, recipe.options, results)
                elif tasks and recipe.algorithm == "awq":
                    from qexport.algorithms.awq import _awq_block

                    notes: set[str] = set()
                    given = _awq_block(block, facts, finite_tasks(tasks, results), inputs, recipe.options, results,
                                       notes)
                    for note in sorted(notes):
                        warnings.warn(f"qexport: awq: block {i}: {note}", stacklevel=2)
                if needs_inputs and i < run_to:
                    inputs = given if given is not None else [inp.with_hidden(run_block(block, inp))
                                                              for inp in inputs]
                elif head_gptq and i == n - 1:
                    final = model.get_submodule(arch.final_norm)
                    head_acc = _head_hessian(model.get_submodule(arch.lm_head), final, block, inputs)
            algorithm_s += time.perf_counter() - t1
            if i >= run_to:
                inputs = None
            quantized = {}
            for t in tasks:  # nothing in a block is tied: no shared table (it would keep the block's bytes alive)
                qmod = _swap(model, t.name, t.module, rule_of[t.name], results.get(t.name), done, {})
                if qmod is not None:
                    quantized[t.name] = qmod
            chosen = _check_layout(model, quantized, recipe, layout if chosen is None else chosen, embeddings, tied)
            writer.write(_block_entries(block, here, quantized, chosen, written_once))
            _release(block)
        # outside the blocks: the embeddings (to nearest) and lm_head (GPTQ on the last block's outputs, or to
        # nearest; a tied one shares its embedding's stored weight)
        load_tables()
        shared: dict[tuple, Any] = {}
        for name, mod, rule in embeddings:
            _quantize_embedding(model, name, mod, rule, shared, report)
        outside = tied | {t.name for t in rest}
        for name, mod, rule in [c for c in candidates if c[0] in outside]:
            result = None
            if head_gptq and name not in tied:
                t1 = time.perf_counter()
                with counting_work(work):
                    result = _gptq_head(name, mod, rule, head_acc, recipe.options)
                algorithm_s += time.perf_counter() - t1
            _swap(model, name, mod, rule, result, done, shared)
        report.layers += [done[c[0]] for c in candidates if c[0] in done]
        if recipe.algorithm != "rtn":
            report.algorithm = {"name": recipe.algorithm, **work.to_dict(algorithm_s)}
        model.qexport_report = report
        seconds = time.perf_counter() - t0
        folder = save_quantized(model, out, tokenizer, force=force, layout=chosen or layout,
                                provenance={**(provenance or {}), "streamed": True, "quantize_s": round(seconds, 1)},
                                written=writer)
    finally:
        shutil.rmtree(writer.folder, ignore_errors=True)
        if spill is not None:
            shutil.rmtree(spill.folder, ignore_errors=True)
    return StreamResult(folder, report, time.perf_counter() - t0, len(blocks), peak_rss_bytes(),
                        spill.bytes_written if spill is not None else 0)


class SpilledInput:
    """A calibration batch's block input (:class:`qexport.algorithms.common.BlockInput`'s interface) whose hidden
    states live in a file of :class:`ActivationSpill`, read back each time they are used (the rest, small: the
    position embeddings and masks, stays in memory). Its file is deleted with it."""

    def __init__(self, spill: "ActivationSpill", h: torch.Tensor, rest: tuple, kwargs: dict, positional: bool):
        self.spill, self.rest, self._kwargs, self.positional = spill, rest, kwargs, positional
        self.shape, self.dtype = tuple(h.shape), h.dtype
        self.path = spill.write(h)
        weakref.finalize(self, self.path.unlink, missing_ok=True)

    @property
    def hidden(self) -> torch.Tensor:
        return self.spill.read(self.path, self.shape, self.dtype)

    @property
    def args(self) -> tuple:
        return (self.hidden, *self.rest) if self.positional else ()

    @property
    def kwargs(self) -> dict:
        return self._kwargs if self.positional else {**self._kwargs, "hidden_states": self.hidden}

    def with_hidden(self, h: torch.Tensor) -> "SpilledInput":
        return SpilledInput(self.spill, h, self.rest, self._kwargs, self.positional)


class ActivationSpill:
    """The calibration activations at a block boundary, on disk: raw tensor bytes, one file per batch, in a
    temporary folder (no pickling). :meth:`wrap` turns in-memory block inputs into :class:`SpilledInput`."""

    def __init__(self, folder: Path):
        self.folder, self.count, self.bytes_written = folder, 0, 0

    def write(self, h: torch.Tensor) -> Path:
        path = self.folder / f"{self.count:06d}.bin"
        self.count += 1
        h.detach().contiguous().view(torch.uint8).numpy().tofile(path)
        self.bytes_written += h.numel() * h.element_size()
        return path

    def read(self, path: Path, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype).reshape(shape)

    def wrap(self, inputs: list) -> list[SpilledInput]:
        out = []
        for inp in inputs:
            if isinstance(inp, SpilledInput):
                out.append(inp)
            elif inp.args:
                out.append(SpilledInput(self, inp.args[0], tuple(inp.args[1:]), dict(inp.kwargs), True))
            else:
                kwargs = {k: v for k, v in inp.kwargs.items() if k != "hidden_states"}
                out.append(SpilledInput(self, inp.kwargs["hidden_states"], (), kwargs, False))
        return out


def _spill_budget(max_activation_bytes: int | None) -> int | None:
    """The activation bytes kept in memory before spilling: ``max_activation_bytes``, or by default a quarter of
    the memory available now (``/proc/meminfo``; None, never spilling, where that cannot be read)."""
    if max_activation_bytes is not None:
        return max_activation_bytes
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kb * 1024 // 4


def _finite_ids(tasks) -> set[int]:
    """The ids of the modules of ``tasks`` that have finite weights (those SmoothQuant smooths)."""
    from qexport.algorithms.common import finite_tasks

    return {id(t.module) for t in finite_tasks(tasks, {})}


def _smoothquant_scales(model: nn.Module, source: SafetensorsFolder, arch, blocks, by_block: dict, batches: list,
                        alpha: float, load_tables, spill: ActivationSpill | None) -> dict[int, list] | None:
    """SmoothQuant's first pass (see the module docstring): each block's scales, in the order of its groups,
    folded as :func:`qexport.algorithms.smoothquant.smooth_model` folds them; None when the folds changed the
    float logits on the probe window beyond float rounding (the model is then left unsmoothed, as there)."""
    from qexport.algorithms.common import capture_block_inputs, run_block
    from qexport.algorithms.awq import _relative_change
    from qexport.algorithms.smoothquant import AbsMax, block_groups, changed_too_much, fold_block
    from qexport.models.architectures import describe

    facts = describe(model, arch)
    prefix = arch.layers + "."
    tables = (model.get_submodule(arch.embed), model.get_submodule(arch.lm_head))
    load_tables()
    inputs = _capture(model, blocks[0], batches, spill)
    probe = capture_block_inputs(model, blocks[0], [batches[0][:1]])[0]
    for t in tables:
        _release(t)
    plain, folded = probe, probe  # the probe window through the float blocks, and through the folded ones
    scales: dict[int, list] = {}
    for i, block in enumerate(blocks):
        _materialize(model, source, lambda name: name.startswith(f"{prefix}{i}."))
        groups = block_groups(block, facts, i, _finite_ids(by_block.get(i, [])))
        with AbsMax([g.linears[0] for g in groups]) as stats:  # the float block's outputs: the next inputs
            inputs = [inp.with_hidden(run_block(block, inp)) for inp in inputs]
        plain = plain.with_hidden(run_block(block, plain))
        scales[i] = fold_block(groups, stats, alpha)
        folded = folded.with_hidden(run_block(block, folded))
        _release(block)
    load_tables()
    final = model.get_submodule(arch.final_norm)
    change = _relative_change(tables[1](final(folded.hidden)).float(), tables[1](final(plain.hidden)).float())
    for t in tables:
        _release(t)
    return None if changed_too_much(change) else scales


def _rotation_plan(model: nn.Module, recipe):
    """The recipe's rotation made from the skeleton's shapes (None without one), its online rotation installed
    and a tied ``lm_head`` untied, as :func:`qexport.algorithms.rotate.rotate_model` leaves the model."""
    if recipe.rotation == "none":
        return None
    from qexport.algorithms.rotate import RotationPlan

    plan = RotationPlan(model, recipe.rotation, recipe.options["rotate_seed"])
    plan.untie_head(model)  # on the meta device: lm_head gets a weight of its own, read when the tables are
    plan.install(model)
    return plan


def _swap(model: nn.Module, name: str, mod: nn.Linear, rule, result, done: dict, shared: dict):
    """:func:`qexport.api.install_linear` (rounded to nearest, through ``shared``, when there is no ``result``),
    its report line kept in ``done``, and the float weight dropped. Returns the QLinear, or None when the layer
    stays float."""
    from qexport.api import install_linear

    qmod, done[name] = install_linear(model, name, mod, rule, shared if result is None else None, result,
                                      stacklevel=3)
    if qmod is not None and mod.weight is not getattr(qmod, "weight", None):  # not needed any more
        mod.weight = nn.Parameter(torch.empty_like(mod.weight, device="meta"), requires_grad=False)
    return qmod


def _check_layout(model: nn.Module, quantized: dict, recipe, layout: str, embeddings: list, tied: set) -> str:
    """The tensor layout of the folder, fixed by the first block (``layout`` 'auto' becomes what it allows)
    and checked on every later one (a block the fixed layout cannot hold is an error naming the way out)."""
    from qexport import compressed

    if layout == "qexport":
        return layout
    why = compressed.why_not_expressible(model, quantized, recipe.to_dict())
    if why is None and embeddings:
        why = f"{embeddings[0][0]}: a quantized embedding (qexport's own)"
    if why is None and tied:
        why = f"{sorted(tied)[0]}: a quantized weight shared with another layer (qexport stores it once)"
    if why is None:
        return "compressed-tensors"
    if layout == "compressed-tensors":
        raise InvalidConfig(f"this model has no compressed-tensors form: {why}; pass layout='qexport' (--layout "
                            "qexport), fixed before the first block is written")
    return "qexport"


def _block_entries(block: nn.Module, here: str, quantized: dict, layout: str, shared: set[int]
                   ) -> list[TensorEntry]:
    """A block's tensors as the folder stores them: its quantized layers in ``layout``, the rest as they are,
    but for the online rotation every block shares, written with the first (``shared``: the ids of the
    modules written; the folder's manifest names the others aliases of it)."""
    from qexport import compressed
    from qexport.algorithms.rotate import OnlineRotation
    from qexport.checkpoint import _native_entries

    skip = tuple(f"{name}." for name in quantized)
    for name, mod in block.named_modules():
        if isinstance(mod, OnlineRotation):
            if id(mod) in shared:
                skip += (f"{here}{name}.",)
            shared.add(id(mod))
    entries = [TensorEntry.of(here + k, t) for k, t in block.state_dict().items() if not (here + k).startswith(skip)]
    for name, mod in quantized.items():
        entries += compressed.layer_entries(name, mod) if layout == "compressed-tensors" else _native_entries(name, mod)
    return entries


def _capture(model: nn.Module, block: nn.Module, batches: list, spill: ActivationSpill | None) -> list:
    """The first block's inputs, batch by batch, each on disk at once when ``spill`` is given."""
    from qexport.algorithms.common import capture_block_inputs

    if spill is None:
        return capture_block_inputs(model, block, batches)
    return [inp for b in batches for inp in spill.wrap(capture_block_inputs(model, block, [b]))]


def _head_hessian(head: nn.Module, final: nn.Module, block: nn.Module, inputs: list):
    """The Hessian of ``lm_head``'s inputs (the final norm of the last block's outputs), batch by batch."""
    from qexport.algorithms.common import run_block
    from qexport.algorithms.gptq import HessianAccumulator

    acc = HessianAccumulator(head.in_features)
    for inp in inputs:
        acc.add(final(run_block(block, inp)))
    return acc


def _gptq_head(name: str, mod: nn.Linear, rule, acc, options) -> Any:
    """GPTQ of ``lm_head`` on the Hessian of its inputs, as the in-memory pass."""
    from qexport.algorithms.common import LayerTask
    from qexport.algorithms.gptq import _quantize_task

    results: dict[str, Any] = {}
    _quantize_task(LayerTask(name, mod, rule.weight), acc, options, results)
    return results[name]


def write_random_llama(folder: str | os.PathLike, layers: int, hidden: int = 2048, intermediate: int = 5632,
                       vocab: int = 32000, head_dim: int = 64, kv_heads: int | None = None) -> int:
    """A random-initialized Llama checkpoint written straight to one bf16 safetensors file, a tensor at a time
    (never whole in memory), with its ``config.json``: what the streaming tests and bench quantize. The
    defaults are TinyLlama-1.1B's shape (22 layers of them: 1.1B parameters). Returns the parameter count."""
    from transformers import LlamaConfig

    from qexport._safetensors import write_safetensors

    heads = hidden // head_dim
    kv_heads = kv_heads or max(1, heads // 8)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kv = kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden),
                       p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})

    def make(i: int, shape: tuple[int, ...]):
        if len(shape) == 1:
            return lambda: torch.ones(shape, dtype=torch.bfloat16)
        return lambda: (torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02).to(torch.bfloat16)

    write_safetensors(folder / "model.safetensors", [TensorEntry(n, torch.bfloat16, s, make(i, s))
                                                     for i, (n, s) in enumerate(shapes.items())])
    cfg.save_pretrained(folder)
    return sum(math.prod(s) for s in shapes.values())
