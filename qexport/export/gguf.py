"""GGUF export for llama.cpp: ``qexport export --format gguf`` / :func:`export_gguf`.

A model quantized to llama.cpp's block formats (:mod:`qexport.ggml`, the ``gguf-*`` presets) is written as
one GGUF file with the ``gguf`` package (llama.cpp's own writer). The quantized layers' bytes go in as they
are stored, so llama.cpp dequantizes exactly qexport's dequantized weights; :func:`read_back` checks that
with gguf's reader and dequantizer. What stays float is written as ``float_type`` (f16 or f32), norms as f32.

Conventions (llama.cpp's ``convert_hf_to_gguf.py``): tensor names from ``gguf.TensorNameMap``; for the GGUF
``llama`` architecture the rows of ``q_proj`` and ``k_proj`` permuted from Hugging Face's rotate-half RoPE
layout to GGML's (a permutation of whole rows, so a quantized row moves with its blocks unchanged; llama.cpp
runs the other architectures with the rotate-half layout, so their rows stay as they are); biases and q/k norms
f32; Gemma's norms, which scale by ``1 + w``, stored as ``1 + w``; a tied ``lm_head`` is not written (llama.cpp
reads ``token_embd``); Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` written fused, as llama.cpp runs them.
The tokenizer's fields are copied from the GGUF file the model was converted from (``qexport-source.json``, as
for ``smollm2``), else taken from the model folder's SentencePiece ``tokenizer.model`` (gguf's
``SentencePieceVocab``, llama.cpp's ``llama`` tokenizer), else built from ``tokenizer.json``: byte-level BPE as
llama.cpp's ``gpt2`` tokenizer, SentencePiece-style BPE (byte fallback) with gguf's ``LlamaHfVocab`` and
scores in the order of its merges.

Architectures (Hugging Face ``model_type`` -> GGUF): ``llama`` and ``mistral`` -> ``llama``, ``qwen2`` ->
``qwen2``, ``qwen3`` -> ``qwen3``, ``gemma2`` -> ``gemma2`` (attention and final soft-capping, sliding-window
layers), ``gemma3_text`` -> ``gemma3`` (sliding-window layers with their own RoPE base), ``phi3`` -> ``phi3``;
RoPE unscaled or linearly scaled. What llama.cpp would run differently is refused with the reason: a Gemma
whose ``query_pre_attn_scalar`` is not the one llama.cpp derives, Phi-3's long-context RoPE (its factor tensors
are not written). Refused, with the layer and what to use: integer, NF4 or other non-GGML weights, quantized
activations (W8A8, LLM.int8()), online rotations and a quantized KV cache, none of which a GGUF tensor type
states.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qexport._io import OutputExists
from qexport.errors import InvalidConfig, UnsupportedOp

__all__ = ["export_gguf", "read_back", "GgufResult", "ARCHITECTURES", "FLOAT_TYPES", "hf_to_gguf_names",
           "llama_file_type"]

# Hugging Face model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                 "gemma3_text": "gemma3", "phi3": "phi3"}
_PERMUTED = {"llama"}  # the GGUF architectures whose q/k rows llama.cpp stores permuted (GGML's RoPE layout)
_NORM_PLUS_ONE = {"gemma2", "gemma3"}  # Gemma's RMSNorm scales by (1 + w); llama.cpp's files hold 1 + w
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # where llama.cpp scales queries by hidden / heads, not head_dim
FLOAT_TYPES = ("f16", "f32")
_USE_INSTEAD = "a gguf-* recipe (qexport recipes lists them: gguf-q8_0, gguf-q4_k, gguf-q4_k-gptq, ...)"


@dataclass
class GgufResult:
    path: Path
    report: dict[str, Any]


@dataclass
class _Tensor:
    """One tensor to write: its GGUF name, the array written, its GGML type, its number of weights, and, for a
    quantized one, how to get the float32 weight it must read back as (made only when checked)."""

    name: str
    array: Any
    gtype: Any
    elements: int
    expected: Callable[[], torch.Tensor] | None = None


def _architecture(config) -> str:
    """The GGUF architecture of a Hugging Face config; UnsupportedOp for a family with no GGUF export."""
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise UnsupportedOp(f"model type {getattr(config, 'model_type', None)!r} has no GGUF export: llama.cpp has "
                            "no such architecture, or qexport does not write it; supported: "
                            f"{', '.join(ARCHITECTURES)}")
    return arch


def llama_file_type(name: str) -> int:
    """The value of llama.cpp's file type ``name`` (``'f32'``, ``'f16'``, ``'q4_0'``, ``'q4_k_m'``, ...) in
    ``gguf.LlamaFileType``."""
    import gguf

    return int(gguf.LlamaFileType["ALL_F32" if name == "f32" else f"MOSTLY_{name.upper()}"])


def _permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each head, rows ``[0, 2, 4, ..., 1, 3, 5, ...]`` of the
    rotate-half layout become interleaved pairs."""
    n = w.shape[0]
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    n = w.shape[0]
    return w.reshape(heads, n // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_settings(config) -> dict[str, dict]:
    """The RoPE parameters by layer type (Gemma 3's ``sliding_attention`` / ``full_attention``), or under
    ``'all'`` where one setting covers every layer."""
    params = getattr(config, "rope_parameters", None)
    if not params:  # configs from before rope_parameters
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", None))
    if params and all(isinstance(v, dict) for v in params.values()):
        return params
    return {"all": params}


def _rope(params: dict) -> tuple[float, float | None]:
    """(theta, linear scaling factor or None) of one RoPE setting; UnsupportedOp for what llama.cpp would run
    differently from the file's metadata."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear"):
        raise UnsupportedOp(f"RoPE scaling {kind!r}: the GGUF export writes unscaled or linearly scaled RoPE only "
                            "(Phi-3's long-context RoPE needs its factor tensors, which it does not write)")
    theta = params.get("rope_theta")
    if theta is None:
        raise UnsupportedOp("the model's config has no rope_theta")
    return float(theta), float(params["factor"]) if kind == "linear" else None


def _check_llama_cpp_runs_it_the_same(config) -> None:
    """What llama.cpp derives rather than reads, checked against the config: RoPE, Gemma's query scale and
    sliding-window layers."""
    arch = _architecture(config)
    settings = _rope_settings(config)
    for where, params in settings.items():
        _rope(params)
        if where == "sliding_attention" and params.get("rope_type", "default") != "default":
            raise UnsupportedOp("gemma3: llama.cpp runs the sliding-window layers with unscaled RoPE; this "
                                f"config scales them ({params.get('rope_type')!r})")
    if arch in _NORM_PLUS_ONE:
        head_dim = config.head_dim
        big = config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]
        want = config.hidden_size // config.num_attention_heads if big else head_dim
        if config.query_pre_attn_scalar != want:
            raise UnsupportedOp(f"{arch}: query_pre_attn_scalar={config.query_pre_attn_scalar}, but llama.cpp "
                                f"scales queries by 1/sqrt({want}) for this model ({config.num_hidden_layers} "
                                "layers); its file would not run as this model")
    if arch == "gemma2" and (config.attn_logit_softcapping is None or config.final_logit_softcapping is None):
        raise UnsupportedOp("gemma2: llama.cpp always soft-caps attention and final logits; this config "
                            "turns soft-capping off")
    if arch == "gemma3" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedOp("gemma3: llama.cpp does not soft-cap attention logits; this config does")


def hf_to_gguf_names(model: nn.Module) -> dict[str, str]:
    """GGUF tensor names (llama.cpp's) of the model's parameters, by their Hugging Face names."""
    import gguf

    cfg = model.config
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[_architecture(cfg)]
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        stem, dot, suffix = name.rpartition(".")
        # gguf maps no lm_head for an architecture whose output is always the embedding (gemma2)
        gname = name_map.get_name(stem) or ("output" if stem == head else None)
        if gname is None:
            raise UnsupportedOp(f"{name}: no llama.cpp tensor name for it")
        out[name] = f"{gname}.{suffix}"
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "qdata") and mod_name + ".weight" not in out:  # quantized layers have buffers, no weight
            gname = name_map.get_name(mod_name) or ("output" if mod_name == head else None)
            if gname is None:
                raise UnsupportedOp(f"{mod_name}: no llama.cpp tensor name for it")
            out[mod_name + ".weight"] = f"{gname}.weight"
    return out


def _check_expressible(model: nn.Module) -> None:
    from qexport.export.onnx import kv_cache_spec
    from qexport.modules import QEmbedding, QLinear

    if kv_cache_spec(model) is not None:
        raise UnsupportedOp(f"a quantized KV cache has no GGUF form (llama.cpp quantizes its cache at run time: "
                            f"llama.cpp's --cache-type-k); use {_USE_INSTEAD}")
    for name, mod in model.named_modules():
        if type(mod).__name__ == "OnlineRotation":
            raise UnsupportedOp(f"{name}: an online Hadamard rotation has no GGUF form; use {_USE_INSTEAD} "
                                "without 'rotate'")
        if isinstance(mod, QLinear):
            if mod.act_spec is not None:
                raise UnsupportedOp(f"{name}: quantized activations ({mod.act_spec.describe()}) have no GGUF form "
                                    f"(llama.cpp quantizes activations itself); use {_USE_INSTEAD}")
            if not mod.spec.format.ggml:
                raise UnsupportedOp(f"{name}: {mod.spec.describe()} weights have no GGUF block type; use "
                                    f"{_USE_INSTEAD}")
        elif isinstance(mod, QEmbedding) and not mod.spec.format.ggml:
            raise UnsupportedOp(f"{name}: a {mod.spec.describe()} embedding has no GGUF block type; use "
                                f"{_USE_INSTEAD}")


def _tokenizer_fields(source: str | None, tokenizer, config) -> tuple[list[tuple[str, Any, Any, Any]], str]:
    """``[(key, value, type, sub_type)]`` of the ``tokenizer.*`` fields, and where they came from."""
    import gguf

    gguf_file = _source_gguf(source)
    if gguf_file is not None:
        reader = gguf.GGUFReader(str(gguf_file))
        fields = []
        for key, f in reader.fields.items():
            if key.startswith("tokenizer."):
                sub = f.types[1] if len(f.types) > 1 else None
                fields.append((key, f.contents(), f.types[0], sub))
        return fields, f"copied from {gguf_file.name}"
    folder = _model_folder(source)
    if folder is not None and (folder / "tokenizer.model").is_file():
        return _vocab_fields(gguf.vocab.SentencePieceVocab(folder), folder, config), "from tokenizer.model"
    if tokenizer is None:
        raise InvalidConfig("the GGUF export needs the model's tokenizer: give a model name or folder, or tokenizer=")
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = spec.get("model") or {}
    if model.get("byte_fallback"):  # SentencePiece-style BPE, kept as tokenizer.json only
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            vocab = gguf.vocab.LlamaHfVocab(Path(tmp))
            fields = _vocab_fields(vocab, Path(tmp), config, _merge_scores(model))
            return fields, "from tokenizer.json (SentencePiece-style BPE)"
    return _bpe_fields(tokenizer, spec), "built from tokenizer.json (byte-level BPE)"


def _merge_scores(model: dict) -> dict[str, float]:
    """Scores for llama.cpp's SentencePiece tokenizer from a BPE model's merges: ``-rank`` of the merge that makes
    each token, so that it merges in the BPE's order (gguf's ``LlamaHfVocab`` scores every token -1000, and
    llama.cpp then merges left to right: other tokens than the Hugging Face tokenizer's)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _vocab_fields(vocab, folder: Path, config, scores_by_token: dict[str, float] | None = None
                  ) -> list[tuple[str, Any, Any, Any]]:
    """llama.cpp's ``llama`` (SentencePiece) tokenizer fields from one of gguf's vocabularies, padded with
    unused tokens to the model's vocabulary size as llama.cpp's converter does, and the special tokens and
    flags gguf's ``SpecialVocab`` reads from the folder. ``scores_by_token`` replaces the vocabulary's scores
    (0 for a token no merge makes)."""
    import gguf

    size = config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    for i, (text, score, kind) in enumerate(vocab.all_tokens()):
        if i >= size:
            raise UnsupportedOp(f"the tokenizer has more tokens than the model's vocabulary ({size})")
        tokens[i], types[i] = text.decode("utf-8"), int(kind)
        scores[i] = float(score) if scores_by_token is None else scores_by_token.get(tokens[i], 0.0)
    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "llama", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
              ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=size)
    for kind, value in special.special_token_ids.items():
        fields.append((f"tokenizer.ggml.{kind}_token_id", int(value), V.UINT32, None))
    for kind, value in special.add_special_token.items():
        fields.append((f"tokenizer.ggml.add_{kind}_token", bool(value), V.BOOL, None))
    if isinstance(special.chat_template, str):
        fields.append(("tokenizer.chat_template", special.chat_template, V.STRING, None))
    if _architecture(config) in _NORM_PLUS_ONE:  # llama.cpp's converter: Gemma adds no leading space
        fields.append(("tokenizer.ggml.add_space_prefix", False, V.BOOL, None))
    return fields


