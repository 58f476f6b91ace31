"""The ONNX export's GroupQueryAttention form (qexport.lowering.gqa) against its standard Attention form.

Both forms of one quantized tiny Llama run in ONNX Runtime at MatMulNBits accuracy level 0 (fp32 activations):
their logits agree within 1e-4 absolute over a prefill and decode steps through a growing cache (observed
~1e-6; the forms differ only in float summation order), the GroupQueryAttention form's shared-buffer loop
(``OnnxCausalLM.generate``, I/O binding) picks the same greedy tokens, and the graph has the nodes the form
promises. A RoPE-scaled model checks that the rotary tables come from the graph's own rotary subgraph.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from qexport.config import KVCacheSpec, QuantSpec, Recipe, Rule
from qexport.errors import InvalidConfig, UnsupportedOp

from tiny import tiny_llama, word_tokenizer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from qexport.export import OnnxCausalLM, export_onnx  # noqa: E402
from qexport.lowering.gqa import gqa_form  # noqa: E402

EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
W4 = Recipe(name="w4g32", rules=(Rule("lm_head", None), Rule("*", QuantSpec(bits=4, group_size=32))))
# int4 body and an int8 lm_head, as the w4g128-head8 preset
W4_HEAD8 = Recipe(name="w4-head8", exclude=("*embed*",), rules=(
    Rule("lm_head", QuantSpec(bits=8)), Rule("*", QuantSpec(bits=4, group_size=32))))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def run_steps(lm: OnnxCausalLM, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Last-position logits of a prefill of ``prefill`` tokens, then one decode step per remaining token."""
    past, out = lm.empty_past(1), []
    for lo, hi in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        logits, past = lm.step(ids[:, lo:hi], np.ones((1, hi), np.int64), past)
        out.append(logits[:, -1])
    return np.concatenate(out)


def ops(folder) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)


def both_forms(model, tmp_path, recipe, tok, **kw):
    std = export_onnx(model, tmp_path / "standard", recipe, tok, attention_form="standard", **kw)
    gqa = export_onnx(model, tmp_path / "gqa", recipe, tok, **kw)
    return std, gqa


def test_gqa_form_matches_the_standard_form_and_has_its_nodes(tmp_path, tok):
    std, gqa = both_forms(tiny_llama(), tmp_path, W4, tok)
    form = gqa.report["attention_form"]
    assert form["form"] == "gqa" and form["chosen"] == "auto" and form["layers"] == 2 and form["qkv_packed"] == 2
    assert std.report["attention_form"] == {"form": "standard", "op": "Attention (opset 23)", "chosen": "standard",
                                            "reason": "asked for"}
    o = ops(gqa.path)
    assert (o["GroupQueryAttention"], o["Attention"], o["RotaryEmbedding"]) == (2, 0, 0), o
    # two residual Add + norm pairs per layer (the last one is the final norm); the first norm stays standard
    assert (o["SkipSimplifiedLayerNormalization"], o["RMSNormalization"]) == (4, 1), o
    assert o["MatMul"] == 2 * 5 + 1, o  # one packed QKV + o_proj + gate / up / down per layer, the float lm_head
    assert "position_ids" not in gqa.report["inputs"] and "position_ids" in std.report["inputs"]
    a, b = OnnxCausalLM(std.path, session_config=EXACT), OnnxCausalLM(gqa.path, session_config=EXACT)
    ids = torch.randint(4, 512, (1, 20), generator=torch.Generator().manual_seed(0)).numpy()
    la, lb = run_steps(a, ids, 14), run_steps(b, ids, 14)
    assert np.abs(la - lb).max() < 1e-4 and (la.argmax(-1) == lb.argmax(-1)).all()
    # the shared-buffer loop (one pre-allocated cache, written in place) picks the standard form's tokens
    prompt = torch.from_numpy(ids[:, :8])
    assert b.generate(prompt, max_new_tokens=12).tolist() == a.generate(prompt, max_new_tokens=12).tolist()


