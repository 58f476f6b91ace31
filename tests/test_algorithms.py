"""GPTQ and AWQ (qexport.algorithms): numerics on small synthetic problems, the tiny Llama end to end,
calibration data, the registry of algorithms, and the recipes that select them."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import qexport
import qexport.config
from qexport.algorithms import ALGORITHMS, calibration_batches, calibration_tokens, get_algorithm
from qexport.algorithms.awq import fold_scales, scale_groups, search_clip
from qexport.algorithms.calibration import sample_windows
from qexport.algorithms.common import LayerTask, build_quantized_weight, group_ranges, quantize_with_qparams
from qexport.algorithms.gptq import HessianAccumulator, gptq_quantize
from qexport.algorithms.registry import Option, register
from qexport.config import QuantSpec, Recipe, Rule, load_recipe
from qexport.errors import CalibrationError, InvalidConfig, QExportError, UnsupportedOp
from qexport.formats import fake_quantize, qparams_from_range, quantize_weight
from qexport.modules import QLinear
from qexport.models.architectures import describe
from qexport.presets import PRESETS
from tiny import tiny_llama, word_tokenizer

W4G64 = QuantSpec(bits=4, group_size=64, symmetric=False)
LINEARS = 14  # in the tiny Llama (2 blocks x 7), lm_head excluded


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are small: one thread is faster, and steadier on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_inputs(tokens: int, k: int, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated (low rank plus a little noise), as LLM activations are."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g)
    mix = torch.randn(rank, k, generator=g)
    return z @ mix + 0.05 * torch.randn(tokens, k, generator=g)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.T - x @ wq.T).pow(2).mean())


def calib_ids(n: int = 16, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 512, (n, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# GPTQ on one layer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_output_error_vs_rtn(act_order):
    x, held_out = correlated_inputs(3072, 256).split([2048, 1024])
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    acc = HessianAccumulator(256)
    acc.add(x)
    qw, deq = gptq_quantize(w, acc.hessian, W4G64, act_order=act_order)
    rtn = fake_quantize(w, W4G64)
    e_gptq, e_rtn = output_error(x, w, deq), output_error(x, w, rtn)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    # held-out inputs from the same distribution: still clearly better
    assert output_error(held_out, w, deq) < 0.6 * output_error(held_out, w, rtn)


@pytest.mark.parametrize("spec", [
    W4G64,
    QuantSpec(bits=4, group_size=64, symmetric=True),
    QuantSpec(bits=2, group_size=48, symmetric=False),  # 160 = 3 x 48 + a partial group of 16
    QuantSpec(bits=8, granularity="per_channel", symmetric=True),
    QuantSpec(bits=4, granularity="per_tensor", symmetric=False),
    QuantSpec(bits=4, group_size=64, symmetric=False, observer="mse"),
], ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_roundtrip_through_qexport_dequantize(spec, act_order):
    x = correlated_inputs(512, 160)
    w = torch.randn(24, 160, generator=torch.Generator().manual_seed(5))
    acc = HessianAccumulator(160)
    acc.add(x)
    qw, deq = gptq_quantize(w, acc.hessian, spec, act_order=act_order, block_size=32)
    # the stored weight is qexport's layout: dequantize() gives exactly what GPTQ computed with
    assert torch.equal(qw.dequantize(), deq)
    assert qw.spec == spec and qw.shape == (24, 160)
    n_groups = 1 if spec.granularity.value == "per_tensor" else math.ceil(160 / qw.group)
    assert qw.scales().shape == (1 if spec.granularity.value == "per_tensor" else 24, n_groups)
    codes = qw.codes().to(torch.float32)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    scale = qw.scales().repeat_interleave(qw.group, 1)[:, :160]
    zp = qw.zero_points()
    by_hand = codes * scale if zp is None else (codes - zp.repeat_interleave(qw.group, 1)[:, :160]) * scale
    assert torch.equal(by_hand.expand_as(deq), deq)
    # and a QLinear holding it computes x @ deq^T
    layer = QLinear(qw)
    torch.testing.assert_close(layer(x[:8]), x[:8] @ deq.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [W4G64, QuantSpec(bits=8), QuantSpec(bits=2, group_size=48, symmetric=False),
                                  QuantSpec(bits=4, granularity="per_tensor", symmetric=False)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_build_quantized_weight_matches_quantize_weight(spec):
    w = torch.randn(10, 160, generator=torch.Generator().manual_seed(2))
    ref = quantize_weight(w, spec)
    scale, zero = qparams_from_range(*group_ranges(w, spec), spec.bits, spec.symmetric)
    codes, deq = quantize_with_qparams(w, spec, scale, zero)
    built = build_quantized_weight(spec, codes, scale, zero)
    assert built.tensors().keys() == ref.tensors().keys()
    for name, t in ref.tensors().items():
        assert torch.equal(built.tensors()[name], t), name
    assert torch.equal(built.dequantize(), deq)


def test_build_quantized_weight_rejects_codes_outside_the_grid():
    spec = QuantSpec(bits=4, group_size=8, symmetric=False)
    with pytest.raises(QExportError, match=r"codes outside \[0, 15\]"):
        build_quantized_weight(spec, torch.full((2, 8), 16.0), torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(QExportError, match="scale has shape"):
        build_quantized_weight(spec, torch.zeros(2, 8), torch.ones(2, 2), torch.zeros(2, 2))


def test_gptq_hessian_not_positive_definite_warns_and_quantizes():
    k = 64
    x = correlated_inputs(256, k)
    h = (2 * x.T @ x / 256).double()
    evals, evecs = torch.linalg.eigh(h)
    top = evecs[:, -1:]
    h = h - 1.5 * evals[-1] * (top @ top.T)  # its largest eigenvalue becomes negative: indefinite
    assert torch.linalg.eigvalsh(h).min() < 0 and (h.diagonal() > 0).all()
    w = torch.randn(16, k)
    with pytest.warns(UserWarning, match="not positive definite"):
        qw, deq = gptq_quantize(w, h, W4G64, percdamp=0.01, name="layer")
    assert torch.isfinite(deq).all() and torch.equal(qw.dequantize(), deq)


class NaNAtZero(nn.Module):
    """Inputs where x == 0 become NaN: a model whose activations go bad on some calibration data."""

    def forward(self, x):
        return x / torch.where(x == 0, torch.zeros_like(x), torch.ones_like(x))


def test_gptq_nan_hessian_is_an_error_and_in_a_model_the_layer_is_rounded_to_nearest():
    h = torch.eye(8)
    h[0, 1] = float("nan")
    with pytest.raises(QExportError, match="NaN"):
        gptq_quantize(torch.randn(4, 8), h, QuantSpec(bits=4, group_size=8, symmetric=False))
    model = nn.Sequential(NaNAtZero(), nn.Linear(8, 4))
    calib = torch.randn(16, 8)
    calib[3, 2] = 0.0
    recipe = Recipe("g", rules=(Rule("*", QuantSpec(bits=4, group_size=8, symmetric=False)),), algorithm="gptq")
    with pytest.warns(UserWarning, match="NaN/inf values.*rounding this layer to nearest"):
        q = qexport.quantize(copy.deepcopy(model), recipe, calibration=calib)
    assert isinstance(q[1], QLinear)
    assert torch.equal(q[1].qdata, quantize_weight(model[1].weight, recipe.rules[0].weight).qdata)


def test_gptq_dead_columns():
    x = correlated_inputs(512, 64)
    x[:, 5] = 0.0
    x[:, 40] = 0.0
    acc = HessianAccumulator(64)
    acc.add(x)
    w = torch.randn(8, 64)
    qw, deq = gptq_quantize(w, acc.hessian, QuantSpec(bits=4, group_size=32, symmetric=False))
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, [5, 40]], torch.zeros(8, 2))  # inputs are always zero there: the weight is dropped
    assert output_error(x, w, deq) < output_error(x, w, fake_quantize(w, QuantSpec(bits=4, group_size=32,
                                                                                     symmetric=False)))


# ------------------------------------------------------------------------------------------------
# GPTQ on models
# ------------------------------------------------------------------------------------------------
def test_gptq_on_a_plain_sequential_mlp_beats_rtn():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    x = correlated_inputs(1024, 128, rank=12)
    recipe = Recipe("mlp-gptq", rules=(Rule("*", W4G64),), algorithm="gptq")
    gptq = qexport.quantize(copy.deepcopy(mlp), recipe, calibration=x)
    rtn = qexport.quantize(copy.deepcopy(mlp), Recipe("mlp-rtn", rules=(Rule("*", W4G64),)))
    assert isinstance(gptq[0], QLinear) and isinstance(gptq[2], QLinear)
    with torch.no_grad():
        ref = mlp(x)
        e_gptq = float((gptq(x) - ref).pow(2).mean())
        e_rtn = float((rtn(x) - ref).pow(2).mean())
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def test_gptq_tiny_llama_end_to_end_and_deterministic():
    model = tiny_llama(seed=3)
    calib = calib_ids()
    a = qexport.quantize(copy.deepcopy(model), "w4g128-gptq", calibration=calib)
    b = qexport.quantize(copy.deepcopy(model), "w4g128-gptq", calibration=list(calib))  # a list of 1-D tensors
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QLinear)}
    assert len(qa) == LINEARS and qa.keys() == qb.keys()
    for n in qa:
        for t in ("qdata", "scale", "zero_point"):
            assert torch.equal(getattr(qa[n], t), getattr(qb[n], t)), (n, t)
    report = a.qexport_report
    assert report.recipe["algorithm"] == "gptq" and len(report.quantized) == LINEARS
    assert [layer.name for layer in report.kept_float] == ["lm_head"]
    # GPTQ found other codes than RTN for the same format
    rtn = qexport.quantize(copy.deepcopy(model), "w4g128")
    assert not torch.equal(a.model.layers[1].mlp.down_proj.qdata, rtn.model.layers[1].mlp.down_proj.qdata)
    ids = calib_ids(2, 24, seed=9)
    with torch.no_grad():
        assert torch.isfinite(a(ids).logits).all()


def test_calibration_work_counts_a_blocks_matmuls_and_attention():
    """The work quantize() reports: every linear's 2 T K N and attention's two S x S products, once per forward."""
    from qexport.algorithms.common import capture_block_inputs, counting_work, run_block

    model = tiny_llama()  # hidden 64, MLP 160, 4 query heads and 2 KV heads of 16
    block = model.model.layers[0]
    (inp,) = capture_block_inputs(model, block, [calib_ids(2, 24)])
    with counting_work() as work:
        run_block(block, inp)
        run_block(block, inp)
    tokens = 2 * 24
    linears = 2 * tokens * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160)
    attention = 2 * (2 * 2 * 4 * 24 * 24 * 16)  # Q K^T and P V per batch row and query head
    assert work.forwards == 2 and work.flops == 2 * (linears + attention) and work.seconds > 0
    d = work.to_dict(1.0)
    assert d["forward_flops"] == work.flops and d["forward_gflop_per_s"] > 0


def test_quantize_reports_the_algorithms_time_and_work():
    calib = calib_ids(4, 16)
    q = qexport.quantize(tiny_llama(), "w4g128-gptq", calibration=calib)
    a = q.qexport_report.algorithm
    assert a["name"] == "gptq" and a["seconds"] >= a["forward_seconds"] > 0 and a["forward_flops"] > 0
    # the capture of block 0's inputs, then one forward per block (the calibration windows fit one batch)
    assert a["forwards"] == 1 + 2
    assert q.qexport_report.to_dict()["algorithm"] == a and "gptq: " in q.qexport_report.algorithm_summary()
    assert qexport.quantize(tiny_llama(), "w4g128").qexport_report.algorithm is None


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.quantized_weight().codes() for n, m in model.named_modules() if isinstance(m, QLinear)}


def test_gptq_in_one_forward_per_block_is_the_staged_order(monkeypatch):
    """Quantizing each linear in its own pre-hook, in one forward, is true-sequential GPTQ: the same codes as
    running the block once per stage (up to float rounding of the differently batched forwards)."""
    from qexport.algorithms import gptq

    calib = calib_ids(16, 32)
    one = qexport.quantize(tiny_llama(), "w4g128-gptq", calibration=calib)
    assert one.qexport_report.algorithm["forwards"] == 1 + 2
    monkeypatch.setattr(gptq, "ONE_PASS_BYTES", 0)  # the windows stay in batches of 8: stages
    staged = qexport.quantize(tiny_llama(), "w4g128-gptq", calibration=calib)
    # 2 batches: their capture; per block a probe and 4 stages on each batch; block 1's inputs
    assert staged.qexport_report.algorithm["forwards"] == 2 + 2 * (1 + 4 * 2) + 2
    a, b = _codes(one), _codes(staged)
    assert a.keys() == b.keys() and len(a) == LINEARS
    differ = sum(int((a[k] != b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())
    assert differ < 0.01, differ
    # and without true_sequential (one Hessian pass over the float block) the codes are not these
    flat = Recipe("flat", rules=PRESETS["w4g128-gptq"].rules, algorithm="gptq", options={"true_sequential": False})
    c = _codes(qexport.quantize(tiny_llama(), flat, calibration=calib))
    assert sum(int((c[k] != b[k]).sum()) for k in c) / sum(v.numel() for v in c.values()) > 5 * differ


def test_gptq_falls_back_to_stages_when_a_linear_runs_twice(monkeypatch):
    from qexport.algorithms import gptq

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return x + self.fc(torch.relu(self.fc(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(64, 32)
            self.layers = nn.ModuleList([Twice(), Twice()])

        def forward(self, ids):
            h = self.emb(ids)
            for layer in self.layers:
                h = layer(h)
            return h

    recipe = Recipe("g", rules=(Rule("layers.*", QuantSpec(bits=4, group_size=16, symmetric=False)),),
                    algorithm="gptq")
    calib = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    got = _codes(qexport.quantize(Net(), recipe, calibration=calib))
    monkeypatch.setattr(gptq, "_gptq_one_forward", lambda *a: None)  # the stages, on the same one batch
    ref = _codes(qexport.quantize(Net(), recipe, calibration=calib))
    assert got.keys() == ref.keys() == {"layers.0.fc", "layers.1.fc"}
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_gptq_keeps_a_nan_layer_float_with_a_warning():
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="layers.1.mlp.down_proj stays float: .* 1 NaN/inf value"):
        q = qexport.quantize(model, "w4g128-gptq", calibration=calib_ids(8))
    assert type(q.model.layers[1].mlp.down_proj) is nn.Linear
    assert len(q.qexport_report.quantized) == LINEARS - 1


# ------------------------------------------------------------------------------------------------
# AWQ
# ------------------------------------------------------------------------------------------------
def llama_with_outlier_channels(seed: int = 0):
    """The tiny Llama whose norms make a few hidden channels 8x larger, as real LLMs' activations are."""
    model = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(64, generator=g))
                norm.weight[torch.randperm(64, generator=g)[:4]] *= 8.0
    return model


