"""The calibrated algorithms against small, plain reference implementations written here from the papers,
on fixed seeds: GPTQ as the paper's column loop, AWQ's grid search over alpha, SmoothQuant's max|x|
statistic. "Lower error than round to nearest" cannot tell a correct algorithm from one with a missing
step; equal codes can.

Each reference is deliberately naive (one column, one candidate, one token at a time where that is
clearer) and shares no code with the library beyond the model under test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qexport.algorithms.awq import _collect, _search_scale, scale_groups
from qexport.algorithms.common import BlockInput
from qexport.algorithms.gptq import gptq_quantize
from qexport.algorithms.smoothquant import smooth_model
from qexport.config import QuantSpec
from qexport.formats import quantize_weight
from qexport.models.architectures import architecture, describe

from tiny import tiny_llama

BITS, GROUP = 4, 128
QMAX = 2**BITS - 1


# ----------------------------------------------------------------------------------------------------
# A plain asymmetric int4 grid with min-max group ranges (the range always holds 0)
# ----------------------------------------------------------------------------------------------------
def _group_params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``cols`` ``[N, g]``."""
    lo = cols.min(1).values.clamp(max=0.0)
    hi = cols.max(1).values.clamp(min=0.0)
    scale = (hi - lo) / QMAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale).clamp(0, QMAX)
    return scale, zero


def _round(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = (torch.round(col / scale) + zero).clamp(0, QMAX)
    return q, (q - zero) * scale


def _fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Round to nearest of ``w`` ``[N, K]`` in groups of ``GROUP`` along K."""
    out = torch.empty_like(w)
    for a in range(0, w.shape[1], GROUP):
        s, z = _group_params(w[:, a : a + GROUP])
        out[:, a : a + GROUP] = _round(w[:, a : a + GROUP], s[:, None], z[:, None])[1]
    return out


SPEC = QuantSpec(bits=BITS, group_size=GROUP, symmetric=False, observer="minmax")


# ----------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------
def _gptq_reference(w: torch.Tensor, h: torch.Tensor, act_order: bool, percdamp: float = 0.01) -> torch.Tensor:
    """GPTQ as Algorithm 1 of the paper, without its lazy batches: for each column j in turn, round it, and
    subtract its scaled error ``(w_j - q_j) / U_jj * U_j,j:`` from every later column, where ``U`` is the upper
    Cholesky factor of ``(H + damp I)^-1``. A group's range comes from its columns when the first of them is
    reached (with act-order: from the original weight, before any update). Float64. Returns the codes."""
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    n, k = w.shape
    h += percdamp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    params = {}
    if act_order:  # static groups, from the original weight
        for a in range(0, k, GROUP):
            params[a // GROUP] = _group_params(w[:, a : a + GROUP])
    w, h = w[:, order], h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(n, k, dtype=torch.float64)
    for j in range(k):
        c = int(order[j])  # the column's place in the weight
        if c // GROUP not in params:  # without act-order columns come in order: j == c
            params[c // GROUP] = _group_params(w[:, j : j + GROUP])
        s, z = params[c // GROUP]
        q, dq = _round(w[:, j], s, z)
        codes[:, c] = q
        e = (w[:, j] - dq) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    return codes


def _correlated(tokens: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=g))  # channels of different magnitude
    return (torch.randn(tokens, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_gives_the_codes_of_the_papers_column_loop(act_order):
    """K = 512 spans four of the library's lazy blocks of 128 columns: a missing update between blocks (or
    within one) changes most codes after the first block."""
    x = _correlated(2048, 512, seed=0)
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    ref = _gptq_reference(w, h, act_order)
    qw, deq = gptq_quantize(w, h.float(), SPEC, act_order=act_order)
    ours = qw.codes().to(torch.float64)
    differ = float((ours != ref).double().mean())
    # float32 (library) against float64 (reference): a code sitting on a rounding boundary may flip, and its
    # error then reaches the later columns; on this seed at most a handful of 24576 codes differ, by one step
    assert differ < 2e-3 and float((ours - ref).abs().max()) <= 1, differ
    rtn = quantize_weight(w, SPEC)
    assert torch.equal(rtn.dequantize(), _fake_quant(w))  # the reference's grid is the library's
    assert float((ours != rtn.codes()).double().mean()) > 0.2  # and GPTQ is far from round to nearest here


# ----------------------------------------------------------------------------------------------------
# AWQ: the scale search of one decoder block's groups
# ----------------------------------------------------------------------------------------------------
def _awq_alpha_reference(x: torch.Tensor, weights: list[torch.Tensor], out_fn, n_grid: int) -> tuple[float, float]:
    """AWQ's search: ``s = mean|x|^alpha`` normalised by ``sqrt(max s * min s)``, for alpha = i / n_grid; the
    alpha whose round-to-nearest of ``W * s`` (then ``/ s``) gives the least mean squared output error
    ``out_fn(weights') - out_fn(weights)`` wins (the first on ties). Returns (alpha, best error / alpha-0 error)."""
    x_mean = x.reshape(-1, x.shape[-1]).abs().mean(0)
    ref = out_fn(weights)
    errs = []
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        errs.append(float((out_fn([_fake_quant(w * s) / s for w in weights]) - ref).pow(2).mean()))
    best = min(range(n_grid), key=lambda i: (errs[i], i))
    return best / n_grid, errs[best] / errs[0]


@torch.no_grad()
def test_awq_searches_alpha_as_the_reference_grid_search():
    """The MLP's input group (gate and up, measured at the MLP's output) and its output group (down_proj
    alone) of a block with strongly uneven input channels: the library's search picks the reference's alpha
    for both, and that alpha is not 0 (the search is doing something)."""
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=1, seed=3).eval()
    block = model.model.layers[0]
    with torch.no_grad():  # a few loud channels, as in real LLM activations
        model.model.layers[0].post_attention_layernorm.weight[:8] *= 20.0
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    seen = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp_in", a[0])),
             block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp_out", a[0]))]
    inputs = []
    hooks.append(block.register_forward_pre_hook(lambda m, a, kw: inputs.append(BlockInput(a, dict(kw))),
                                                 with_kwargs=True))
    model(ids)
    for h_ in hooks:
        h_.remove()

    facts = describe(model, architecture(model, "test", "test"))
    groups = {g.key: g for g in scale_groups(block, facts)[0]}
    data = _collect(block, list(groups.values()), facts.arch.attention(block), inputs, 1)
    options = {"n_grid": 20, "duo_scaling": False}
    mlp = block.mlp

    def mlp_out(ws):
        saved = [mlp.gate_proj.weight.data, mlp.up_proj.weight.data]
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = ws
        try:
            return mlp(seen["mlp_in"])
        finally:
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = saved

    cases = {"mlp_in": (seen["mlp_in"], [mlp.gate_proj.weight.data.clone(), mlp.up_proj.weight.data.clone()],
                        mlp_out),
             "mlp_out": (seen["mlp_out"], [mlp.down_proj.weight.data.clone()],
                         lambda ws: seen["mlp_out"] @ ws[0].T)}
    for key, (x, ws, fn) in cases.items():
        g = groups[key]
        _, alpha, ratio = _search_scale(g, [SPEC] * len(g.linears), data, options)
        ref_alpha, ref_ratio = _awq_alpha_reference(x, ws, fn, options["n_grid"])
        assert alpha == ref_alpha and alpha > 0, (key, alpha, ref_alpha)
        assert ratio == pytest.approx(ref_ratio, rel=1e-3), key


