"""``export_onnx``: a quantized causal LM with KV cache as a standard ONNX (QDQ) model in a folder.

The folder (written atomically: built under a temporary name, then renamed)::

    model.onnx            the graph; weights inside, or in model.onnx.data when they pass EXTERNAL_DATA_BYTES
    model.onnx.data       (large models only) external tensor data
    config.json           the Hugging Face config (+ generation_config.json when the model has one)
    tokenizer files       when a tokenizer was given: tokenizer.json, tokenizer_config.json, special_tokens_map.json
                          and chat_template.jinja, what transformers, ONNX Runtime GenAI and onnxruntime-extensions
                          read (a sentencepiece tokenizer.model only for a tokenizer without tokenizer.json)
    recipe.json           the recipe, as ``qexport recipes --show`` prints it
    export_report.json    which layers were quantized how, which stayed float and why, ORT session
                          settings, inputs / outputs, sizes
    genai_config.json     what onnxruntime-genai needs to run the folder (``og.Model(DIR)``), unless the report's
                          ``genai`` entry says why it cannot (:mod:`qexport.export.genai`)

Graph interface (optimum's names, so ``ORTModelForCausalLM``-style callers find what they expect):
inputs ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past + seq] int64, ``position_ids``
[batch, seq] int64, ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_dim] float32;
outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key`` / ``.value`` [batch, kv_heads, past + seq,
head_dim]. Batch, sequence and past lengths are dynamic (past may be 0 for the first step).

The graph is the canonical quantized form (``qexport`` custom ops, as every back-end sees it) exported by
``torch.onnx.export`` and lowered by :mod:`qexport.lowering`: no second quantizer. For the ONNX Runtime target
the model is captured by dynamo as one torch-level graph (:func:`capture`) and the compile back-end's ONNX
fusions run on it under the pass manager (:data:`qexport.passes.ONNX_FUSIONS`: RMSNorm, rotary embeddings,
grouped-query attention with its KV-cache update, static sizes), so that each becomes one opset-23 node
(``RMSNormalization``, ``RotaryEmbedding``, ``Attention``); the report's ``fusions`` has each pass's counts and
skip reasons. ``fuse=False`` and the TensorRT target export the model as traced, written out at opset 21.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexport._io import OutputExists, replace_folder
from qexport.errors import CalibrationError, InvalidConfig, ModelLoadError, UnsupportedOp

__all__ = ["export_onnx", "ExportResult", "EXTERNAL_DATA_BYTES", "MODEL_FILE", "DATA_FILE", "REPORT_FILE",
           "RECIPE_FILE", "TOKENIZER_FILES", "save_tokenizer", "input_names", "output_names"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
REPORT_FILE = "export_report.json"
RECIPE_FILE = "recipe.json"
# Tensors go to an external data file past this total: far below protobuf's 2 GiB limit on one message.
EXTERNAL_DATA_BYTES = 1 << 30
ATTENTION_FORMS = ("auto", "gqa", "standard")
_EXAMPLE = dict(batch=2, seq=6, past=5)  # distinct sizes, none 0 or 1, so that no axis is specialized
# The tokenizer files an export folder's runtimes read, when the tokenizer has a tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> list[str]:
    """Save ``tokenizer``'s files into ``folder``: only :data:`TOKENIZER_FILES` (those present) when it has a
    ``tokenizer.json``, which holds the whole tokenizer (a sentencepiece ``tokenizer.model`` beside it is ~100 MB
    nothing reads); everything ``save_pretrained`` writes otherwise. Returns the names written."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix=".tokenizer.", dir=folder) as tmp:
        tokenizer.save_pretrained(tmp)
        written = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        keep = [f for f in written if f in TOKENIZER_FILES] if "tokenizer.json" in written else written
        for name in keep:
            shutil.move(os.path.join(tmp, name), folder / name)
    return keep


@dataclass
class ExportResult:
    """Where the folder was written and what the export report says."""

    path: Path
    report: dict[str, Any]


def input_names(layers: int, kv_cache=None, attention_form: str = "standard") -> list[str]:
    """Graph inputs; with a quantized KV cache (a ``KVCacheSpec``) each past key / value is followed by its
    ``_scale`` (and ``_zero_point``) input (:mod:`qexport.kvcache`). The GroupQueryAttention form
    (:mod:`qexport.lowering.gqa`) has no ``position_ids``."""
    from qexport.kvcache import stored_names

    positions = [] if attention_form == "gqa" else ["position_ids"]
    return ["input_ids", "attention_mask", *positions] + stored_names(kv_cache, "past_key_values", layers)