def test_awq_fold_into_rmsnorm_and_v_proj_keeps_the_float_model():
    model = llama_with_outlier_channels()
    ids = calib_ids(2, 24, seed=4)
    with torch.no_grad():
        before = model(ids).logits
    block = model.model.layers[0]
    groups, notes = scale_groups(block, describe(model))
    assert [g.key for g in groups] == ["attn_in", "attn_out", "mlp_in", "mlp_out"] and not notes
    norm_before = block.input_layernorm.weight.clone()
    v_before = block.self_attn.v_proj.weight.clone()
    g = torch.Generator().manual_seed(0)
    for group in groups:
        n = group.n_prev
        fold_scales(group, torch.exp(torch.randn(n, generator=g)))  # scales over about a factor 10
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(block.input_layernorm.weight, norm_before)
    assert not torch.allclose(block.self_attn.v_proj.weight, v_before)
    # grouped-query attention (4 heads, 2 kv heads): o_proj's 64 scales are 32 v_proj scales, each used twice
    attn_out = groups[1]
    assert attn_out.full(torch.arange(32.0)).tolist() == [*range(16), *range(16), *range(16, 32), *range(16, 32)]


def test_awq_reduces_block_output_error_vs_rtn():
    model = llama_with_outlier_channels()
    calib = calib_ids(16, 32)
    x = calib_ids(8, 32, seed=2)
    recipe = Recipe("awq", rules=(Rule("model.layers.0.*", W4G64),), algorithm="awq")
    rtn_recipe = Recipe("rtn", rules=(Rule("model.layers.0.*", W4G64),))
    awq = qexport.quantize(copy.deepcopy(model), recipe, calibration=calib)
    rtn = qexport.quantize(copy.deepcopy(model), rtn_recipe)

    def block0_out(m):
        out = {}
        h = m.model.layers[0].register_forward_hook(
            lambda mod, a, o: out.setdefault("y", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(x)
        h.remove()
        return out["y"]

    ref = block0_out(model)
    e_awq = float((block0_out(awq) - ref).pow(2).mean())
    e_rtn = float((block0_out(rtn) - ref).pow(2).mean())
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    # the fold moved the outlier scales out of the norm weights
    assert awq.model.layers[0].input_layernorm.weight.max() < 0.8 * model.model.layers[0].input_layernorm.weight.max()
    assert all(isinstance(m, QLinear) for m in awq.model.layers[0].modules() if isinstance(m, nn.Linear))


def test_awq_with_gptq_rounding():
    """rounding="gptq": the same folded scales, then GPTQ instead of clip + round to nearest."""
    model = llama_with_outlier_channels()
    calib = calib_ids(16, 32)
    x = calib_ids(8, 32, seed=2)
    rules = (Rule("model.layers.0.*", W4G64),)
    awq_gptq = qexport.quantize(copy.deepcopy(model), Recipe("ag", rules=rules, algorithm="awq",
                                                             options={"rounding": "gptq"}), calibration=calib)
    awq = qexport.quantize(copy.deepcopy(model), Recipe("a", rules=rules, algorithm="awq"), calibration=calib)
    rtn = qexport.quantize(copy.deepcopy(model), Recipe("r", rules=rules))
    assert awq_gptq.qexport_report.recipe["options"]["rounding"] == "gptq"

    def block0_error(m):
        out = {}
        for name, mod in (("q", m), ("ref", model)):
            h = mod.model.layers[0].register_forward_hook(
                lambda _m, a, o, k=name: out.setdefault(k, o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                mod(x)
            h.remove()
        return float((out["q"] - out["ref"]).pow(2).mean())

    e = {k: block0_error(m) for k, m in (("awq_gptq", awq_gptq), ("awq", awq), ("rtn", rtn))}
    assert e["awq_gptq"] < 0.8 * e["rtn"], e
    # the scales were folded as with rounding="rtn"; the codes are GPTQ's, not AWQ's
    torch.testing.assert_close(awq_gptq.model.layers[0].input_layernorm.weight,
                               awq.model.layers[0].input_layernorm.weight)
    assert not torch.equal(awq_gptq.model.layers[0].mlp.down_proj.qdata, awq.model.layers[0].mlp.down_proj.qdata)
    assert all(isinstance(m, QLinear) for m in awq_gptq.model.layers[0].modules() if isinstance(m, nn.Linear))


def test_awq_block_inputs_float_are_the_float_models_hidden_states():
    """block_inputs="float": block 1 is searched on the float model's hidden states (reference AWQ);
    the default feeds it block 0's quantized outputs."""
    model = llama_with_outlier_channels()
    calib = calib_ids(8, 32)
    rules = (Rule("model.layers.*", W4G64),)

    def block1_inputs(m, **quantize_kw):
        seen = []
        h = m.model.layers[1].register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True)
        try:
            if quantize_kw:
                qexport.quantize(m, **quantize_kw, calibration=calib)
            else:
                with torch.no_grad():
                    m(calib)
        finally:
            h.remove()
        return next(t for t in seen if t.shape[0] == len(calib))  # not find_blocks' one-sequence probe

    want = block1_inputs(copy.deepcopy(model))
    got_float = block1_inputs(copy.deepcopy(model), recipe=Recipe(
        "a", rules=rules, algorithm="awq", options={"block_inputs": "float"}))
    got_quant = block1_inputs(copy.deepcopy(model), recipe=Recipe("a", rules=rules, algorithm="awq"))
    assert got_float.shape == want.shape == got_quant.shape
    torch.testing.assert_close(got_float, want, rtol=1e-5, atol=1e-5)
    assert (got_quant - want).abs().max() > 1e-3


def test_awq_clip_search_never_worse_than_the_full_range():
    x = correlated_inputs(512, 128)
    w = torch.randn(16, 128)
    w[:, 3] *= 20  # one outlier column
    spec = W4G64
    scale, zero = search_clip(w, x, spec, clip_grid=20, max_shrink=0.5)
    _, clipped = quantize_with_qparams(w, spec, scale, zero)
    assert output_error(x, w, clipped) <= output_error(x, w, fake_quantize(w, spec)) * (1 + 1e-6)
    assert torch.equal(build_quantized_weight(spec, quantize_with_qparams(w, spec, scale, zero)[0], scale,
                                              zero).dequantize(), clipped)


def test_awq_tiny_llama_end_to_end_deterministic():
    model = tiny_llama(seed=5)
    calib = calib_ids()
    a = qexport.quantize(copy.deepcopy(model), "w4g128-awq", calibration=calib)
    b = qexport.quantize(copy.deepcopy(model), "w4g128-awq", calibration=calib)
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QLinear)}
    assert len(qa) == LINEARS
    for n, m in b.named_modules():
        if isinstance(m, QLinear):
            assert torch.equal(m.qdata, qa[n].qdata) and torch.equal(m.scale, qa[n].scale), n
    with torch.no_grad():
        assert torch.isfinite(a(calib[:2]).logits).all()


def test_awq_needs_a_llama_layout():
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(UnsupportedOp, match="use algorithm 'gptq'"):
        qexport.quantize(mlp, Recipe("a", rules=(Rule("*", W4G64),), algorithm="awq"), calibration=torch.randn(8, 16))


# ------------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------------
def test_calibration_tokens_deterministic_and_shaped():
    tok = word_tokenizer()
    from tiny import EMMA

    text = EMMA.read_text()[:20000]
    a = calibration_tokens(text, tok, samples=6, seq_len=64, seed=0)
    b = calibration_tokens(text, tok, samples=6, seq_len=64, seed=0)
    c = calibration_tokens(text, tok, samples=6, seq_len=64, seed=1)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # non-overlapping windows of the token stream when the text is long enough
    ids = torch.arange(1000)
    w = sample_windows(ids, 10, 64, seed=3)
    starts = sorted(int(r[0]) for r in w)
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 64)) for r in w)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))
    with pytest.warns(UserWarning, match="samples overlap"):
        assert sample_windows(ids, 20, 64).shape == (20, 64)


