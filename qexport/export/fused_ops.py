"""Whole-op forms of a Llama-style decoder's attention, rotary embeddings and RMSNorm for the ONNX export.

``torch.onnx.export`` of a Hugging Face Llama writes each of these out in elementwise ONNX ops: SmolLM2's
decode step is ~2,600 nodes, and on a CPU ONNX Runtime spends about as long on the ~2,300 small ones as on
the 211 weight MatMuls. Opset 23 has a standard op for each:

* ``Attention`` (grouped-query: 3 kv heads for 9 query heads read as they are, no ``repeat_kv`` copy;
  boolean mask; scale): ``scaled_dot_product_attention(..., enable_gqa=True)``, which the exporter lowers
  to it at opset 23;
* ``RotaryEmbedding`` (non-interleaved, ``cos`` / ``sin`` of shape ``[batch, seq, head_dim / 2]``):
  ``torch.onnx.ops.rotary_embedding``, the op's torch form, which the exporter writes as it is;
* ``RMSNormalization``: ``torch.nn.functional.rms_norm``, which the exporter lowers to it.

With a float KV cache (``past_in_attention=True``) the attention goes further: each layer's forward runs
``torch.onnx.ops.rotary_embedding`` on the 3-D projections ``[batch, seq, heads * head_dim]`` and
``torch.onnx.ops.attention`` with the layer's past key / value as inputs, exported as one ``Attention``
node that also returns the present key / value. The reshapes and transposes around the projections and
the two ``Concat`` nodes of the cache update go away (SmolLM2 w4g128: 2576 -> 891 nodes in the file,
990 -> 542 in ONNX Runtime's optimized decode graph); the cache tensors keep their
``[batch, kv_heads, seq, head_dim]`` interface. A quantized KV cache keeps the first form (its cache update
quantizes the new entries).

:func:`fused_ops` patches a model's modeling module for the duration of an export so that its forward
calls these; the arithmetic is the same (tests compare the exported model with the PyTorch one). Only
families of the architecture table whose norms are ``x / rms(x) * w``, whose attention reads separate q / k / v
projections with rotate-half rotary embeddings, without soft-capping or sliding windows, are patched (Llama,
Mistral, Qwen2, Qwen3: :func:`~qexport.models.architectures.fused_export_refusal`); others export as before.
The TensorRT target never uses this (its parser and QDQ rules are checked on the opset-21 graph).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["FUSED_OPSET", "ONNX_OPS", "fusable", "fused_ops"]

FUSED_OPSET = 23  # Attention, RotaryEmbedding, RMSNormalization
ONNX_OPS = {"attention": "Attention", "rotary": "RotaryEmbedding", "norm": "RMSNormalization"}  # export report


def fusable(model: nn.Module) -> str | None:
    """None when :func:`fused_ops` applies to ``model``, else why not (for the export report)."""
    from qexport.models.architectures import describe, find_architecture, fused_export_refusal

    config = getattr(model, "config", None)
    arch = find_architecture(model)
    if arch is None:
        return f"model type {getattr(config, 'model_type', None)!r} is not in the architecture table"
    why = fused_export_refusal(arch, describe(model, arch))
    if why is not None:
        return why
    impl = getattr(config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} is not 'sdpa'"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    try:
        sdpa = importlib.import_module("transformers.integrations.sdpa_attention")
        modeling = importlib.import_module(type(model).__module__)
    except ImportError as e:
        return f"cannot import the modeling code to patch ({e})"
    if not callable(getattr(sdpa, "use_gqa_in_sdpa", None)) or not callable(getattr(modeling, "apply_rotary_pos_emb",
                                                                                    None)):
        return "this transformers version's sdpa attention / rotary code is not the one fused_ops patches"
    return None


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    x = hidden_states.to(torch.float32)
    y = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight.to(torch.float32), self.variance_epsilon)
    return y.to(hidden_states.dtype)


class _RotaryHalves:
    """HF's ``cos`` / ``sin`` ``[batch, seq, head_dim]`` repeat their first half; ONNX's ``RotaryEmbedding``
    takes that half. Sliced once per ``cos`` for all layers within one :func:`fused_ops` (holding ``cos``
    keeps its id unique)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def __call__(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if id(cos) not in self._by_id:
            half = cos.shape[-1] // 2
            self._by_id[id(cos)] = (cos, cos[..., :half], sin[..., :half])
        return self._by_id[id(cos)][1:]


def _apply_rotary(halves: _RotaryHalves):
    """HF's ``apply_rotary_pos_emb`` on ``[batch, heads, seq, head_dim]`` as ONNX's ``RotaryEmbedding``."""
    from torch.onnx.ops import rotary_embedding

    def apply(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids=None, unsqueeze_dim: int = 1):
        c, s = halves(cos, sin)
        return rotary_embedding(q, c, s), rotary_embedding(k, c, s)

    return apply


def _attention_forward(original, halves: _RotaryHalves):
    """A Llama-style attention forward whose rotary embeddings, cache update and attention are the ONNX
    ops' torch forms (``torch.onnx.ops``); ``original`` runs where that form does not apply (no mask, no
    filled cache layer: not the export wrapper's call)."""
    from torch.onnx.ops import attention, rotary_embedding

    from qexport.export.onnx import kv_geometry

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        layers = getattr(kwargs.get("cache"), "layers", None)
        if attention_mask is None or layers is None or not getattr(layers[self.layer_idx], "is_initialized", False):
            return original(self, hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **kwargs)
        cos, sin = halves(*position_embeddings)
        heads, kv_heads = self.config.num_attention_heads, kv_geometry(self.config)[1]
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if getattr(self, "q_norm", None) is not None:  # per-head norms before the rotary embedding (Qwen3)
            q = self.q_norm(q.unflatten(-1, (heads, -1))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (kv_heads, -1))).flatten(-2)
        q = rotary_embedding(q, cos, sin, num_heads=heads)
        k = rotary_embedding(k, cos, sin, num_heads=kv_heads)
        layer = layers[self.layer_idx]
        out, layer.keys, layer.values, _ = attention(q, k, self.v_proj(hidden_states), attention_mask, layer.keys,
                                                     layer.values, q_num_heads=heads, kv_num_heads=kv_heads,
                                                     scale=self.scaling)
        return self.o_proj(out), None

    return forward