def _model_folder(source: str | None) -> Path | None:
    """The local folder of a model name or path (a saved quantized folder: the model it was quantized from)."""
    if source is None:
        return None
    from qexport.models import MODEL_ALIASES, smollm2_checkpoint

    folder = smollm2_checkpoint(progress=False) if source in MODEL_ALIASES else Path(source)
    if not folder.is_dir():
        return None
    if (folder / "recipe.json").is_file():
        from qexport.checkpoint import read_provenance

        return _model_folder(read_provenance(folder).get("source_model"))
    return folder


def _source_gguf(source: str | None) -> Path | None:
    """The GGUF file a model was converted from (``qexport-source.json`` in its folder), if any."""
    folder = _model_folder(source)
    marker = folder / "qexport-source.json" if folder is not None else None
    if marker is None or not marker.is_file():
        return None
    path = Path(json.loads(marker.read_text()).get("source", ""))
    return path if path.suffix == ".gguf" and path.is_file() else None


def _bpe_fields(tokenizer, spec: dict) -> list[tuple[str, Any, Any, Any]]:
    """llama.cpp's ``gpt2`` tokenizer fields from a Hugging Face fast tokenizer with a byte-level BPE model
    (``spec``: its ``tokenizer.json``, parsed)."""
    import gguf

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedOp(f"tokenizer model {model.get('type')!r}: the GGUF export builds byte-level BPE "
                            "tokenizers only (or copies a source GGUF's)")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "gpt-2", V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32),
              ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", int(value), V.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields.append(("tokenizer.chat_template", template, V.STRING, None))
    return fields