def test_calibration_errors():
    tok = word_tokenizer()
    with pytest.raises(CalibrationError, match="empty"):
        calibration_tokens("   ", tok)
    with pytest.raises(CalibrationError, match="fewer than one sample of 512"):
        calibration_tokens("a short text", tok, samples=4, seq_len=512)
    with pytest.raises(CalibrationError, match="positive integer"):
        calibration_tokens("text", tok, samples=0)
    with pytest.raises(CalibrationError, match="empty"):
        calibration_batches(torch.empty(0, 16, dtype=torch.long))
    with pytest.raises(CalibrationError, match="empty"):
        calibration_batches([])
    with pytest.raises(CalibrationError, match="sample 1 must be a 1-D tensor"):
        calibration_batches([torch.arange(5), torch.zeros(2, 2, dtype=torch.long)])
    with pytest.raises(CalibrationError, match=r"2-D tensor \[samples, seq_len\]"):
        calibration_batches(torch.arange(10))
    assert [b.shape for b in calibration_batches([torch.arange(5), torch.arange(7)])] == [(1, 5), (1, 7)]


def test_quantize_asks_for_calibration_data_before_touching_the_model():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    for recipe in ("w4g128-gptq", "w4g128-awq"):
        with pytest.raises(CalibrationError, match=r"needs calibration data: pass calibration=token ids \[N, L\]"):
            qexport.quantize(model, recipe)
        with pytest.raises(CalibrationError, match="empty"):
            qexport.quantize(model, recipe, calibration=torch.empty(0, 8, dtype=torch.long))
    with pytest.raises(InvalidConfig, match="takes no calibration data"):
        qexport.quantize(model, "w4g128", calibration=calib_ids())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, QLinear) for m in model.modules())


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_roundtrip_json_with_their_options(name, tmp_path):
    r = load_recipe(name)
    assert r is PRESETS[name]
    defaults = ALGORITHMS[r.algorithm].defaults()
    assert set(r.options) == set(defaults)
    d = r.to_dict()  # every option is written, except rotation options at their defaults
    written = d.get("options", {})
    assert json.loads(json.dumps(d)) == d and {**defaults, **written} == dict(r.options)
    assert set(defaults) - set(written) <= {"rotate", "rotate_seed"}
    assert Recipe.from_dict(json.loads(json.dumps(d))) == r
    assert Recipe.from_json(r.to_json(tmp_path / f"{name}.json")) == r
    assert copy.deepcopy(r) == r and hash(r) == hash(copy.deepcopy(r))


