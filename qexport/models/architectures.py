"""Decoder architectures as data: where each family keeps its linears and norms, and what its attention does.

AWQ and SmoothQuant (which norm or linear absorbs which scales), rotation (which weights fold which
matrix), the fused ONNX export (which model code it may swap for ONNX's whole ops) and the support
matrix (``qexport models``) all read :data:`ARCHITECTURES`; nothing else decides what a model is.

An entry names modules relative to one decoder block:

- ``attn_norm`` feeds the attention's input linears ``qkv`` (three names, or one for Phi-3's fused
  ``qkv_proj`` whose rows are ``[q; k; v]``); ``o`` is the attention's output linear;
- ``mlp_norm`` feeds the MLP's input linears ``mlp_in``: gated ``(gate, up)``, Phi-3's fused ``gate_up_proj``
  (rows ``[gate; up]``), or one plain ``fc1``; ``mlp_out`` is the last MLP linear;
- ``norm`` is the norms' form: ``"rms"`` (``x / rms(x) * w``), ``"rms_1p"`` (Gemma: ``x / rms(x) * (1 + w)``)
  or ``"layernorm"`` (mean subtracted, weight and bias);
- ``post_norms``: norms applied to a sublayer's output before the residual add (Gemma 2 and 3).

Facts that vary within a family (head counts, ``head_dim``, sliding-window layers, soft-capping) are read
from the model's config by :func:`describe`; whether the embedding is tied is read from the modules where it
matters (rotation unties it).

A model type that is not in the table still quantizes with round-to-nearest and GPTQ, which work on any
``nn.Linear``; what needs the table (AWQ, SmoothQuant, rotation, the fused ONNX export) raises
:class:`~qexport.errors.UnsupportedOp` naming the model type and what to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qexport.errors import UnsupportedOp

__all__ = ["Architecture", "ModelFacts", "ARCHITECTURES", "architecture", "describe", "find_architecture",
           "rotation_refusal", "onnx_fusions", "ONNX_FUSION_OPS", "model_type", "PATHS", "support", "support_markdown"]


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm: str = "rms"  # "rms" | "rms_1p" | "layernorm"
    attn: str = "self_attn"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o: str = "o_proj"
    mlp: str = "mlp"  # the module that holds the MLP linears ("" when they sit in the block itself)
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    gated: bool = True  # mlp_out reads act(gate) * up: up's output rows can absorb mlp_out's scales
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_norms: tuple[str, ...] = ()
    qk_norm: bool = False
    embedding_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    rotary: bool = True  # rotate-half rotary embeddings (False: learned positions)
    attn_softcap: bool = False  # attention logits soft-capped by default (Gemma 2): eager attention, no SDPA
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def fused_gate_up(self) -> bool:
        return self.gated and len(self.mlp_in) == 1

    def sub(self, block: nn.Module, path: str) -> nn.Module:
        """The module at ``path`` (relative to ``block``; "" is the block)."""
        return block.get_submodule(path) if path else block

    def attention(self, block: nn.Module) -> nn.Module:
        return self.sub(block, self.attn)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return self.sub(block, self.mlp)

    def linear(self, block: nn.Module, part: str, name: str) -> nn.Linear:
        """One of the block's linears: ``part`` is ``"attn"`` or ``"mlp"``."""
        return self.sub(block, self.attn if part == "attn" else self.mlp).get_submodule(name)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("Llama", ("llama",)),
    Architecture("Mistral", ("mistral",)),
    Architecture("Qwen2", ("qwen2",), notes=("q/k/v_proj have biases",)),
    Architecture("Qwen3", ("qwen3",), qk_norm=True),
    Architecture("Gemma 2", ("gemma2",), norm="rms_1p", mlp_norm="pre_feedforward_layernorm",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), embedding_scale=True,
                 attn_softcap=True),
    Architecture("Gemma 3", ("gemma3_text", "gemma3"), norm="rms_1p", mlp_norm="pre_feedforward_layernorm",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), embedding_scale=True,
                 qk_norm=True),
    Architecture("Phi-3", ("phi3",), qkv=("qkv_proj",), mlp_in=("gate_up_proj",)),
    Architecture("OPT", ("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
                 final_norm="model.decoder.final_layer_norm", norm="layernorm", o="out_proj", mlp="",
                 mlp_in=("fc1",), mlp_out="fc2", gated=False, attn_norm="self_attn_layer_norm",
                 mlp_norm="final_layer_norm", rotary=False, notes=("learned positions; linears have biases",)),
)
_BY_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_architecture(model: nn.Module) -> Architecture | None:
    """The table's entry for ``model``'s config ``model_type``, or None."""
    return _BY_TYPE.get(model_type(model))