def output_names(layers: int, kv_cache=None) -> list[str]:
    from qexport.kvcache import stored_names

    return ["logits"] + stored_names(kv_cache, "present", layers)


def kv_cache_spec(model: nn.Module):
    """The ``KVCacheSpec`` recorded in a quantized model's recipe (``Recipe.kv_cache``), or None."""
    from qexport.config import KVCacheSpec

    report = getattr(model, "qexport_report", None)
    recipe = getattr(report, "recipe", None) or {}
    return KVCacheSpec.parse(recipe.get("kv_cache"))


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class _KVCacheLM(nn.Module):
    """Flat-tensor interface of a Hugging Face causal LM with a KV cache: (ids, mask, positions, past k/v per
    layer) -> (logits, present k/v per layer). The past is given to the model as a ``DynamicCache``, or,
    with ``kv_cache`` (a ``KVCacheSpec``), as a ``QuantizedKVCache`` built from the stored codes and scales
    (:mod:`qexport.kvcache`)."""

    def __init__(self, model: nn.Module, layers: int, kv_cache=None):
        super().__init__()
        self.m = model
        self.layers = layers
        self.kv_cache = kv_cache

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        if self.kv_cache is not None:
            from qexport.kvcache import cache_from_flat, flat_from_cache

            cache = cache_from_flat(self.kv_cache, past, self.layers)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
            return (out.logits, *flat_from_cache(out.cache))
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
            # the inputs themselves, not update()'s concatenation of them to an empty tensor
            cache.layers[i].keys, cache.layers[i].values = past[2 * i], past[2 * i + 1]
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _prepare(model, recipe, tokenizer, calibration):
    """(quantized model, tokenizer, source model name or None) from a name / folder / module and a recipe."""
    from qexport.config import load_recipe
    from qexport.modules import QEmbedding, QLinear
    from qexport.prepare import quantize_model

    source = None
    if isinstance(model, (str, os.PathLike)):
        from qexport.models import load_model, source_name

        source = source_name(model)
        model, loaded_tok = load_model(model)
        tokenizer = tokenizer or loaded_tok
    elif not isinstance(model, nn.Module):
        raise InvalidConfig(f"export_onnx() expects a model name, a checkpoint folder or a torch.nn.Module, "
                            f"got {type(model).__name__}")
    if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
        raise ModelLoadError("export_onnx() needs a Hugging Face causal LM (a model with a decoder config)")
    already = any(isinstance(m, (QLinear, QEmbedding)) for m in model.modules())
    if recipe is None:  # as it is: quantized already, or the float reference export
        return model, tokenizer, source
    recipe = load_recipe(recipe)
    if already:
        raise InvalidConfig("export_onnx(): this model is already quantized; pass recipe=None to export it as is")
    if source is None:
        model = copy.deepcopy(model)
    if recipe.needs_data and calibration is None and tokenizer is None:
        raise CalibrationError(f"recipe {recipe.name!r} needs calibration data: pass calibration= (a CalibrationSet "
                               "with the tokenizer, or token ids [N, L])")
    return quantize_model(model, recipe, tokenizer, calibration), tokenizer, source


def check_tensorrt_modules(model: nn.Module) -> None:
    """TensorRT's QDQ rules (:mod:`qexport.lowering.tensorrt_rules`, the ones the lowering and the graph lint
    apply) on the quantized layers before exporting, so that a refusal comes before the slow export."""
    from qexport.lowering.tensorrt_rules import check_activation, check_weight
    from qexport.modules import QLinear

    for name, mod in model.named_modules():
        if not isinstance(mod, QLinear):
            continue
        spec, act = mod.spec, mod.act_spec
        check_weight(name, spec.format.value, spec.bits, spec.symmetric, mod.group, mod.in_features,
                     spec.granularity.value == "per_tensor")
        if act is not None:
            check_activation(name, dynamic=act.dynamic, symmetric=act.symmetric,
                             llm_int8=act.outlier_threshold is not None)


