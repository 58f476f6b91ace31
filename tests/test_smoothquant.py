"""SmoothQuant (qexport.algorithms.smoothquant): the scales follow the paper's formula, folding them is exact
in float, the W8A8 error shrinks on a model with activation outliers, options are validated, and the
smoothed, quantized model goes through the compile back-end and the ONNX export unchanged.

Tolerances: folding rescales weights by powers of the activation range, so the float logits move only by
float32 rounding (relative norm 1e-5; observed ~1e-7). ORT runs the same integer codes and scales as the
reference, so the export agrees with torch to 1e-4 absolute, as in tests/test_export.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qexport
from qexport.algorithms.awq import scale_groups
from qexport.algorithms.smoothquant import _input_absmax, smooth_model, smooth_scales
from qexport.backend import BackendOptions
from qexport.config import QuantSpec, Recipe, Rule
from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.models.architectures import describe
from qexport.modules import QLinear
from qexport.presets import PRESETS, get_preset

from tiny import tiny_llama

W8 = QuantSpec(bits=8)
PER_TOKEN = QuantSpec(bits=8, granularity="per_token", dynamic=True)


def calib(n=4, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 512, (n, length), generator=g)


def outlier_llama(seed=0):
    """The tiny Llama with LLM-like activation outliers: a few channels of each norm's output (the inputs of
    q/k/v and gate/up) and of up_proj's output (down_proj's input) are 30x larger than the rest."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 30.0
            layer.mlp.up_proj.weight[[5, 90]] *= 30.0
    return model


def test_smooth_scales_follow_the_formula_on_a_hand_made_example():
    x = torch.tensor([4.0, 1.0, 0.0, 9.0, 2.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0, 0.5])
    # alpha 0.5: sqrt(x / w); a channel with x or w equal to 0 keeps 1
    assert torch.allclose(smooth_scales(x, w, 0.5), torch.tensor([2.0, 0.5, 1.0, 1.0, 2.0]))
    # alpha 0.75: x^0.75 / w^0.25
    expected = torch.tensor([4.0 ** 0.75, 1.0 / 4.0 ** 0.25, 1.0, 1.0, 2.0 ** 0.75 / 0.5 ** 0.25])
    assert torch.allclose(smooth_scales(x, w, 0.75), expected)
    # alpha 0 moves nothing into the activations' favour: 1 / w; alpha 1: x
    assert torch.allclose(smooth_scales(x, w, 1.0), torch.tensor([4.0, 1.0, 1.0, 1.0, 2.0]))
    # with alpha 0.5 the smoothed maxima of x / s and w * s are equal
    s = smooth_scales(x, w, 0.5)
    live = (x > 0) & (w > 0)
    assert torch.allclose((x / s)[live], (w * s)[live])


def test_smoothing_is_exact_in_float_and_balances_each_group():
    model = outlier_llama()
    ref = copy.deepcopy(model)
    batches = [calib()]
    ids = calib(2, 24, seed=5)
    summary = smooth_model(model, list(model.model.layers), batches, alpha=0.5)
    assert summary["groups"] == 8  # 4 groups per block (o_proj's tied across the query heads of a kv head)
    assert summary["max_scale"] > 3.0  # the outlier channels were scaled
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-5
    # weights and norms did change
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)

    # the formula, read back: with alpha 0.5, for every channel of every norm-fed group, the new activation
    # maximum equals the new weight maximum (both sqrt(max|x| max|w|) of the original model)
    for layer in model.model.layers:
        groups, _ = scale_groups(layer, describe(model))
        for g in groups:
            if g.prev_kind != "norm":
                continue
            x_max = _input_absmax(model, [g.linears[0]], batches)[id(g.linears[0])]
            w_max = torch.stack([lin.weight.abs().amax(0) for lin in g.linears]).amax(0)
            assert torch.allclose(x_max, w_max, rtol=1e-4), g.key


