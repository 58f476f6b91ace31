"""Graph passes on small models traced with torch.fx: node counts, skip reasons and numerics."""

import copy
import math

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
import torch.nn.functional as F
from torch import nn

import qexport
from qexport import QuantSpec, Recipe, Rule
from qexport.formats import fake_quantize
from qexport.passes import PassManager, QuantContext, annotate, convert, fold, fuse_attention, prepare
from qexport.passes.context import act_range_for
from qexport.presets import PRESETS

Q = torch.ops.qexport


def count(gm, target) -> int:
    """Calls of ``target`` (an op overload also counts calls recorded as its packet)."""
    packet = getattr(target, "overloadpacket", None)
    return sum(1 for n in gm.graph.nodes if n.target == target or (packet is not None and n.target == packet))


def run(model, recipe, mode=None, passes=(annotate, prepare, convert, fold)):
    gm = fx.symbolic_trace(model)
    ctx = QuantContext(qexport.load_recipe(recipe), mode)
    results = {r.name: r for r in PassManager(list(passes)).run(gm, ctx)}
    return gm, results


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 96)
        self.fc2 = nn.Linear(96, 40)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("preset", ["w8", "w4g64", "w2g64", "nf4-dq", "w4g128-sym"])
def test_mlp_weight_only_matches_eager_qlinear(preset):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 48)
    gm, res = run(copy.deepcopy(model), preset)
    assert res["annotate"].changed == {"linear": 2}
    assert res["convert"].changed == {"qlinear": 2, "layers": 2}
    assert count(gm, Q.qlinear.default) == 2
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    if preset == "nf4-dq":
        assert res["fold"].changed["scales_folded"] == 2 and count(gm, Q.double_dequantize.default) == 0
    eager = qexport.quantize(copy.deepcopy(model), preset)
    torch.testing.assert_close(gm(x), eager(x), atol=0, rtol=0)


