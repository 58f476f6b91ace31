"""The ONNX export's GroupQueryAttention form (qexport.lowering.gqa), the default for Llama-like models.

Each export of a quantized tiny Llama runs in ONNX Runtime at MatMulNBits accuracy level 0 (fp32 activations)
and matches the quantized PyTorch model within 1e-4 absolute over a prefill and decode steps through a growing
cache (``verify``; the standard form is checked the same way in test_export.py); the shared-buffer loop
(``OnnxCausalLM.generate``, I/O binding) picks the tokens of a full recompute, and the graph has the nodes the
form promises. A RoPE-scaled model checks that the rotary tables come from the graph's own rotary subgraph.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import qexport

from qexport.config import KVCacheSpec, QuantSpec, Recipe, Rule
from qexport.errors import InvalidConfig, UnsupportedOp

from tiny import tiny_llama, word_tokenizer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from qexport.export import OnnxCausalLM, export_onnx, verify  # noqa: E402
from qexport.lowering.gqa import gqa_form  # noqa: E402

EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
W4 = Recipe(name="w4g32", rules=(Rule("lm_head", None), Rule("*", QuantSpec(bits=4, group_size=32))))
# int4 body and an int8 lm_head, as the w4g128-head8 preset
W4_HEAD8 = Recipe(name="w4-head8", exclude=("*embed*",), rules=(
    Rule("lm_head", QuantSpec(bits=8)), Rule("*", QuantSpec(bits=4, group_size=32))))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def ops(folder) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)


def test_gqa_form_matches_torch_and_has_its_nodes(tmp_path, tok):
    """The default export of a tiny Llama is the GroupQueryAttention form: its nodes, its logits against the
    quantized PyTorch model over a prefill and decode steps, and greedy generation over the shared buffer."""
    model = tiny_llama()
    gqa = export_onnx(model, tmp_path / "gqa", W4, tok)
    form = gqa.report["attention_form"]
    assert form["form"] == "gqa" and form["chosen"] == "auto" and form["layers"] == 2 and form["qkv_packed"] == 2
    o = ops(gqa.path)
    assert (o["GroupQueryAttention"], o["Attention"], o["RotaryEmbedding"]) == (2, 0, 0), o
    # two residual Add + norm pairs per layer (the last one is the final norm); the first norm stays standard
    assert (o["SkipSimplifiedLayerNormalization"], o["RMSNormalization"]) == (4, 1), o
    assert o["MatMul"] == 2 * 5 + 1, o  # one packed QKV + o_proj + gate / up / down per layer, the float lm_head
    assert "position_ids" not in gqa.report["inputs"]
    res = verify(gqa.path, reference=qexport.quantize(copy.deepcopy(model), W4), session_config=EXACT,
                 decode_steps=4)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res
    # the shared-buffer loop (one pre-allocated cache, written in place) picks the tokens of a full recompute
    lm = OnnxCausalLM(gqa.path, session_config=EXACT)
    ids = torch.randint(4, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    new = lm.generate(ids, max_new_tokens=10)
    for _ in range(10):
        ids = torch.cat([ids, lm(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert new.tolist() == ids[0, 8:].tolist()


def test_rotary_tables_come_from_the_graph_rope_scaling_included(tmp_path, tok):
    """Llama-3 RoPE scaling changes the frequencies; the GroupQueryAttention form evaluates the exported rotary
    subgraph for every position, so the export matches the PyTorch model past the scaling's low-frequency
    factor (positions up to 90 of an original context of 64)."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama().config
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    cfg.rope_parameters = {**cfg.rope_scaling}
    torch.manual_seed(0)
    scaled = LlamaForCausalLM(cfg).eval()
    assert not torch.allclose(scaled.model.rotary_emb.inv_freq, tiny_llama().model.rotary_emb.inv_freq)
    res = export_onnx(scaled, tmp_path / "gqa", W4, tok)
    assert res.report["attention_form"]["form"] == "gqa"
    ids = torch.randint(4, 512, (1, 90), generator=torch.Generator().manual_seed(1))
    out = verify(res.path, reference=qexport.quantize(copy.deepcopy(scaled), W4), input_ids=ids,
                 session_config=EXACT, decode_steps=6)
    assert out["max_abs"] < 1e-4 and out["top1_agreement"] == 1.0, out


def test_8bit_layers_of_a_mixed_recipe_run_at_level_4(tmp_path, tok):
    """With 4-bit layers the session's MatMulNBits accuracy level is 0 (fp32 activations); an 8-bit layer at
    level 0 runs ORT's fp32-activation 8-bit kernel (~40x slower than level 4), so the export writes it as its
    own MatMulNBits node at level 4 (int8 activations: close to, not equal to, the reference). An explicit
    level keeps the standard QDQ form (test_export.py's mixed recipe)."""
    model = tiny_llama()
    res = export_onnx(model, tmp_path / "default", W4_HEAD8, tok)
    assert res.report["ort_session_config"] == EXACT
    rows = {r["name"]: r for r in res.report["layers"]}
    assert rows["lm_head"]["onnx"].startswith("com.microsoft.MatMulNBits int8 block 64 accuracy level 4")
    nodes = [n for n in onnx.load(str(res.path / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert [{a.name: a.i for a in n.attribute if a.name in ("bits", "accuracy_level")} for n in nodes] == [
        {"bits": 8, "accuracy_level": 4}]
    out = verify(res.path, reference=qexport.quantize(copy.deepcopy(model), W4_HEAD8), decode_steps=2)
    assert 0 < out["max_rel"] < 0.05, out  # int8 activations in lm_head only


def test_what_has_no_gqa_form_is_refused_or_kept_standard(tmp_path, tok):
    from onnx import helper

    model = tiny_llama()
    with pytest.raises(InvalidConfig, match="attention_form='fast' is not valid"):
        export_onnx(model, tmp_path / "bad", W4, tok, attention_form="fast")
    kv = Recipe(name="w4-kv8", rules=W4.rules, kv_cache=KVCacheSpec.parse("int8"))
    with pytest.raises(UnsupportedOp, match="attention_form='gqa' does not apply: a quantized KV cache"):
        export_onnx(model, tmp_path / "kv-gqa", kv, tok, attention_form="gqa")
    with pytest.raises(UnsupportedOp, match="attention_form='gqa' does not apply: the TensorRT target"):
        export_onnx(model, tmp_path / "trt-gqa", W4, tok, target="tensorrt", attention_form="gqa")
    res = export_onnx(model, tmp_path / "kv", kv, tok)  # auto: the standard form, and why
    assert res.report["attention_form"]["form"] == "standard"
    assert "quantized KV cache" in res.report["attention_form"]["reason"]
    # a graph without a fused Attention node (exported with fuse=False) has nothing to rewrite
    f32 = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["attention_mask"], ["out"])], "g",
                              [f32("attention_mask", onnx.TensorProto.INT64, [1, 4])],
                              [f32("out", onnx.TensorProto.INT64, [1, 4])])
    with pytest.raises(UnsupportedOp, match="no Attention node"):
        gqa_form(helper.make_model(graph), 64)


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
