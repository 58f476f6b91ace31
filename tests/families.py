"""Tiny random-initialized models of every family in qexport's architecture table, built in-process from
transformers configs (no downloads). Each keeps what makes its family different: Qwen3's q/k norms, Gemma's
``(1 + w)`` norms, scaled embeddings, one KV head, head_dim larger than hidden / heads, sliding-window and
global layers and Gemma 2's soft-capping, Phi-3's fused projections, OPT's LayerNorms and learned positions."""

from __future__ import annotations

import torch

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    import transformers as T

    gemma = dict(intermediate_size=128, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"])
    return {
        "llama": lambda: T.LlamaConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2,
                                           sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**_COMMON, intermediate_size=128, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**_COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=32),
        "gemma2": lambda: T.Gemma2Config(**_COMMON, **gemma),
        "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, **gemma),
        "phi3": lambda: T.Phi3Config(**_COMMON, intermediate_size=128, num_key_value_heads=2),
        "opt": lambda: T.OPTConfig(**_COMMON, ffn_dim=128, word_embed_proj_dim=64),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt")


def tiny_model(family: str, seed: int = 0):
    """A tiny float model of ``family`` in eval mode. Norm weights and biases are randomized (transformers
    initializes them to constants, which would hide a fold that ignores them)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    return model