class FunctionalLayers(nn.Module):
    """A linear through F.linear on a parameter, and a matmul with a [K, N] parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 24))  # F.linear layout [N, K]
        self.proj = nn.Parameter(torch.randn(32, 16))  # x @ proj: [K, N]

    def forward(self, x):
        h = F.linear(x, self.w)
        return torch.matmul(h, self.proj)


def test_functional_linear_and_matmul_with_parameter():
    torch.manual_seed(1)
    model = FunctionalLayers()
    x = torch.randn(3, 24)
    spec = QuantSpec(bits=4, group_size=8, symmetric=False)
    recipe = Recipe("r", rules=(Rule("*", spec),))
    gm, res = run(copy.deepcopy(model), recipe)
    assert res["annotate"].changed == {"linear": 1, "matmul": 1}
    assert count(gm, Q.qlinear.default) == 2
    want = F.linear(x, fake_quantize(model.w.data, spec)) @ fake_quantize(model.proj.data.t(), spec).t()
    torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


def test_conv_weights_quantized_per_output_channel():
    torch.manual_seed(2)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 10, 10)
    gm, res = run(copy.deepcopy(model), "w8", mode="dynamic")
    assert res["annotate"].changed["conv"] == 1 and res["annotate"].changed["linear"] == 1
    assert ("conv", "activation quantization of conv is not supported; weights only") in res["annotate"].skipped
    assert count(gm, Q.dequantize_weight.default) == 1 and count(gm, Q.qlinear_a8.default) == 1
    w = fake_quantize(model.conv.weight.data.reshape(8, -1), QuantSpec(bits=8)).reshape(8, 3, 3, 3)
    h = F.relu(F.conv2d(x, w, model.conv.bias, padding=1)).mean(dim=(2, 3))
    ref = copy.deepcopy(model.head)
    ref = qexport.quantize(nn.Sequential(ref), PRESETS["w8a8-dynamic"])
    torch.testing.assert_close(gm(x), ref(h), atol=1e-5, rtol=1e-5)


class TwoActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)

    def forward(self, x):
        h = self.q(x)
        return torch.matmul(h, h.transpose(-2, -1))


def test_skips_are_reported_with_reasons():
    recipe = Recipe("r", rules=(Rule("*", QuantSpec(bits=8)),), exclude=("q",))
    gm, res = run(TwoActivations(), recipe)
    reasons = dict(res["annotate"].skipped)
    assert reasons["q"] == "excluded or no rule matches"
    assert reasons["matmul"] == "matmul of two activations (attention scores); not quantized"
    assert res["convert"].total == 0 and count(gm, Q.qlinear.default) == 0


def test_nan_weight_stays_float_with_warning():
    model = MLP()
    model.fc1.weight.data[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="fc1 stays float"):
        gm, res = run(model, "w8")
    assert res["convert"].changed == {"qlinear": 1, "layers": 1}
    assert res["convert"].skipped[0][0] == "fc1"
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module") == 1  # fc1 kept as nn.Linear


def test_static_prepare_calibrate_convert():
    torch.manual_seed(3)
    model = MLP().eval()
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ctx = QuantContext(PRESETS["w8a8-static"])
    res = PassManager([annotate, prepare]).run(gm, ctx)
    assert res[1].changed == {"observers": 2}
    batches = [torch.randn(4, 48) * (i + 1) for i in range(3)]
    for b in batches:
        gm(b)
    assert act_range_for(gm.fc1.weight).batches == 3  # observers are keyed by the layer's weight
    res = PassManager([convert, fold]).run(gm, ctx)
    assert res[0].changed == {"w8a8_static": 2, "layers": 2}
    assert count(gm, Q.quantize_per_tensor.default) == 2
    assert not any("observer" in str(n.target) for n in gm.graph.nodes)

    # The graph observes the float model's activations; eager QLinears observe their weight-quantized
    # predecessors. The first layer's input is the same for both; the second differs slightly.
    eager = qexport.quantize(copy.deepcopy(model), "w8a8-static")
    qexport.calibrate(eager, batches)
    absmax = max(float(b.abs().max()) for b in batches)
    assert float(eager.fc1.act_scale) == pytest.approx(absmax / 127, rel=1e-6)
    assert float(gm.qx_fc1_act_scale) == pytest.approx(absmax / 127, rel=1e-6)
    assert float(gm.qx_fc2_act_scale) == pytest.approx(float(eager.fc2.act_scale), rel=0.02)
    x = torch.randn(6, 48)
    torch.testing.assert_close(gm(x), eager(x), atol=1e-3, rtol=0.02)


class QDQChain(nn.Module):
    def __init__(self, s1, s2):
        super().__init__()
        self.register_buffer("s1", torch.tensor(s1))
        self.register_buffer("s2", torch.tensor(s2))

    def forward(self, x):
        q = Q.quantize_per_tensor(x, self.s1, 0)
        q2 = Q.quantize_per_tensor(Q.dequantize_activation(q, self.s1, 0), self.s2, 0)
        return Q.dequantize_activation(q2, self.s2, 0)


def test_fold_removes_identity_qdq_pairs_only():
    x = torch.randn(4, 8)
    same = fx.symbolic_trace(QDQChain(0.02, 0.02))
    want = same(x)
    res = fold(same)
    same.recompile()
    assert res.changed["qdq_pairs_removed"] == 1
    assert count(same, Q.quantize_per_tensor.default) == 1
    torch.testing.assert_close(same(x), want, atol=0, rtol=0)

    requant = fx.symbolic_trace(QDQChain(0.02, 0.05))
    res = fold(requant)
    assert "qdq_pairs_removed" not in res.changed and res.skipped
    assert fold(same).total == 0  # idempotent


# ----------------------------------------------------------------------------------------------------
# Attention fusion
# ----------------------------------------------------------------------------------------------------
class HandAttention(nn.Module):
    """Attention written out by hand, in the variants seen in real model code."""

    def __init__(self, variant="mul", n_rep=1):
        super().__init__()
        self.variant = variant
        self.n_rep = n_rep

    def forward(self, q, k, v, mask):
        if self.n_rep > 1:  # grouped-query attention: repeat K/V heads
            b, h, s, d = k.shape
            k = k[:, :, None].expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)
            v = v[:, :, None].expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)
        if self.variant == "div":
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(8)  # head_dim
        elif self.variant == "nomask":
            scores = q @ k.transpose(2, 3) * 0.125
            return F.softmax(scores, dim=-1) @ v
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * 0.125
        scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=0.1, training=self.training)
        return torch.matmul(probs, v)


def _attn_inputs(kv_heads=4):
    torch.manual_seed(5)
    q = torch.randn(2, 4, 10, 8)
    k = torch.randn(2, kv_heads, 10, 8)
    v = torch.randn(2, kv_heads, 10, 8)
    mask = torch.triu(torch.full((10, 10), float("-inf")), 1)[None, None]
    return q, k, v, mask


@pytest.mark.parametrize("variant,n_rep", [("mul", 1), ("div", 1), ("nomask", 1), ("mul", 2)])
def test_fuse_attention_rewrites_to_sdpa(variant, n_rep):
    model = HandAttention(variant, n_rep).eval()
    inputs = _attn_inputs(kv_heads=4 // n_rep)
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*inputs)  # ranks, as dynamo's example values give them
    want = gm(*inputs)
    res = fuse_attention(gm)
    gm.recompile()
    assert res.changed == {"sdpa": 1}
    assert count(gm, F.scaled_dot_product_attention) == 1
    assert count(gm, F.softmax) == 0 and count(gm, torch.matmul) == 0
    torch.testing.assert_close(gm(*inputs), want, atol=1e-5, rtol=1e-5)
    assert fuse_attention(gm).total == 0  # idempotent


class SoftmaxOverQueries(HandAttention):
    def forward(self, q, k, v, mask):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.125, dim=-2), v)


class ReturnsWeights(HandAttention):
    def forward(self, q, k, v, mask):
        probs = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.125 + mask, dim=-1)
        return torch.matmul(probs, v), probs


class NoTranspose(HandAttention):
    def forward(self, q, k, v, mask):
        return torch.matmul(F.softmax(torch.matmul(q, k) * 0.125, dim=-1), v)


class TensorScale(HandAttention):
    def forward(self, q, k, v, mask):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-2, -1)) * mask, dim=-1), v)


class TrainingDropout(HandAttention):
    def forward(self, q, k, v, mask):
        probs = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.125, dim=-1)
        return torch.matmul(F.dropout(probs, p=0.1, training=True), v)


@pytest.mark.parametrize("cls,reason", [
    (SoftmaxOverQueries, "softmax is not over the last dimension"),
    (ReturnsWeights, "attention weights have other users (returned or reused)"),
    (NoTranspose, "keys are not transposed over the last two dimensions"),
    (TensorScale, "scale is not a constant number"),
    (TrainingDropout, "dropout is active (training) between softmax and matmul"),
])
def test_fuse_attention_leaves_look_alikes(cls, reason):
    gm = fx.symbolic_trace(cls())
    inputs = _attn_inputs()
    if cls is NoTranspose:
        inputs = (inputs[0], inputs[1].transpose(-2, -1), inputs[2], inputs[3])
    ShapeProp(gm).propagate(*inputs)
    res = fuse_attention(gm)
    assert res.total == 0
    assert [r for _, r in res.skipped] == [reason]
    assert count(gm, F.scaled_dot_product_attention) == 0


# ------------------------------------------------------------------------------------------------------
# ONNX fusions (ONNX_FUSIONS): fuse_rmsnorm, fuse_rotary, fuse_gqa, fuse_kv_attention, static_sizes
# ------------------------------------------------------------------------------------------------------
class RMSNormBlock(nn.Module):
    """LlamaRMSNorm written out, then a linear; ``variant`` plants a look-alike."""

    def __init__(self, variant="llama"):
        super().__init__()
        self.variant = variant
        self.weight = nn.Parameter(torch.rand(32) + 0.5)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        h = x.to(torch.float32)
        sq = h * h if self.variant == "square_by_mul" else h.pow(2)
        var = sq.mean(0 if self.variant == "mean_dim0" else -1, keepdim=True)
        y = h * torch.rsqrt(var + 1e-6)
        out = self.fc(y.to(x.dtype) * self.weight)
        return (out, var) if self.variant == "var_returned" else out


def _traced(model, x):
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    return gm


@pytest.mark.parametrize("variant", ["llama", "square_by_mul"])
def test_fuse_rmsnorm_rewrites_to_one_op(variant):
    from qexport.passes.fuse_rmsnorm import fuse_rmsnorm

    torch.manual_seed(0)
    model, x = RMSNormBlock(variant).eval(), torch.randn(3, 5, 32) * 4
    gm = _traced(copy.deepcopy(model), x)
    res = fuse_rmsnorm(gm)
    assert res.changed == {"rms_norm": 1} and not res.skipped
    assert count(gm, F.rms_norm) == 1
    assert count(gm, torch.rsqrt) == 0 and sum(n.target in ("pow", "mean") for n in gm.graph.nodes) == 0
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant, reason", [("mean_dim0", None), ("var_returned", "other users")])
def test_fuse_rmsnorm_leaves_look_alikes(variant, reason):
    from qexport.passes.fuse_rmsnorm import fuse_rmsnorm

    model, x = RMSNormBlock(variant).eval(), torch.randn(3, 5, 32)
    gm = _traced(model, x)
    res = fuse_rmsnorm(gm)
    assert res.changed == {} and count(gm, F.rms_norm) == 0
    assert (reason is None and not res.skipped) or (reason in res.skipped[0][1])


def test_fuse_rmsnorm_skips_half_precision():
    from qexport.passes.fuse_rmsnorm import fuse_rmsnorm

    model = RMSNormBlock().half()
    x = torch.randn(2, 32, dtype=torch.float16)
    res = fuse_rmsnorm(_traced(model, x))
    assert res.changed == {} and res.skipped[0][1] == "not float32"


def test_static_sizes_makes_repeat_kv_shapes_constant():
    import torch._dynamo

    from qexport.passes.static_sizes import static_sizes

    def repeat_kv(k):
        b, kv, length, d = k.shape
        return k[:, :, None].expand(b, kv, 2, length, d).reshape(b, kv * 2, length, d) * 2

    results = []

    def backend(gm, example_inputs):
        results.append(static_sizes(gm))
        for n in gm.graph.nodes:
            if n.op == "call_method" and n.target in ("expand", "reshape"):
                assert not any(isinstance(a, fx.Node) for a in n.args[1:]), n.format_node()
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(repeat_kv, backend=backend)
    for length in (3, 7, 11):
        k = torch.randn(1, 2, length, 4)
        torch._dynamo.mark_dynamic(k, 2)  # the KV length
        torch.testing.assert_close(f(k), repeat_kv(k), atol=0, rtol=0)
    assert results and results[0].changed == {"expand": 1, "reshape": 1}


def test_static_sizes_leaves_a_shape_tuple_alone():
    """``y.view(x.size())``: one argument that is a whole shape, not a size; rewriting it to -1 would flatten."""
    import torch._dynamo

    from qexport.passes.static_sizes import static_sizes

    def f(x, y):
        return (y * 2).view(x.size())

    results = []

    def backend(gm, example_inputs):
        results.append(static_sizes(gm))
        return gm.forward

    torch._dynamo.reset()
    g = torch.compile(f, backend=backend)
    for n in (3, 5):
        x, y = torch.randn(n, 4), torch.randn(n * 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(y, 0)
        torch.testing.assert_close(g(x, y), f(x, y), atol=0, rtol=0)
    assert results and "reshape" not in results[0].changed


class Rotary(nn.Module):
    """Hugging Face's rotary embedding: ``cos`` / ``sin`` of ``cat((f, f))`` times a scaling, unsqueezed at 1, and
    ``q * cos + rotate_half(q) * sin``. Look-alikes: ``swapped`` (halves not negated the same way), ``untied``
    (``cos`` of ``cat((f, g))``: its halves differ, so the first half is not all of it)."""

    def __init__(self, variant="hf"):
        super().__init__()
        self.variant = variant

    def forward(self, q, freqs, other):
        emb = torch.cat((freqs, other if self.variant == "untied" else freqs), dim=-1)
        cos, sin = (emb.cos() * 1.0).to(q.dtype).unsqueeze(1), (emb.sin() * 1.0).to(q.dtype).unsqueeze(1)
        x1, x2 = q[..., : q.shape[-1] // 2], q[..., q.shape[-1] // 2 :]
        rot = torch.cat((x1, -x2), dim=-1) if self.variant == "swapped" else torch.cat((-x2, x1), dim=-1)
        return q * cos + rot * sin


def _compiled_pass(model, pass_fn, *args):
    """``(pass result, rewritten graph, output)`` of ``pass_fn`` run on dynamo's graph of ``model(*args)``."""
    import torch._dynamo

    seen = []

    def backend(gm, example_inputs):
        seen.append((pass_fn(gm), gm))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(*args)
    return (*seen[0], out)


