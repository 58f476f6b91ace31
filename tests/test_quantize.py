"""Eager quantization: module replacement, numerics against fake-quant, reports and size accounting."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import qexport
from qexport import QEmbedding, QLinear, QuantSpec, Recipe, Rule
from qexport.errors import InvalidConfig, InvalidTensor
from qexport.formats import fake_quantize
from qexport.presets import PRESETS

from tiny import tiny_llama

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def fake_quant_reference(model, recipe):
    """A float copy whose quantizable weights are replaced by dequantize(quantize(w))."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            rule = recipe.rule_for(name, embedding=isinstance(mod, nn.Embedding))
            if rule is not None and rule.weight is not None:
                mod.weight.data = fake_quantize(mod.weight.data, rule.weight)
    return ref


# the presets that quantize weights only, without calibration data
WEIGHT_ONLY = sorted(n for n, r in PRESETS.items() if not r.needs_data and all(rl.activation is None for rl in r.rules))


@pytest.mark.parametrize("preset", WEIGHT_ONLY)
def test_preset_replaces_linears_and_matches_fake_quant(preset):
    model = tiny_llama()
    ids = torch.randint(0, 512, (2, 33))
    recipe = PRESETS[preset]
    ref = fake_quant_reference(model, recipe)
    q = qexport.quantize(copy.deepcopy(model), preset)

    qlinears = [n for n, m in q.named_modules() if isinstance(m, QLinear)]
    head = recipe.rule_for("lm_head") is not None  # w4g128-head8 quantizes lm_head (int8) too
    assert len(qlinears) == 2 * LINEARS_PER_LAYER + head
    assert isinstance(q.lm_head, QLinear) == head and isinstance(q.lm_head, nn.Linear) != head
    emb = recipe.rule_for("model.embed_tokens", embedding=True) is not None  # w4g64-sym-emb8 quantizes the table
    assert isinstance(q.model.embed_tokens, QEmbedding) == emb and isinstance(q.model.embed_tokens, nn.Embedding) != emb
    report = q.qexport_report
    assert len(report.quantized) == 2 * LINEARS_PER_LAYER + head + emb
    if head:
        assert report.kept_float == [] and q.lm_head.spec.bits == 8
    else:
        assert [layer.name for layer in report.kept_float] == ["lm_head"]
        assert report.kept_float[0].reason == "excluded by recipe"

    with torch.no_grad():
        got = q(ids).logits
        want = ref(ids).logits
        fp = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # and quantization really changed something (random weights are not on any grid)
    assert (got - fp).abs().max() > 1e-6


def test_stored_tensors_are_packed_integers():
    model = tiny_llama()
    qexport.quantize(model, "w4g128")
    layer = model.model.layers[0].mlp.down_proj  # [64, 160]: K=160 -> groups 128 + partial 32
    assert layer.qdata.dtype == torch.uint8 and layer.qdata.shape == (64, 80)
    assert layer.scale.shape == (64, 2)
    assert layer.zero_point.dtype == torch.uint8 and layer.zero_point.shape == (64, 1)
    assert not any(p.is_floating_point() and p.numel() >= 64 * 160 for p in layer.buffers())
    sd = model.state_dict()
    assert "model.layers.0.mlp.down_proj.qdata" in sd
    assert "model.layers.0.mlp.down_proj.weight" not in sd


def test_size_accounting_formula():
    model = tiny_llama()
    fp_total = qexport.model_size(model).total_bytes
    assert fp_total == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    qexport.quantize(model, "w8")
    size = qexport.model_size(model)
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QLinear)]
    # int8 codes + one fp32 scale per output row
    assert size.quantized_bytes == sum(n * k + 4 * n for n, k in shapes)
    assert size.quantized_fp16_bytes == sum(2 * n * k for n, k in shapes)
    assert size.quantized_params == sum(n * k for n, k in shapes)
    assert size.total_bytes == size.quantized_bytes + size.float_bytes
    assert size.total_bytes < fp_total