def test_smoothquant_reduces_w8a8_error_and_keeps_the_stored_format():
    model = outlier_llama()
    ids = calib(2, 24, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    plain = qexport.quantize(copy.deepcopy(model), "w8a8-dynamic")
    smoothed = qexport.quantize(copy.deepcopy(model), "w8a8-dynamic-sq", calibration=calib())
    layers = [m for m in smoothed.modules() if isinstance(m, QLinear)]
    assert len(layers) == 14 and all(m.act_spec == PER_TOKEN and m.spec == W8 for m in layers)
    assert smoothed.qexport_report.recipe["algorithm"] == "smoothquant"
    with torch.no_grad():
        err_plain = float((plain(ids).logits - ref).pow(2).mean())
        err_sq = float((smoothed(ids).logits - ref).pow(2).mean())
    assert err_sq < 0.5 * err_plain, (err_sq, err_plain)


def test_static_smoothquant_calibrates_and_reduces_error():
    model = outlier_llama()
    ids = calib(2, 24, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    batches = [calib(1, 32, seed=s) for s in range(2)]
    plain = qexport.quantize(copy.deepcopy(model), "w8a8-static")
    qexport.calibrate(plain, batches)
    smoothed = qexport.quantize(copy.deepcopy(model), "w8a8-static-sq", calibration=torch.cat(batches))
    qexport.calibrate(smoothed, batches)
    with torch.no_grad():
        err_plain = float((plain(ids).logits - ref).pow(2).mean())
        err_sq = float((smoothed(ids).logits - ref).pow(2).mean())
    assert err_sq < 0.5 * err_plain, (err_sq, err_plain)


def test_option_validation():
    rules = (Rule("*", W8, PER_TOKEN),)
    assert Recipe(name="r", rules=rules, algorithm="smoothquant").options["alpha"] == 0.5
    assert Recipe(name="r", rules=rules, algorithm="smoothquant", options={"alpha": 1}).options["alpha"] == 1.0
    with pytest.raises(InvalidConfig, match=r"option 'alpha' .* must be in \[0.0, 1.0\], got 1.5"):
        Recipe(name="r", rules=rules, algorithm="smoothquant", options={"alpha": 1.5})
    with pytest.raises(InvalidConfig, match="option 'alpha' .* must be a number"):
        Recipe(name="r", rules=rules, algorithm="smoothquant", options={"alpha": "high"})
    with pytest.raises(InvalidConfig, match=r"unknown option\(s\) \['n_grid'\] for algorithm 'smoothquant'"):
        Recipe(name="r", rules=rules, algorithm="smoothquant", options={"n_grid": 4})
    with pytest.raises(InvalidConfig, match="no rule quantizes activations"):
        Recipe(name="r", rules=(Rule("*", W8),), algorithm="smoothquant")
    with pytest.raises(InvalidConfig, match="need symmetric per-channel or per-tensor int8"):
        Recipe(name="r", rules=(Rule("*", QuantSpec(bits=4, group_size=32), PER_TOKEN),), algorithm="smoothquant")
    # the presets round-trip through JSON with their options
    for name in ("w8a8-dynamic-sq", "w8a8-static-sq"):
        r = get_preset(name)
        assert r is PRESETS[name] and r.algorithm == "smoothquant" and r.needs_data
        assert Recipe.from_dict(r.to_dict()) == r


def test_smoothquant_needs_a_family_of_the_architecture_table():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(UnsupportedOp,
                       match="algorithm 'smoothquant' needs the decoder layout of Sequential .*use algorithm 'rtn'"):
        qexport.quantize(model, Recipe(name="r", rules=(Rule("*", W8, PER_TOKEN),), algorithm="smoothquant"),
                         calibration=torch.randn(4, 8))


def test_compile_backend_runs_a_smoothed_model_like_eager():
    torch._dynamo.reset()
    model = qexport.quantize(outlier_llama(), "w8a8-dynamic-sq", calibration=calib())
    ids = calib(1, 16, seed=7)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="qexport", options={"recipe": "w8a8-dynamic", "target": "eager"})
        out = compiled(ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    # the calibrated recipe itself is refused, with a pointer to quantize() then compile
    with pytest.raises(InvalidConfig, match=r"qexport.quantize\(model, recipe, calibration=\.\.\.\)"):
        BackendOptions.from_dict({"recipe": "w8a8-dynamic-sq"})


def test_onnx_export_of_a_smoothed_model_matches_torch(tmp_path):
    # one preset: the lowering of a smoothed model is that of any W8A8 model (tests/test_export.py covers the
    # static one); what is checked here is that nothing the smoothing changed escapes the export
    preset = "w8a8-dynamic-sq"
    pytest.importorskip("onnxruntime")
    from qexport.export import export_onnx, verify

    from tiny import word_tokenizer

    batches = [calib(1, 32, seed=s) for s in range(2)]
    model = qexport.quantize(outlier_llama(), preset, calibration=torch.cat(batches))
    if get_preset(preset).needs_calibration:
        qexport.calibrate(model, batches)
    folder = export_onnx(model, tmp_path / preset, None, word_tokenizer()).path  # quantized already: as it is
    res = verify(folder, reference=model, session_config={"session.qdq_matmulnbits_accuracy_level": "0"},
                 decode_steps=2)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res
