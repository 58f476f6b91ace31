"""cpu_kernels: run the quantized linears of a CPU graph on integer kernels (the compile back-end's inductor target).

After ``convert`` and ``fold`` each quantized linear is a ``qexport.qlinear`` or ``qexport.qlinear_a8`` call on
constant weights, which inductor would run as an opaque call to the reference (dequantize the whole weight,
then a float matmul, at every call). This pass repacks each weight once for the kernel that fits it
(:mod:`qexport.kernels.cpu`) and puts the kernel's torch code in the graph instead:

* 4- and 2-bit integer weights -> ``aten._weight_int4pack_mm_for_cpu`` (counter ``int4``);
* per-channel 8-bit weights -> ``aten._weight_int8pack_mm`` (``int8``);
* W8A8 -> ``torch._int_mm`` with the reference's float epilogue (``int8_int8``), and the activation
  quantizers as plain torch code inductor fuses (``quantizers``).

Each packed layer is checked once against the reference on a probe input (:func:`qexport.kernels.cpu.probe`);
a layer whose kernel is missing, refuses the shape or misses the tolerance keeps the reference, as do NF4 and
grouped int8 weights. ``details`` names, per layer, the kernel that runs or why the reference does; the
pass does nothing when ``QEXPORT_KERNEL`` forces a kernel.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import qexport.ops as qops
from qexport.kernels import cpu, dispatch, reference
from qexport.passes.graph_utils import constant_value, drop_unused_constants, node_value, op_packet, register_constant
from qexport.passes.pass_manager import PassResult

Q = torch.ops.qexport

# each activation quantizer op -> the same computation as plain torch code
QUANTIZERS = {Q.quantize_per_token: qops.per_token_int8, Q.quantize_per_tensor_dynamic: qops.per_tensor_dynamic_int8,
              Q.quantize_per_tensor: qops.per_tensor_int8}


def _probe_input(k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, k, generator=gen).to(dtype)


def _layer(node: fx.Node) -> str:
    return node.meta.get("qexport_layer") or node.name


def _replace(gm: fx.GraphModule, node: fx.Node, packed: cpu.Packed, inputs: tuple, bias: fx.Node | None,
             layer: str) -> None:
    g = gm.graph
    with g.inserting_before(node):
        consts = [None if t is None else g.get_attr(register_constant(gm, f"qx_{layer}_{packed.kind}_{name}", t))
                  for name, t in packed.tensors.items()]
        new = g.call_function(packed.fn, (*inputs, *consts, *packed.args, bias))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    g.erase_node(node)


def _values(gm: fx.GraphModule, ctx, weights: tuple, bias) -> tuple:
    """The values of a layer's weight tensors (constants of ``gm``) and of its bias (a constant, or a parameter
    dynamo passes as an input, whose value ``ctx`` holds)."""
    try:
        values = [constant_value(gm, a) for a in weights]
    except KeyError:
        raise cpu.Unsupported("its weight is not a constant of the graph") from None
    if isinstance(bias, fx.Node) and bias.op == "placeholder":
        b = getattr(ctx, "placeholders", {}).get(bias)
        if b is None:
            raise cpu.Unsupported("the value of its bias is not known when the graph is compiled")
    else:
        b = constant_value(gm, bias)
    return (*values, b)


def _lower_qlinear(gm: fx.GraphModule, ctx, node: fx.Node) -> tuple[cpu.Packed, float]:
    x, qdata, scale, zp, bias, fmt, bits, group, k, symmetric = node.args
    qd, sc, z, b = _values(gm, ctx, (qdata, scale, zp), bias)
    if qd.device.type != "cpu":
        raise cpu.Unsupported(f"its weight is on {qd.device}")
    pack = cpu.pack_int8 if bits == 8 else cpu.pack_int4
    packed = pack(qd, sc, z, fmt, bits, group, k, symmetric)
    xv = node_value(x)
    dtype = xv.dtype if xv is not None and xv.is_floating_point() else torch.float32
    err = cpu.probe(packed, lambda xx: reference.qlinear(xx, qd, sc, z, b, fmt, bits, group, k, symmetric),
                    (_probe_input(k, dtype),), b)
    _replace(gm, node, packed, (x,), bias, _layer(node))
    return packed, err


def _lower_a8(gm: fx.GraphModule, ctx, node: fx.Node) -> tuple[cpu.Packed, float]:
    xq, x_scale, x_zp, wq, w_scale, bias = node.args
    w, ws, b = _values(gm, ctx, (wq, w_scale), bias)
    if w.device.type != "cpu":
        raise cpu.Unsupported(f"its weight is on {w.device}")
    packed = cpu.pack_int8_int8(w, ws, x_zp)
    gen = torch.Generator().manual_seed(0)
    probe_in = (torch.randint(-128, 128, (2, w.shape[1]), generator=gen, dtype=torch.int8),
                torch.rand(2, 1, generator=gen) * 0.1)
    err = cpu.probe(packed, lambda q, s: reference.qlinear_a8(q, s, x_zp, w, ws, b), probe_in, b)
    _replace(gm, node, packed, (xq, x_scale), bias, _layer(node))
    return packed, err


def cpu_kernels(gm: fx.GraphModule, ctx=None) -> PassResult:
    result = PassResult("cpu_kernels")
    choice = dispatch.get_kernel()
    if choice != "auto":
        result.skip("graph", f"{dispatch.ENV_VAR}={choice}: the quantized layers run the {choice} kernels")
        return result
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        op = op_packet(node)
        if op in QUANTIZERS:
            node.target = QUANTIZERS[op]
            result.count("quantizers")
        elif op in (Q.qlinear, Q.qlinear_a8):
            layer = _layer(node)
            try:
                packed, err = (_lower_qlinear if op is Q.qlinear else _lower_a8)(gm, ctx, node)
            except cpu.Unsupported as e:
                result.skip(layer, f"reference kernel: {e}")
                result.details[layer] = "reference"
                continue
            result.count(packed.kind)
            result.details[layer] = f"{packed.note}; probe error {err:.2g}"
    dropped = drop_unused_constants(gm)
    if dropped:
        result.count("constants_replaced", dropped)
    return result