def _tensors(model: nn.Module, float_type: str) -> list[_Tensor]:
    """The tensors to write, in the model's order."""
    import gguf

    from qexport.modules import QEmbedding, QLinear

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    arch = _architecture(cfg)
    permuted = arch in _PERMUTED
    has_output = gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[{v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]]
    names = hf_to_gguf_names(model)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out, seen = [], set()
    float_gtype = gguf.GGMLQuantizationType.F16 if float_type == "f16" else gguf.GGMLQuantizationType.F32
    modules = dict(model.named_modules())
    embedding = model.get_input_embeddings()
    for hf_name, gname in names.items():
        if gname in seen:
            continue
        mod_name = hf_name.rpartition(".")[0]
        mod = modules[mod_name]
        if tied and mod is model.get_output_embeddings() and _shares_table(mod, embedding):
            continue  # llama.cpp reads the tied embedding
        if mod is model.get_output_embeddings() and not has_output:
            raise UnsupportedOp(f"{mod_name}: llama.cpp's {arch} computes the logits with token_embd, so "
                                f"{mod_name} must share the embedding's table; use {_USE_INSTEAD}, which round "
                                "both alike")
        seen.add(gname)
        rows = heads if mod_name.endswith("q_proj") else kv_heads if mod_name.endswith("k_proj") else None
        permute = (lambda t, rows=rows: _permute_rows(t, rows)) if permuted and rows and hf_name.endswith(
            ".weight") else (lambda t: t)
        if isinstance(mod, (QLinear, QEmbedding)) and hf_name.endswith(".weight"):  # not its bias
            qw = mod.quantized_weight()
            gtype = gguf.GGMLQuantizationType(_ggml_type(qw).ggml_id)
            out.append(_Tensor(gname, permute(qw.qdata).numpy(), gtype, qw.shape[0] * qw.shape[1],
                               lambda qw=qw, permute=permute: permute(qw.dequantize())))
            continue
        t = dict(mod.named_parameters(recurse=False))[hf_name.rpartition(".")[2]].detach().to(torch.float32)
        if arch in _NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            t = t + 1
        if t.dim() == 1:  # norms and biases: f32, as llama.cpp writes them
            out.append(_Tensor(gname, t.numpy(), gguf.GGMLQuantizationType.F32, t.numel()))
        else:
            arr = permute(t).numpy()
            out.append(_Tensor(gname, arr.astype("float16") if float_type == "f16" else arr, float_gtype, t.numel()))
    return out


