"""The named recipes (``qexport recipes`` lists them) and the named KV-cache formats.

:data:`PRESETS` is the one table of named recipes: ``quantize(model, "w4g128")``, ``--recipe w4g128``. Some
need calibration data, which :attr:`Recipe.needs_data <qexport.config.Recipe.needs_data>` tells from the
recipe itself: the algorithm's (GPTQ, AWQ, SmoothQuant; ``quantize(model, name, calibration=tokens)``) or that
of static activation scales (:func:`qexport.calibrate` after quantizing). Any preset name followed by the
suffix of a KV-cache format (``w4g128-kv8``, ``w8-kv4g32``) is that preset with its KV cache stored so
(:func:`get_preset`).
"""

from __future__ import annotations

from qexport.config import KVCacheSpec, QuantSpec, Recipe, Rule
from qexport.errors import UnknownPreset

__all__ = ["PRESETS", "KV_CACHE_PRESETS", "get_preset", "LLM_INT8_THRESHOLD", "STATIC_FALLBACK_RATIO"]

LLM_INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (the paper's and bitsandbytes' default)
# Static activations: SmolLM2's rotated down_proj inputs reach 197x (layer 11) and 17x (layer 28) their median
# token's range (attention-sink tokens); every other linear stays under 15x.
STATIC_FALLBACK_RATIO = 16.0


_GPTQ_SPEC = dict(bits=4, symmetric=False, observer="mse")  # GPTQ's group ranges: MSE search (docs/gptq-awq.md)
_GPTQ2_SPEC = dict(_GPTQ_SPEC, bits=2)


def _single(name: str, spec: QuantSpec, description: str) -> Recipe:
    return Recipe(name=name, rules=(Rule("*", spec),), description=description)


def _gguf(name: str, fmt: str, observer: str, description: str, algorithm: str = "rtn",
          wider: tuple[str, ...] = (), wider_fmt: str = "") -> Recipe:
    """A GGML preset: ``fmt`` everywhere, ``wider_fmt`` on the ``wider`` patterns, the embedding and lm_head q8_0."""
    table = QuantSpec(format="q8_0")
    return Recipe(name=name, algorithm=algorithm, exclude=(),
                  description=f"{description}; embedding and lm_head q8_0 (a tied table stored once)",
                  rules=(Rule("*embed_tokens", table), Rule("lm_head", table), Rule("*.lm_head", table),
                         *(Rule(p, QuantSpec(format=wider_fmt, observer=observer)) for p in wider),
                         Rule("*", QuantSpec(format=fmt, observer=observer))))


