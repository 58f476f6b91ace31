"""Quantized embeddings (QEmbedding) and a tied lm_head sharing their stored weight: numerics against the float
reference, recipe semantics, the saved folder, the ONNX forms (GatherBlockQuantized and standard Gather +
DequantizeLinear) in ONNX Runtime, and the compile back-end."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qexport
from qexport import QuantSpec, Recipe, Rule
from qexport.checkpoint import MANIFEST_FILE, load_quantized, save_quantized
from qexport.formats import expand_groups, quantize_weight
from qexport.modules import QEmbedding, QLinear

from tiny import tiny_llama, word_tokenizer

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
INT4G32 = QuantSpec(bits=4, group_size=32)
SPECS = {
    "int8-row": QuantSpec(bits=8),
    "int8-tensor": QuantSpec(bits=8, granularity="per_tensor"),
    "uint8-g32": QuantSpec(bits=8, group_size=32, symmetric=False),
    "int4-g32": INT4G32,
    "uint4-g16": QuantSpec(bits=4, group_size=16, symmetric=False),
    "int4-g48": QuantSpec(bits=4, group_size=48),  # a partial last group on 64
    "uint2-g32": QuantSpec(bits=2, group_size=32, symmetric=False),
}


def emb_recipe(spec=INT4G32, body=INT4G32, name="emb"):
    """The tied table (embedding and lm_head) in ``spec``, the decoder's linears in ``body``."""
    return Recipe(name=name, exclude=(), rules=(Rule("*embed_tokens", spec), Rule("lm_head", spec), Rule("*", body)))


# ----------------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_qembedding_rows_are_the_dequantized_table(spec):
    torch.manual_seed(0)
    emb = nn.Embedding(40, 64)
    q = QEmbedding.from_embedding(emb, spec)
    ids = torch.tensor([[0, 39, 7], [7, 3, 21]])
    got = q(ids)
    qw = q.quantized_weight()
    assert got.shape == (2, 3, 64) and got.dtype == torch.float32
    assert torch.equal(got, F.embedding(ids, qw.dequantize()))  # bit for bit: the rows of the reference table
    # against the float table: round to nearest is within half a step of each element's group, one step where
    # the full-range symmetric grid clamps the side opposite the extreme at 2^(b-1)-1 (the extreme maps to -2^(b-1))
    step = expand_groups(qw.scales().abs(), qw.group, 64).expand(40, -1)
    bound = 1.0 if spec.symmetric else 0.5
    assert bool(((got - emb.weight[ids]).abs() <= bound * step[ids] + 1e-6).all())