@contextlib.contextmanager
def fused_ops(model: nn.Module, past_in_attention: bool = False) -> Iterator[None]:
    """Within the block, ``model``'s attention runs as grouped-query SDPA, its rotary embeddings as
    ``torch.onnx.ops.rotary_embedding`` and its RMSNorms as ``F.rms_norm``; with ``past_in_attention`` (a float
    ``DynamicCache``) each attention layer runs as ``torch.onnx.ops`` rotary + attention with the cache
    update inside (see the module docstring). Restored on exit. Raises ValueError when :func:`fusable`
    says no."""
    why = fusable(model)
    if why is not None:
        raise ValueError(f"fused ops do not apply: {why}")
    sdpa = importlib.import_module("transformers.integrations.sdpa_attention")
    modeling = importlib.import_module(type(model).__module__)
    norms = {type(m) for m in model.modules()
             if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")}
    attentions = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")
                  and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling"))}
    saved = [(sdpa, "use_gqa_in_sdpa", sdpa.use_gqa_in_sdpa),
             (modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)]
    saved += [(cls, "forward", cls.forward) for cls in norms]
    if past_in_attention:
        saved += [(cls, "forward", cls.forward) for cls in attentions]
    halves = _RotaryHalves()
    try:
        # HF repeats the kv heads before SDPA unless it may pass enable_gqa, which it allows only without a
        # mask; SDPA's math with enable_gqa and a mask is the same computation, and ONNX's Attention has both.
        sdpa.use_gqa_in_sdpa = lambda attention_mask, key, value: True
        modeling.apply_rotary_pos_emb = _apply_rotary(halves)
        for cls in norms:
            cls.forward = _rms_norm_forward
        if past_in_attention:
            for cls in attentions:
                cls.forward = _attention_forward(cls.forward, halves)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