def _layer_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """``(qexport op type, exported qdata initializer name) -> module name`` for the quantized modules that share
    their stored weight (a tied embedding and lm_head): the exporter names the one initializer after either."""
    from qexport.modules import QEmbedding, QLinear, tied_groups

    mods = {n: m for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    names = {}
    for group in tied_groups(mods.items()):
        for name in group:
            op = "QEmbedding" if isinstance(mods[name], QEmbedding) else "QLinear"
            names.update({(op, f"m.{other}.qdata"): name for other in group})
    return names


def _set_constant(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """Register ``value`` as parameter or buffer ``target`` (a dotted path) of ``root``, making the submodules on
    the way."""
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        if not isinstance(getattr(mod, part, None), nn.Module):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)


def capture(wrapper: nn.Module, args: tuple, dynamic_shapes) -> "torch.fx.GraphModule":
    """``wrapper`` as one torch-level FX graph (dynamo, the graph form the compile back-end's passes read),
    inputs in ``wrapper``'s order, parameters and buffers as ``get_attr`` nodes named after their module paths
    (``m.model.layers.0.mlp.up_proj.qdata``), so that the ONNX initializers and the lowering report name the
    layers. Raises UnsupportedOp when dynamo cannot capture the model in one graph."""
    import itertools

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            gm = torch._dynamo.export(wrapper, dynamic_shapes=dynamic_shapes)(*args).graph_module
    except Exception as e:  # dynamo raises many types (graph breaks, unsupported calls, guard failures)
        raise UnsupportedOp(f"dynamo could not capture the model in one graph: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    paths: dict[int, str] = {}
    for name, t in itertools.chain(wrapper.named_parameters(remove_duplicate=False),
                                   wrapper.named_buffers(remove_duplicate=False)):
        paths.setdefault(id(t), name)
    renamed: dict[str, str] = {}  # dynamo's attribute name -> the module path
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target not in renamed:
            owner, _, attr = f".{node.target}".rpartition(".")
            owner_mod = gm.get_submodule(owner[1:])
            value = getattr(owner_mod, attr)
            path = paths.get(id(value), node.target)
            if path != node.target:
                _set_constant(gm, path, value)
                delattr(owner_mod, attr)
            renamed[node.target] = path
        node.target = renamed[node.target]
    gm.recompile()
    return gm


def _export_proto(model: nn.Module, target: str, nf4_form: str = "auto", fuse: bool = True,
                  embedding_form: str = "auto", accuracy_level: int | None = None, attention_form: str = "auto"):
    """The lowered ``onnx.ModelProto`` of ``model`` with the KV-cache interface, its lowering report, the
    fusion passes' results (``PassResult`` list) or why none ran (a string), and the ``attention_form`` entry."""
    from torch.export import Dim

    from qexport.lowering.core import BLOCKED_OPSET, lower
    from qexport.lowering.translate import FUSED_OPSET, onnx_program
    from qexport.modules import QLinear

    for name, mod in model.named_modules():
        if isinstance(mod, QLinear) and mod.needs_calibration and not mod.calibrated:
            raise CalibrationError(f"{name} quantizes activations statically but is not calibrated: run "
                                   "qexport.calibrate(model, batches) first, or pass calibration= to export_onnx()")
    layers, kv_heads, head_dim = kv_geometry(model.config)
    b, s, p = _EXAMPLE["batch"], _EXAMPLE["seq"], _EXAMPLE["past"]
    vocab = model.config.vocab_size
    kv = kv_cache_spec(model)
    if kv is None:
        past = [torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * layers)]
    else:  # codes, scales (and zero points) of a quantized cache
        from qexport.kvcache import example_stored

        past = [t for _ in range(2 * layers) for t in example_stored(kv, b, kv_heads, p, head_dim)]
    args = (torch.randint(0, vocab, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s).contiguous(), *past)
    dyn = Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in past))
    wrapper = _KVCacheLM(model, layers, kv).eval()
    names = dict(input_names=input_names(layers, kv), output_names=output_names(layers, kv))
    unfused = "not asked for" if not fuse else "TensorRT target (opset 21)" if target == "tensorrt" else None
    gm = None
    if unfused is None:
        try:
            gm = capture(wrapper, args, shapes)
        except UnsupportedOp as e:  # exported as traced, written out: slower in ONNX Runtime, the same numbers
            unfused = str(e)
            warnings.warn(f"{e}; exporting without the ONNX fusions (opset 21)", stacklevel=3)
    fusions: list | str = unfused
    if gm is not None:
        from qexport.passes import ONNX_FUSIONS, PassManager, fuse_attention

        # as the compile back-end does: hand-written attention to SDPA, then the ONNX fusions
        fusions = PassManager([fuse_attention, *ONNX_FUSIONS]).run(gm, None)
    try:
        if gm is not None:  # the same export call and lowering as the compile back-end's ORT target
            proto = onnx_program(gm, args, shapes[:3] + shapes[3], FUSED_OPSET, **names)
        else:
            proto = onnx_program(wrapper, args, shapes, BLOCKED_OPSET, **names)
    except Exception as e:  # the exporter raises many types; the first line names the failing op
        raise UnsupportedOp(f"torch.onnx.export failed on this model: {str(e).strip().splitlines()[0]}") from e
    # double-quantized scales are computed in the exported graph: hand the lowering their float values
    double_quantized = {name: mod.quantized_weight().scales() for name, mod in model.named_modules()
                        if isinstance(mod, QLinear) and mod._dq_block is not None}
    proto, report = lower(proto, target, double_quantized, nf4_form, embedding_form, _layer_names(model),
                          accuracy_level)
    return proto, report, fusions, _attention_form(proto, model, target, kv, fusions, attention_form)