def test_qembedding_keeps_the_table_dtype_and_refuses_what_it_cannot_store():
    emb = nn.Embedding(16, 32).to(torch.bfloat16)
    assert QEmbedding.from_embedding(emb, INT4G32)(torch.tensor([1, 2])).dtype == torch.bfloat16
    with pytest.raises(qexport.QExportError, match="max_norm"):
        QEmbedding.from_embedding(nn.Embedding(16, 32, max_norm=1.0), INT4G32)
    with pytest.raises(qexport.QExportError, match="integer grids"):
        QEmbedding(quantize_weight(torch.randn(16, 32), QuantSpec(bits=4, format="nf4", group_size=16)))


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_model_equals_its_dequantized_float_model(tie):
    model = tiny_llama(tie=tie)
    q = qexport.quantize(copy.deepcopy(model), emb_recipe(QuantSpec(bits=8)))
    ref = copy.deepcopy(model)  # the float model with every quantized weight replaced by its dequantized values
    ref.model.embed_tokens.weight = nn.Parameter(q.model.embed_tokens.dequantized_weight())
    for name, m in q.named_modules():
        if isinstance(m, QLinear):
            ref.get_submodule(name).weight = nn.Parameter(m.dequantized_weight())
    with torch.no_grad():
        torch.testing.assert_close(q(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Recipes and tied storage
# ----------------------------------------------------------------------------------------------------
def test_tied_embedding_and_lm_head_share_one_stored_weight():
    model = qexport.quantize(tiny_llama(tie=True), emb_recipe())
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QEmbedding) and isinstance(head, QLinear)
    assert head.qdata is emb.qdata and head.scale is emb.scale
    rows = {r.name: r for r in model.qexport_report.layers}
    assert rows["model.embed_tokens"].kind == "Embedding" and rows["model.embed_tokens"].status == "quantized"
    assert rows["lm_head"].reason == "shares its stored weight with model.embed_tokens (tied)"
    size = qexport.model_size(model)
    table = emb.qdata.numel() + 4 * emb.scale.numel()  # int4 codes packed two per byte + float32 scales
    linears = sum(t.numel() * t.element_size() for n, m in model.named_modules() if isinstance(m, QLinear)
                  and n != "lm_head" for t in m.buffers())
    assert size.quantized_bytes == table + linears  # the shared table counted once
    assert size.quantized_params == 512 * 64 + sum(m.out_features * m.in_features for n, m in model.named_modules()
                                                   if isinstance(m, QLinear) and n != "lm_head")


def test_untied_or_differently_quantized_weights_are_not_shared():
    untied = qexport.quantize(tiny_llama(tie=False), emb_recipe())
    assert untied.lm_head.qdata is not untied.model.embed_tokens.qdata
    mixed = Recipe(name="mixed", exclude=(), rules=(Rule("*embed_tokens", QuantSpec(bits=8)), Rule("lm_head", INT4G32)))
    tied = qexport.quantize(tiny_llama(tie=True), mixed)
    assert tied.lm_head.qdata is not tied.model.embed_tokens.qdata and tied.lm_head.spec == INT4G32


def test_catch_all_rules_do_not_reach_embeddings():
    everything = Recipe(name="all", exclude=(), rules=(Rule("*", INT4G32),))
    assert everything.rule_for("model.embed_tokens", embedding=True) is None
    assert everything.rule_for("model.embed_tokens") is not None  # a linear of that name would be quantized
    model = qexport.quantize(tiny_llama(tie=True), everything)
    assert type(model.model.embed_tokens) is nn.Embedding and isinstance(model.lm_head, QLinear)
    assert type(qexport.quantize(tiny_llama(), "w4g128").model.embed_tokens) is nn.Embedding  # default exclude
    nf4 = Recipe(name="nf4", exclude=(), rules=(Rule("*embed_tokens", QuantSpec(bits=4, format="nf4", group_size=32)),))
    with pytest.warns(UserWarning, match="model.embed_tokens stays float: embeddings are stored as integer grids"):
        model = qexport.quantize(tiny_llama(), nf4)
    assert type(model.model.embed_tokens) is nn.Embedding
    assert {r.name: r.status for r in model.qexport_report.layers}["model.embed_tokens"] == "float"


def test_preset_quantizes_the_tied_table():
    model = qexport.quantize(tiny_llama(tie=True), "w4g64-sym-emb8")
    assert model.model.embed_tokens.spec == model.lm_head.spec == QuantSpec(bits=8)
    assert model.lm_head.qdata is model.model.embed_tokens.qdata
    assert model.model.layers[0].mlp.up_proj.spec == QuantSpec(bits=4, group_size=64)


def test_saved_folder_stores_the_tied_weight_once_and_reloads_bit_identical(tmp_path):
    from safetensors import safe_open

    model = qexport.quantize(tiny_llama(tie=True), emb_recipe())
    saved = save_quantized(model, tmp_path / "q", word_tokenizer())
    with safe_open(str(saved.path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.qdata", "model.embed_tokens.scale"} <= keys
    assert not any(k.startswith("lm_head.") for k in keys) and "model.embed_tokens.weight" not in keys
    manifest = json.loads((saved.path / MANIFEST_FILE).read_text())
    assert manifest["layers"]["lm_head"]["shares"] == "model.embed_tokens"
    assert manifest["layers"]["model.embed_tokens"]["kind"] == "embedding"
    assert saved.layout == "qexport" and "quantized embedding" in saved.engines["transformers"]
    loaded = load_quantized(saved.path)
    assert loaded.lm_head.qdata is loaded.model.embed_tokens.qdata
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert qexport.model_size(loaded).total_bytes == qexport.model_size(model).total_bytes


# ----------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------
def _run_lookup(nodes, inits, ids, opset=21):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"ids": ids.numpy()})[0])


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
@pytest.mark.parametrize("form", ["gbq", "standard"])
@pytest.mark.parametrize("k", [72, 96])  # 72: MatMulNBits pads the last block of 16 / 32, the lookup cuts it off
def test_onnx_lookups_equal_the_reference_rows(spec, form, k):
    pytest.importorskip("onnxruntime")
    from qexport.formats import _load
    from qexport.lowering.embedding import gbq_block, gbq_lookup, nbits_weight, standard_lookup
    from qexport.lowering.qdq import weight_initializers

    torch.manual_seed(1)
    qw = quantize_weight(torch.randn(40, k), spec)
    ids = torch.tensor([[0, 39, 5], [5, 17, 2]])
    if form == "gbq":
        if gbq_block("int", spec.bits, qw.group, k) is None:
            pytest.skip(f"{spec.describe()} has no GatherBlockQuantized form")
        w, inits = nbits_weight("w", qw.qdata, qw.scale, qw.zero_point, "int", spec.bits, qw.group, k, spec.symmetric)
        nodes, more, _ = gbq_lookup("e", "ids", "rows", 2, w)
        inits += more
    else:
        zp = None if qw.zero_point is None else _load(qw.zero_point, spec.bits, qw.num_groups, False)
        w, inits = weight_initializers("w", qw.codes(), qw.scale, zp, spec.bits, spec.symmetric, qw.group, k)
        nodes, _ = standard_lookup("e", "ids", "rows", 2, w, private=True)
    got = _run_lookup(nodes, inits, ids, opset=25 if spec.bits == 2 else 21)
    assert torch.equal(got, F.embedding(ids, qw.dequantize()))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.mark.parametrize("form,spec", [("auto", INT4G32), ("standard", QuantSpec(bits=8))])
