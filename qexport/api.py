"""Eager quantization of a PyTorch model and its size accounting."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from qexport.config import Recipe, load_recipe
from qexport.errors import CalibrationError, InvalidConfig, QExportError
from qexport.modules import QEmbedding, QLinear, embed_scale_of

__all__ = ["quantize", "calibrate", "LayerReport", "QuantizationReport", "SizeReport", "model_size"]


@dataclass
class LayerReport:
    name: str
    kind: str  # module class name
    status: str  # "quantized" | "float"
    spec: str | None = None  # QuantSpec.describe() when quantized
    reason: str = ""  # why it stayed float
    shape: tuple[int, int] | None = None


@dataclass
class QuantizationReport:
    recipe: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    rotation: dict[str, Any] | None = None  # what the recipe's rotation did (RotationReport.to_dict())
    calibration: dict[str, Any] | None = None  # where calibration windows came from (qexport.prepare)
    algorithm: dict[str, Any] | None = None  # an algorithm's time and work (CalibrationWork.to_dict(), its name)

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status == "quantized"]

    @property
    def kept_float(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status == "float"]

    def to_dict(self) -> dict[str, Any]:
        d = {"recipe": self.recipe, "layers": [asdict(layer) for layer in self.layers]}
        if self.rotation is not None:
            d["rotation"] = self.rotation
        if self.calibration is not None:
            d["calibration"] = self.calibration
        if self.algorithm is not None:
            d["algorithm"] = self.algorithm
        return d

    def algorithm_summary(self) -> str:
        """One line: the algorithm's time and its calibration forwards' work (empty for round to nearest)."""
        a = self.algorithm
        if not a:
            return ""
        rate = f", {a['forward_gflop_per_s']:g} GFLOP/s" if a["forward_gflop_per_s"] else ""
        return (f"{a['name']}: {a['seconds']:.0f} s, of which {a['forward_seconds']:.0f} s in {a['forwards']} "
                f"calibration forwards ({a['forward_flops'] / 1e9:.1f} GFLOP{rate})")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, recipe: "Recipe | str | os.PathLike", calibration=None, *,
             progress: bool = False) -> nn.Module:
    """Quantize the weights of ``model`` in place according to ``recipe``; returns ``model``.

    Every ``nn.Linear`` whose name matches a rule of the recipe (and no ``exclude`` pattern) is replaced by
    a :class:`~qexport.modules.QLinear` that stores packed integer weights, and every ``nn.Embedding`` that a
    rule names (catch-all patterns do not reach embeddings: :meth:`Recipe.rule_for`) by a
    :class:`~qexport.modules.QEmbedding` (integer grids or GGML blocks, rounded to nearest whatever the
    algorithm). Modules that share one float weight (a tied embedding and ``lm_head``) and get the same format
    share one stored weight, rounded to nearest (an algorithm leaves a tied ``lm_head`` to its embedding). A
    layer that cannot be quantized (NaN/inf weights, an unsupported shape) stays in float with a warning.
    What happened to each layer is in ``model.qexport_report`` (a :class:`QuantizationReport`).

    Args:
        model: any ``nn.Module``.
        recipe: a :class:`~qexport.config.Recipe`, a preset name (``"w4g128"``) or a path to a JSON recipe.
            With the option ``rotate`` (``'hadamard'`` / ``'random'``) a Llama model is first rotated in
            place (:func:`qexport.algorithms.rotate.rotate_model`): same float outputs, weights easier to
            quantize, one extra MatMul before each down_proj.
        calibration: for the algorithms that need data (``'gptq'``, ``'awq'``): token ids ``[N, L]`` or a
            list of 1-D token tensors (from a text: ``qexport.algorithms.calibration_tokens``); for a model
            that takes float inputs, a float tensor ``[N, ...]``. Not used by ``'rtn'`` (static activation
            scales are calibrated afterwards with :func:`calibrate`).
        progress: show a progress bar.
    """
    if not isinstance(model, nn.Module):
        raise InvalidConfig(f"quantize() expects a torch.nn.Module, got {type(model).__name__}")
    recipe = load_recipe(recipe)
    batches = _algorithm_batches(recipe, calibration)
    report = QuantizationReport(recipe=recipe.to_dict())
    if recipe.rotation != "none":  # before anything is quantized: the rotated weights are the ones to quantize
        from qexport.algorithms.rotate import rotate_model

        report.rotation = rotate_model(model, recipe.rotation, recipe.options["rotate_seed"]).to_dict()

    candidates, embeddings, tied = plan_layers(model, recipe, report)
    computed = None
    if recipe.algorithm != "rtn":
        from qexport.algorithms import get_algorithm
        from qexport.algorithms.common import LayerTask, counting_work

        tasks = [LayerTask(name, mod, rule.weight) for name, mod, rule in candidates if name not in tied]
        was_training = model.training
        model.eval()  # no dropout while calibrating
        t0 = time.perf_counter()
        try:
            with counting_work() as work:
                computed = get_algorithm(recipe.algorithm)(model, tasks, batches, recipe.options, progress=progress)
        finally:
            model.train(was_training)
        report.algorithm = {"name": recipe.algorithm, **work.to_dict(time.perf_counter() - t0)}

    shared: dict[tuple, Any] = {}  # (float weight, spec) -> its QuantizedWeight: tied weights quantized once
    for name, mod, rule in embeddings:
        _quantize_embedding(model, name, mod, rule, shared, report)
    iterator = candidates
    if progress and computed is None:
        from tqdm.auto import tqdm

        iterator = tqdm(candidates, desc=f"quantize {recipe.name}", unit="layer", leave=False, disable=None)
    for name, mod, rule in iterator:
        rounded = computed is None or name in tied
        report.layers.append(install_linear(model, name, mod, rule, shared if rounded else None,
                                            None if rounded else computed.get(name), stacklevel=3)[1])
    model.qexport_report = report
    return model


def install_linear(model: nn.Module, name: str, mod: nn.Linear, rule, shared: dict | None, result=None,
                   stacklevel: int = 2) -> tuple[QLinear | None, LayerReport]:
    """Put the QLinear of ``mod`` in its place: rounded to nearest when ``shared`` is given (the weights stored
    once across modules, :func:`_shared_weight`), else from an algorithm's ``result``. Returns it and its report
    line; a layer that cannot be quantized stays float (None), with a warning."""
    shape = tuple(mod.weight.shape)
    note = ""
    try:
        if shared is not None:
            qw, note = _shared_weight(shared, mod.weight, rule.weight, name)
            qmod = QLinear(qw, mod.bias, weight_dtype=mod.weight.dtype, act_spec=rule.activation)
        else:
            qmod = _qlinear_from_result(result, mod, name, rule)
    except QExportError as e:
        warnings.warn(f"qexport: {name} stays float: {e}", stacklevel=stacklevel + 1)
        return None, LayerReport(name, type(mod).__name__, "float", None, str(e), shape)
    _set_submodule(model, name, qmod)
    desc = rule.weight.describe() + (f", act {rule.activation.describe()}" if rule.activation else "")
    return qmod, LayerReport(name, "Linear", "quantized", desc, note, shape)


def plan_layers(model: nn.Module, recipe: Recipe, report: QuantizationReport) -> tuple[list, list, set[str]]:
    """What ``recipe`` does to ``model``'s layers: the linears to quantize and the embeddings a rule names, as
    ``(name, module, rule)``, and the names of the linears tied to such an embedding in the same format (a tied
    lm_head shares the table's stored weight, rounded to nearest, whatever the algorithm: the table is stored
    once). The linears that stay float, and the layers quantized already, get their lines in ``report``."""
    candidates, embeddings = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, (QLinear, QEmbedding)):
            report.layers.append(LayerReport(name, type(mod).__name__, "quantized", mod.spec.describe(),
                                             "already quantized", tuple(mod.quantized_weight().shape)))
        elif isinstance(mod, nn.Embedding):
            rule = recipe.rule_for(name, embedding=True)
            if rule is not None and rule.weight is not None:  # embeddings no rule names are not listed
                embeddings.append((name, mod, rule))
        elif isinstance(mod, nn.Linear):
            rule = recipe.rule_for(name)
            shape = tuple(mod.weight.shape)
            if rule is None or rule.weight is None:
                reason = "excluded by recipe" if rule is None and _excluded(recipe, name) else (
                    "recipe keeps it float" if rule is not None else "no rule matches")
                report.layers.append(LayerReport(name, type(mod).__name__, "float", None, reason, shape))
            else:
                candidates.append((name, mod, rule))
    tables = {(_tensor_key(m.weight), r.weight) for _, m, r in embeddings}
    tied = {name for name, mod, rule in candidates if (_tensor_key(mod.weight), rule.weight) in tables}
    return candidates, embeddings, tied


def _shared_weight(shared: dict, weight: torch.Tensor, spec, name: str):
    """The QuantizedWeight of ``weight`` in ``spec``, quantized once for every module that holds that tensor,
    and a note naming the module it is shared with ("" for the first)."""
    key = (_tensor_key(weight), spec)
    if key in shared:
        qw, first = shared[key]
        return qw, f"shares its stored weight with {first} (tied)"
    from qexport.formats import quantize_weight

    qw = quantize_weight(weight, spec, name=name)
    shared[key] = (qw, name)
    return qw, ""


def _quantize_embedding(model: nn.Module, name: str, mod: nn.Embedding, rule, shared: dict,
                        report: QuantizationReport) -> None:
    shape = tuple(mod.weight.shape)
    try:
        embed_scale_of(mod)  # a subclass other than a scaled embedding computes what qexport does not know
        if not (rule.weight.format.value == "int" or rule.weight.format.ggml) or rule.weight.double_quant:
            raise QExportError(f"embeddings are stored as integer grids or GGML blocks, not {rule.weight.describe()}")
        qw, note = _shared_weight(shared, mod.weight, rule.weight, name)
        qmod = QEmbedding.from_embedding(mod, rule.weight, name=name, qweight=qw)
    except QExportError as e:
        warnings.warn(f"qexport: {name} stays float: {e}", stacklevel=3)
        report.layers.append(LayerReport(name, type(mod).__name__, "float", None, str(e), shape))
        return
    _set_submodule(model, name, qmod)
    report.layers.append(LayerReport(name, "Embedding", "quantized", rule.weight.describe(), note, shape))


def _algorithm_batches(recipe: Recipe, calibration) -> list | None:
    """The calibration batches of an algorithm that needs data (checked before the model is touched)."""
    if not recipe.algorithm_needs_data:
        if calibration is not None:
            raise InvalidConfig(
                f"recipe {recipe.name!r} uses algorithm {recipe.algorithm!r}, which takes no calibration data: leave "
                "calibration out (static activation scales are calibrated after quantize() with qexport.calibrate)"
            )
        return None
    if calibration is None:
        raise CalibrationError(
            f"recipe {recipe.name!r} uses algorithm {recipe.algorithm!r}, which needs calibration data: pass "
            "calibration=token ids [N, L] or a list of 1-D token tensors, e.g. "
            "qexport.algorithms.calibration_tokens(text, tokenizer, samples=128, seq_len=512)"
        )
    from qexport.algorithms.calibration import calibration_batches

    return calibration_batches(calibration)


def _qlinear_from_result(result, linear: nn.Linear, name: str, rule) -> QLinear:
    """The QLinear of an algorithm's stored weight (an error it reported is raised here)."""
    if isinstance(result, QExportError):
        raise result
    if result is None:
        raise QExportError(f"{name}: the algorithm did not quantize this layer")
    return QLinear(result, linear.bias, weight_dtype=linear.weight.dtype, act_spec=rule.activation)