def _attention_form(proto, model: nn.Module, target: str, kv, fusions, asked: str) -> dict[str, Any]:
    """Rewrite ``proto`` in place into the GroupQueryAttention form (:mod:`qexport.lowering.gqa`) when ``asked``
    (``'gqa'``, or ``'auto'`` where it applies); returns the report's ``attention_form`` entry. ``'auto'``
    keeps the standard form, with the reason, where the rewrite does not apply; ``'gqa'`` raises there."""
    from qexport.lowering.gqa import gqa_form

    why = ("asked for" if asked == "standard" else "TensorRT target" if target != "ort"
           else "a quantized KV cache (qexport's own scale inputs) has no GroupQueryAttention form" if kv is not None
           else f"exported without the ONNX fusions ({fusions})" if not isinstance(fusions, list) else None)
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    if why is None and (any("sliding" in t for t in layer_types) or getattr(config, "sliding_window", None)
                        and getattr(config, "use_sliding_window", True) is not False and not layer_types):
        why = "sliding-window attention (GroupQueryAttention's local window is not written for it)"
    if why is None:
        length = int(getattr(config, "max_position_embeddings", 0) or 0)
        if length < 1:
            why = "the model's config has no max_position_embeddings: the rotary tables need a context length"
    if why is None:
        try:
            _, info = gqa_form(proto, length)
            return {**info.to_dict(), "chosen": asked}
        except UnsupportedOp as e:
            why = str(e)
    if asked == "gqa":
        raise UnsupportedOp(f"attention_form='gqa' does not apply: {why}; use 'standard' or 'auto'")
    return {"form": "standard", "op": "Attention (opset 23)" if isinstance(fusions, list) else "elementwise ops",
            "chosen": asked, "reason": why}


def _kv_report(layers: int, kv_heads: int, head_dim: int, kv) -> dict[str, Any]:
    """The export report's ``kv_cache`` entry: geometry, and the stored layout of a quantized cache."""
    entry: dict[str, Any] = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}
    if kv is None:
        entry["quantized"] = None
        return entry
    from qexport.kvcache import stored_layout

    entry["quantized"] = kv.to_dict()
    entry["describe"] = kv.describe()
    entry["layout"] = stored_layout(kv, head_dim)
    entry["graph"] = ("present = concat(past, quantize(new keys / values after RoPE)); attention reads "
                      "dequantize(present), the new tokens included")
    return entry