# llama.cpp's Q2_K file type is a mix (llama_tensor_get_type): attn_v, attn_output and ffn_down in q3_k, the rest
# in q2_k. (llama.cpp gives attn_v q4_k instead when 4 or more query heads share a KV head: not in this preset.)
_Q2_K_MIX = ("*.self_attn.v_proj", "*.self_attn.o_proj", "*.mlp.down_proj")


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        _single("w8", QuantSpec(bits=8, granularity="per_channel", symmetric=True),
                "int8 weights, per-channel symmetric"),
        _single("w4g128", QuantSpec(bits=4, group_size=128, symmetric=False),
                "int4 weights, groups of 128, asymmetric (uint4 + zero point)"),
        _single("w4g128-sym", QuantSpec(bits=4, group_size=128, symmetric=True),
                "int4 weights, groups of 128, symmetric"),
        # The tied 49152 x 576 lm_head of SmolLM2 is a fifth of its weights and, left float, a sixth of an int4
        # decode step: int8 per channel costs little perplexity. The embedding (a gather) stays float.
        Recipe(name="w4g128-head8", exclude=("*embed*",),
               description="int4 weights, groups of 128, asymmetric; lm_head int8 per-channel; embeddings float",
               rules=(Rule("lm_head", QuantSpec(bits=8, granularity="per_channel", symmetric=True)),
                      Rule("*.lm_head", QuantSpec(bits=8, granularity="per_channel", symmetric=True)),
                      Rule("*", QuantSpec(bits=4, group_size=128, symmetric=False)))),
        _single("w8-trt", QuantSpec(bits=8, granularity="per_channel", symmetric=True, restricted_range=True),
                "int8 weights, per-channel symmetric, restricted range [-127, 127]: TensorRT-ready (scales > 0)"),
        _single("w4g128-trt", QuantSpec(bits=4, group_size=128, symmetric=True, restricted_range=True),
                "int4 weights, groups of 128, symmetric, restricted range [-7, 7]: TensorRT-ready (scales > 0)"),
        _single("w4g64", QuantSpec(bits=4, group_size=64, symmetric=False),
                "int4 weights, groups of 64, asymmetric"),
        # Groups of 64 divide SmolLM2's 576 and 1536 inputs, and symmetric codes need no zero points: the int4
        # form that `qexport quantize` saves as compressed-tensors for transformers and vLLM alike.
        _single("w4g64-sym", QuantSpec(bits=4, group_size=64, symmetric=True),
                "int4 weights, groups of 64, symmetric (saved as compressed-tensors: transformers and vLLM load it)"),
        # SmolLM2's tied 49152 x 576 table is a fifth of its weights: int8 rows take the model from 173 to 88 MB for
        # +0.12% perplexity; int4 rows (g32 / g64) cost +14% / +23% (docs/embedding.md). The catch-all "*" does not
        # reach embeddings (Recipe.rule_for): the table is quantized by the rule that names it.
        Recipe(name="w4g64-sym-emb8", exclude=(),
               description="int4 weights, groups of 64, symmetric; the embedding and lm_head int8 per row "
                           "(a tied table stored once)",
               rules=(Rule("*embed_tokens", QuantSpec(bits=8, granularity="per_channel", symmetric=True)),
                      Rule("lm_head", QuantSpec(bits=8, granularity="per_channel", symmetric=True)),
                      Rule("*.lm_head", QuantSpec(bits=8, granularity="per_channel", symmetric=True)),
                      Rule("*", QuantSpec(bits=4, group_size=64, symmetric=True)))),
        _single("nf4-dq", QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True),
                "NF4 weights, blocks of 64, scales double-quantized to int8 in blocks of 256"),
        _single("w2g64", QuantSpec(bits=2, group_size=64, symmetric=False),
                "int2 weights, groups of 64, asymmetric (round-to-nearest)"),
        _single("w2g64-mse", QuantSpec(bits=2, group_size=64, symmetric=False, observer="mse"),
                "int2 weights, groups of 64, asymmetric, range chosen by MSE search"),
        Recipe(name="w8a8-dynamic", description="int8 per-channel weights, int8 per-token dynamic activations",
               rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token", dynamic=True)),)),
        Recipe(name="w8a8-llmint8",
               description="LLM.int8(): int8 per-channel weights; input columns with an |x| >= 6 in float, "
                           "the rest int8 per-token dynamic",
               rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token", dynamic=True,
                                                             outlier_threshold=LLM_INT8_THRESHOLD)),)),
        Recipe(name="w8a8-static", description="int8 per-channel weights, int8 per-tensor calibrated activations",
               rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor")),)),
        # Presets that need calibration data (Recipe.needs_data): for their algorithm, at quantize() time
        # (quantize(model, name, calibration=tokens)), or for static activation scales (calibrate()).
        Recipe(name="w8a8-dynamic-sq", algorithm="smoothquant",
               rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token", dynamic=True)),),
               description="int8 per-channel weights, int8 per-token dynamic activations, SmoothQuant scales "
                           "folded into the norms / v_proj / up_proj (needs calibration data)"),
        Recipe(name="w8a8-static-sq", algorithm="smoothquant",
               rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor")),),
               description="int8 per-channel weights, int8 per-tensor calibrated activations, SmoothQuant scales "
                           "folded into the norms / v_proj / up_proj (needs calibration data)"),
        Recipe(name="w4g128-gptq", algorithm="gptq", rules=(Rule("*", QuantSpec(group_size=128, **_GPTQ_SPEC)),),
               description="int4 weights, groups of 128, asymmetric, GPTQ with act-order and MSE group ranges "
                           "(needs calibration data)"),
        Recipe(name="w4g64-gptq", algorithm="gptq", rules=(Rule("*", QuantSpec(group_size=64, **_GPTQ_SPEC)),),
               description="int4 weights, groups of 64, asymmetric, GPTQ with act-order and MSE group ranges "
                           "(needs calibration data)"),
        Recipe(name="w2g64-gptq", algorithm="gptq", rules=(Rule("*", QuantSpec(group_size=64, **_GPTQ2_SPEC)),),
               description="int2 weights, groups of 64, asymmetric, GPTQ with act-order and MSE group ranges, no "
                           "rotation (needs calibration data)"),
        Recipe(name="w2g64-gptq-hadamard", algorithm="gptq", options={"rotate": "hadamard"},
               rules=(Rule("*", QuantSpec(group_size=64, **_GPTQ2_SPEC)),),
               description="int2 weights, groups of 64, asymmetric, GPTQ after a randomized Hadamard rotation "
                           "folded into the weights (Llama models; one online rotation before each down_proj; "
                           "needs calibration data)"),
        Recipe(name="w2g64-gptq-hadamard-attn4", algorithm="gptq", options={"rotate": "hadamard"},
               rules=(Rule("*.self_attn.*", QuantSpec(group_size=64, **_GPTQ_SPEC)),
                      Rule("*", QuantSpec(group_size=64, **_GPTQ2_SPEC))),
               description="int4 attention / int2 MLP weights (2.5 bits per weight on Llama-style blocks whose MLP "
                           "holds 3/4 of the weights), groups of 64, asymmetric, GPTQ after a randomized Hadamard "
                           "rotation (Llama models; needs calibration data)"),
        Recipe(name="w8a8-static-hadamard", options={"rotate": "hadamard"},
               rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor",
                                                             static_fallback_ratio=STATIC_FALLBACK_RATIO)),),
               description="int8 per-channel weights, int8 per-tensor calibrated activations after a randomized "
                           "Hadamard rotation (Llama models); layers whose calibrated range is > 16x the median "
                           "token's keep float activations (needs calibration data)"),
        Recipe(name="w4g128-awq", algorithm="awq",
               rules=(Rule("*", QuantSpec(bits=4, group_size=128, symmetric=False)),),
               description="int4 weights, groups of 128, asymmetric, AWQ scales and clipping (needs calibration data)"),
        Recipe(name="w4g128-awq-gptq", algorithm="awq", options={"rounding": "gptq"},
               rules=(Rule("*", QuantSpec(group_size=128, **_GPTQ_SPEC)),),
               description="int4 weights, groups of 128, asymmetric, AWQ scales folded into the model, then "
                           "GPTQ with act-order and MSE group ranges (needs calibration data)"),
        # llama.cpp's GGML block formats (qexport.ggml; `qexport export --format gguf`). The embedding and lm_head
        # are q8_0, what llama.cpp's quantizer gives SmolLM2's tied 576-wide table (q6_k, which falls back to q8_0);
        # a K-quant on a layer whose input is not a multiple of 256 is stored in llama.cpp's fallback type
        # (q4_k -> q5_0, q6_k -> q8_0, q2_k and q3_k -> q4_0). The K-quants choose each sub-block's range by MSE search,
        # the way llama.cpp searches its sub-block scales.
        *(_gguf(f"gguf-{t}", t, obs, f"llama.cpp {t.upper()} weights ({what}), round to nearest")
          for t, obs, what in (("q8_0", "minmax", "int8 blocks of 32, fp16 scales"),
                               ("q4_0", "minmax", "int4 blocks of 32, fp16 scales"),
                               ("q6_k", "mse", "6-bit, 256-blocks of 16 with int8 scales"),
                               ("q4_k", "mse", "4-bit, 256-blocks of 32 with 6-bit scales and mins"),
                               ("q3_k", "mse", "3-bit, 256-blocks of 16 with 6-bit scales"),
                               ("q2_k", "mse", "2-bit, 256-blocks of 16 with 4-bit scales and mins"))),
        *(_gguf(f"gguf-{t}-gptq", t, "mse", f"llama.cpp {t.upper()} weights, GPTQ with act-order, sub-block ranges "
                "by MSE search (needs calibration data)", algorithm="gptq")
          for t in ("q4_k", "q2_k")),
        _gguf("gguf-q4_k-awq", "q4_k", "mse", "llama.cpp Q4_K weights, AWQ scales folded into the model, then rounded "
              "by the format (needs calibration data)", algorithm="awq"),
        *(_gguf(f"gguf-q2_k-mix{suffix}", "q2_k", "mse", "llama.cpp's Q2_K file-type mix: Q2_K weights, Q3_K for "
                f"attention's v_proj and o_proj and the MLP's down_proj, {how}", algorithm=algorithm,
                wider=_Q2_K_MIX, wider_fmt="q3_k")
          for suffix, algorithm, how in (("", "rtn", "round to nearest"),
                                         ("-gptq", "gptq", "GPTQ with act-order (needs calibration data)"),
                                         ("-awq", "awq", "AWQ scales folded into the model, then rounded by the "
                                                         "formats (needs calibration data)"))),
    )
}