def test_export_stores_the_tied_weight_once_and_matches_torch(form, spec, tok, tmp_path):
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    from qexport.export import export_onnx, verify

    recipe = emb_recipe(spec)
    res = export_onnx(tiny_llama(tie=True), tmp_path / form, recipe, tok, embedding_form=form, ort_accuracy_level=0)
    proto = onnx.load(str(res.path / "model.onnx"))
    rows = {r["name"]: r for r in res.report["layers"]}
    # (the GroupQueryAttention form's rotary cos / sin tables are as large: left out by name)
    codes = [t for t in proto.graph.initializer
             if len(t.raw_data) >= 512 * 64 * spec.bits // 8 and not t.name.startswith("gqa.")]
    assert len(codes) == 1, [t.name for t in codes]  # the table, once
    readers = [n for n in proto.graph.node if codes[0].name in n.input]
    if form == "auto":
        assert {n.op_type for n in readers} == {"GatherBlockQuantized", "MatMulNBits"}
        assert rows["model.embed_tokens"]["onnx"] == "com.microsoft.GatherBlockQuantized int4 block 32"
        assert rows["lm_head"]["onnx"].startswith("com.microsoft.MatMulNBits int4 block 32")
    else:
        assert {n.op_type for n in readers} == {"Cast", "DequantizeLinear"}  # the lookup's Cast copy, the lm_head
        assert rows["model.embed_tokens"]["onnx"] == "Gather + DequantizeLinear int8 per-row"
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(res.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / "optimized.onnx"))
        # 2 layers x (packed QKV, o, gate, up, down) + lm_head: fused too
        assert sum(n.op_type == "MatMulNBits" for n in optimized.graph.node) == 11
    out = verify(res.path, reference=qexport.quantize(tiny_llama(tie=True), recipe),
                 session_config={"session.qdq_matmulnbits_accuracy_level": "0"}, decode_steps=3)
    assert out["max_abs"] < 1e-4 and out["top1_agreement"] == 1.0, out


# ----------------------------------------------------------------------------------------------------
# Compile back-end
# ----------------------------------------------------------------------------------------------------
def test_compiled_model_matches_eager_with_a_quantized_tied_table():
    pytest.importorskip("onnxruntime")
    import qexport.backend as B

    torch._dynamo.reset()
    model = tiny_llama(tie=True)
    recipe = emb_recipe()
    eager = qexport.quantize(copy.deepcopy(model), recipe)
    compiled = torch.compile(copy.deepcopy(model), backend="qexport",
                             options={"recipe": recipe, "target": "onnxruntime"})
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(IDS).logits, eager(IDS).logits, atol=1e-5, rtol=1e-5)
        counts = B.reports()[-1].counts()
        assert counts["annotate"]["embedding"] == 1 and counts["convert"]["embedding"] == 1
        assert counts["convert"]["qlinear"] == 15  # lm_head included, on the table's constants
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# Scaled embeddings (Gemma)
# ----------------------------------------------------------------------------------------------------
def test_a_scaled_embedding_is_quantized_with_its_scale_everywhere(tmp_path):
    """Gemma's embedding multiplies the rows by sqrt(hidden_size): the quantized table keeps that factor in
    eager, in a saved folder and in the ONNX export; another nn.Embedding subclass still stays float."""
    from families import tiny_model

    from qexport.export import export_onnx, verify

    model = tiny_model("gemma3")
    recipe = emb_recipe(QuantSpec(bits=8))
    q = qexport.quantize(copy.deepcopy(model), recipe)
    emb = q.model.embed_tokens
    assert isinstance(emb, QEmbedding) and float(emb.embed_scale) == float(model.model.embed_tokens.embed_scale) == 8.0
    assert q.lm_head.qdata is emb.qdata
    ref = copy.deepcopy(model)
    ref.model.embed_tokens.weight.data = emb.dequantized_weight()  # tied: the lm_head reads it too
    for name, m in q.named_modules():
        if isinstance(m, QLinear) and name != "lm_head":
            ref.get_submodule(name).weight = nn.Parameter(m.dequantized_weight())
    ids = IDS % model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        saved = save_quantized(q, tmp_path / "q", word_tokenizer())
        manifest = json.loads((saved.path / MANIFEST_FILE).read_text())
        assert manifest["layers"]["model.embed_tokens"]["embed_scale"] == 8.0
        assert torch.equal(load_quantized(saved.path)(ids).logits, q(ids).logits)
    pytest.importorskip("onnxruntime")
    res = export_onnx(copy.deepcopy(model), tmp_path / "onnx", recipe, word_tokenizer(), ort_accuracy_level=0)
    out = verify(res.path, reference=q, session_config={"session.qdq_matmulnbits_accuracy_level": "0"},
                 decode_steps=2)
    assert out["max_abs"] < 1e-4 and out["top1_agreement"] == 1.0, out

    class Doubled(nn.Embedding):
        def forward(self, ids):
            return 2 * super().forward(ids)

    other = tiny_llama(tie=False)
    other.model.embed_tokens.__class__ = Doubled
    with pytest.warns(UserWarning, match="embed_tokens stays float: Doubled is a subclass of nn.Embedding"):
        qexport.quantize(other, emb_recipe(QuantSpec(bits=8)))