def test_tied_embeddings_counted_once():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    size = qexport.model_size(model)
    distinct = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    assert size.total_bytes == sum(distinct.values()) + sum(b.numel() * b.element_size() for b in model.buffers())


def test_mixed_recipe_and_float_rule():
    recipe = Recipe(
        name="mixed",
        rules=(
            Rule("*.self_attn.o_proj", None),  # keep float
            Rule("*.self_attn.*", QuantSpec(bits=8)),
            Rule("re:.*\\.mlp\\.(gate|up)_proj", QuantSpec(bits=4, group_size=32)),
            Rule("*.mlp.down_proj", QuantSpec(bits=2, group_size=16, symmetric=False)),
        ),
    )
    model = qexport.quantize(tiny_llama(), recipe)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.o_proj, nn.Linear) and not isinstance(layer.self_attn.o_proj, QLinear)
    assert layer.self_attn.q_proj.spec.bits == 8
    assert layer.mlp.up_proj.spec.group_size == 32
    assert layer.mlp.down_proj.spec.bits == 2
    reasons = {r.name: r.reason for r in model.qexport_report.kept_float}
    assert reasons["model.layers.1.self_attn.o_proj"] == "recipe keeps it float"


def test_recipe_from_json_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(PRESETS["w4g64"].to_dict()))
    model = qexport.quantize(tiny_llama(), str(path))
    assert model.model.layers[0].self_attn.q_proj.spec == PRESETS["w4g64"].rules[0].weight


def test_nan_weight_layer_falls_back_to_float_with_warning():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.warns(UserWarning, match="model.layers.0.mlp.up_proj stays float"):
        qexport.quantize(model, "w8")
    assert not isinstance(model.model.layers[0].mlp.up_proj, QLinear)
    entry = {r.name: r for r in model.qexport_report.kept_float}["model.layers.0.mlp.up_proj"]
    assert "NaN" in entry.reason
    assert isinstance(model.model.layers[0].mlp.gate_proj, QLinear)