# Named KV-cache formats (``--kv-cache NAME``). int4 uses groups of 32 along head_dim: a whole 64-wide head
# per scale costs SmolLM2 much more perplexity (docs/kv-cache.md).
KV_CACHE_PRESETS: dict[str, KVCacheSpec] = {
    "int8": KVCacheSpec(bits=8),
    "int8-sym": KVCacheSpec(bits=8, symmetric=True),
    "int4": KVCacheSpec(bits=4, group_size=32),
    "int4-g64": KVCacheSpec(bits=4, group_size=64),
    "int4-sym": KVCacheSpec(bits=4, group_size=32, symmetric=True),
}


def get_preset(name: str) -> Recipe:
    """The preset ``name``, or a preset plus a KV-cache suffix (``w4g128-kv8``); UnknownPreset lists them."""
    if name in PRESETS:
        return PRESETS[name]
    for spec in KV_CACHE_PRESETS.values():  # any preset plus a KV-cache suffix: w4g128-kv8, w8-kv4g32 ...
        base = name[: -len(spec.suffix())]
        if name.endswith(spec.suffix()) and base in PRESETS:
            return PRESETS[base].with_kv_cache(spec)
    raise UnknownPreset(f"unknown recipe preset {name!r}; available: {', '.join(PRESETS)} (each may take a "
                        f"KV-cache suffix: {', '.join(s.suffix() for s in KV_CACHE_PRESETS.values())})")