def test_recipe_options_validation_and_json():
    r = Recipe("g", rules=(Rule("*", W4G64),), algorithm="gptq", options={"act_order": True, "percdamp": 0.05})
    assert r.options["act_order"] is True and r.options["percdamp"] == 0.05 and r.options["block_size"] == 128
    back = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back != Recipe("g", rules=(Rule("*", W4G64),), algorithm="gptq")
    with pytest.raises(TypeError):
        r.options["act_order"] = False  # read-only
    assert "options" not in PRESETS["w4g128"].to_dict()  # rtn recipes are written as before
    with pytest.raises(InvalidConfig, match=r"unknown option\(s\) \['alpha'\] for algorithm 'gptq'"):
        Recipe("g", rules=(Rule("*", W4G64),), algorithm="gptq", options={"alpha": 1})
    with pytest.raises(InvalidConfig, match="option 'percdamp' of algorithm 'gptq' must be in"):
        Recipe("g", rules=(Rule("*", W4G64),), algorithm="gptq", options={"percdamp": -1})
    with pytest.raises(InvalidConfig, match="option 'clip' of algorithm 'awq' must be true or false"):
        Recipe("a", rules=(Rule("*", W4G64),), algorithm="awq", options={"clip": "yes"})
    with pytest.raises(InvalidConfig, match="algorithm 'rtn'"):
        Recipe("r", rules=(Rule("*", W4G64),), options={"percdamp": 0.1})
    with pytest.raises(InvalidConfig, match="use algorithm 'rtn' for NF4"):
        Recipe("n", rules=(Rule("*", QuantSpec(bits=4, format="nf4")),), algorithm="gptq")


