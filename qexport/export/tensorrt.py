"""TensorRT: lint an ONNX graph against TensorRT's QDQ rules, and build an engine (TensorRT imported lazily).

:func:`lint_tensorrt` checks a finished graph against TensorRT 10's explicit-quantization rules, the ones
:mod:`qexport.lowering.tensorrt_rules` states once for the pre-export check, the lowering and this lint; each
violation names its rule (``opset``, ``custom-op``, ``dynamic-quantization``, ``integer-op``, ``constant-scale``,
``positive-scale``, ``zero-point``, ``type``, ``int4-weight-only``, ``int4-blocked``, ``weight-axis``) and says
what TensorRT needs (:data:`qexport.lowering.tensorrt_rules.RULES`).

:func:`build_engine` builds a strongly typed engine (precisions come from the graph's Q/DQ types) with a
timing cache and one optimization profile covering the dynamic batch / sequence / past axes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qexport.errors import InvalidConfig, ModelLoadError, QExportError, UnsupportedOp
from qexport.lowering.tensorrt_rules import INTEGER_OPS, OPSETS as TRT_OPSETS, QUANTIZED_BITS, RULES

__all__ = ["Violation", "lint_tensorrt", "build_engine", "TensorRTUnavailable", "TRT_OPSETS", "quantized_types"]


class TensorRTUnavailable(QExportError):
    """TensorRT's Python package is not installed here."""


@dataclass(frozen=True)
class Violation:
    node: str
    op_type: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): [{self.rule}] {self.message}"


def _load(model):
    """An ``onnx.ModelProto`` from a proto or a path, with clear errors for missing or non-ONNX files."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise ModelLoadError(f"ONNX model {str(p)!r} does not exist")
    try:
        proto = onnx.load(str(p))
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelLoadError(f"{str(p)!r} is not an ONNX model: {str(e).strip().splitlines()[0] if str(e) else e}") \
            from None
    if not proto.graph.node:
        raise ModelLoadError(f"{str(p)!r} is not an ONNX model (no graph nodes)")
    return proto


def _type_name(data_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(data_type)


def quantized_types(model) -> set[str]:
    """Names of the integer types (``INT8``, ``INT4``, ...) that the graph's Q / DQ nodes use."""
    proto = _load(model)
    inits = {i.name: i for i in proto.graph.initializer}
    found = set()
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            found.add(_type_name(inits[n.input[0]].data_type))
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            found.add(_type_name(inits[n.input[2]].data_type))
    return found