def _run_batch(model, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, torch.Tensor):
        if batch.numel() == 0:
            raise CalibrationError("a calibration batch is empty")
        model(batch)
    else:
        raise CalibrationError(
            f"calibration batches must be tensors, tuples of tensors or dicts of keyword arguments, "
            f"got {type(batch).__name__}"
        )


@torch.no_grad()
def calibrate(model, batches: Iterable, *, progress: bool = False) -> int:
    """Run ``batches`` through ``model`` to choose the static activation scales; returns the batch count.

    ``model`` is a model quantized by :func:`quantize` with a static-activation recipe (``w8a8-static``),
    or a model compiled with ``torch.compile(model, backend="qexport")`` and such a recipe. Each batch
    is a tensor (``model(batch)``), a tuple (``model(*batch)``) or a dict (``model(**batch)``). Ranges are
    observed with the min-max observer and frozen when the batches are exhausted.
    """
    from qexport import backend

    qlinears = [m for m in model.modules() if isinstance(m, QLinear) and m.needs_calibration] \
        if isinstance(model, nn.Module) else []
    compiled = backend.is_compiled_with_qexport(model)
    if not qlinears and not compiled:
        raise CalibrationError(
            "nothing to calibrate: quantize the model with a static-activation recipe (e.g. 'w8a8-static') "
            "or compile it with backend='qexport' first"
        )
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrate", unit="batch", leave=False, disable=None)
    for m in qlinears:
        m.observing = True
    count = 0
    try:
        with backend.calibrating() as observed_graphs:
            for batch in iterator:
                _run_batch(model, batch)
                count += 1
    finally:
        for m in qlinears:
            m.observing = False
    if count == 0:
        raise CalibrationError("the calibration set is empty: give at least one batch")
    if compiled and not qlinears and not observed_graphs:
        raise CalibrationError(
            "nothing to calibrate: this compiled model has no static-activation layers (recipe e.g. 'w8a8-static')"
        )
    for m in qlinears:
        m.freeze_calibration()
    _report_activation_fallbacks(model, qlinears)
    return count


