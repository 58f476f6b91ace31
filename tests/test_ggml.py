"""llama.cpp's GGML block formats (qexport.ggml): the bytes dequantize bit for bit as gguf's own dequantizer
does, round to nearest matches gguf's quantizer where it has one, GPTQ fills the same blocks, and models
quantized to these formats save, load and run on every back-end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport import ggml
from qexport.algorithms.gptq import gptq_quantize
from qexport.config import QuantSpec
from qexport.errors import InvalidConfig, InvalidTensor
from qexport.formats import quantize_weight, stored_layout

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # noqa: E402

TYPES = list(ggml.GGML_TYPES)


def _weight(n: int = 12, k: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with the cases blocks meet: an all-zero block, an outlier, all-positive and all-negative
    blocks, a constant block, and a row of tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :256] = 0.0
    w[1, 7] = 4.0
    w[2, :256] = w[2, :256].abs() + 0.01
    w[3, 256:] = -w[3, 256:].abs() - 0.02
    w[4, :32] = 0.3
    w[5] = w[5] * 1e-4
    return w


def _gguf_dequantize(data: torch.Tensor, t: ggml.GgmlType, shape) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data.numpy(), GGMLQuantizationType(t.ggml_id)).reshape(shape).copy())


@pytest.mark.parametrize("name", TYPES)
def test_blocks_dequantize_bit_identical_to_gguf(name):
    t = ggml.ggml_type(name)
    assert GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_id)] == (t.block, t.type_size)
    w = _weight()
    data = ggml.quantize(w, t)
    assert data.dtype == torch.uint8 and tuple(data.shape) == (12, 512 // t.block * t.type_size)
    ours = ggml.dequantize(data, t, 512)
    ref = _gguf_dequantize(data, t, w.shape)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # bit for bit, signs of zeros included
    assert torch.equal(ggml.encode(t, ggml.decode(t, data)), data)
    # round to nearest is close: relative RMS error per type (Gaussian rows)
    err = float((ours - w)[6:].pow(2).mean().sqrt() / w[6:].std())
    assert err < {"q8_0": 0.012, "q6_k": 0.04, "q5_0": 0.07, "q4_0": 0.11, "q4_1": 0.12, "iq4_nl": 0.1,
                  "q4_k": 0.12, "q3_k": 0.2, "q2_k": 0.35}[name], err


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0"])
def test_round_to_nearest_matches_ggufs_quantizer(name):
    """gguf's Python quantizers reproduce llama.cpp's reference ones for these types. qexport rounds against
    the fp16 scale it stores (gguf against the unrounded one), so a few codes may differ, never the error."""
    t = ggml.ggml_type(name)
    w = _weight(seed=3)
    ours = ggml.quantize(w, t)
    theirs = torch.from_numpy(quants.quantize(w.numpy(), GGMLQuantizationType(t.ggml_id)).copy())
    assert ours.shape == theirs.shape
    a, b = ggml.decode(t, ours), ggml.decode(t, theirs)
    assert torch.equal(a.d, b.d) and (a.dmin is None or torch.equal(a.dmin, b.dmin))  # the same fp16 scales
    # codes differ by at most one step, except in the row of tiny values (fp16 subnormal scales, far from
    # their float32 value: gguf's codes for the unrounded scale then miss by many steps, and err more)
    normal = torch.ones(12, dtype=torch.bool)
    normal[5] = False
    diff = (a.q - b.q)[normal]
    assert int(diff.abs().max()) <= 1 and float((diff != 0).float().mean()) < 0.1
    e_ours = (ggml.dequantize(ours, t) - w).pow(2).sum()
    e_theirs = (_gguf_dequantize(theirs, t, w.shape) - w).pow(2).sum()
    assert e_ours <= e_theirs * 1.0001


def test_decoded_fields_follow_the_documented_formulas():
    """Q4_K by hand: ``w = d * sc * q - dmin * m`` per sub-block of 32, from the decoded fields."""
    t = ggml.ggml_type("q4_k")
    w = _weight()[:2, :256]
    blk = ggml.decode(t, ggml.quantize(w, t))
    d, dmin = blk.d[..., None, None], blk.dmin[..., None, None]
    q = blk.q.reshape(2, 1, 8, 32).float()
    expect = (d * blk.sc[..., None].float()) * q - dmin * blk.m[..., None].float()
    assert torch.equal(expect.reshape(2, 256), ggml.dequantize(ggml.encode(t, blk), t))
    assert int(blk.sc.max()) <= 63 and int(blk.m.max()) <= 63 and int(blk.q.max()) <= 15


def test_q3_k_fields_follow_the_documented_formula():
    """Q3_K by hand: ``w = d * (sc - 32) * (q - 4)`` per sub-block of 16; the block's extreme sub-block scale
    takes the 6-bit scale's extra level, -32, as llama.cpp's quantizer puts it."""
    t = ggml.ggml_type("q3_k")
    w = _weight()[:, :256]
    blk = ggml.decode(t, ggml.quantize(w, t))
    q = blk.q.reshape(12, 1, 16, 16).float()
    expect = (blk.d[..., None, None] * blk.sc[..., None].float()) * (q - 4)
    assert torch.equal(expect.reshape(12, 256), ggml.dequantize(ggml.encode(t, blk), t))
    assert int(blk.sc.min()) >= -32 and int(blk.sc.max()) <= 31 and int(blk.q.max()) <= 7
    nonzero = blk.d.squeeze(-1) != 0
    assert bool((blk.sc.amin((-2, -1))[nonzero] == -32).all())


def test_specs_take_their_fields_from_the_type():
    s = QuantSpec(format="q4_k")
    assert (s.bits, s.group_size, s.symmetric, s.describe()) == (4, 256, False, "q4_k")
    assert QuantSpec.from_dict(s.to_dict()) == s
    assert QuantSpec(format="q6_k", observer="mse").describe() == "q6_k mse"
    for bad, words in ((dict(format="q4_k", group_size=128), "blocks of 256"),
                       (dict(format="q4_0", bits=2), "4-bit codes"),
                       (dict(format="q8_0", symmetric=False), "symmetric"),
                       (dict(format="q4_0", dynamic=True), "dynamic")):
        with pytest.raises(InvalidConfig, match=words):
            QuantSpec(**bad)


@pytest.mark.parametrize("name, k, stored", [("q4_k", 512, "q4_k"), ("q4_k", 576, "q5_0"), ("q6_k", 576, "q8_0"),
                                             ("q2_k", 576, "q4_0"), ("q3_k", 576, "q4_0"),
                                             ("q4_0", 576, "q4_0")])
def test_k_quants_fall_back_as_llama_cpp_does(name, k, stored):
    w = _weight(k=1024)[:4, :k]
    qw = quantize_weight(w, QuantSpec(format=name, observer="mse"))
    assert qw.spec.format.value == stored and qw.spec.observer.value == "mse"
    t = ggml.ggml_type(stored)
    assert stored_layout(QuantSpec(format=name), (4, k)) == {"qdata": (torch.uint8, (4, k // t.block * t.type_size))}
    assert torch.equal(qw.dequantize(), ggml.dequantize(qw.qdata, t, k))
    assert qw.scales().numel() == 0 and qw.codes().shape == (4, k)


def test_algorithms_that_search_integer_grids_refuse_ggml_formats_and_say_which_take_them():
    from qexport.config import Recipe, Rule

    for algorithm in ("gptq", "awq"):  # they take them
        Recipe("g", rules=(Rule("*", QuantSpec(format="q4_k")),), algorithm=algorithm)
    with pytest.raises(InvalidConfig, match="use algorithm 'gptq', 'awq' or 'rtn' for GGML formats"):
        Recipe("s", rules=(Rule("*", QuantSpec(format="q4_k")),), algorithm="smoothquant")


def test_a_row_no_type_fits_is_refused_with_the_way_out():
    with pytest.raises(InvalidTensor, match="keep this layer in float"):
        quantize_weight(torch.randn(4, 48), QuantSpec(format="q4_k"), name="model.layers.0.mlp.down_proj")


def test_fp16_overflow_is_refused():
    with pytest.raises(InvalidTensor, match="fp16"):
        ggml.quantize(torch.full((1, 32), 1e7), "q8_0")


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(name, act_order):
    """With H = I no error is propagated, so GPTQ must store exactly the round-to-nearest bytes."""
    w = _weight(seed=5)[:8]
    spec = QuantSpec(format=name, observer="mse")
    qw, deq = gptq_quantize(w, torch.eye(512), spec, act_order=act_order)
    assert torch.equal(qw.qdata, quantize_weight(w, spec).qdata)
    assert torch.equal(deq, qw.dequantize())


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k", "q6_k", "q4_0"])
def test_gptq_lowers_the_output_error_and_keeps_its_bytes_exact(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.1 + torch.eye(256))
    w = torch.randn(16, 256, generator=g) * 0.05
    spec = QuantSpec(format=name)
    qw, deq = gptq_quantize(w, 2 * x.T @ x / x.shape[0], spec)
    assert torch.equal(deq, qw.dequantize()) and qw.spec == spec
    rtn = quantize_weight(w, spec).dequantize()
    ratio = float((x @ (deq - w).T).pow(2).mean() / (x @ (rtn - w).T).pow(2).mean())
    assert ratio < 0.75, ratio  # measured 0.49-0.57 on these seeds


def _llama256():
    from tiny import tiny_llama

    return tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=1)


def test_awq_under_a_block_format_folds_its_scales_and_rounds_with_the_formats_codec(monkeypatch):
    """AWQ with q4_k: the scales it folds leave the float model unchanged, each stored layer holds exactly the
    format's own round-to-nearest of its scaled weight, and block 0's output error is below plain q4_k's."""
    import copy

    import qexport
    from qexport.algorithms import awq
    from qexport.config import Recipe, Rule

    model = _llama256()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a few hidden channels 8x larger, as real LLMs' activations are
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(256, generator=g))
                norm.weight[torch.randperm(256, generator=g)[:8]] *= 8.0
    spec = QuantSpec(format="q4_k", observer="mse")
    rules = (Rule("model.layers.0.*", spec),)
    folded = {}
    fold = awq.fold_scales
    monkeypatch.setattr(awq, "fold_scales", lambda group, s: (folded.setdefault(group.key, group.full(s)),
                                                             fold(group, s)))
    calib = torch.randint(4, 512, (16, 32), generator=torch.Generator().manual_seed(1))
    out = qexport.quantize(copy.deepcopy(model), Recipe("a", rules=rules, algorithm="awq"), calibration=calib)
    rtn = qexport.quantize(copy.deepcopy(model), Recipe("r", rules=rules))
    assert set(folded) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}

    block, ref_block = out.model.layers[0], model.model.layers[0]
    q = block.self_attn.q_proj  # scaled once, by the attention-input scales
    expected = quantize_weight(ref_block.self_attn.q_proj.weight.detach() * folded["attn_in"][None, :], spec)
    assert q.spec.format.value == "q4_k" and torch.equal(q.qdata, expected.qdata)
    assert not torch.equal(folded["attn_in"], torch.ones(256))

    x = torch.randint(4, 512, (8, 32), generator=torch.Generator().manual_seed(2))

    def block0_out(m):
        seen = {}
        h = m.model.layers[0].register_forward_hook(lambda mod, a, o: seen.setdefault("y", o[0] if isinstance(o, tuple)
                                                                                      else o))
        with torch.no_grad():
            m(x)
        h.remove()
        return seen["y"]

    ref = block0_out(model)
    e_awq, e_rtn = (float((block0_out(m) - ref).pow(2).mean()) for m in (out, rtn))
    assert e_awq < e_rtn, (e_awq, e_rtn)


@torch.no_grad()
def test_a_gguf_preset_saves_loads_compiles_and_exports(tmp_path):
    from qexport.checkpoint import load_quantized, save_quantized
    from qexport.export.runtime import OnnxCausalLM
    from qexport.modules import QEmbedding, QLinear
    from qexport.prepare import quantize_model

    from tiny import word_tokenizer

    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    model = quantize_model(_llama256(), "gguf-q4_k")
    kinds = {name: m.spec.format.value for name, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    assert set(kinds.values()) == {"q4_k", "q8_0"} and kinds["model.embed_tokens"] == kinds["lm_head"] == "q8_0"
    ref = model(ids).logits
    loaded = load_quantized(save_quantized(model, tmp_path / "q", word_tokenizer()).path)
    assert torch.equal(loaded(ids).logits, ref)

    import qexport

    compiled = _llama256()
    compiled.forward = torch.compile(compiled.forward, backend="qexport",
                                     options={"recipe": "gguf-q4_k", "target": "inductor"})
    np.testing.assert_allclose(compiled(ids).logits.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)

    qexport.export_onnx(loaded, tmp_path / "onnx", force=True)
    got = OnnxCausalLM(tmp_path / "onnx")(ids).logits
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-3, atol=1e-3)