def lint_tensorrt(model) -> list[Violation]:
    """Every violation of TensorRT's QDQ rules (:data:`qexport.lowering.tensorrt_rules.RULES`) in ``model`` (a
    ModelProto or a path)."""
    from onnx import TensorProto, helper, numpy_helper

    from qexport.lowering.qdq import onnx_type

    proto = _load(model)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    constants = {n.output[0]: helper.get_attribute_value(n.attribute[0]) for n in g.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    out: list[Violation] = []

    def bad(node, rule, what):
        name, op = ("<model>", "opset") if node is None else (node.name or node.output[0], node.op_type)
        out.append(Violation(name, op, rule, f"{what}: TensorRT needs {RULES[rule].requirement}"))

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
        bad(None, "opset", f"opset {opset}")

    def const(name):
        if name in inits:
            return inits[name]
        return constants.get(name)

    signed_ok = {onnx_type(bits, True) for bits in QUANTIZED_BITS}
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            bad(node, "custom-op", f"{node.domain}.{node.op_type}")
            continue
        if node.op_type == "DynamicQuantizeLinear":
            bad(node, "dynamic-quantization", "dynamic activation quantization")
            continue
        if node.op_type in INTEGER_OPS:
            bad(node, "integer-op", f"integer {node.op_type}")
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = const(node.input[1])
        if scale is None:
            bad(node, "constant-scale", f"scale {node.input[1]!r} is not a constant")
        else:
            s = numpy_helper.to_array(scale).astype(np.float64)
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                bad(node, "positive-scale",
                    f"scale {node.input[1]!r} has values <= 0 or not finite (min {s.min():.3g})")
        qtype = None
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zp_name:
            zp = const(zp_name)
            if zp is None:
                bad(node, "zero-point", f"zero point {zp_name!r} is not a constant")
            else:
                qtype = zp.data_type
                if np.any(numpy_helper.to_array(zp) != 0):
                    bad(node, "zero-point", f"asymmetric zero point {zp_name!r} (non-zero values)")
        weight = const(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is not None:
            qtype = weight.data_type
        elif qtype is None:
            qtype = attrs.get("output_dtype") or TensorProto.UINT8  # ONNX's default quantized type
        if qtype not in signed_ok:
            bad(node, "type", f"quantized type {_type_name(qtype)}")
        if qtype in (TensorProto.INT4, TensorProto.UINT4):
            if weight is None:
                bad(node, "int4-weight-only", "int4 on an activation")
            elif len(weight.dims) != 2 or not attrs.get("block_size"):
                how = "per-tensor" if scale is not None and len(scale.dims) == 0 else "per-channel / unblocked"
                bad(node, "int4-blocked", f"{how} int4 weight")
        if weight is not None and scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1 \
                and not attrs.get("block_size"):
            axis = attrs.get("axis", 1) % len(weight.dims)
            readers = consumers.get(node.output[0], [])
            channel = {("MatMul", 1): len(weight.dims) - 1}
            want = next((channel[(r.op_type, i)] for r, i in readers if (r.op_type, i) in channel), axis)
            if scale.dims[0] != weight.dims[axis] or axis != want:
                bad(node, "weight-axis", f"per-channel scale of {scale.dims[0]} values on axis {axis} of a weight "
                    f"{list(weight.dims)}, not the output-channel axis {want}")
    return out


_DIM_ROLES = {  # input name prefix -> role of each dynamic axis
    "input_ids": {0: "batch", 1: "seq"},
    "position_ids": {0: "batch", 1: "seq"},
    "attention_mask": {0: "batch", 1: "total"},
    "past_key_values.": {0: "batch", 2: "past"},
}


def _profile_shapes(shape: list[int], name: str, limits: dict[str, tuple[int, int, int]]):
    """(min, opt, max) shapes of one input for the optimization profile."""
    roles = next((r for prefix, r in _DIM_ROLES.items() if name.startswith(prefix)), {})
    shapes = []
    for k in range(3):
        dims = []
        for axis, d in enumerate(shape):
            if d >= 0:
                dims.append(d)
            elif axis in roles:
                dims.append(limits[roles[axis]][k])
            else:
                raise UnsupportedOp(f"input {name!r} has a dynamic axis {axis} that build-engine has no range for")
        shapes.append(tuple(dims))
    return shapes


def build_engine(onnx_path: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False, int4: bool = False,
                 max_batch: int = 1, max_seq: int = 512, max_past: int = 1024, opt_seq: int = 128,
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float = 4.0,
                 force: bool = False) -> Path:
    """Build a strongly typed TensorRT engine from an exported ONNX QDQ model; returns the engine path.

    Strongly typed: every tensor's precision comes from the graph (its Q / DQ types), not from builder
    flags. ``int8`` / ``int4`` state which quantized types the engine must contain: the build stops early if
    the graph has none of them. The graph is linted first (:func:`lint_tensorrt`). One optimization profile
    covers batch 1..max_batch, new tokens 1..max_seq (optimum at opt_seq) and a past of 0..max_past. The
    timing cache is read from and written back to ``timing_cache`` (default: ``<out>.timing.cache``).
    Raises TensorRTUnavailable when TensorRT's Python package is missing.
    """
    from qexport._io import OutputExists, atomic_write_bytes

    src = Path(onnx_path).expanduser()
    if src.is_dir():
        src = src / "model.onnx"
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise OutputExists(f"{str(out)!r} already exists; pass --force to replace it")
    proto = _load(src)
    problems = lint_tensorrt(proto)
    if problems:
        raise UnsupportedOp(f"{str(src)!r} breaks TensorRT's QDQ rules ({len(problems)} violations; first: "
                            f"{problems[0]}); run `qexport lint-trt {src}`")
    types = quantized_types(proto)
    for flag, name in ((int8, "INT8"), (int4, "INT4")):
        if flag and name not in types:
            raise InvalidConfig(f"--{name.lower()} asked for, but {str(src)!r} has no {name} Q/DQ "
                                f"(it has: {', '.join(sorted(types)) or 'none'})")
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed here (pip install tensorrt on a machine with an NVIDIA "
                                  "GPU); the ONNX model is ready to build there") from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedOp(f"TensorRT's ONNX parser rejected {str(src)!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_path = Path(timing_cache) if timing_cache else out.with_name(out.name + ".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    limits = {"batch": (1, 1, max_batch), "seq": (1, opt_seq, max_seq), "past": (0, opt_seq, max_past),
              "total": (1, 2 * opt_seq, max_seq + max_past)}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(d < 0 for d in t.shape):
            profile.set_shape(t.name, *_profile_shapes(list(t.shape), t.name, limits))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UnsupportedOp(f"TensorRT could not build an engine from {str(src)!r} (see the log above)")
    atomic_write_bytes(out, bytes(engine), overwrite=force)
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()), overwrite=True)
    return out
