"""``genai_config.json``: what onnxruntime-genai needs to run an export folder as it is (``og.Model(DIR)``).

onnxruntime-genai drives a decoder graph from a JSON description of it: the graph's file and input / output
names, the KV-cache geometry, the special token ids, the ONNX Runtime session options and the default search.
An export folder (:mod:`qexport.export.onnx`) already has what genai's decoder loop expects: ``input_ids``,
``attention_mask`` [batch, past + seq] (and, in the standard form, ``position_ids``) inputs,
``past_key_values.{i}.key`` / ``.value`` inputs and ``present.{i}.key`` / ``.value`` outputs, and the Hugging Face
tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``). In the GroupQueryAttention form
(:mod:`qexport.lowering.gqa`, the default where it applies) genai hands the graph one buffer of ``max_length``
per key / value as both past and present (``past_present_share_buffer``), which the graph writes into; the
standard form concatenates past and new keys / values, so present is longer than past and genai hands over a
growing cache.

The session options are the folder's ``ort_session_config`` (e.g. the MatMulNBits accuracy level): genai
passes every session option it does not know by name to ``AddConfigEntry``, so the entries carry over as they
are. Thread counts are left to genai (all cores); a caller sets them with ``og.Config.overlay``.

What genai cannot run is refused with :class:`~qexport.errors.UnsupportedOp`: a quantized KV cache (each
past key / value comes with qexport's own scale, and zero-point, inputs in qexport's stored layout, which
genai's decoder does not feed), and a model type or graph interface that genai's plain decoder loop does not
drive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qexport.errors import UnsupportedOp

__all__ = ["genai_config", "write_genai_config", "genai_entry", "GENAI_CONFIG_FILE", "GENAI_MODEL_TYPES"]

GENAI_CONFIG_FILE = "genai_config.json"
# Hugging Face model types that onnxruntime-genai runs as a plain decoder (its ModelType::IsLLM list, less
# the types with extra state or their own cache layout: chatglm, gptoss, lfm2, phimoe, phi3small, gemma2 /
# gemma3_text's sliding-window layers).
GENAI_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo", "smollm3")


def _token_id(value) -> int | list[int] | None:
    """A special token id from a Hugging Face config: an int, a list of ints (several EOS ids), or None."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) > 1 else (int(value[0]) if value else None)
    return None if value is None else int(value)


def genai_config(hf_config, report: dict[str, Any], generation_config=None) -> dict[str, Any]:
    """The ``genai_config.json`` contents for an export folder (pure: nothing is read or written).

    Args:
        hf_config: the exported model's Hugging Face config (``model.config``).
        generation_config: its generation config, whose special token ids (a chat model's several EOS ids)
            win over the model config's.
        report: the folder's export report as :func:`qexport.export.export_onnx` builds it (``inputs``,
            ``outputs``, ``kv_cache``, ``ort_session_config``, ``files``).

    Raises:
        UnsupportedOp: the export cannot run in onnxruntime-genai (the message says why, on one line).
    """
    from qexport.export.onnx import MODEL_FILE, input_names, kv_geometry, output_names

    kv = report.get("kv_cache") or {}
    if kv.get("quantized"):
        raise UnsupportedOp(f"onnxruntime-genai cannot run a quantized KV cache ({kv.get('describe') or 'codes'} "
                            "with scale inputs); export without a kv_cache recipe entry to run it in genai")
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in GENAI_MODEL_TYPES:
        raise UnsupportedOp(f"onnxruntime-genai has no plain-decoder model type for {model_type!r}; "
                            f"supported: {', '.join(GENAI_MODEL_TYPES)}")
    layers, kv_heads, head_dim = kv_geometry(hf_config)
    form = (report.get("attention_form") or {}).get("form", "standard")
    inputs = input_names(layers, attention_form=form)
    if report.get("inputs") != inputs or report.get("outputs") != output_names(layers):
        raise UnsupportedOp("the export's graph inputs / outputs are not the KV-cache interface genai binds "
                            f"(expected {inputs[:4]} ..., got {(report.get('inputs') or [])[:4]} ...)")
    context = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    if context < 1:
        raise UnsupportedOp("the model's config has no max_position_embeddings: genai needs a context length")
    def special(name: str):
        value = getattr(generation_config, name, None)
        try:
            return _token_id(value if value is not None else getattr(hf_config, name, None))
        except (TypeError, ValueError):
            raise UnsupportedOp(f"the model's {name} is not a token id or a list of them") from None

    eos = special("eos_token_id")
    if eos is None:
        raise UnsupportedOp("the model's config has no eos_token_id: genai needs one to stop generating")
    bos, pad = special("bos_token_id"), special("pad_token_id")
    first_eos = eos[0] if isinstance(eos, list) else eos
    session_options = {"log_id": "qexport", "provider_options": [],  # CPU
                       **{k: str(v) for k, v in (report.get("ort_session_config") or {}).items()}}
    return {
        "model": {
            "type": model_type,
            "bos_token_id": first_eos if bos is None else bos,
            "eos_token_id": eos,
            "pad_token_id": first_eos if pad is None else pad,  # genai pads batches; EOS when there is no pad
            "context_length": context,
            "vocab_size": int(hf_config.vocab_size),
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": session_options,
                "hidden_size": int(hf_config.hidden_size),
                "head_size": head_dim,
                "num_attention_heads": int(hf_config.num_attention_heads),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({} if form == "gqa" else {"position_ids": "position_ids"}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": context,
            "min_length": 0,
            "do_sample": False,  # greedy, as OnnxCausalLM.generate
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention writes the new keys / values into the buffer past and present share; the
            # standard form's graph concatenates them (present is longer than past)
            "past_present_share_buffer": form == "gqa",
            "early_stopping": True,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def write_genai_config(folder: str | os.PathLike, hf_config, report: dict[str, Any], generation_config=None
                       ) -> Path:
    """Write :func:`genai_config` into ``folder`` as ``genai_config.json``; returns the file's path.

    Raises:
        UnsupportedOp: the export cannot run in onnxruntime-genai (nothing is written).
    """
    config = genai_config(hf_config, report, generation_config)
    path = Path(folder) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def genai_entry(folder: str | os.PathLike, hf_config, report: dict[str, Any], generation_config=None
                ) -> dict[str, Any]:
    """Write ``genai_config.json`` into ``folder`` when onnxruntime-genai can run the export, and return the
    export report's ``genai`` entry: ``{"written": true}``, or ``{"written": false, "reason": ...}`` (an export
    genai cannot run is still a good ONNX Runtime export, so the refusal is recorded, not raised)."""
    try:
        write_genai_config(folder, hf_config, report, generation_config)
    except UnsupportedOp as e:
        return {"written": False, "reason": str(e)}
    return {"written": True}