def test_compile_backend_refuses_calibrated_recipes_with_a_pointer_to_quantize():
    from qexport.backend import BackendOptions

    with pytest.raises(InvalidConfig, match=r"qexport.quantize\(model, recipe, calibration=\.\.\.\)"):
        BackendOptions.from_dict({"recipe": "w4g128-gptq"})


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
def test_registry_lists_every_algorithm():
    assert list(ALGORITHMS) == ["rtn", "gptq", "awq", "smoothquant"]
    assert qexport.config.ALGORITHMS is ALGORITHMS  # one registry, whichever module it is read from
    assert {name: a.needs_data for name, a in ALGORITHMS.items()} == {
        "rtn": False, "gptq": True, "awq": True, "smoothquant": True}
    for name, a in ALGORITHMS.items():
        assert a.name == name and callable(a.run) and get_algorithm(name) is a.run and a.doc
        assert all(isinstance(o, Option) for o in a.options.values())
        assert dict(Recipe("r", rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token",
                                                                                dynamic=True)),),
                           algorithm=name).options) == a.defaults()
    assert {r.algorithm for r in PRESETS.values()} == set(ALGORITHMS)  # every algorithm has a preset
    assert set(ALGORITHMS["rtn"].options) == {"rotate", "rotate_seed"} < set(ALGORITHMS["gptq"].options)