def architecture(model: nn.Module, what: str, instead: str) -> Architecture:
    """The entry for ``model``; :class:`UnsupportedOp` naming the model type, ``what`` needs it, and ``instead``."""
    arch = find_architecture(model)
    if arch is None:
        known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
        kind = model_type(model)
        which = f"model type {kind!r}" if kind else f"{type(model).__name__} (no config.model_type)"
        raise UnsupportedOp(
            f"{what} needs the decoder layout of {which}, which qexport's architecture table lacks (it has: "
            f"{known}); {instead}"
        )
    return arch


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says about its attention (the parts that vary within a family)."""

    arch: Architecture
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    sliding_layers: int  # layers with sliding-window attention
    attn_softcap: float | None
    final_softcap: float | None


def describe(model: nn.Module, arch: Architecture | None = None) -> ModelFacts:
    arch = arch or architecture(model, "describing the model", "give a model of a supported family")
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kinds = getattr(cfg, "layer_types", None) or []
    sliding = sum(1 for k in kinds if "sliding" in str(k))
    if not kinds and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        sliding = cfg.num_hidden_layers
    return ModelFacts(
        arch=arch, hidden=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, layers=cfg.num_hidden_layers,
        sliding_layers=sliding, attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
    )


def rotation_refusal(arch: Architecture) -> str | None:
    """Why rotation does not apply to ``arch`` (None when it does)."""
    if arch.norm == "layernorm":
        return ("LayerNorm subtracts the mean, which does not commute with a rotation of the residual stream "
                "(the model would first need its LayerNorms turned into RMSNorms, which qexport does not do)")
    if arch.post_norms:
        return ("the norms on the attention and MLP outputs (" + ", ".join(arch.post_norms) + ") scale the "
                "rotated residual contributions channel by channel; folding them would take two online rotations "
                "per layer")
    if arch.fused_qkv or arch.fused_gate_up:
        return "the fused qkv_proj / gate_up_proj layout is not handled by the rotation code yet"
    return None


ONNX_FUSION_OPS = {"attention": ("fuse_kv_attention", "Attention"), "rotary": ("fuse_rotary", "RotaryEmbedding"),
                   "norm": ("fuse_rmsnorm", "RMSNormalization")}  # what -> (pass, opset-23 ONNX op)


def onnx_fusions(arch: Architecture) -> dict[str, str | None]:
    """What the ONNX fusion passes (:data:`qexport.passes.ONNX_FUSIONS`) make of a model of this family, from
    its layout: ``{"attention" | "rotary" | "norm": None when fused into one ONNX node, else why not}``. The
    passes decide by matching the graph; tests/test_families.py checks this says what they do."""
    return {
        "attention": "attention logits are soft-capped (eager attention)" if arch.attn_softcap else None,
        "rotary": None if arch.rotary else "learned positions, no rotary embeddings",
        "norm": None if arch.norm in ("rms", "rms_1p") else "LayerNorm (RMSNorm only)",
    }


# ----------------------------------------------------------------------------------------------------
# The support matrix: family x path. tests/test_families.py runs every cell on a tiny model of the family
# and checks that it behaves as stated here; `qexport models` prints it.
# ----------------------------------------------------------------------------------------------------
PATHS = {  # path -> (column title, what the tests compare, with the tolerance)
    "rtn": ("RTN", "w8 logits vs float, relative error < 0.03"),
    "gptq": ("GPTQ", "w4g64-gptq logits vs float, relative error < 0.3"),
    "awq": ("AWQ", "folds keep float logits (< 1e-4); w4g128-awq vs float < 0.35"),
    "smoothquant": ("SmoothQuant", "folds keep float logits (< 1e-4); w8a8-dynamic-sq vs float < 0.05"),
    "rotation": ("rotation", "rotated float model vs float, relative error < 1e-5"),
    "kv_cache": ("KV cache", "int8 KV cache vs float cache, relative error < 0.02"),
    "compile_inductor": ("compile: inductor", "w8, compiled (int8 CPU kernel, bfloat16 activations) vs eager, "
                                              "relative error < 1e-2"),
    "compile_onnxruntime": ("compile: onnxruntime", "w8, compiled (int8 activations in MatMulNBits) vs eager < 0.03"),
    "onnx_ort": ("ONNX: ORT", "w8 export, prefill + decode vs eager, max relative error < 1e-5"),
    "onnx_tensorrt": ("ONNX: TensorRT", "w8 export, TensorRT QDQ lint clean (no engine built: TensorRT absent)"),
    "saved_folder": ("saved folder", "w4g64-sym save + load: logits bit-identical"),
    "gguf": ("GGUF", "gguf-q8_0 file for llama.cpp: every quantized tensor read back by gguf's dequantizer "
                     "bit-identical"),
}
EXACT_PATHS = ("rotation", "compile_inductor", "onnx_ort", "saved_folder", "gguf")  # float rounding or bit-identical


def support(arch: Architecture) -> dict[str, tuple[str, str]]:
    """``path -> (status, note)`` for one family; status ``"exact"``, ``"approx"`` (within the stated
    tolerance of the float model), ``"lint"`` (graph checked, not run) or ``"refused"`` (with the reason)."""
    out = {}
    for path in PATHS:
        status = "exact" if path in EXACT_PATHS else "lint" if path == "onnx_tensorrt" else "approx"
        note = ""
        if path == "rotation" and rotation_refusal(arch):
            status, note = "refused", rotation_refusal(arch)
        elif path == "onnx_ort":
            fused = [what for what, why in onnx_fusions(arch).items() if why is None]
            note = "fused: " + ", ".join(fused) if fused else "nothing fused"
        elif path == "gguf" and gguf_refusal(arch):
            status, note = "refused", gguf_refusal(arch)
        elif path == "awq" and not arch.gated:
            note = "no MLP-output group (ungated MLP)"
        out[path] = (status, note)
    return out


def gguf_refusal(arch: Architecture) -> str | None:
    """Why a family has no GGUF export (None when it has one): llama.cpp runs no such architecture, or qexport
    does not write it yet."""
    from qexport.export.gguf import ARCHITECTURES as GGUF

    if any(t in GGUF for t in arch.model_types):
        return None
    return f"model type {arch.model_types[0]!r} has no GGUF export: llama.cpp has no such architecture"


def support_markdown() -> str:
    """The support matrix as a Markdown table (README's is this text)."""
    mark = {"exact": "exact", "approx": "approx.", "lint": "lint only", "refused": "refused"}
    head = "| family | model types | " + " | ".join(t for t, _ in PATHS.values()) + " |"
    lines = [head, "|" + "---|" * (len(PATHS) + 2)]
    notes: list[str] = []
    for arch in ARCHITECTURES:
        cells = []
        for path, (status, note) in support(arch).items():
            cell = mark[status]
            if note and status == "refused":
                if note not in notes:
                    notes.append(note)
                cell += f" ({notes.index(note) + 1})"
            elif note and path == "onnx_ort":
                cell += ", " + note
            cells.append(cell)
        lines.append(f"| {arch.family} | {', '.join(arch.model_types)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({i}) {n}" for i, n in enumerate(notes, 1)]
    lines.append("")
    lines += [f"- {title}: {what}" for title, what in PATHS.values()]
    return "\n".join(lines) + "\n"
