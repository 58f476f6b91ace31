"""LLM.int8() (qexport.llm_int8): config, reference numerics against a plain float implementation of the
decomposition, the eager module, the compile back-end (eager and ONNX Runtime targets), the ONNX export and
its TensorRT refusal, the float fallback of the lowering, and outlier counting.

Tolerances: the int8 part is exact integer arithmetic in both implementations, so results differ only by
float32 rounding of the scale products and of the float matmul (relative 1e-5 against float64); ONNX Runtime
against PyTorch: 1e-4 absolute on O(1) logits, as for the other W8A8 lowerings.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch

import qexport
import qexport.backend as B
from qexport import QLinear, QuantSpec, Recipe, Rule
from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.llm_int8 import outlier_columns, outlier_mask
from qexport.presets import PRESETS

from tiny import tiny_llama, word_tokenizer

Q = torch.ops.qexport
PRESET = "w8a8-llmint8"
IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
GATE_COL, QKV_COL = 5, 9  # planted outlier input columns of gate/up_proj and of q/k/v_proj


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def planted_llama(seed: int = 7, layers: int = 2):
    """A tiny Llama whose norms scale one hidden column by 40: that input column of q/k/v_proj and of
    gate/up_proj holds values far above 6 on every token, as LLM.int8()'s 'emergent features' do."""
    model = tiny_llama(seed=seed)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[QKV_COL] = 40.0
            layer.post_attention_layernorm.weight[GATE_COL] = 40.0
    return model


def int8_weight(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, 1, generator=g) * 0.02 + 0.001) * torch.where(torch.rand(n, 1, generator=g) < 0.5, -1, 1)
    return wq, scale


def float_reference(x, wq, scale, bias, threshold):
    """LLM.int8() written out plainly in float64: outlier columns times the dequantized weight, the rest
    fake-quantized per token (symmetric, absmax / 127) times the same weight."""
    x = x.double().reshape(-1, x.shape[-1])
    w = wq.double() * scale.double().reshape(-1, 1)
    outliers = (x.abs() >= threshold).any(dim=0)
    regular = torch.where(outliers, torch.zeros_like(x), x)
    s = (regular.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    regular_q = torch.clamp(torch.round(regular / s), -128, 127) * s
    x_out = torch.where(outliers, x, torch.zeros_like(x))
    y = regular_q @ w.t() + x_out @ w.t()
    return y if bias is None else y + bias.double()


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
def test_preset_and_spec_validation():
    r = PRESETS[PRESET]
    act = r.rules[0].activation
    assert act.outlier_threshold == 6.0 and act.dynamic and not r.needs_calibration
    assert act.describe() == "int8 per-token sym dynamic llm.int8 outliers>=6"
    d = json.loads(json.dumps(r.to_dict()))
    assert d["rules"][0]["activation"]["outlier_threshold"] == 6.0 and Recipe.from_dict(d) == r
    assert "outlier_threshold" not in PRESETS["w8a8-dynamic"].to_dict()["rules"][0]["activation"]
    inf = QuantSpec(bits=8, granularity="per_token", dynamic=True, outlier_threshold=math.inf)
    assert QuantSpec.from_dict(json.loads(json.dumps(inf.to_dict()))) == inf
    for bad in (0, -1.0, float("nan"), "6", True):
        with pytest.raises(InvalidConfig, match="outlier_threshold must be a number > 0"):
            QuantSpec(bits=8, granularity="per_token", dynamic=True, outlier_threshold=bad)
    with pytest.raises(InvalidConfig, match="per-token dynamic"):
        QuantSpec(bits=8, granularity="per_tensor", outlier_threshold=6.0)
    with pytest.raises(InvalidConfig, match="per-token dynamic"):
        QuantSpec(bits=8, granularity="per_tensor", dynamic=True, outlier_threshold=6.0)
    with pytest.raises(InvalidConfig, match="not weights"):
        Rule("*", QuantSpec(bits=8, granularity="per_token", dynamic=True, outlier_threshold=6.0))


# ----------------------------------------------------------------------------------------------------
# Reference numerics
# ----------------------------------------------------------------------------------------------------
def planted_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 48, generator=g)
    x[1, 2, 7] = 50.123  # one token: its whole column is an outlier column, for every token
    x[:, :, 30] = -8.5 + torch.rand(2, 5, generator=g)  # a column that is large everywhere
    return x