def _tensor_bytes(proto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def _save_model(proto, folder: Path, external_data: bool | None) -> list[str]:
    import onnx

    external = _tensor_bytes(proto) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    if external:
        onnx.save_model(proto, folder / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        return [MODEL_FILE, DATA_FILE]
    onnx.save_model(proto, folder / MODEL_FILE)
    return [MODEL_FILE]


def _layer_table(model: nn.Module, qdq) -> list[dict[str, Any]]:
    """One row per linear layer: how the recipe treated it and how the export lowered it."""
    rows = []
    report = getattr(model, "qexport_report", None)
    for layer in (report.layers if report is not None else []):
        row = {"name": layer.name, "shape": list(layer.shape) if layer.shape else None}
        if layer.status == "quantized" and layer.name in qdq.layers:
            fallback = dict(qdq.float_fallback).get(layer.name)
            row.update(status="float" if fallback else "quantized", spec=layer.spec, onnx=qdq.layers[layer.name])
            if fallback:
                row["reason"] = f"quantized by the recipe ({layer.spec}), but {fallback}: dequantized at export"
            elif layer.reason:  # quantized, with a note (e.g. activations kept float by static_fallback_ratio)
                row["note"] = layer.reason
        elif layer.status == "quantized":
            row.update(status="float", spec=layer.spec, reason="not reached by the exported forward pass")
        else:
            row.update(status="float", reason=layer.reason)
        rows.append(row)
    return rows


def export_onnx(model, out: str | os.PathLike, recipe=None, tokenizer=None, *, target: str = "ort",
                force: bool = False, calibration=None, external_data: bool | None = None,
                nf4_form: str = "auto", fuse: bool = True, ort_accuracy_level: int | None = None,
                embedding_form: str = "auto", attention_form: str = "auto") -> ExportResult:
    """Export a causal LM, quantized by ``recipe``, as an ONNX QDQ folder (see the module docstring).

    Args:
        model: ``'smollm2'``, a local Hugging Face checkpoint folder, or a causal LM module (quantized
            already by :func:`qexport.quantize` when ``recipe`` is None; a module is copied, never changed).
        out: the folder to write. An existing one is replaced only with ``force``.
        recipe: preset name, JSON path or Recipe; None to export the module as it is (quantized already by
            :func:`qexport.quantize`, or float: the fp32 baseline).
        tokenizer: saved into the folder (loaded with the model when ``model`` is a name or folder).
        target: ``'ort'`` (ONNX Runtime) or ``'tensorrt'`` (TensorRT's QDQ rules: symmetric weights, no dynamic
            activations, int4 blocked; checked again by :func:`qexport.export.lint_tensorrt`).
        calibration: for recipes that need data (GPTQ / AWQ / SmoothQuant, static activations): a
            :class:`qexport.prepare.CalibrationSet`, token ids ``[N, L]`` or a list of ``[1, L]`` rows; left out,
            the default CalibrationSet when a tokenizer is at hand (:func:`qexport.prepare.quantize_model`).
        external_data: force (True) or forbid (False) ``model.onnx.data``; default: only past 1 GiB of weights.
        nf4_form: NF4 layers for ``target='ort'``: ``'auto'`` (ONNX Runtime's ``MatMulBnb4`` where its block
            layout fits, else the lookup form) or ``'lookup'`` (standard ONNX only: ``Gather`` of the code book
            times the scale, then ``MatMul``, for runtimes without ``com.microsoft`` ops). TensorRT keeps NF4
            float (report entry).
        fuse: ONNX Runtime target: run the ONNX fusion passes (:data:`qexport.passes.ONNX_FUSIONS`), so that
            attention with its cache update, rotary embeddings and RMSNorm are opset 23's ``Attention`` /
            ``RotaryEmbedding`` / ``RMSNormalization`` nodes; False writes them out in elementwise ops (opset 21).
            The report's ``fusions`` gives each pass's counts and skip reasons, or why none ran.
        ort_accuracy_level: the MatMulNBits accuracy level written into the folder's ``ort_session_config``
            (0: fp32 activations, exact; 4: int8 activations, faster); default 4 when every weight is 8-bit,
            else 0.
        embedding_form: a quantized embedding for ``target='ort'``: ``'auto'`` (ONNX Runtime's
            ``GatherBlockQuantized`` where its kernel takes the weight, else standard ops), ``'gbq'`` (always that
            op; refused where it does not fit) or ``'standard'`` (``Gather`` + ``DequantizeLinear`` only); a
            tied ``lm_head`` reads the same initializers, as ``MatMulNBits`` (at its own accuracy level: 4 for
            8-bit, 0 for 4-bit codes, or ``ort_accuracy_level``) with ``'gbq'``
            (:mod:`qexport.lowering.embedding`). TensorRT: dequantized to a float table (report entry).
        attention_form: ONNX Runtime target: ``'auto'`` (default: the GroupQueryAttention form where it applies,
            else the standard one), ``'gqa'`` (ONNX Runtime's ``GroupQueryAttention`` with in-graph rotary, packed
            QKV and a KV buffer that past and present can share, :mod:`qexport.lowering.gqa`; refused where it
            does not apply) or ``'standard'`` (opset 23 ``Attention`` + ``RotaryEmbedding``, a growing cache).
            The GroupQueryAttention form decodes SmolLM2 faster in both onnxruntime-genai and
            :class:`~qexport.export.OnnxCausalLM` (docs/onnxruntime-genai.md); its positions follow the
            attention mask, so rows must not be left-padded. The report's ``attention_form`` says which form
            was written and why.

    Raises:
        OutputExists, UnsupportedOp (a layer or op the target cannot run), CalibrationError, ModelLoadError.
    """
    from qexport.lowering.embedding import check_form
    from qexport.lowering.core import NF4_FORMS, TARGETS, ort_session_config

    if target not in TARGETS:
        raise InvalidConfig(f"target={target!r} is not valid; allowed: {', '.join(TARGETS)}")
    if nf4_form not in NF4_FORMS:
        raise InvalidConfig(f"nf4_form={nf4_form!r} is not valid; allowed: {', '.join(NF4_FORMS)}")
    check_form(embedding_form)
    if attention_form not in ATTENTION_FORMS:
        raise InvalidConfig(f"attention_form={attention_form!r} is not valid; allowed: {', '.join(ATTENTION_FORMS)}")
    if attention_form == "gqa":  # what is known before the model is quantized fails first
        from qexport.config import load_recipe

        kv = getattr(load_recipe(recipe), "kv_cache", None) if recipe is not None else None
        if target != "ort" or kv is not None:
            why = "the TensorRT target" if target != "ort" else "a quantized KV cache (qexport's own scale inputs)"
            raise UnsupportedOp(f"attention_form='gqa' does not apply: {why} has no GroupQueryAttention form; "
                                "use 'standard' or 'auto'")
    ort_session_config(set(), ort_accuracy_level)  # a bad level fails before the model is quantized
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise OutputExists(f"{str(out)!r} already exists; pass force=True / --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{str(out)!r} is a file, not an export folder; remove it or choose another --out")
    t0 = time.perf_counter()
    qmodel, tokenizer, source = _prepare(model, recipe, tokenizer, calibration)
    if target == "tensorrt":
        check_tensorrt_modules(qmodel)
    proto, qdq, fusions, form = _export_proto(qmodel, target, nf4_form, fuse, embedding_form, ort_accuracy_level,
                                              attention_form)
    if target == "tensorrt":
        from qexport.export.tensorrt import lint_tensorrt

        problems = lint_tensorrt(proto)
        if problems:
            raise UnsupportedOp("the TensorRT export breaks TensorRT's QDQ rules: "
                                + "; ".join(str(p) for p in problems[:5]))
    layers, kv_heads, head_dim = kv_geometry(qmodel.config)
    kv = kv_cache_spec(qmodel)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        files = _save_model(proto, tmp, external_data)
        qmodel.config.save_pretrained(tmp)
        if getattr(qmodel, "generation_config", None) is not None:
            qmodel.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        recipe_dict = qmodel.qexport_report.recipe if hasattr(qmodel, "qexport_report") else None
        if recipe_dict is not None:
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe_dict, indent=2) + "\n")
        import qexport

        report = {
            "qexport": qexport.__version__,
            "source_model": source,
            "recipe": recipe_dict.get("name") if recipe_dict else None,
            "target": target,
            "opset": qdq.opset,
            "fusions": ([r.to_dict() for r in fusions] if isinstance(fusions, list) else {"not_used": fusions}),
            "files": {f: (tmp / f).stat().st_size for f in files},
            "onnx_bytes": sum((tmp / f).stat().st_size for f in files),
            "inputs": input_names(layers, kv, form["form"]),
            "outputs": output_names(layers, kv),
            "attention_form": form,
            "kv_cache": _kv_report(layers, kv_heads, head_dim, kv),
            "ort_session_config": ort_session_config(qdq.weight_bits, ort_accuracy_level),
            "layers": _layer_table(qmodel, qdq),
            "float_fallback": qdq.to_dict()["float_fallback"],
            "notes": qdq.notes,
            **({"tensorrt_saturation": qdq.to_dict()["tensorrt_saturation"]} if target == "tensorrt" else {}),
            "tied_embeddings": bool(getattr(qmodel.config, "tie_word_embeddings", False)),
            # where the calibration windows came from (qexport.prepare), so verify rebuilds the same reference
            "calibration": getattr(getattr(qmodel, "qexport_report", None), "calibration", None),
            "not_linear": "norms stay float32, embeddings too unless the recipe quantizes them; a tied embedding "
                          "/ lm_head is written once (float, or quantized with one format)",
            "export_s": round(time.perf_counter() - t0, 2),
        }
        from qexport.export.genai import genai_entry

        report["genai"] = genai_entry(tmp, qmodel.config, report, getattr(qmodel, "generation_config", None))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        replace_folder(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, report)
