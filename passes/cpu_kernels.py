"""cpu_kernels: run the quantized linears of a CPU graph on integer kernels (the compile back-end's inductor target).

After ``convert`` and ``fold`` each quantized linear is a ``qexport.qlinear`` or ``qexport.qlinear_a8`` call on
constant weights, which inductor would run as an opaque call to the reference (dequantize the whole weight,
then a float matmul, at every call). This pass repacks each weight once for the kernel that fits it
(:mod:`qexport.kernels.cpu`) and puts the kernel's torch code in the graph instead:

* 4- and 2-bit integer weights -> ``aten._weight_int4pack_mm_for_cpu`` (counter ``int4``);
* per-channel 8-bit weights -> ``aten._weight_int8pack_mm`` (``int8``);
* W8A8 -> ``torch._int_mm`` with the reference's float epilogue (``int8_int8``), and the activation
  quantizers as plain torch code inductor fuses (``quantizers``);
* float32 linears on constant weights (what a recipe leaves float, such as a preset's ``lm_head``) -> a product
  with a ``[K, N]`` copy of the weight, which torch's float32 GEMV reads about twice as fast (``float``).

Each packed layer is checked once against the reference on a probe input (:func:`qexport.kernels.cpu.probe`);
a layer whose kernel is missing, refuses the shape or misses the tolerance keeps the reference, as do NF4,
grouped int8 and zero-point int8 weights. ``details`` names, per layer, the kernel that runs or why the
reference does. Weights read by several nodes are packed once. The pass does nothing when ``QEXPORT_KERNEL``
forces a kernel.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import qexport.ops as qops
from qexport.kernels import cpu, dispatch, reference
from qexport.passes.graph_utils import (constant_value, drop_unused_constants, module_path_of_param, node_value,
                                        op_packet, register_constant)
from qexport.passes.pass_manager import PassResult

Q = torch.ops.qexport

# each activation quantizer op -> the same computation as plain torch code
QUANTIZERS = {Q.quantize_per_token: qops.per_token_int8, Q.quantize_per_tensor_dynamic: qops.per_tensor_dynamic_int8,
              Q.quantize_per_tensor: qops.per_tensor_int8}


PROBE_ROWS = (2, 37)  # a decode-like and a prefill-like M: the kernels take other paths for larger M


def _probe_inputs(k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(m, k, generator=gen).to(dtype) for m in PROBE_ROWS]


def _value(gm: fx.GraphModule, ctx, a, what: str):
    """The value of a layer's tensor argument: a constant of ``gm``, or a module parameter / buffer that dynamo
    passes as an input (a model quantized before compiling), whose value ``ctx`` holds."""
    if isinstance(a, fx.Node) and a.op == "placeholder":
        v = getattr(ctx, "placeholders", {}).get(a) if module_path_of_param(a) is not None else None
        if v is None:
            raise cpu.Unsupported(f"its {what} is an input of the graph, not a weight known when it is compiled")
        return v
    try:
        return constant_value(gm, a)
    except KeyError:
        raise cpu.Unsupported(f"its {what} is computed in the graph, not a constant") from None


def _bias_value(gm: fx.GraphModule, ctx, bias):
    """The bias's value for the probe; None when the graph computes it (the node itself is passed on as it is,
    to the kernel as to the reference, so the probe can leave it out)."""
    try:
        return _value(gm, ctx, bias, "bias")
    except cpu.Unsupported:
        return None


def _layer(node: fx.Node) -> str:
    if node.meta.get("qexport_layer"):
        return node.meta["qexport_layer"]
    weight = node.args[3] if op_packet(node) is Q.qlinear_a8 else node.args[1]
    located = module_path_of_param(weight) if isinstance(weight, fx.Node) else None
    return located[0] if located and located[0] else node.name


def _replace(gm: fx.GraphModule, node: fx.Node, packed: cpu.Packed, consts: list, inputs: tuple, bias) -> None:
    g = gm.graph
    with g.inserting_before(node):
        args = [None if c is None else g.get_attr(c) for c in consts]
        new = g.call_function(packed.fn, (*inputs, *args, *packed.args, bias))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    g.erase_node(node)


def _pack_qlinear(gm: fx.GraphModule, ctx, node: fx.Node) -> tuple[cpu.Packed, float]:
    x, qdata, scale, zp, bias, fmt, bits, group, k, symmetric = node.args
    qd, sc = _value(gm, ctx, qdata, "weight"), _value(gm, ctx, scale, "scale")
    z = None if zp is None else _value(gm, ctx, zp, "zero point")
    if qd.device.type != "cpu":
        raise cpu.Unsupported(f"its weight is on {qd.device}")
    packed = (cpu.pack_int8 if bits == 8 else cpu.pack_int4)(qd, sc, z, fmt, bits, group, k, symmetric)
    b = _bias_value(gm, ctx, bias)
    xv = node_value(x)
    dtype = xv.dtype if xv is not None and xv.is_floating_point() else torch.float32
    errs = [cpu.probe(packed, lambda xx: reference.qlinear(xx, qd, sc, z, b, fmt, bits, group, k, symmetric),
                      (xp,), b) for xp in _probe_inputs(k, dtype)]
    return packed, max(errs)


def _pack_a8(gm: fx.GraphModule, ctx, node: fx.Node) -> tuple[cpu.Packed, float]:
    xq, x_scale, x_zp, wq, w_scale, bias = node.args
    w, ws = _value(gm, ctx, wq, "weight"), _value(gm, ctx, w_scale, "scale")
    if w.device.type != "cpu":
        raise cpu.Unsupported(f"its weight is on {w.device}")
    packed = cpu.pack_int8_int8(w, ws, x_zp)
    b = _bias_value(gm, ctx, bias)
    gen = torch.Generator().manual_seed(0)
    errs = [cpu.probe(packed, lambda q, s: reference.qlinear_a8(q, s, x_zp, w, ws, b),
                      (torch.randint(-128, 128, (m, w.shape[1]), generator=gen, dtype=torch.int8),
                       torch.rand(m, 1, generator=gen) * 0.1), b) for m in PROBE_ROWS]
    return packed, max(errs)


FLOAT_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}


def _pack_float(gm: fx.GraphModule, ctx, node: fx.Node) -> tuple[cpu.Packed, float]:
    x, weight = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    w = _value(gm, ctx, weight, "weight")
    if w.device.type != "cpu":
        raise cpu.Unsupported(f"its weight is on {w.device}")
    packed = cpu.pack_float(w)
    b = _bias_value(gm, ctx, bias)
    errs = [cpu.probe(packed, lambda xx: torch.nn.functional.linear(xx, w, b), (xp,), b)
            for xp in _probe_inputs(w.shape[1], torch.float32)]
    return packed, max(errs)


def _float_linear(node: fx.Node) -> bool:
    """A float linear whose weight may be a constant (checked when it is packed)."""
    if node.target not in FLOAT_LINEAR or len(node.args) < 2:
        return False
    xv = node_value(node.args[0])
    return xv is None or xv.dtype == torch.float32


def cpu_kernels(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("cpu_kernels")
    choice = dispatch.get_kernel()
    if choice != "auto":
        result.skip("graph", f"{dispatch.ENV_VAR}={choice}: the quantized layers run the {choice} kernels")
        return result
    done: dict[tuple, tuple] = {}  # a weight read by several nodes (a module called twice) is packed once
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        op = op_packet(node)
        if op in QUANTIZERS:
            node.target = QUANTIZERS[op]
            result.count("quantizers")
            continue
        is_float = _float_linear(node)
        if op not in (Q.qlinear, Q.qlinear_a8) and not is_float:
            continue
        layer = _layer(node)
        is_a8 = op is Q.qlinear_a8
        # what the packed weight depends on: x_zero_point, wq, w_scale / qdata, scale, zero_point and the format
        weights = node.args[1:2] if is_float else node.args[2:5] if is_a8 else node.args[1:4] + node.args[5:]
        key = (op, *(a.target if isinstance(a, fx.Node) else a for a in weights))
        if key not in done:
            try:
                packed, err = (_pack_float if is_float else _pack_a8 if is_a8 else _pack_qlinear)(gm, ctx, node)
            except cpu.Unsupported as e:
                if is_float:  # a float linear on an activation, or a weight not known when compiled: as it is
                    continue
                result.skip(layer, f"reference kernel: {e}")
                result.details[layer] = f"reference ({e})"
                continue
            consts = [None if t is None else register_constant(gm, f"qx_{layer}_{packed.kind}_{name}", t)
                      for name, t in packed.tensors.items()]
            done[key] = (packed, consts)
            result.count(packed.kind)
            result.details[layer] = f"{packed.note}; probe error {err:.2g}"
        packed, consts = done[key]
        inputs = node.args[:2] if is_a8 else node.args[:1]
        bias = (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")) if is_float else \
            node.args[5] if is_a8 else node.args[4]
        _replace(gm, node, packed, consts, inputs, bias)
    dropped = drop_unused_constants(gm)
    if dropped:
        result.count("constants_replaced", dropped)
    return result