def _report_activation_fallbacks(model: nn.Module, qlinears: list) -> None:
    """Warn about, and record in ``model.qexport_report``, the layers that ``QuantSpec.static_fallback_ratio``
    left with float activations."""
    names = {id(m): n for n, m in model.named_modules()}
    fallen = [(names.get(id(m), "?"), m) for m in qlinears if m.activation_fallback]
    if not fallen:
        return
    report = getattr(model, "qexport_report", None)
    rows = {layer.name: layer for layer in (report.layers if report is not None else [])}
    for name, m in fallen:
        if name in rows:
            rows[name].spec = f"{m.spec.describe()}, activations float"
            rows[name].reason = m.activation_fallback
    first, m = fallen[0]
    warnings.warn(f"{len(fallen)} layer(s) keep float activations (static_fallback_ratio): {first}: "
                  f"{m.activation_fallback}", stacklevel=4)  # the caller of calibrate() (under no_grad)


def _excluded(recipe: Recipe, name: str) -> bool:
    from qexport.config import match_pattern

    return any(match_pattern(p, name) for p in recipe.exclude)


# ----------------------------------------------------------------------------------------------------
# Size accounting
# ----------------------------------------------------------------------------------------------------
@dataclass
class SizeReport:
    """Bytes actually held by a model, deduplicated across tied tensors.

    ``total_bytes``: every parameter and buffer. ``quantized_bytes``: what the quantized layers (linears and
    embeddings) store (codes + scales + zero points + double-quant tensors + bias), a weight shared by a tied
    embedding and ``lm_head`` once. ``quantized_fp16_bytes``: the same layers' weights and biases at 2 bytes
    per element, the usual baseline for weight compression. ``float_bytes``: everything else (float
    embeddings, norms, layers kept float).
    """

    total_bytes: int
    quantized_bytes: int
    quantized_fp16_bytes: int
    float_bytes: int
    quantized_params: int  # number of weight elements held quantized

    @property
    def quantized_ratio_vs_fp16(self) -> float | None:
        if not self.quantized_fp16_bytes:
            return None
        return self.quantized_bytes / self.quantized_fp16_bytes

    @property
    def bits_per_weight(self) -> float | None:
        if not self.quantized_params:
            return None
        return 8.0 * self.quantized_bytes / self.quantized_params

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantized_ratio_vs_fp16"] = self.quantized_ratio_vs_fp16
        d["bits_per_weight"] = self.bits_per_weight
        return d