@pytest.mark.parametrize("variant, reason", [("hf", None), ("swapped", None), ("untied", "first half")])
def test_fuse_rotary(variant, reason):
    from torch.onnx.ops import rotary_embedding

    from qexport.passes.fuse_rotary import fuse_rotary

    model = Rotary(variant)
    q, freqs, other = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    res, gm, out = _compiled_pass(model, fuse_rotary, q, freqs, other)
    torch.testing.assert_close(out, model(q, freqs, other), atol=1e-6, rtol=1e-6)
    assert res.changed == ({"rotary": 1} if variant == "hf" else {})
    assert count(gm, rotary_embedding) == (1 if variant == "hf" else 0)
    assert (reason is None and not res.skipped) or reason in res.skipped[0][1]
    if variant == "hf":  # the fused graph is one RotaryEmbedding on the first half of cos / sin
        assert count(gm, torch.neg) + sum(n.target == "neg" for n in gm.graph.nodes) == 0


class CachedAttention(nn.Module):
    """A grouped-query attention step with a KV-cache update (Hugging Face's DynamicLayer.update + sdpa):
    returns the attention and the present key / value. ``variant``: ``causal`` asks SDPA for a causal mask with a
    past, ``one_cat`` updates only the key."""

    def __init__(self, variant="cache"):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, past_k, past_v, mask):
        keys = torch.cat((past_k, k), dim=-2)
        values = torch.cat((past_v, v), dim=-2) if self.variant != "one_cat" else v
        causal = self.variant == "causal"
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if causal else mask, scale=0.25,
                                             is_causal=causal, enable_gqa=True)
        return out, keys, values