def test_rotary_tables_come_from_the_graph_rope_scaling_included(tmp_path, tok):
    """Llama-3 RoPE scaling changes the frequencies; the GroupQueryAttention form evaluates the exported rotary
    subgraph for every position, so both forms agree past the scaling's low-frequency factor."""
    model = tiny_llama()
    cfg = model.config
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    cfg.rope_parameters = {**cfg.rope_scaling}
    from transformers import LlamaForCausalLM

    scaled = LlamaForCausalLM(cfg).eval()
    scaled.load_state_dict(model.state_dict())
    base = scaled.model.rotary_emb.inv_freq
    assert not torch.allclose(base, tiny_llama().model.rotary_emb.inv_freq)  # the scaling took effect
    std, gqa = both_forms(scaled, tmp_path, W4, tok)
    a, b = OnnxCausalLM(std.path, session_config=EXACT), OnnxCausalLM(gqa.path, session_config=EXACT)
    ids = torch.randint(4, 512, (1, 90), generator=torch.Generator().manual_seed(1)).numpy()
    la, lb = run_steps(a, ids, 80), run_steps(b, ids, 80)
    assert np.abs(la - lb).max() < 1e-4


def test_8bit_layers_of_a_mixed_recipe_run_at_level_4(tmp_path, tok):
    """With 4-bit layers the session's MatMulNBits accuracy level is 0 (fp32 activations); an 8-bit layer at
    level 0 runs ORT's fp32-activation 8-bit kernel (~40x slower than level 4), so the export writes it as its
    own MatMulNBits node at level 4, unless a level is asked for."""
    model = tiny_llama()
    default = export_onnx(model, tmp_path / "default", W4_HEAD8, tok)
    exact = export_onnx(model, tmp_path / "exact", W4_HEAD8, tok, ort_accuracy_level=0)
    assert default.report["ort_session_config"] == exact.report["ort_session_config"] == EXACT
    rows = {r["name"]: r for r in default.report["layers"]}
    assert rows["lm_head"]["onnx"].startswith("com.microsoft.MatMulNBits int8 block 64 accuracy level 4")
    nodes = [n for n in onnx.load(str(default.path / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert [{a.name: a.i for a in n.attribute if a.name in ("bits", "accuracy_level")} for n in nodes] == [
        {"bits": 8, "accuracy_level": 4}]
    rows = {r["name"]: r for r in exact.report["layers"]}
    assert rows["lm_head"]["onnx"] == "DequantizeLinear int8 per-channel -> MatMul"
    ids = torch.randint(4, 512, (1, 16), generator=torch.Generator().manual_seed(2)).numpy()
    la = run_steps(OnnxCausalLM(default.path), ids, 12)
    lb = run_steps(OnnxCausalLM(exact.path), ids, 12)
    assert 0 < np.abs(la - lb).max() < 0.05 * np.abs(lb).max()  # int8 activations in lm_head only


def test_what_has_no_gqa_form_is_refused_or_kept_standard(tmp_path, tok):
    model = tiny_llama()
    with pytest.raises(InvalidConfig, match="attention_form='fast' is not valid"):
        export_onnx(model, tmp_path / "bad", W4, tok, attention_form="fast")
    kv = Recipe(name="w4-kv8", rules=W4.rules, kv_cache=KVCacheSpec.parse("int8"))
    res = export_onnx(model, tmp_path / "kv", kv, tok)
    assert res.report["attention_form"]["form"] == "standard"
    assert "quantized KV cache" in res.report["attention_form"]["reason"]
    with pytest.raises(UnsupportedOp, match="attention_form='gqa' does not apply: a quantized KV cache"):
        export_onnx(model, tmp_path / "kv-gqa", kv, tok, attention_form="gqa")
    plain = export_onnx(model, tmp_path / "plain", W4, tok, fuse=False)
    assert plain.report["attention_form"]["form"] == "standard"
    assert plain.report["attention_form"]["reason"].startswith("exported without the ONNX fusions")
    with pytest.raises(UnsupportedOp, match="no Attention node"):
        gqa_form(onnx.load(str(plain.path / "model.onnx")), 64)


def test_cli_attention_form(tmp_path, tok, capsys):
    from qexport.cli import main
    from tiny import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    assert main(["export", "--model", str(ckpt), "--recipe", "w8", "--out", str(tmp_path / "x"),
                 "--attention-form", "standard"]) == 0
    assert "standard attention" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(ckpt), "--recipe", "w8", "--out", str(tmp_path / "y"),
              "--attention-form", "fast"])
    assert e.value.code == 2
