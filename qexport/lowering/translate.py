"""Step 1 of the ONNX lowering: the ``torch.onnx.export`` translation of each ``qexport`` op.

Weight-consuming ops become nodes of the ``qexport`` ONNX domain that carry their stored-weight initializers
and their format as attributes (``fmt``, ``bits``, ``group``, ``in_features``, ``symmetric``), so that step 2
(:mod:`qexport.lowering.core`) sees whole weights and picks each target's form. Activation quantization
becomes standard ONNX: per-token / per-tensor dynamic scales as ReduceMax / Div / Round / Clip / Cast (the
recipe's symmetric int8 quantizer; ONNX's ``DynamicQuantizeLinear`` is asymmetric uint8, another quantizer),
a static per-tensor scale as ``QuantizeLinear`` (int8 zero point). The ``qexport`` domain never reaches a
runtime: step 2 replaces every node of it.
"""

from __future__ import annotations

import numpy as np
import torch

from qexport.lowering.llm_int8 import OP_TYPE as LLM_INT8_OP, SCHEMA as LLM_INT8_SCHEMA

__all__ = ["DOMAIN", "FUSED_OPSET", "translations", "onnx_program"]

DOMAIN = "qexport"
FUSED_OPSET = 23  # Attention (grouped-query, with the KV cache), RotaryEmbedding, RMSNormalization
_F32, _I8 = 1, 3  # onnx.TensorProto.FLOAT, INT8


def onnx_program(module, args: tuple, dynamic_shapes=None, opset: int = FUSED_OPSET, **names):
    """``torch.onnx.export(module, args)`` with :func:`translations`, the one export call of the compile
    back-end's ONNX Runtime target and of ``qexport export``: the ``onnx.ModelProto`` step 2 lowers.

    onnxscript's optimizer (constant folding, shape-chain and dead-code removal) runs on the exported graph
    before the qexport-domain nodes are lowered, so it never sees a quantized weight's ``DequantizeLinear``.
    ``names``: ``input_names`` / ``output_names``. The exporter's debug records (FX node,
    stack trace: 7% of a w4g128 file) are dropped."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, tuple(args), dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=opset,
                                 custom_translation_table=translations(), optimize=True, verbose=False,
                                 report=False, **names)
    proto = prog.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: every ``torch.ops.qexport`` op."""
    from onnx import numpy_helper
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_schemas()
    qx = Opset(DOMAIN, 1)
    Q = torch.ops.qexport

    def qlinear(x, qdata, scale, zero_point, bias, fmt: str, bits: int, group: int, in_features: int,
                symmetric: bool):
        return qx.QLinear(x, qdata, scale, zero_point, bias, fmt=fmt, bits=bits, group=group,
                          in_features=in_features, symmetric=int(symmetric))

    def dequantize_weight(qdata, scale, zero_point, fmt: str, bits: int, group: int, in_features: int,
                          symmetric: bool):
        return qx.DequantizeWeight(qdata, scale, zero_point, fmt=fmt, bits=bits, group=group,
                                   in_features=in_features, symmetric=int(symmetric))

    def qembedding(indices, qdata, scale, zero_point, fmt: str, bits: int, group: int, dim: int, symmetric: bool):
        return qx.QEmbedding(indices, qdata, scale, zero_point, fmt=fmt, bits=bits, group=group, in_features=dim,
                             symmetric=int(symmetric))

    def symmetric_int8(xf, scale):
        q = op.Clip(op.Round(op.Div(xf, scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
        return op.Cast(q, to=_I8), scale

    def amax_scale(amax):
        return op.Max(op.Div(amax, op.Constant(value_float=127.0)),
                      op.Constant(value_float=float(torch.finfo(torch.float32).tiny)))

    def quantize_per_token(x):
        xf = op.Cast(x, to=_F32)
        return symmetric_int8(xf, amax_scale(op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)))

    def quantize_per_tensor_dynamic(x):
        xf = op.Cast(x, to=_F32)
        return symmetric_int8(xf, amax_scale(op.ReduceMax(op.Abs(xf), keepdims=0)))

    def quantize_per_tensor(x, scale, zero_point: int):
        zp = op.Constant(value=numpy_helper.from_array(np.array(zero_point, dtype=np.int8), "zp"))
        return op.QuantizeLinear(op.Cast(x, to=_F32), scale, zp)

    def qlinear_a8(xq, x_scale, x_zero_point: int, wq, w_scale, bias):
        return qx.QLinearA8(xq, x_scale, wq, w_scale, bias, x_zero_point=x_zero_point)

    def qlinear_llm_int8(x, wq, w_scale, bias, threshold: float):
        return qx.QLinearLLMInt8(x, wq, w_scale, bias, threshold=threshold)

    return {
        Q.qlinear.default: qlinear,
        Q.dequantize_weight.default: dequantize_weight,
        Q.qembedding.default: qembedding,
        Q.quantize_per_token.default: quantize_per_token,
        Q.quantize_per_tensor_dynamic.default: quantize_per_tensor_dynamic,
        Q.quantize_per_tensor.default: quantize_per_tensor,
        Q.qlinear_a8.default: qlinear_a8,
        Q.qlinear_llm_int8.default: qlinear_llm_int8,
    }


_WEIGHT_ATTRS = [("fmt", "STRING"), ("bits", "INT"), ("group", "INT"), ("in_features", "INT"), ("symmetric", "INT")]
_SCHEMAS = {  # op -> (inputs as (name, type, optional), attributes as (name, type))
    "QLinear": ([("x", "T", False), ("qdata", "Q", False), ("scale", "T", False), ("zero_point", "Q", True),
                 ("bias", "T", True)], _WEIGHT_ATTRS),
    "DequantizeWeight": ([("qdata", "Q", False), ("scale", "T", False), ("zero_point", "Q", True)], _WEIGHT_ATTRS),
    "QEmbedding": ([("indices", "I", False), ("qdata", "Q", False), ("scale", "T", False), ("zero_point", "Q", True)],
                   _WEIGHT_ATTRS),
    "QLinearA8": ([("xq", "Q", False), ("x_scale", "T", False), ("wq", "Q", False), ("w_scale", "T", False),
                   ("bias", "T", True)], [("x_zero_point", "INT")]),
    LLM_INT8_OP: LLM_INT8_SCHEMA,
}


def _register_schemas() -> None:
    """ONNX schemas for the qexport domain, so onnxscript can record these ops (they never reach a runtime)."""
    from onnx import defs

    OpSchema = defs.OpSchema
    for name, (inputs, attrs) in _SCHEMAS.items():
        try:
            defs.get_schema(name, 1, DOMAIN)
            continue
        except defs.SchemaError:  # not registered yet
            pass
        opt = OpSchema.FormalParameterOption
        types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float"),
                 ("Q", ["tensor(uint8)", "tensor(int8)"], "stored codes")]
        if any(t == "I" for _, t, _ in inputs):
            types.append(("I", ["tensor(int64)", "tensor(int32)"], "indices"))
        schema = OpSchema(
            name, DOMAIN, 1,
            inputs=[OpSchema.FormalParameter(n, t, param_option=opt.Optional if o else opt.Single)
                    for n, t, o in inputs],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=types,
            attributes=[OpSchema.Attribute(n, getattr(OpSchema.AttrType, t), "") for n, t in attrs],
        )
        defs.register_schema(schema)
