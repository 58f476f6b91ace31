"""ONNX export of quantized causal LMs with KV cache (qexport.export): every preset runs in ONNX Runtime and
matches the PyTorch reference; ORT fuses the QDQ pattern it should; the TensorRT lint catches planted
violations; bad input gives clear errors.

Tolerances: ORT runs the same integer codes and scales as the reference, in fp32, so logits agree to
1e-4 absolute (they are O(1); observed ~3e-7) with MatMulNBits accuracy level 0. An export takes seconds, so
one export with a different format per layer covers every lowering; the per-preset test is opt-in.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import qexport
from qexport.cli import main
from qexport.config import QuantSpec, Recipe, Rule
from qexport.errors import CalibrationError, InvalidConfig, ModelLoadError, QExportError, UnsupportedOp
from qexport.presets import PRESETS

from tiny import EMMA, tiny_llama, word_tokenizer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from qexport.export import OnnxCausalLM, export_onnx, lint_tensorrt, verify  # noqa: E402
from qexport.export.tensorrt import quantized_types  # noqa: E402

EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}  # fp32 activations in the fused MatMulNBits
W8 = QuantSpec(bits=8)
PER_TOKEN = QuantSpec(bits=8, granularity="per_token", dynamic=True)
PER_TENSOR = QuantSpec(bits=8, granularity="per_tensor")
# One export covers every lowering: a different format per linear of the (2-layer) tiny Llama. Groups of 32
# give blocked weights on K = 64 and K = 160 (5 groups).
MIXED = Recipe(name="mixed", rules=(
    Rule("*.q_proj", W8),                                                   # int8 per-channel
    Rule("*.k_proj", QuantSpec(bits=4, group_size=32)),                     # int4 blocked, symmetric
    Rule("*.v_proj", QuantSpec(bits=4, group_size=32, symmetric=False)),    # uint4 blocked + zero point
    Rule("*.o_proj", QuantSpec(bits=2, group_size=32, symmetric=False)),    # uint2 blocked (opset 25)
    Rule("*.gate_proj", QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True)),  # MatMulBnb4
    Rule("*.up_proj", W8, PER_TOKEN),                                       # W8A8 dynamic
    Rule("*.down_proj", W8, PER_TENSOR),                                    # W8A8 static
))
MIXED_TRT = Recipe(name="mixed-trt", rules=(
    Rule("*.down_proj", W8, PER_TENSOR),
    Rule("*.up_proj", W8),
    Rule("*", QuantSpec(bits=4, group_size=32)),
))
ORT_FUSED = {"MatMulNBits": 8, "MatMulIntegerToFloat": 2, "MatMulInteger": 2, "MatMulBnb4": 2}  # 2 layers


def one_layer_llama():
    model = tiny_llama()
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return model


def calibration():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (1, 48), generator=g) for _ in range(2)]


def reference(recipe, layers=2):
    model = qexport.quantize(tiny_llama() if layers == 2 else one_layer_llama(), recipe)
    if qexport.load_recipe(recipe).needs_calibration:
        qexport.calibrate(model, calibration())
    return model


def optimized_ops(folder, tmp_path) -> Counter:
    """Op types of the graph ONNX Runtime runs after its optimizations (saved with optimized_model_filepath)."""
    lm = OnnxCausalLM(folder)
    so = lm.session_options
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """Export folders, made once per (recipe, target); TensorRT-target ones from a one-layer model."""
    cache = {}

    def get(recipe, target="ort"):
        key = (getattr(recipe, "name", recipe), target)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / key[0]
            model = tiny_llama() if target == "ort" else one_layer_llama()
            # accuracy level 0 for every layer: a mixed recipe's 8-bit layers would otherwise run at their own
            # level 4 (int8 activations; test_gqa_form.py::test_8bit_layers_of_a_mixed_recipe_run_at_level_4)
            level = {"ort_accuracy_level": 0} if target == "ort" else {}
            cache[key] = export_onnx(model, out, recipe, tok, target=target, calibration=calibration(), **level).path
        return cache[key]

    return get


def test_mixed_export_matches_torch_with_kv_cache(exported):
    folder = exported(MIXED)
    res = verify(folder, reference=reference(MIXED), session_config=EXACT, decode_steps=4)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res
    report = json.loads((folder / "export_report.json").read_text())
    rows = {layer["name"]: layer for layer in report["layers"]}
    assert rows["lm_head"]["status"] == "float" and rows["lm_head"]["reason"] == "excluded by recipe"
    gate = rows["model.layers.0.mlp.gate_proj"]
    assert gate["status"] == "quantized" and gate["onnx"] == ("com.microsoft.MatMulBnb4 nf4 block 32 "
                                                               "(double-quantized scales reconstructed)")
    assert report["float_fallback"] == []
    assert rows["model.layers.1.self_attn.v_proj"]["onnx"] == "DequantizeLinear uint4 block 32 + zero point -> MatMul"
    assert rows["model.layers.0.self_attn.q_proj"]["onnx"] == "DequantizeLinear int8 per-channel -> MatMul"
    assert report["opset"] == 25 and report["ort_session_config"] == EXACT


def test_ort_fuses_qdq(exported, tmp_path):
    ops = optimized_ops(exported(MIXED), tmp_path)
    assert {op: ops[op] for op in ORT_FUSED} == ORT_FUSED, ops
    assert ops["DequantizeLinear"] == 0, ops  # every weight DequantizeLinear was fused


def test_qdq_graph_is_standard(exported):
    """Per-channel int8 on axis 1, blocked int4 / uint4 / uint2 on axis 0; standard domain only, except the
    NF4 layers' com.microsoft.MatMulBnb4 (nf4_form='lookup' avoids it: test_nf4_export_forms) and the
    GroupQueryAttention form's attention and residual norms (attention_form='standard' avoids them)."""
    m = onnx.load(str(exported(MIXED) / "model.onnx"))
    assert {o.domain for o in m.opset_import} == {"", "com.microsoft"} and m.opset_import[0].version == 25
    assert Counter((n.domain, n.op_type) for n in m.graph.node if n.domain) == {
        ("com.microsoft", "MatMulBnb4"): 2, ("com.microsoft", "GroupQueryAttention"): 2,
        ("com.microsoft", "SkipSimplifiedLayerNormalization"): 4}
    onnx.checker.check_model(m, full_check=True)
    inits = {i.name: i for i in m.graph.initializer}
    T = onnx.TensorProto
    seen = Counter()
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            seen[(T.DataType.Name(inits[n.input[0]].data_type), tuple(sorted(attrs.items())))] += 1
    assert seen == {("INT8", (("axis", 1),)): 2, ("INT4", (("axis", 0), ("block_size", 32))): 2,
                    ("UINT4", (("axis", 0), ("block_size", 32))): 2, ("UINT2", (("axis", 0), ("block_size", 32))): 2}
    assert Counter(n.op_type for n in m.graph.node)["QuantizeLinear"] == 2  # static activations of down_proj