def test_matches_float_reference_and_outliers_are_float():
    x = planted_input()
    wq, scale = int8_weight(24, 48)
    bias = torch.randn(24)
    assert outlier_mask(x, 6.0).nonzero().flatten().tolist() == [7, 30]
    got = Q.qlinear_llm_int8(x, wq, scale, bias, 6.0)
    want = float_reference(x, wq, scale, bias, 6.0).reshape(got.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    # The outlier columns really go through the float path: with them removed from the input, the result
    # changes by exactly their float product (no int8 rounding of x[..., 7] = 50.123)
    w = wq.double() * scale.double()
    x_wo = x.clone()
    x_wo[..., [7, 30]] = 0.0
    delta = got.double() - Q.qlinear_llm_int8(x_wo, wq, scale, bias, 6.0).double()
    # x_wo has no outlier column, but its regular part is the same, so the int8 part is identical
    torch.testing.assert_close(delta, x[..., [7, 30]].double() @ w[:, [7, 30]].t(), rtol=1e-5, atol=1e-5)

    # and that is what makes it better than plain per-token W8A8, where 50.123 sets the token's scale
    exact = x.double() @ w.t() + bias.double()
    plain = Q.qlinear_llm_int8(x, wq, scale, bias, math.inf)
    assert sqnr(exact, got.double()) > sqnr(exact, plain.double()) + 10


def test_threshold_inf_is_plain_per_token_w8a8_and_tiny_threshold_is_float():
    x = planted_input()
    wq, scale = int8_weight(24, 48, seed=1)
    xq, xs = Q.quantize_per_token(x)
    w8a8 = Q.qlinear_a8(xq, xs, 0, wq, scale, None)
    torch.testing.assert_close(Q.qlinear_llm_int8(x, wq, scale, None, math.inf), w8a8, rtol=0, atol=0)
    # a threshold below every |x|: every column is an outlier, the layer is a float matmul
    w = wq.float() * scale
    torch.testing.assert_close(Q.qlinear_llm_int8(x, wq, scale, None, 1e-30), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_outlier_columns_are_chosen_over_all_tokens_of_the_call():
    x = planted_input()
    wq, scale = int8_weight(24, 48, seed=2)
    whole = Q.qlinear_llm_int8(x, wq, scale, None, 6.0)
    # the first batch row alone has no outlier in column 7 (it is in row 1): its column 7 is int8 then
    alone = Q.qlinear_llm_int8(x[:1], wq, scale, None, 6.0)
    assert outlier_mask(x[:1], 6.0).nonzero().flatten().tolist() == [30]
    assert not torch.equal(alone, whole[:1])
    torch.testing.assert_close(alone.double(), float_reference(x[:1], wq, scale, None, 6.0).reshape(alone.shape),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Eager module and outlier counting
# ----------------------------------------------------------------------------------------------------
def test_quantized_llama_is_closer_to_float_than_w8a8_dynamic():
    model = planted_llama()
    q = qexport.quantize(copy.deepcopy(model), PRESET)
    down = q.model.layers[0].mlp.gate_proj
    assert isinstance(down, QLinear) and down.act_spec.outlier_threshold == 6.0
    assert all(layer.spec.endswith("llm.int8 outliers>=6") for layer in q.qexport_report.quantized)
    # each QLinear computes the float reference decomposition of its stored weight on its real input
    seen = {}
    h = down.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        got = q(IDS).logits
        fp = model(IDS).logits
        dyn = qexport.quantize(copy.deepcopy(model), "w8a8-dynamic")(IDS).logits
    h.remove()
    assert outlier_mask(seen["x"], 6.0).nonzero().flatten().tolist() == [GATE_COL]
    want = float_reference(seen["x"], down.qdata, down.scale, None, 6.0).reshape(seen["y"].shape)
    torch.testing.assert_close(seen["y"].double(), want, rtol=1e-5, atol=1e-5)
    assert sqnr(fp, got) > sqnr(fp, dyn) + 6, (sqnr(fp, got), sqnr(fp, dyn))


def test_outlier_columns_counts_planted_columns():
    model = planted_llama()
    stats = outlier_columns(model, [IDS[:1], IDS[1:]], thresholds=(6.0, math.inf, 1e-30))
    assert stats.calls["model.layers.0.mlp.gate_proj"] == 2 and "lm_head" not in stats.calls
    for i in range(2):
        for name, col in (("self_attn.q_proj", QKV_COL), ("mlp.up_proj", GATE_COL)):
            layer = f"model.layers.{i}.{name}"
            assert stats.mean(layer, 6.0) >= 1  # the planted column
            assert stats.mean(layer, math.inf) == 0 and stats.mean(layer, 1e-30) == stats.in_features[layer]
    # the same counts through a quantized model (the hooks read QLinear inputs too)
    q = qexport.quantize(copy.deepcopy(model), PRESET)
    qstats = outlier_columns(q, [IDS[:1], IDS[1:]], thresholds=(6.0,))
    assert qstats.mean("model.layers.0.self_attn.q_proj", 6.0) == stats.mean("model.layers.0.self_attn.q_proj", 6.0)
    assert stats.to_dict()["layers"]["model.layers.0.mlp.up_proj"]["in_features"] == 64


# ----------------------------------------------------------------------------------------------------
# Compile back-end
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("target", ["eager", "onnxruntime"])
def test_compiled_matches_eager(target, _reset_dynamo):
    if target == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = planted_llama(seed=12, layers=1)
    eager = qexport.quantize(copy.deepcopy(model), PRESET)
    c = torch.compile(copy.deepcopy(model), backend="qexport", options={"recipe": PRESET, "target": target})
    with torch.no_grad():
        got, want = c(IDS).logits, eager(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4 if target == "onnxruntime" else 0,
                               rtol=1e-4 if target == "onnxruntime" else 0)
    assert B.reports()[-1].counts()["convert"] == {"llm_int8": 7, "layers": 7}
    if target == "onnxruntime":
        graph = [g for g in B._LIVE if g.report is B.reports()[-1]][0].compiled
        report = graph.reports[-1]
        assert report.llm_int8 == 7 and report.matmulinteger == 0 and not report.float_fallback


def test_ort_target_falls_back_to_float_when_the_decomposition_cannot_be_built(monkeypatch, _reset_dynamo):
    pytest.importorskip("onnxruntime")
    import qexport.lowering.llm_int8 as L

    def refuse(name, *args, **kwargs):
        raise UnsupportedOp(f"{name}: planted failure")

    monkeypatch.setattr(L, "llm_int8_nodes", refuse)
    model = planted_llama(seed=13, layers=1)
    c = torch.compile(copy.deepcopy(model), backend="qexport", options={"recipe": PRESET, "target": "onnxruntime"})
    with pytest.warns(UserWarning, match="stays float: LLM.int8.. decomposition not lowered"):
        with torch.no_grad():
            got = c(IDS).logits
    graph = [g for g in B._LIVE if g.report is B.reports()[-1]][0].compiled
    report = graph.reports[-1]
    assert report.llm_int8 == 0 and len(report.float_fallback) == 7
    assert all("planted failure" in reason for _, reason in report.float_fallback)
    # float MatMul of the dequantized int8 weight: the weight-only int8 model
    with torch.no_grad():
        want = qexport.quantize(copy.deepcopy(model), "w8")(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# ONNX export
# ----------------------------------------------------------------------------------------------------
def test_onnx_export_runs_in_ort_and_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from qexport.export import OnnxCausalLM, export_onnx, verify

    tok = word_tokenizer()
    model = planted_llama(seed=14, layers=1)
    folder = export_onnx(model, tmp_path / "llmint8", PRESET, tok, attention_form="standard").path
    reference = qexport.quantize(copy.deepcopy(model), PRESET)
    res = verify(folder, reference=reference, decode_steps=3)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res

    report = json.loads((folder / "export_report.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["model.layers.0.mlp.up_proj"]["onnx"].startswith("LLM.int8(): outlier columns (|x| >= 6)")
    assert not report["float_fallback"]
    graph = onnx.load(str(folder / "model.onnx")).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulInteger"] == 7 and ops["NonZero"] == 7 and ops["Where"] >= 7
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)  # standard ONNX only
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) == 7  # each weight stored once, as int8
    # ONNX Runtime fuses the int8 part into MatMulIntegerToFloat
    so = OnnxCausalLM(folder).session_options
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert fused["MatMulIntegerToFloat"] == 7, fused


def test_tensorrt_target_refuses_llm_int8(tmp_path):
    from qexport.export import export_onnx

    with pytest.raises(UnsupportedOp, match=r"LLM.int8\(\) quantizes activations at run time.*w8a8-static"):
        export_onnx(planted_llama(layers=1), tmp_path / "trt", PRESET, word_tokenizer(), target="tensorrt")
    assert not (tmp_path / "trt").exists()