def _shares_table(head: nn.Module, embedding: nn.Module) -> bool:
    """Whether a tied ``lm_head`` still reads the embedding's table (float, or the same quantized bytes)."""
    if hasattr(head, "qdata") or hasattr(embedding, "qdata"):
        return getattr(head, "qdata", None) is getattr(embedding, "qdata", None)
    return head.weight is embedding.weight


def _ggml_type(qw):
    from qexport import ggml

    return ggml.ggml_type(qw.spec.format.value)


def _metadata(writer, model: nn.Module, recipe_dict, file_type: int) -> None:
    import gguf

    import qexport

    cfg = model.config
    arch = _architecture(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(getattr(cfg, "_name_or_path", "") or "model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or arch in _NORM_PLUS_ONE:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    settings = _rope_settings(cfg)
    theta, factor = _rope(settings.get("full_attention", settings.get("all", {})))
    writer.add_rope_freq_base(theta)
    if factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    rotary = float(settings.get("all", {}).get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(head_dim * rotary))
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if arch == "gemma2" or (arch == "gemma3" and "sliding_attention" in layer_types):
        # llama.cpp's default layer patterns are Gemma's; the file states each layer all the same
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if "sliding_attention" in settings:
            writer.add_rope_freq_base_swa(_rope(settings["sliding_attention"])[0])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if arch in ("gemma2", "gemma3") and getattr(cfg, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "phi3":  # as llama.cpp's converter: 0 for none (llama.cpp runs Phi-3 without a window today)
        writer.add_sliding_window(cfg.sliding_window or 0)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("general.quantized_by", f"qexport {qexport.__version__}")
    if recipe_dict is not None:
        writer.add_string("qexport.recipe", json.dumps(recipe_dict, sort_keys=True))


def export_gguf(model, out: str | os.PathLike, recipe=None, tokenizer=None, *, calibration=None,
                float_type: str = "f16", force: bool = False, check: bool = True) -> GgufResult:
    """Write a causal LM, quantized by ``recipe`` (a ``gguf-*`` preset or a recipe of GGML formats), as a GGUF
    file for llama.cpp (see the module docstring).

    Args:
        model: ``'smollm2'``, a checkpoint folder, a saved quantized folder, or a causal LM module (quantized
            already when ``recipe`` is None; float, with ``recipe=None``, for an all-float file to give
            llama.cpp's own quantizer).
        out: the ``.gguf`` file to write; an existing one is replaced only with ``force``.
        float_type: what stays float (the embedding, a float ``lm_head``): ``'f16'`` (llama.cpp's default) or
            ``'f32'``; norms are f32 either way.
        check: read the file back with gguf's reader and compare every quantized tensor, dequantized by
            gguf, with qexport's dequantized weight, bit for bit (:func:`read_back`).
    """
    import gguf

    from qexport.export.onnx import _prepare

    if float_type not in FLOAT_TYPES:
        raise InvalidConfig(f"float_type={float_type!r} is not valid; allowed: {', '.join(FLOAT_TYPES)}")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise OutputExists(f"{str(out)!r} already exists; pass force=True / --force to replace it")
    if out.is_dir():
        raise OutputExists(f"{str(out)!r} is a folder; give the .gguf file to write")
    t0 = time.perf_counter()
    qmodel, tokenizer, source = _prepare(model, recipe, tokenizer, calibration)
    arch = _architecture(qmodel.config)
    _check_llama_cpp_runs_it_the_same(qmodel.config)
    _check_expressible(qmodel)
    # a module remembers the folder it was loaded from (its config's _name_or_path)
    tok_fields, tok_source = _tokenizer_fields(source or getattr(qmodel.config, "_name_or_path", None) or None,
                                               tokenizer, qmodel.config)
    tensors = _tensors(qmodel, float_type)
    counts: dict[str, int] = {}
    params: dict[str, int] = {}
    for t in tensors:
        kind = t.gtype.name.lower()
        counts[kind] = counts.get(kind, 0) + 1
        params[kind] = params.get(kind, 0) + t.elements
    main = max((k for k in params if k != "f32" or len(params) == 1), key=params.get)
    recipe_dict = qmodel.qexport_report.recipe if hasattr(qmodel, "qexport_report") else None

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        # the file type named after the type most weights are in (q4_k, q3_k: llama.cpp's Q4_K_M, Q3_K_M, as it
        # names such files)
        _metadata(writer, qmodel, recipe_dict, llama_file_type({"q4_k": "q4_k_m", "q3_k": "q3_k_m"}.get(main, main)))
        for key, value, vtype, sub in tok_fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in tensors:
            writer.add_tensor(t.name, t.array, raw_dtype=t.gtype if t.expected is not None else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        readback = read_back(tmp, {t.name: t.expected for t in tensors if t.expected is not None}) if check else None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    total = sum(params.values())
    report = {
        "format": "gguf",
        "source_model": source,
        "recipe": recipe_dict.get("name") if recipe_dict else None,
        "architecture": arch,
        "file_type": main,
        "bytes": size,
        "bits_per_weight": round(8 * size / total, 3),
        "tensor_types": counts,
        "parameters_by_type": params,
        "float_type": float_type,
        "tokenizer": tok_source,
        "readback": readback,
        "export_s": round(time.perf_counter() - t0, 2),
    }
    return GgufResult(out, report)


def read_back(path: str | os.PathLike, expected: dict[str, torch.Tensor | Callable[[], torch.Tensor]]
              ) -> dict[str, Any]:
    """Dequantize every tensor of ``expected`` (a float32 weight, or a function that makes it) from the GGUF
    file with gguf's own reader and dequantizer and compare it bit for bit; raises
    :class:`~qexport.errors.QExportError` on the first difference."""
    import gguf
    from gguf.quants import dequantize

    from qexport.errors import QExportError

    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    for name, want in expected.items():
        t = found.get(name)
        if t is None:
            raise QExportError(f"{path}: tensor {name!r} is missing")
        want = want() if callable(want) else want
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(want.shape)
        if not torch.equal(got.view(torch.int32), want.to(torch.float32).contiguous().view(torch.int32)):
            bad = int((got != want).sum())
            raise QExportError(f"{path}: tensor {name!r} ({t.tensor_type.name}) reads back with {bad} values "
                               "different from qexport's dequantized weight")
    return {"tensors": len(expected), "bit_identical": True, "reader": f"gguf {_gguf_version()}"}


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