def test_folder_layout_kv_cache_and_generation(exported, tok):
    folder = exported(MIXED)
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "recipe.json", "export_report.json", "tokenizer.json"} <= names
    assert json.loads((folder / "recipe.json").read_text())["name"] == "mixed"
    lm = OnnxCausalLM(folder, session_config=EXACT)
    inputs = [i.name for i in lm.session.get_inputs()]
    # the GroupQueryAttention form (the default) takes its positions from the attention mask
    assert lm.attention_form == "gqa" and inputs[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert lm.past_names == [f"past_key_values.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    assert lm.output_names == ["logits"] + [f"present.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    # greedy generation with the KV cache equals generation without it (full recompute each step) ...
    prompt = tok("Emma Woodhouse , handsome , clever", return_tensors="pt")["input_ids"]
    new = lm.generate(prompt, max_new_tokens=6)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, lm(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert new.tolist() == ids[0, prompt.shape[1]:].tolist()
    # ... and the PyTorch model's greedy generation
    ref = reference(MIXED).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert new.tolist() == ref[0, prompt.shape[1]:].tolist()
    # dynamic batch with a right-padded row; a left-padded one is refused in this form (positions would be wrong)
    batch = torch.cat([prompt, prompt]).numpy()
    mask = np.ones_like(batch)
    mask[1, -2:] = 0
    logits, present = lm.step(batch, mask, lm.empty_past(2))
    assert logits.shape[:2] == batch.shape and present[0].shape[2] == batch.shape[1]
    one, _ = lm.step(batch[:1, :-2], mask[:1, :-2], lm.empty_past(1))
    assert np.abs(logits[1, :-2] - one[0]).max() < 1e-4
    mask[1] = 1
    mask[1, :2] = 0
    with pytest.raises(UnsupportedOp, match="left-padded"):
        lm.step(batch, mask, lm.empty_past(2))


def test_fused_attention_rotary_and_norm_ops(tok, tmp_path):
    """The ORT export runs the ONNX fusion passes on dynamo's graph of the model: attention with its cache update,
    rotary embeddings and RMSNorm become opset-23 Attention / RotaryEmbedding / RMSNormalization nodes: fewer
    nodes, the same logits as the PyTorch model and as the unfused export, with the KV cache and a left-padded
    batch."""
    model = tiny_llama()
    fused = export_onnx(model, tmp_path / "fused", "w8", tok, attention_form="standard")
    plain = export_onnx(model, tmp_path / "plain", "w8", tok, fuse=False, ort_accuracy_level=0)
    assert plain.report["ort_session_config"] == EXACT and fused.report["ort_session_config"] != EXACT
    with pytest.raises(InvalidConfig, match="accuracy level"):
        export_onnx(model, tmp_path / "bad", "w8", tok, ort_accuracy_level=5)
    ops = {f: Counter(n.op_type for n in onnx.load(str(r.path / "model.onnx")).graph.node) for f, r in
           (("fused", fused), ("plain", plain))}
    assert (ops["fused"]["Attention"], ops["fused"]["RotaryEmbedding"], ops["fused"]["RMSNormalization"]) == (2, 4, 5)
    assert ops["fused"]["Softmax"] == 0 and ops["plain"]["Softmax"] == 2 and ops["plain"]["Attention"] == 0
    assert sum(ops["fused"].values()) < 0.6 * sum(ops["plain"].values()), (ops["fused"], ops["plain"])
    # the cache update is inside Attention: it reads each layer's past inputs and writes the present outputs
    attention = [n for n in onnx.load(str(fused.path / "model.onnx")).graph.node if n.op_type == "Attention"]
    assert [(list(n.input[4:6]), list(n.output[1:3])) for n in attention] == [
        ([f"past_key_values.{i}.key", f"past_key_values.{i}.value"], [f"present.{i}.key", f"present.{i}.value"])
        for i in range(2)]
    assert fused.report["opset"] == 23 and plain.report["opset"] == 21
    counts = {p["name"]: p["changed"] for p in fused.report["fusions"]}
    assert counts["fuse_rmsnorm"] == {"rms_norm": 5} and counts["fuse_rotary"] == {"rotary": 4}
    # heads read as the projections give them, [batch, seq, heads * head_dim]: no reshapes or transposes around
    assert counts["fuse_kv_attention"] == {"attention": 2, "with_past": 2, "heads_3d": 2}
    assert ops["fused"]["Transpose"] == 0 and ops["fused"]["Reshape"] == 0, ops["fused"]
    assert plain.report["fusions"] == {"not_used": "not asked for"}
    ref = reference("w8")
    for r in (fused, plain):  # prefill, then 4 decode steps with the KV cache
        res = verify(r.path, reference=ref, session_config=EXACT, decode_steps=4)
        assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res
    # a batch whose second row is left-padded: positions and mask follow attention_mask
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = ref(ids, attention_mask=mask).logits
    for r in (fused, plain):
        lm = OnnxCausalLM(r.path, session_config=EXACT)
        logits, past = lm.step(ids.numpy(), mask.numpy(), lm.empty_past(2))
        got = torch.from_numpy(logits)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=1e-4, rtol=0)  # padded positions are free
        nxt = torch.randint(3, 512, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step, _ = lm.step(nxt.numpy(), mask2.numpy(), past)
        full = ref(torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1]
        torch.testing.assert_close(torch.from_numpy(step)[:, -1], full, atol=1e-4, rtol=0)


def test_a_model_dynamo_cannot_capture_exports_unfused_with_a_warning(tok, tmp_path, monkeypatch):
    """When dynamo cannot capture the model in one graph, the export says so (warning, report) and writes the
    traced model out at opset 21; the folder still computes what the PyTorch model does."""
    def no_graph(*args, **kwargs):
        raise RuntimeError("graph break in a made-up call")

    monkeypatch.setattr(torch._dynamo, "export", no_graph)
    with pytest.warns(UserWarning, match="dynamo could not capture the model in one graph: graph break"):
        res = export_onnx(tiny_llama(), tmp_path / "traced", "w8", tok)
    assert res.report["fusions"] == {"not_used": "dynamo could not capture the model in one graph: graph break in "
                                                 "a made-up call"}
    assert res.report["opset"] == 21
    res = verify(res.path, reference=reference("w8"), session_config=EXACT, decode_steps=1)
    assert res["max_abs"] < 1e-4, res


def test_eager_attention_is_fused_from_its_written_out_form(tok, tmp_path):
    """A model with eager (hand-written) attention: fuse_attention turns it into SDPA first, then the ONNX fusions
    apply as to an sdpa model."""
    res = export_onnx(tiny_llama(attn_implementation="eager"), tmp_path / "eager", "w8", tok)
    counts = {p["name"]: p["changed"] for p in res.report["fusions"]}
    assert counts["fuse_attention"] == {"sdpa": 2} and counts["fuse_kv_attention"]["with_past"] == 2
    assert res.report["opset"] == 23
    res = verify(res.path, reference=reference("w8"), session_config=EXACT, decode_steps=2)
    assert res["max_abs"] < 1e-4, res


def test_rotated_static_w8a8_export_matches_torch(tok, tmp_path):
    """w8a8-static-hadamard: rotation folded into the weights, the online down_proj rotation, calibrated
    per-tensor activations (QuantizeLinear + MatMulInteger), with the KV cache."""
    res = export_onnx(tiny_llama(), tmp_path / "sh", "w8a8-static-hadamard", tok, calibration=calibration())
    ref = qexport.quantize(tiny_llama(), "w8a8-static-hadamard")
    qexport.calibrate(ref, calibration())
    out = verify(res.path, reference=ref, session_config=EXACT, decode_steps=3)
    assert out["max_abs"] < 1e-4 and out["top1_agreement"] == 1.0, out
    assert sum(layer["status"] == "quantized" for layer in res.report["layers"]) == 14  # 2 x 7 linears; lm_head float


def test_perplexity_matches_torch(exported, tok):
    from qexport.eval import perplexity

    text = EMMA.read_text()
    got = perplexity(OnnxCausalLM(exported(MIXED), session_config=EXACT), tok, text, tokens=256, window=64)
    want = perplexity(reference(MIXED), tok, text, tokens=256, window=64)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5)


def test_atomic_write_force_and_external_data(exported, tok, tmp_path):
    from qexport.export.onnx import _save_model

    folder = exported(MIXED)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(QExportError, match="already exists"):
        qexport.export_onnx(tiny_llama(), folder, MIXED, tok)  # the top-level alias
    assert sorted(p.name for p in folder.iterdir()) == before
    failing = tmp_path / "out"
    with pytest.raises(CalibrationError):  # static recipe, no calibration, no tokenizer: nothing is left behind
        export_onnx(tiny_llama(), failing, "w8a8-static")
    assert not failing.exists() and not list(tmp_path.iterdir())
    # the same graph with its tensors in model.onnx.data loads and runs the same
    ext = tmp_path / "ext"
    shutil.copytree(folder, ext)
    assert _save_model(onnx.load(str(folder / "model.onnx")), ext, external_data=True) == ["model.onnx",
                                                                                          "model.onnx.data"]
    inline = onnx.load(str(ext / "model.onnx"), load_external_data=False).graph.initializer
    assert all(len(t.raw_data) <= 1024 for t in inline) and (ext / "model.onnx.data").stat().st_size > 300_000
    ids = torch.randint(0, 512, (1, 9))
    torch.testing.assert_close(OnnxCausalLM(ext, session_config=EXACT)(ids).logits,
                               OnnxCausalLM(folder, session_config=EXACT)(ids).logits, atol=0, rtol=0)


# ~15 s per preset on 2 cores; the rotated preset: test_rotated_static_w8a8_export_matches_torch
# the gguf presets all export through the same float fallback: gguf-q4_k stands for them
DATA_FREE = [n for n, r in PRESETS.items() if not r.algorithm_needs_data and r.rotation == "none"
             and (not n.startswith("gguf-") or n == "gguf-q4_k")]


@pytest.mark.parametrize("recipe", DATA_FREE)
def test_every_preset_runs_in_ort_and_matches_torch(exported, recipe):
    res = verify(exported(recipe), reference=reference(recipe), session_config=EXACT, decode_steps=4)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res


# ----------------------------------------------------------------------------------------------------
# TensorRT target and lint
# ----------------------------------------------------------------------------------------------------
def test_tensorrt_target_follows_the_rules(exported):
    folder = exported(MIXED_TRT, "tensorrt")
    assert lint_tensorrt(folder / "model.onnx") == []
    assert main(["lint-trt", str(folder)]) == 0
    res = verify(folder, reference=reference(MIXED_TRT, layers=1), session_config=EXACT, decode_steps=2)
    # TensorRT needs scales > 0: a group with a negative scale is negated and its extreme code (-8 -> 8)
    # saturates to 7, one step on one weight per such group (counted in the report's notes). The random tiny
    # model has near-uniform logits, so its top-1 is fragile: the bound is loose.
    assert res["top1_agreement"] >= 0.8 and res["max_rel"] < 0.2, res
    report = json.loads((folder / "export_report.json").read_text())
    assert report["opset"] == 21 and any("saturated" in n for n in report["notes"])
    # the summary (also the export's warning) counts the saturated groups and points to the restricted presets
    sat = report["tensorrt_saturation"]
    assert 0 < sat["saturated_groups"] <= sat["negated"] < sat["groups"]
    assert sat["saturated_codes"] >= sat["saturated_groups"]
    assert report["notes"][0].startswith(f"TensorRT: {sat['negated']} of {sat['groups']}")
    assert "w4g128-trt" in report["notes"][0]
    m = onnx.load(str(folder / "model.onnx"))
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1 + 7  # activation of down_proj, weights
    assert quantized_types(m) == {"INT8", "INT4"}


@pytest.mark.parametrize("recipe,match", [
    ("w4g128", "symmetric"), ("w8a8-dynamic", "dynamic activation"), ("w2g64", "2-bit"),
    ("w4g128-sym", "blocked"),  # K = 64 < 128: one group per row is per-channel int4
])
def test_tensorrt_target_refuses_what_tensorrt_cannot_run(tok, tmp_path, recipe, match):
    with pytest.raises(UnsupportedOp, match=match):
        export_onnx(tiny_llama(), tmp_path / "trt", recipe, tok, target="tensorrt", calibration=calibration())
    assert not (tmp_path / "trt").exists()


# ----------------------------------------------------------------------------------------------------
# NF4 (MatMulBnb4 / lookup form / float for TensorRT) and TensorRT-ready restricted-range grids
# ----------------------------------------------------------------------------------------------------
# q_proj's groups of 24 fit no MatMulBnb4 block (16 .. 256 dividing 24 and K = 64): the lookup form there
NF4_MIX = Recipe(name="nf4-mix", rules=(
    Rule("*.q_proj", QuantSpec(bits=4, format="nf4", group_size=24)),
    Rule("*", QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True, double_quant_block=16)),
))
NF4_LOOKUP_NODES = {"Cast", "Gather", "Mul"}  # per lookup-form layer: Cast, Gather (codes), Gather (scales), Mul


@pytest.mark.parametrize("nf4_form", ["auto", "lookup"])
def test_nf4_export_forms(tok, tmp_path, nf4_form):
    # standard ONNX only: the lookup form, with the standard attention form
    form = "standard" if nf4_form == "lookup" else "auto"
    folder = export_onnx(one_layer_llama(), tmp_path / nf4_form, NF4_MIX, tok, nf4_form=nf4_form,
                         attention_form=form).path
    res = verify(folder, reference=reference(NF4_MIX, layers=1), session_config=EXACT, decode_steps=2)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res  # same codes and scales in fp32
    m = onnx.load(str(folder / "model.onnx"))
    ops = Counter(n.op_type for n in m.graph.node)
    lookup_gathers = sum(1 for n in m.graph.node if n.op_type == "Gather" and n.input[0].endswith(("_nf4_code", "_Ws")))
    bnb4 = 6 if nf4_form == "auto" else 0
    assert ops["MatMulBnb4"] == bnb4 and lookup_gathers == 2 * (7 - bnb4), ops
    assert ops["DequantizeLinear"] == 0
    rows = {r["name"]: r for r in json.loads((folder / "export_report.json").read_text())["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["onnx"].startswith("Gather nf4 code book")
    assert rows["model.layers.0.mlp.up_proj"]["onnx"] == (
        "com.microsoft.MatMulBnb4 nf4 block 32 (double-quantized scales reconstructed)" if bnb4 else
        "Gather nf4 code book (UINT4 indices) * scale (double-quantized scales reconstructed) -> MatMul")
    if nf4_form == "lookup":  # standard ONNX only, 4-bit indices in the file
        assert {o.domain for o in m.opset_import} == {""}
        onnx.checker.check_model(m, full_check=True)
        assert sum(i.data_type == onnx.TensorProto.UINT4 for i in m.graph.initializer) == 7
    # ONNX Runtime keeps MatMulBnb4 and constant-folds the lookup form into float weights
    optimized = optimized_ops(folder, tmp_path)
    # the embedding, and in the GroupQueryAttention form the total length read from the mask's shape
    assert optimized["MatMulBnb4"] == bnb4 and optimized["Gather"] == 1 + (form == "auto")


def test_nf4_under_tensorrt_stays_float_with_report(tok, tmp_path):
    with pytest.warns(UserWarning, match="7 NF4 layer.*stay float in the TensorRT export"):
        folder = export_onnx(one_layer_llama(), tmp_path / "trt", "nf4-dq", tok, target="tensorrt").path
    assert lint_tensorrt(folder / "model.onnx") == []
    report = json.loads((folder / "export_report.json").read_text())
    assert len(report["float_fallback"]) == 7 and all("no TensorRT form" in f["reason"] for f in report["float_fallback"])
    res = verify(folder, reference=reference("nf4-dq", layers=1), session_config=EXACT, decode_steps=2)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res  # the float weights are the NF4 values


# Weight-only: with static int8 activations ONNX Runtime runs a TensorRT graph's QDQ MatMul with its u8s8
# kernel, whose int16 pair sums saturate on CPUs without VNNI (qexport.lowering.qdq), so that is not a test
# of the export's numerics.
RESTRICTED_TRT = Recipe(name="restricted-trt", rules=(
    Rule("*.mlp.*", QuantSpec(bits=8, restricted_range=True)),
    Rule("*", QuantSpec(bits=4, group_size=32, restricted_range=True)),
))


def llama_256(seed: int = 3):
    """One decoder layer with hidden size 256 and MLP 512, so that groups of 128 are blocked (w4g128-trt)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("recipe", ["w4g128-trt", RESTRICTED_TRT], ids=["w4g128-trt", "mixed"])
def test_restricted_range_tensorrt_export_is_exact(tok, tmp_path, recipe, recwarn):
    """Restricted-range grids have scales > 0: nothing is negated or saturated, and the TensorRT graph
    computes exactly what the PyTorch model does (to fp32 summation order)."""
    model = llama_256 if isinstance(recipe, str) else one_layer_llama
    folder = export_onnx(model(), tmp_path / "trt", recipe, tok, target="tensorrt", calibration=calibration()).path
    assert not [w for w in recwarn if "negated" in str(w.message)]
    assert lint_tensorrt(folder / "model.onnx") == [] and main(["lint-trt", str(folder)]) == 0
    ref = qexport.quantize(model(), recipe)
    if qexport.load_recipe(recipe).needs_calibration:
        qexport.calibrate(ref, calibration())
    res = verify(folder, reference=ref, session_config=EXACT, decode_steps=2)
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0, res
    report = json.loads((folder / "export_report.json").read_text())
    sat = report["tensorrt_saturation"]
    assert sat["groups"] > 0 and sat["negated"] == sat["saturated_groups"] == sat["saturated_codes"] == 0
    assert report["float_fallback"] == [] and not any("negated" in n for n in report["notes"])
    m = onnx.load(str(folder / "model.onnx"))
    assert quantized_types(m) == ({"INT4"} if recipe == "w4g128-trt" else {"INT4", "INT8"})
    assert Counter(n.op_type for n in m.graph.node)["DequantizeLinear"] >= 7


def _plant(folder, tmp_path, edit):
    m = onnx.load(str(folder / "model.onnx"))
    edit(m)
    path = tmp_path / "planted.onnx"
    onnx.save(m, str(path))
    return path


def _first_dq(m):
    return next(n for n in m.graph.node if n.op_type == "DequantizeLinear")


def _init(m, name):
    return next(i for i in m.graph.initializer if i.name == name)


def test_lint_catches_planted_violations(exported, tmp_path, capsys):
    from onnx import helper, numpy_helper

    folder = exported(MIXED_TRT, "tensorrt")

    def asym_zero_point(m):
        dq = _first_dq(m)
        s = numpy_helper.to_array(_init(m, dq.input[1]))
        zp = helper.make_tensor("planted_zp", onnx.TensorProto.INT4, s.shape, np.ones(s.size, dtype=np.int8))
        m.graph.initializer.append(zp)
        dq.input.append("planted_zp")

    def zero_scale(m):
        t = _init(m, _first_dq(m).input[1])
        a = numpy_helper.to_array(t).copy()
        a.flat[3] = 0.0
        t.CopyFrom(numpy_helper.from_array(a, t.name))

    def per_tensor_int4(m):
        dq = _first_dq(m)
        del dq.attribute[:]
        t = _init(m, dq.input[1])
        t.CopyFrom(numpy_helper.from_array(np.array(0.01, np.float32), t.name))

    def contrib_op(m):
        m.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["input_ids"], ["a", "b", "c"], name="dql"))

    expected = {asym_zero_point: "zero-point", zero_scale: "positive-scale", per_tensor_int4: "int4-blocked",
                contrib_op: "dynamic-quantization"}
    for edit, rule in expected.items():
        path = _plant(folder, tmp_path, edit)
        problems = lint_tensorrt(path)
        assert [p.rule for p in problems] == [rule], problems
        name = problems[0].node
        assert main(["lint-trt", str(path)]) == 1
        assert name in capsys.readouterr().out  # the CLI names the violating node
    # the ORT graph breaks TensorRT's rules: unsigned weights with zero points, int2 and opset 25
    rules = {p.rule for p in lint_tensorrt(exported(MIXED) / "model.onnx")}
    assert {"zero-point", "type", "opset"} <= rules


def test_build_engine_without_tensorrt(exported, tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    folder = exported(MIXED_TRT, "tensorrt")
    code = main(["build-engine", str(folder / "model.onnx"), "--out", str(tmp_path / "model.plan"), "--int4"])
    err = capsys.readouterr().err
    assert code == 2 and "TensorRT is not installed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model.plan").exists()
    # a precision the graph does not have is refused before TensorRT is needed
    assert main(["build-engine", str(exported(MIXED) / "model.onnx"), "--out", str(tmp_path / "model.plan")]) == 2
    assert "breaks TensorRT's QDQ rules" in capsys.readouterr().err  # linted before TensorRT is needed


def test_build_engine_drives_the_tensorrt_api(exported, tmp_path, monkeypatch):
    """build-engine against a recording stand-in for TensorRT (tests/fake_tensorrt.py): the network is
    strongly typed, every dynamic input gets its profile range, the timing cache is read and written back,
    the engine is written atomically and not over an existing file, and a parser error is reported."""
    import fake_tensorrt

    from qexport._io import OutputExists
    from qexport.export import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    onnx_path = exported(MIXED_TRT, "tensorrt") / "model.onnx"
    plan = tmp_path / "model.plan"
    assert build_engine(onnx_path, plan, int8=True, int4=True, max_batch=2, max_seq=256, max_past=512,
                        opt_seq=64) == plan
    assert plan.read_bytes() == fake_tensorrt.ENGINE
    b = fake_tensorrt.calls[-1]
    assert b.network.flags == 1 << fake_tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert b.config.pools == {fake_tensorrt.MemoryPoolType.WORKSPACE: 4 << 30} and b.config.cache_in == b""
    (profile,) = b.config.profiles
    names = [t.name for t in b.network.inputs]
    assert set(profile.shapes) == set(names) and len(names) == 3 + 2  # ids, mask, positions + 1 layer's k, v
    assert profile.shapes["input_ids"] == ((1, 1), (1, 64), (2, 256))
    assert profile.shapes["attention_mask"] == ((1, 1), (1, 128), (2, 256 + 512))
    kv = dict(zip(names, (t.shape for t in b.network.inputs)))["past_key_values.0.key"]
    assert kv[2] == -1 and profile.shapes["past_key_values.0.key"] == (
        (1, kv[1], 0, kv[3]), (1, kv[1], 64, kv[3]), (2, kv[1], 512, kv[3]))
    cache = tmp_path / "model.plan.timing.cache"
    assert cache.read_bytes() == b"timing-cache:"
    with pytest.raises(OutputExists, match="--force"):
        build_engine(onnx_path, plan)
    build_engine(onnx_path, plan, force=True)  # the second build starts from the saved timing cache
    assert fake_tensorrt.calls[-1].config.cache_in == b"timing-cache:"
    monkeypatch.setattr(fake_tensorrt.OnnxParser, "errors", ["In node 3 (parseGraph): unsupported op"])
    with pytest.raises(UnsupportedOp, match="parser rejected.*unsupported op"):
        build_engine(onnx_path, tmp_path / "other.plan")
    assert not (tmp_path / "other.plan").exists()


def test_polygraphy_comparator_passes_an_exact_export_and_catches_a_planted_change(exported, tmp_path):
    pytest.importorskip("polygraphy")
    from onnx import numpy_helper

    from qexport.export import compare_runtimes

    folder, ref = exported(MIXED), reference(MIXED)
    res = compare_runtimes(folder, reference=ref, session_config=EXACT, decode_steps=2, atol=1e-4, rtol=1e-4)
    assert res["passed"] and res["runners"] == ["pytorch", "onnxruntime"] and res["feeds"] == 3  # prefill + 2
    outs = res["outputs"]["onnxruntime"]
    assert set(outs) == {"logits"} | {f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    assert all(o["passed"] and o["max_abs"] < 1e-4 for o in outs.values()), outs
    # the first DequantizeLinear's scales x 1.05: the logits move, and the comparator says so
    planted = tmp_path / "planted"
    shutil.copytree(folder, planted)
    m = onnx.load(str(planted / "model.onnx"))
    scale = _init(m, _first_dq(m).input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.05, scale.name))
    onnx.save(m, str(planted / "model.onnx"))
    bad = compare_runtimes(planted, reference=ref, session_config=EXACT, decode_steps=2, atol=1e-4, rtol=1e-4)
    logits = bad["outputs"]["onnxruntime"]["logits"]
    assert not bad["passed"] and not logits["passed"] and logits["max_abs"] > 1e-3, logits


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(tmp_path, capsys, tok):
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxCausalLM(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no model.onnx"):
        OnnxCausalLM(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match="cannot load"):
        OnnxCausalLM(tmp_path / "junk")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        lint_tensorrt(tmp_path / "junk" / "model.onnx")
    for argv in (["verify", str(tmp_path / "missing")], ["lint-trt", str(tmp_path / "nothing.onnx")],
                 ["eval", "--backend", "onnxruntime", str(tmp_path / "junk"), "--text", str(EMMA)],
                 ["export", "--model", str(tmp_path / "missing"), "--recipe", "w8", "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("qexport: error:") and len(err.strip().splitlines()) == 1, err
    # an op with no ONNX lowering is named
    from qexport.lowering.core import lower
    from onnx import helper

    node = helper.make_node("Mystery", ["x"], ["y"], domain="qexport")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    with pytest.raises(UnsupportedOp, match="Mystery"):
        lower(helper.make_model(graph))
    with pytest.raises(QExportError, match="target"):
        export_onnx(tiny_llama(), tmp_path / "x", "w8", tok, target="tflite")


def test_cli_export_verify_eval(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    one_layer_llama().save_pretrained(ckpt)
    word_tokenizer().save_pretrained(ckpt)
    out = tmp_path / "exp"
    assert main(["export", "--model", str(ckpt), "--recipe", "w4g128", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", "--model", str(ckpt), "--recipe", "w4g128", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["verify", str(out), "--decode-steps", "2", "--prompt", "Emma", "--max-new-tokens", "3",
                 "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["top1_agreement"] == 1.0 and v["max_abs"] < 1e-4 and "generation" in v
    if importlib.util.find_spec("polygraphy") is not None:
        assert main(["verify", str(out), "--decode-steps", "1", "--polygraphy", "--atol", "1e-4", "--rtol", "1e-4",
                     "--json", str(tmp_path / "p.json")]) == 0
        assert "polygraphy Comparator (pytorch, onnxruntime; 2 feeds; atol 0.0001, rtol 0.0001): PASSED" in \
            capsys.readouterr().out
        assert json.loads((tmp_path / "p.json").read_text())["polygraphy"]["passed"] is True
        if importlib.util.find_spec("tensorrt") is None:  # an engine to compare needs TensorRT
            assert main(["verify", str(out), "--engine", str(tmp_path / "model.plan")]) == 2
            err = capsys.readouterr().err
            assert "needs TensorRT" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--backend", "onnxruntime", str(out), "--text", str(EMMA), "--tokens", "256",
                 "--window", "64", "--reference", "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    report = json.loads((out / "export_report.json").read_text())
    assert report["opset"] == 23 and {"attention": 1, "with_past": 1, "heads_3d": 1} in [p["changed"] for p in report["fusions"]]
    # the export flags reach export_onnx: elementwise form, accuracy level 4 in the folder's session settings
    assert main(["export", "--model", str(ckpt), "--recipe", "w4g128", "--out", str(out), "--force", "--no-fuse",
                 "--ort-accuracy-level", "4"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["opset"] == 21 and report["fusions"] == {"not_used": "not asked for"}
    assert report["ort_session_config"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