@pytest.mark.parametrize("variant, reason", [("cache", None), ("causal", "is_causal with a past"),
                                             ("one_cat", "only one of key and value")])
def test_fuse_kv_attention(variant, reason):
    from torch.onnx.ops import attention

    from qexport.passes.fuse_kv_attention import fuse_kv_attention

    torch.manual_seed(0)
    b, h, kv, s, p, d = 2, 4, 2, 3, 5, 8
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s if variant != "one_cat" else
                                                                                p + s, d)
    past_k, past_v = torch.randn(b, kv, p, d), torch.randn(b, kv, p, d)
    mask = torch.ones(s, p + s, dtype=torch.bool).tril(p)
    model = CachedAttention(variant)
    res, gm, out = _compiled_pass(model, fuse_kv_attention, q, k, v, past_k, past_v, mask)
    for got, want in zip(out, model(q, k, v, past_k, past_v, mask)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fused = variant == "cache"
    assert res.changed == ({"attention": 1, "with_past": 1} if fused else {})
    assert count(gm, attention) == int(fused) and count(gm, F.scaled_dot_product_attention) == int(not fused)
    assert (reason is None and not res.skipped) or reason in res.skipped[0][1]
    if fused:  # the cache update is inside the fused node: the returned cache reads its present outputs
        assert count(gm, torch.cat) == 0


def test_fuse_kv_attention_without_a_cache():
    from torch.onnx.ops import attention

    from qexport.passes.fuse_kv_attention import fuse_kv_attention

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    res, gm, out = _compiled_pass(f, fuse_kv_attention, q, k, v)
    torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-5)
    assert res.changed == {"attention": 1} and count(gm, attention) == 1


