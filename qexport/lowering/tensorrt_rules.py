"""TensorRT's explicit-quantization (QDQ) rules, stated once.

TensorRT 10 builds a strongly typed engine from a QDQ graph: every quantized value is INT8 or INT4 with a
constant scale > 0 and zero point 0, INT4 only for 2-D weights quantized in blocks along one axis, and no
activation scale computed at run time. Each rule has an id (:data:`RULES`) and the same text wherever it
is applied:

* before export, on the quantized modules (:func:`qexport.export.onnx.check_tensorrt_modules`), through
  :func:`weight_rule` / :func:`activation_rule` and :func:`refuse`;
* in the lowering (:mod:`qexport.lowering.core`, target ``'tensorrt'``), on the ``qexport``-domain nodes,
  through the same functions;
* on a finished ONNX graph (:func:`qexport.export.tensorrt.lint_tensorrt`), which reports each broken rule
  by its id with :data:`RULES`' requirement text.

A format without a QDQ form (NF4) is not a refusal: :data:`FLOAT_FORMATS` stay float in a TensorRT export,
with a warning and a report entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from qexport.errors import UnsupportedOp
from qexport.ggml import GGML_TYPES

__all__ = ["Rule", "RULES", "OPSETS", "QUANTIZED_BITS", "INTEGER_OPS", "FLOAT_FORMATS", "RESTRICTED_PRESETS",
           "weight_rule", "activation_rule", "refuse", "check_weight", "check_activation"]

OPSETS = (13, 21)  # per-channel ``axis`` from 13; blocked DequantizeLinear and INT4 from 21
QUANTIZED_BITS = (8, 4)  # signed INT8 and INT4 only
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")  # not in TensorRT's QDQ model
# no code-book or GGML-block dequantization in TensorRT's QDQ rules: kept float, not refused
FLOAT_FORMATS = ("nf4", *GGML_TYPES)
RESTRICTED_PRESETS = "w4g128-trt, w8-trt"
STATIC_OR_WEIGHT_ONLY = "use a static recipe (w8a8-static) or a weight-only one (w8, w4g128-sym)"


@dataclass(frozen=True)
class Rule:
    """``requirement``: what TensorRT needs (the lint's message); ``advice``: what to export instead."""

    id: str
    requirement: str
    advice: str = ""


RULES = {r.id: r for r in (
    Rule("opset", f"TensorRT takes QDQ graphs in opsets {OPSETS[0]}-{OPSETS[1]}"),
    Rule("custom-op", "only ops of the default ONNX domain (com.microsoft contrib ops are ONNX Runtime's)",
         f"use an int recipe ({RESTRICTED_PRESETS})"),
    Rule("dynamic-quantization", "constant activation scales: no quantization computed at run time",
         STATIC_OR_WEIGHT_ONLY),
    Rule("integer-op", "quantized arithmetic only as QuantizeLinear / DequantizeLinear around float ops (no "
         "MatMulInteger / ConvInteger / QLinearMatMul / QLinearConv)", STATIC_OR_WEIGHT_ONLY),
    Rule("constant-scale", "every Q / DQ scale is a constant"),
    Rule("positive-scale", "strictly positive, finite scales"),
    Rule("zero-point", "symmetric quantization: constant zero points of a signed type, all 0",
         f"use a TensorRT-ready symmetric recipe ({RESTRICTED_PRESETS})"),
    Rule("type", "INT8 and INT4 (signed, zero point 0): no UINT8 / UINT4 / 2-bit types",
         f"use {RESTRICTED_PRESETS}"),
    Rule("int4-weight-only", "int4 on weights only, never on an activation"),
    Rule("int4-blocked", "2-D int4 weights quantized in blocks along K (block_size): no per-tensor or "
         "per-channel int4", "use a grouped recipe (w4g128-trt)"),
    Rule("weight-axis", "a per-channel weight scale on the output-channel axis of the MatMul / Gemm that reads it"),
)}


def weight_rule(fmt: str, bits: int, symmetric: bool, group: int, k: int, per_tensor: bool) -> tuple[str, str] | None:
    """``(rule id, what the weight is)`` for the first rule a stored weight breaks, or None. NF4 passes
    and the GGML block formats pass (:data:`FLOAT_FORMATS`: kept float, not refused)."""
    if fmt in FLOAT_FORMATS:
        return None
    if fmt != "int":
        return "custom-op", f"{fmt} weights have no TensorRT QDQ form"
    if bits not in QUANTIZED_BITS:
        return "type", f"TensorRT has no {bits}-bit weights"
    if not symmetric:
        return "zero-point", "this recipe is asymmetric"
    if bits == 4 and (per_tensor or group >= k):
        return "int4-blocked", f"{'per-tensor' if per_tensor else 'per-channel'} int4 weight"
    return None


def activation_rule(*, dynamic: bool, symmetric: bool, llm_int8: bool) -> tuple[str, str] | None:
    """``(rule id, what the activation quantization is)`` for the first rule it breaks, or None."""
    if llm_int8:
        return "dynamic-quantization", ("LLM.int8() quantizes activations at run time (outlier columns and "
                                        "per-token scales)")
    if dynamic:
        return "dynamic-quantization", "dynamic activation quantization"
    if not symmetric:
        return "zero-point", "asymmetric activation scale"
    return None


def refuse(layer: str, broken: tuple[str, str]) -> UnsupportedOp:
    """The error for ``layer`` breaking ``broken`` (a ``(rule id, what)`` pair): what, TensorRT's
    requirement, what to use instead."""
    rule_id, what = broken
    rule = RULES[rule_id]
    advice = f"; {rule.advice}" if rule.advice else ""
    return UnsupportedOp(f"{layer}: {what}: TensorRT needs {rule.requirement} [{rule_id}]{advice}")


def check_weight(layer: str, fmt: str, bits: int, symmetric: bool, group: int, k: int, per_tensor: bool) -> None:
    """Raise UnsupportedOp (:func:`refuse`) when TensorRT cannot run this stored weight."""
    broken = weight_rule(fmt, bits, symmetric, group, k, per_tensor)
    if broken:
        raise refuse(layer, broken)


def check_activation(layer: str, *, dynamic: bool, symmetric: bool, llm_int8: bool = False) -> None:
    """Raise UnsupportedOp (:func:`refuse`) when TensorRT cannot run this activation quantization."""
    broken = activation_rule(dynamic=dynamic, symmetric=symmetric, llm_int8=llm_int8)
    if broken:
        raise refuse(layer, broken)