# ----------------------------------------------------------------------------------------------------
# SmoothQuant: the statistic is max |x| over every calibration token
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_smoothquant_scales_are_the_papers_from_max_abs_activations():
    """s_j = max|x_j|^alpha / max|w_j|^(1-alpha), x over every token of every batch, w over the rows of the
    linears that read x; read back from how much each input column of q_proj, o_proj, gate_proj and down_proj
    was scaled. o_proj's scale is folded into v_proj's rows, so it is one per kv channel (the maxima over the
    query heads that read it); down_proj's into up_proj's rows. Those row folds come first, so the q/k/v and
    gate/up groups take their weight maxima after them."""
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, seed=5).eval()
    kv, n_rep, hd = 2, 2, 16  # tiny_llama: 4 heads of 16, 2 kv heads
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    # the reference statistic: every input row of the four groups' first linears, one token at a time
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, lin in (("q", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                          ("gate", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
            hooks.append(lin.register_forward_pre_hook(
                lambda m, a, key=f"{i}.{name}": rows.setdefault(key, []).extend(a[0].reshape(-1, a[0].shape[-1]))))
    for b in batches:
        model(b)
    for h_ in hooks:
        h_.remove()
    before = copy.deepcopy(model)
    alpha = 0.5
    smooth_model(model, list(model.model.layers), batches, alpha)

    def x_max(key):
        return torch.stack([r.abs() for r in rows[key]]).max(0).values

    def col_max(*ws):
        return torch.cat([w.abs() for w in ws]).max(0).values

    def formula(x, w):
        return x.pow(alpha) / w.pow(1 - alpha)

    def applied(new, old):  # the scale each input column was multiplied by
        return (new.weight / old.weight).mean(0)

    for i in range(2):
        old, new = before.model.layers[i], model.model.layers[i]
        oa, na, om, nm = old.self_attn, new.self_attn, old.mlp, new.mlp
        per_kv = lambda v: v.view(kv, n_rep, hd).max(1).values.reshape(-1)  # noqa: E731
        s_o = formula(per_kv(x_max(f"{i}.o")), per_kv(col_max(oa.o_proj.weight)))
        s_down = formula(x_max(f"{i}.down"), col_max(om.down_proj.weight))
        v_folded, up_folded = oa.v_proj.weight / s_o[:, None], om.up_proj.weight / s_down[:, None]
        s_q = formula(x_max(f"{i}.q"), col_max(oa.q_proj.weight, oa.k_proj.weight, v_folded))
        s_gate = formula(x_max(f"{i}.gate"), col_max(om.gate_proj.weight, up_folded))
        full_o = s_o.view(kv, 1, hd).expand(kv, n_rep, hd).reshape(-1)
        for got, want in ((applied(na.o_proj, oa.o_proj), full_o), (applied(nm.down_proj, om.down_proj), s_down),
                          (applied(na.q_proj, oa.q_proj), s_q), (applied(nm.gate_proj, om.gate_proj), s_gate)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