def test_unknown_algorithm_or_option_names_what_exists():
    with pytest.raises(InvalidConfig, match=r"recipe 'r': unknown algorithm 'hqq'; available: rtn, gptq, awq, "
                                            r"smoothquant"):
        Recipe("r", rules=(Rule("*", W4G64),), algorithm="hqq")
    with pytest.raises(InvalidConfig, match=r"unknown algorithm 'hqq'; available: rtn, gptq, awq, smoothquant"):
        get_algorithm("hqq")
    with pytest.raises(InvalidConfig, match=r"unknown algorithm \['gptq'\]"):
        Recipe("r", rules=(Rule("*", W4G64),), algorithm=["gptq"])
    with pytest.raises(InvalidConfig, match=r"unknown option\(s\) \['steps'\] for algorithm 'awq'; "
                                            r"allowed: \['block_inputs', 'clip'"):
        Recipe("r", rules=(Rule("*", W4G64),), algorithm="awq", options={"steps": 2})
    with pytest.raises(InvalidConfig, match=r"unknown option\(s\) \['rotate'\] for algorithm 'smoothquant'; "
                                            r"allowed: \['alpha'\]"):
        Recipe("r", rules=(Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token", dynamic=True)),),
               algorithm="smoothquant", options={"rotate": "hadamard"})
    with pytest.raises(InvalidConfig, match="already registered"):
        register("gptq", needs_data=True)(lambda *a, **k: {})


def test_rtn_entry_rounds_like_quantize():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    tasks = [LayerTask(str(i), model[i], W4G64) for i in (0, 2)]
    got = get_algorithm("rtn")(model, tasks, None, ALGORITHMS["rtn"].defaults())
    for t in tasks:
        torch.testing.assert_close(got[t.name].dequantize(), quantize_weight(t.module.weight, W4G64).dequantize())