class RepeatKVAttention(nn.Module):
    """Hugging Face's ``repeat_kv`` then SDPA with a mask; ``mismatched`` repeats the values differently (a
    look-alike that must not fuse)."""

    def __init__(self, mismatched=False):
        super().__init__()
        self.mismatched = mismatched

    @staticmethod
    def repeat(x, n):
        b, kv, length, d = x.shape
        return x[:, :, None, :, :].expand(b, kv, n, length, d).reshape(b, kv * n, length, d)

    def forward(self, q, k, v, mask):
        v = v.repeat(1, 3, 1, 1) if self.mismatched else self.repeat(v, 3)
        return torch.nn.functional.scaled_dot_product_attention(q, self.repeat(k, 3), v, attn_mask=mask)


@pytest.mark.parametrize("mismatched", [False, True])
def test_fuse_gqa(mismatched):
    import torch._dynamo

    from qexport.passes.fuse_gqa import fuse_gqa

    results = []

    def backend(gm, example_inputs):
        results.append(fuse_gqa(gm))
        results.append(sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"))
        results.append([n.kwargs.get("enable_gqa") for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)])
        return gm.forward

    torch._dynamo.reset()
    model = RepeatKVAttention(mismatched)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    out = torch.compile(model, backend=backend)(q, k, v, mask)
    torch.testing.assert_close(out, model(q, k, v, mask), atol=1e-6, rtol=0)
    fused, expands, gqa = results
    if mismatched:
        assert fused.changed == {} and expands == 1 and gqa == [None]  # key repeated, value tiled
    else:
        assert fused.changed == {"gqa": 1} and expands == 0 and gqa == [True]
