"""The inductor target's CPU integer kernels (qexport.kernels.cpu) and the pass that puts them in a graph.

Numerics are compared with the reference kernels (qexport.kernels.reference). The weight-only kernels take
bfloat16 activations and scales, so their bound is relative to the output's largest value: 1e-2 (a dot
product of bf16-rounded terms stays near 2^-8 relative); W8A8 through torch._int_mm must be bit-identical.
"""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qexport
from qexport import QuantSpec
from qexport.config import Recipe, Rule
from qexport.formats import quantize_weight
from qexport.kernels import cpu, dispatch, reference
from qexport.passes import PassManager, QuantContext, annotate, convert, cpu_kernels, fold, prepare
from qexport.passes.graph_utils import op_packet

Q = torch.ops.qexport
RTOL = 1e-2


def _rel_err(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _weight(n, k, spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = quantize_weight(w, spec)
    return qw, (qw.qdata, qw.scale, qw.zero_point, spec.format.value, spec.bits, qw.group, k, spec.symmetric)


def _x(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k,bits,group,symmetric,kernel_group,k_pad", [
    (576, 576, 4, 128, False, 64, 576),   # partial last group: split into groups of 64, exact, no padding
    (576, 576, 4, 128, True, 64, 576),
    (100, 576, 4, 64, False, 64, 576),    # N padded to a multiple of 16
    (64, 200, 4, 128, False, 32, 224),    # no kernel group divides both 128 and 200: K padded least
    (48, 96, 4, None, True, 32, 96),      # per channel: the largest kernel group that divides K
    (48, 100, 4, None, False, 128, 128),  # per channel, no kernel group divides K: padded to one group of 128
    (48, 256, 4, "tensor", True, 256, 256),  # per tensor: one [1, 1] scale for every row
    (64, 192, 4, 96, False, 32, 192),     # groups of 96: kernel groups of 32
    (64, 256, 2, 64, False, 64, 256),     # 2-bit codes in the int4 kernel
    (64, 256, 2, 64, True, 64, 256),
])
def test_int4_kernel_matches_reference(n, k, bits, group, symmetric, kernel_group, k_pad):
    gran = {"group_size": group} if isinstance(group, int) else {"granularity": f"per_{group or 'channel'}"}
    spec = QuantSpec(bits=bits, symmetric=symmetric, **gran)
    qw, args = _weight(n, k, spec)
    packed = cpu.pack_int4(*args)
    assert packed.kind == "int4" and packed.args == (kernel_group, n, k_pad)
    bias = torch.randn(n)
    for m in (1, 7):
        x = _x(m, k)
        got = cpu.run(packed, (x,), bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert _rel_err(got, reference.qlinear(x, *args[:3], bias, *args[3:])) < RTOL
    x3 = _x(6, k).reshape(2, 3, k)  # leading dimensions are kept
    assert cpu.run(packed, (x3,), None).shape == (2, 3, n)


def test_int4_kernel_refuses_what_it_cannot_run():
    _, args = _weight(32, 96, QuantSpec(bits=4, group_size=16))
    with pytest.raises(cpu.Unsupported, match="groups of 16"):
        cpu.pack_int4(*args)
    _, args = _weight(32, 96, QuantSpec(bits=4, group_size=32, format="nf4"))
    with pytest.raises(cpu.Unsupported, match="nf4"):
        cpu.pack_int4(*args)


def test_int4_zero_points_take_the_exact_form_where_it_fits():
    """2-bit codes minus their zero point always fit the kernel's 4 bits (zero = 0); 4-bit codes spanning 0..15
    do not, and go through zero = (8 - zero_point) * scale."""
    for bits, exact in ((2, True), (4, False)):
        _, args = _weight(32, 128, QuantSpec(bits=bits, group_size=64, symmetric=False))
        zeros = cpu.pack_int4(*args).tensors["scales_zeros"][..., 1]
        assert bool((zeros == 0).all()) == exact


@pytest.mark.parametrize("n,k,spec", [
    (96, 64, QuantSpec(bits=8, granularity="per_channel", symmetric=True)),
    (40, 100, QuantSpec(bits=8, granularity="per_channel", symmetric=True)),  # K padded to 112
    (40, 64, QuantSpec(bits=8, granularity="per_tensor", symmetric=True)),
])
def test_int8_kernel_matches_reference(n, k, spec):
    qw, args = _weight(n, k, spec)
    packed = cpu.pack_int8(*args)
    assert packed.args == (n, -(-k // 16) * 16)
    bias = torch.randn(n)
    for m in (1, 5):
        x = _x(m, k)
        assert _rel_err(cpu.run(packed, (x,), bias), reference.qlinear(x, *args[:3], bias, *args[3:])) < RTOL


def test_int8_kernel_refuses_groups_and_zero_points():
    _, args = _weight(32, 256, QuantSpec(bits=8, group_size=128))
    with pytest.raises(cpu.Unsupported, match="one scale per output channel"):
        cpu.pack_int8(*args)
    _, args = _weight(32, 256, QuantSpec(bits=8, granularity="per_channel", symmetric=False))
    with pytest.raises(cpu.Unsupported, match="zero points"):
        cpu.pack_int8(*args)


@pytest.mark.parametrize("x_zero_point", [0, 3])
@pytest.mark.parametrize("per_token", [True, False])
def test_int8_int8_kernel_is_bit_identical(x_zero_point, per_token):
    gen = torch.Generator().manual_seed(0)
    wq = torch.randint(-128, 128, (24, 40), generator=gen, dtype=torch.int8)
    ws = torch.rand(24, generator=gen) * 0.01
    xq = torch.randint(-128, 128, (2, 5, 40), generator=gen, dtype=torch.int8)
    xs = torch.rand(2, 5, 1, generator=gen) if per_token else torch.tensor(0.02)
    bias = torch.randn(24, generator=gen)
    packed = cpu.pack_int8_int8(wq, ws, x_zero_point)
    got = cpu.run(packed, (xq, xs), bias)
    torch.testing.assert_close(got, reference.qlinear_a8(xq, xs, x_zero_point, wq, ws, bias), atol=0, rtol=0)


def test_probe_refuses_a_wrong_or_failing_kernel():
    _, args = _weight(32, 64, QuantSpec(bits=4, group_size=32))
    packed = cpu.pack_int4(*args)
    x = (_x(2, 64),)
    assert cpu.probe(packed, lambda xx: reference.qlinear(xx, *args[:3], None, *args[3:]), x, None) < RTOL
    with pytest.raises(cpu.Unsupported, match="exceeds"):
        cpu.probe(packed, lambda xx: 2 * reference.qlinear(xx, *args[:3], None, *args[3:]), x, None)
    broken = cpu.Packed("int4", lambda *a: torch.ops.aten._weight_int4pack_mm_for_cpu(a[0], a[1], 7, a[2]),
                        packed.tensors, packed.args, "int4 kernel")
    with pytest.raises(cpu.Unsupported, match="int4 kernel"):
        cpu.probe(broken, lambda xx: xx, x, None)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 40, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _run(model, recipe, passes):
    gm = fx.symbolic_trace(model)
    ctx = QuantContext(qexport.load_recipe(recipe), None)
    return gm, {r.name: r for r in PassManager(list(passes)).run(gm, ctx)}


def _calls(gm, fn):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and op_packet(n) is fn)


@pytest.mark.parametrize("recipe,kind,tol", [("w8", "int8", RTOL), ("w4g64", "int4", RTOL),
                                              ("w2g64", "int4", RTOL), ("w8a8-dynamic", "int8_int8", 0)])
def test_pass_puts_kernels_in_the_graph(recipe, kind, tol):
    torch.manual_seed(0)
    model = MLP().eval()
    ref_gm, _ = _run(copy.deepcopy(model), recipe, (annotate, prepare, convert, fold))
    gm, res = _run(copy.deepcopy(model), recipe, (annotate, prepare, convert, fold, cpu_kernels))
    r = res["cpu_kernels"]
    assert r.changed[kind] == 2 and not r.skipped
    assert set(r.details) == {"fc1", "fc2"} and all("probe error" in v for v in r.details.values())
    assert _calls(gm, Q.qlinear) == _calls(gm, Q.qlinear_a8) == 0
    assert _calls(gm, {"int4": cpu.int4_linear, "int8": cpu.int8_linear, "int8_int8": cpu.int8_int8_linear}[kind]) == 2
    if kind == "int8_int8":  # the quantizer is plain torch code inductor fuses; no qexport op is left
        assert r.changed["quantizers"] == 2
        assert not any(str(n.target).startswith("qexport.") for n in gm.graph.nodes)
    stored = {n for n, _ in ref_gm.named_buffers() if n.startswith("qx_") and not n.endswith("_bias")}
    assert stored and not stored & {n for n, _ in gm.named_buffers()}  # the stored tensors were replaced
    x = torch.randn(3, 64)
    got, want = gm(x), ref_gm(x)
    if tol:
        assert _rel_err(got, want) < tol
    else:
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_pass_keeps_the_reference_where_no_kernel_fits_and_says_why():
    gm, res = _run(MLP().eval(), "nf4-dq", (annotate, prepare, convert, fold, cpu_kernels))
    r = res["cpu_kernels"]
    assert r.total == 0 and set(r.details) == {"fc1", "fc2"}
    assert all(v.startswith("reference (") and "nf4" in v for v in r.details.values())
    assert [w for w, _ in r.skipped] == ["fc1", "fc2"] and all("nf4" in why for _, why in r.skipped)
    assert _calls(gm, Q.qlinear) == 2


def test_pass_does_nothing_when_a_kernel_is_forced():
    with dispatch.use_kernel("reference"):
        gm, res = _run(MLP().eval(), "w4g64", (annotate, prepare, convert, fold, cpu_kernels))
    assert res["cpu_kernels"].total == 0 and "QEXPORT_KERNEL=reference" in res["cpu_kernels"].skipped[0][1]
    assert _calls(gm, Q.qlinear) == 2


def _eager_and_inductor(recipe):
    """The MLP compiled with the eager and the inductor targets: ``(eager output, inductor output, the inductor
    graph's cpu_kernels pass report)``."""
    from qexport import backend

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 3, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        want = torch.compile(copy.deepcopy(model), backend="qexport", options={"recipe": recipe, "target": "eager"})(x)
        got = torch.compile(copy.deepcopy(model), backend="qexport",
                            options={"recipe": recipe, "target": "inductor"})(x)
    passes = {p["name"]: p for p in backend.reports()[-1].to_dict()["passes"]}
    return want, got, passes["cpu_kernels"]


@pytest.mark.parametrize("recipe", ["w4g128", "w8a8-dynamic"])
def test_inductor_target_runs_the_kernels_and_reports_them(recipe):
    """Through torch.compile as users call it: per-layer kernels in backend.reports(), output of the eager target."""
    want, got, kernels = _eager_and_inductor(recipe)
    details = kernels["details"]
    assert set(details) == {"fc1", "fc2"} and all("probe error" in v for v in details.values())
    assert _rel_err(got, want) < (RTOL if recipe == "w4g128" else 1e-6)


def test_pass_packs_a_weight_read_twice_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = Twice().eval()
    ref_gm, _ = _run(copy.deepcopy(model), "w4g64", (annotate, prepare, convert, fold))
    gm, res = _run(copy.deepcopy(model), "w4g64", (annotate, prepare, convert, fold, cpu_kernels))
    assert res["cpu_kernels"].changed["int4"] == 1 and _calls(gm, cpu.int4_linear) == 2
    assert sum(1 for n, _ in gm.named_buffers() if n.endswith("_int4_packed")) == 1
    x = torch.randn(3, 64)
    assert _rel_err(gm(x), ref_gm(x)) < RTOL


def test_model_quantized_before_compiling_runs_the_kernels_in_bfloat16():
    """A model from qexport.quantize (its stored weights are buffers dynamo passes as inputs) in bfloat16."""
    from qexport import backend

    torch.manual_seed(0)
    q = qexport.quantize(MLP().eval(), "w4g64").to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        want = q(x)
        got = torch.compile(q, backend="qexport", options={"target": "inductor"})(x)
    kernels = next(r for r in backend.reports()[-1].results if r.name == "cpu_kernels")
    assert kernels.changed["int4"] == 2 and not kernels.skipped
    assert got.dtype == torch.bfloat16 and _rel_err(got, want) < RTOL


def test_float_layers_get_a_transposed_copy_of_their_weight():
    """A layer the recipe leaves float (fc2 here, a preset's lm_head in practice) runs x @ W^T on a [K, N] copy,
    which torch's float32 GEMV reads faster; the result equals F.linear's within float32 rounding."""
    recipe = Recipe(name="fc1-w8", rules=(Rule("fc2", None), Rule("*", QuantSpec(bits=8))))
    want, got, kernels = _eager_and_inductor(recipe)
    assert kernels["changed"]["float"] == 1 and kernels["changed"]["int8"] == 1
    assert kernels["details"]["fc2"].startswith("x @ W^T on a [K, N] copy of the float32 weight; probe error")
    assert _rel_err(got, want) < RTOL
    w = torch.randn(40, 96)
    packed = cpu.pack_float(w)
    assert packed.tensors["weight_t"].shape == (96, 40) and packed.tensors["weight_t"].is_contiguous()
    xx = torch.randn(5, 96)
    torch.testing.assert_close(cpu.run(packed, (xx,), None), F.linear(xx, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(cpu.Unsupported, match="bfloat16"):
        cpu.pack_float(w.to(torch.bfloat16))