def test_qlinear_with_bias_and_bad_input():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=True)
    spec = QuantSpec(bits=4, group_size=16)
    q = QLinear.from_linear(lin, spec)
    x = torch.randn(3, 5, 40)
    want = torch.nn.functional.linear(x, fake_quantize(lin.weight.data, spec), lin.bias)
    torch.testing.assert_close(q(x), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(InvalidTensor, match=r"\[\.\.\., 40\]"):
        q(torch.randn(3, 41))


def test_quantize_rejects_non_module():
    with pytest.raises(InvalidConfig, match="nn.Module"):
        qexport.quantize("not a model", "w8")


def test_greedy_generation_with_kv_cache_matches_fake_quant():
    model = tiny_llama(seed=1)
    ref = fake_quant_reference(model, PRESETS["w4g128"])
    q = qexport.quantize(copy.deepcopy(model), "w4g128")
    ids = torch.randint(3, 512, (1, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(q.generate(ids, **kw), ref.generate(ids, **kw), atol=0, rtol=0)


def test_quantize_is_idempotent():
    model = qexport.quantize(tiny_llama(), "w8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qexport.quantize(model, "w8")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def fake_quant_activations(model, scales=None):
    """Forward pre-hooks on every linear but lm_head: symmetric int8 fake-quant of the input, per token
    (scale = max|row| / 127) or, when ``scales`` maps names to a scale, per tensor with that scale."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            def hook(m, args, name=name):
                x = args[0]
                s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30) if scales is None else scales[name]
                return (torch.round(x / s).clamp(-128, 127) * s,)
            mod.register_forward_pre_hook(hook)
    return model


def sqnr_db(ref, got):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def test_w8a8_dynamic_matches_fake_quant_reference():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 512, (2, 40))
    ref = fake_quant_activations(fake_quant_reference(model, PRESETS["w8a8-dynamic"]))
    q = qexport.quantize(copy.deepcopy(model), "w8a8-dynamic")
    assert q.model.layers[0].mlp.up_proj.act_spec.dynamic
    with torch.no_grad():
        got, want = q(ids).logits, ref(ids).logits
    # integer accumulation vs float sums of the same fake-quant values: equal up to float rounding
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_w8a8_static_needs_calibration_then_matches_reference():
    from qexport.errors import CalibrationError

    model = tiny_llama(seed=4)
    calib = [torch.randint(0, 512, (1, 32)) for _ in range(3)]
    q = qexport.quantize(copy.deepcopy(model), "w8a8-static")
    with pytest.raises(CalibrationError, match="calibrate"):
        q(calib[0])
    with pytest.raises(CalibrationError, match="empty"):
        qexport.calibrate(q, [])
    assert qexport.calibrate(q, calib) == 3

    # reference: the absmax of each linear's input over the calibration batches, on the fake-quant model
    ref = fake_quant_reference(model, PRESETS["w8a8-static"])
    absmax = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: absmax.__setitem__(n, max(absmax.get(n, 0.0),
                                                                                      float(a[0].abs().max()))))
             for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for b in calib:
            ref(b)
    for h in hooks:
        h.remove()
    for n, m in q.named_modules():
        if isinstance(m, QLinear):
            assert float(m.act_scale) == pytest.approx(absmax[n] / 127, rel=1e-6)
    fake_quant_activations(ref, {n: v / 127 for n, v in absmax.items()})
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)
        assert sqnr_db(model(ids).logits, q(ids).logits) > 25


def test_static_fallback_ratio_keeps_outlier_dominated_inputs_float():
    """A layer whose calibrated input range is set by one massive token keeps float activations (weights int8)
    when the range passes static_fallback_ratio x the median token's; the others are calibrated as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    act = QuantSpec(bits=8, granularity="per_tensor", static_fallback_ratio=50)
    recipe = Recipe("static-fb", rules=(Rule("*", QuantSpec(bits=8), act),))
    batches = [torch.randn(1, 64, 16) for _ in range(2)]
    batches[1][0, 5] *= 300  # one token, 300x: it alone would set layer 0's scale
    q = qexport.quantize(copy.deepcopy(model), recipe)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) keep float activations \(static_fallback_ratio\): 0: "):
        qexport.calibrate(q, batches)
    first, last = q[0], q[2]
    assert first.act_spec is None and "static_fallback_ratio 50" in first.activation_fallback
    assert "0.act_scale" not in q.state_dict() and "2.act_scale" in q.state_dict()
    assert last.calibrated and last.activation_fallback is None  # LayerNorm output: no token dominates
    x = torch.randn(3, 16)
    with torch.no_grad():  # the fallen-back layer is exactly the weight-only int8 layer
        torch.testing.assert_close(first(x), x @ first.dequantized_weight().T + first.bias, atol=1e-5, rtol=0)
    rows = {layer.name: layer for layer in q.qexport_report.layers}
    assert rows["0"].spec.endswith("activations float") and "median token" in rows["0"].reason
    assert rows["2"].reason == ""
    plain = qexport.quantize(copy.deepcopy(model), Recipe("static", rules=(Rule("*", QuantSpec(bits=8), QuantSpec(
        bits=8, granularity="per_tensor")),)))
    qexport.calibrate(plain, batches)
    assert plain[0].calibrated and plain[2].calibrated
    # the spec: validated, in JSON only when set
    assert QuantSpec.from_dict(act.to_dict()) == act and "static_fallback_ratio" not in QuantSpec(bits=8).to_dict()
    for bad in (1, 0.5, float("inf"), True, "16"):
        with pytest.raises(InvalidConfig, match="static_fallback_ratio must be"):
            QuantSpec(bits=8, granularity="per_tensor", static_fallback_ratio=bad)
    with pytest.raises(InvalidConfig, match="not dynamic ones"):
        QuantSpec(bits=8, granularity="per_token", dynamic=True, static_fallback_ratio=16)


def test_calibrate_rejects_models_without_static_layers():
    from qexport.errors import CalibrationError

    with pytest.raises(CalibrationError, match="nothing to calibrate"):
        qexport.calibrate(qexport.quantize(tiny_llama(), "w8"), [torch.zeros(1, 4, dtype=torch.long)])