def _tensor_key(t: torch.Tensor) -> tuple:
    """Equal for tensors that are views of the same memory (tied weights). A tensor on the meta device has no
    memory to compare: it is equal only to itself, as a tie on a model built without weights is one tensor."""
    if t.device.type == "meta":
        return ("meta", id(t), tuple(t.shape), t.dtype)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def model_size(model: nn.Module) -> SizeReport:
    seen: set[tuple] = set()

    def new_bytes(tensors) -> int:
        """Bytes of the tensors not counted yet (a tied weight counts once)."""
        total = 0
        for t in tensors:
            key = _tensor_key(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    quantized = fp16 = params = 0
    qmods = [m for m in model.modules() if isinstance(m, (QLinear, QEmbedding))]
    for m in qmods:
        shared = _tensor_key(m.qdata) in seen  # a tied weight, counted with the first module that holds it
        quantized += new_bytes(list(m.buffers()) + list(m.parameters()))
        n, k = m.quantized_weight().shape
        n_weights = 0 if shared else n * k
        bias = getattr(m, "bias", None)
        params += n_weights
        fp16 += 2 * (n_weights + (bias.numel() if bias is not None else 0))
    other = new_bytes(list(model.parameters()) + list(model.buffers()))
    return SizeReport(quantized + other, quantized, fp16, other, params)
