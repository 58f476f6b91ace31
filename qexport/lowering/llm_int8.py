"""LLM.int8() in standard ONNX: the ``QLinearLLMInt8`` node of the ``qexport`` domain as two matmuls.

``qexport::qlinear_llm_int8`` is exported (:mod:`qexport.lowering.translate`) as one ``qexport``-domain node,
``QLinearLLMInt8(x, wq, w_scale, bias?, threshold=)``, so that the int8 weight is a single constant. The ONNX
Runtime emitter of :mod:`qexport.lowering.core` replaces it by :func:`llm_int8_nodes`, standard ONNX ops only
(opset >= 18)::

    xf        = Cast(x, float)
    outliers  = GreaterOrEqual(ReduceMax(Abs(Reshape(xf, [-1, K])), axes=[0]), threshold)      # [K] bool
    regular   = Where(outliers, 0, xf)
    s         = Max(ReduceMax(Abs(regular), axes=[-1]) / 127, tiny)                          # per token
    q         = Cast(Clip(Round(regular / s), -128, 127), int8)
    y_int8    = Cast(MatMulInteger(q, Wq^T), float) * (s * w_scale)     # ORT: MatMulIntegerToFloat
    cols      = Reshape(NonZero(outliers), [-1])
    y_float   = MatMul(Gather(xf, cols, axis=-1), Cast(Gather(Wq^T, cols, axis=0), float) * w_scale)
    y         = y_int8 + y_float (+ bias)

The weight is stored once, as int8 ``[K, N]``; the float path gathers only the outlier rows of it at run
time, so its cost follows the number of outlier columns (none: an empty ``MatMul`` that adds zeros). The
numerics are those of :func:`qexport.llm_int8.reference_linear` up to float rounding.

TensorRT takes no activation scales computed at run time, so the ``tensorrt`` target refuses this node (as it
refuses dynamic W8A8; :mod:`qexport.lowering.tensorrt_rules`). If the decomposition cannot be built for a layer,
the core's emitter falls back to a float ``MatMul`` of its dequantized weight, with a warning and a report entry.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from qexport.errors import UnsupportedOp

__all__ = ["OP_TYPE", "SCHEMA", "llm_int8_nodes"]

OP_TYPE = "QLinearLLMInt8"
# the qexport-domain schema: inputs as (name, type, optional), attributes as (name, type)
SCHEMA = ([("x", "T", False), ("wq", "Q", False), ("w_scale", "T", False), ("bias", "T", True)],
          [("threshold", "FLOAT")])
_F32, _I8, _I64 = 1, 3, 7  # onnx.TensorProto.FLOAT, INT8, INT64


def llm_int8_nodes(name: str, x: str, wq: torch.Tensor, w_scale: torch.Tensor, bias: str, out: str,
                   threshold: float, add_array: Callable[[str, np.ndarray], str]) -> list:
    """The ONNX nodes of one LLM.int8() linear (module docstring), ``x -> out``. ``wq`` is the int8 weight
    ``[N, K]``, ``w_scale`` its per-channel (or per-tensor) scales; ``add_array(name, array)`` adds an
    initializer and returns its name."""
    from onnx import helper

    if wq.dtype != torch.int8 or wq.dim() != 2:
        raise UnsupportedOp(f"{name}: LLM.int8() needs an int8 [N, K] weight, got {wq.dtype} {tuple(wq.shape)}")
    k = wq.shape[1]
    wt = add_array(f"{name}_WT", wq.t().contiguous().numpy())
    ws = add_array(f"{name}_ws", w_scale.reshape(-1).to(torch.float32).numpy())
    consts = {
        "rows": np.array([-1, k], dtype=np.int64), "flat": np.array([-1], dtype=np.int64),
        "axis0": np.array([0], dtype=np.int64), "axis_last": np.array([-1], dtype=np.int64),
        "threshold": np.array(threshold, dtype=np.float32), "zero": np.array(0.0, dtype=np.float32),
        "qmax": np.array(127.0, dtype=np.float32), "tiny": np.array(torch.finfo(torch.float32).tiny, np.float32),
        "lo": np.array(-128.0, dtype=np.float32), "hi": np.array(127.0, dtype=np.float32),
    }
    c = {key: add_array(f"{name}_c_{key}", v) for key, v in consts.items()}
    nodes = []

    def node(op: str, inputs: list[str], tag: str, output: str | None = None, **attrs) -> str:
        output = output or f"{name}_{tag}"
        nodes.append(helper.make_node(op, inputs, [output], name=f"{name}_{tag}", **attrs))
        return output

    xf = node("Cast", [x], "xf", to=_F32)
    colmax = node("ReduceMax", [node("Abs", [node("Reshape", [xf, c["rows"]], "rows")], "abs_rows"), c["axis0"]],
                  "colmax", keepdims=0)
    outliers = node("GreaterOrEqual", [colmax, c["threshold"]], "outliers")
    # int8 part: the regular columns, per-token symmetric int8 (qexport::quantize_per_token's arithmetic)
    regular = node("Where", [outliers, c["zero"], xf], "regular")
    amax = node("ReduceMax", [node("Abs", [regular], "abs_regular"), c["axis_last"]], "amax", keepdims=1)
    xs = node("Max", [node("Div", [amax, c["qmax"]], "amax_127"), c["tiny"]], "x_scale")
    q = node("Clip", [node("Round", [node("Div", [regular, xs], "x_div")], "x_round"), c["lo"], c["hi"]], "x_clip")
    acc = node("MatMulInteger", [node("Cast", [q], "xq", to=_I8), wt], "acc")
    scales = node("Mul", [xs, ws], "scale_product")
    y_int8 = node("Mul", [node("Cast", [acc], "accf", to=_F32), scales], "y_int8")
    # float part: the outlier columns of x times the same columns of the dequantized weight
    cols = node("Reshape", [node("NonZero", [outliers], "nonzero"), c["flat"]], "cols")
    x_out = node("Gather", [xf, cols], "x_outliers", axis=-1)
    w_rows = node("Cast", [node("Gather", [wt, cols], "w_rows_q", axis=0)], "w_rows_f", to=_F32)
    w_out = node("Mul", [w_rows, ws], "w_outliers")
    y_float = node("MatMul", [x_out, w_out], "y_float")
    node("Add", [y_int8, y_float], "sum", output=out if not bias else None)
    if bias:
        node("Add", [f"{name}_sum", bias], "bias", output=out)
    return nodes
