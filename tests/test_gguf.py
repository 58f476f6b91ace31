"""GGUF export (qexport.export.gguf): the file gguf's reader reads back bit for bit, transformers' own GGUF
loader (an independent reader: names, row permutation, metadata) turns into the same model, the tokenizer
fields follow llama.cpp's, and what GGUF cannot state is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qexport._io import OutputExists
from qexport.cli import main
from qexport.errors import UnsupportedOp
from qexport.export.gguf import _permute_rows, _unpermute_rows, export_gguf
from qexport.modules import QLinear
from qexport.prepare import quantize_model

from tiny import EMMA, bpe_tokenizer as _bpe_tokenizer, tiny_llama

gguf = pytest.importorskip("gguf")

IDS = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(1))


def _llama(tie: bool = False, vocab: int = 320):
    return tiny_llama(tie=tie, vocab=vocab, hidden_size=256, intermediate_size=512, max_position_embeddings=256)


def test_row_permutation_is_llama_cpps_and_inverts():
    w = torch.arange(8 * 3).reshape(8, 3)
    p = _permute_rows(w, 2)  # per head of 4 rows: [0, 2, 1, 3] (rotate-half halves interleaved)
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert torch.equal(_unpermute_rows(p, 2), w)


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_transformers_reads_the_file_back_as_the_quantized_model(tie, tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantize_model(_llama(tie=tie), "gguf-q4_k")
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=_bpe_tokenizer(), float_type="f32")
    r = res.report
    assert r["readback"]["bit_identical"]
    # f32: 2 x 2 block norms and the final norm; q8_0: token_embd, and output.weight unless tied
    assert r["tensor_types"] == {"q4_k": 14, "q8_0": 1 if tie else 2, "f32": 5}
    assert r["readback"]["tensors"] == 14 + (1 if tie else 2)
    reader = gguf.GGUFReader(str(res.path))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_q.weight"] == "Q4_K" and names["token_embd.weight"] == "Q8_0"
    assert ("output.weight" in names) == (not tie)  # a tied lm_head is read from token_embd
    # the stored q rows are the model's rows, permuted whole (blocks unchanged)
    k_rows = torch.from_numpy(np.array(reader.get_tensor(names_index(reader, "blk.1.attn_k.weight")).data))
    assert torch.equal(_unpermute_rows(k_rows, 2), model.model.layers[1].self_attn.k_proj.qdata)
    fields = reader.fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["general.file_type"].contents() == 15

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@torch.no_grad()
def test_qwen_families_read_back_in_transformers(family, tmp_path):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim 128 > hidden / heads) under their own GGUF
    architectures; their q/k rows stay in Hugging Face's layout, as llama.cpp runs them with rotate-half RoPE.
    (transformers' GGUF reader takes Qwen3's head_dim from its default, 128, not from the file's key length.)"""
    import transformers
    from transformers import AutoModelForCausalLM

    sizes = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    cfg = transformers.Qwen2Config(**sizes) if family == "qwen2" else transformers.Qwen3Config(**sizes, head_dim=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():  # not the constants transformers initializes them to
        if "norm" in name or name.endswith("bias"):
            p.add_(0.2 * torch.randn_like(p))
    model = quantize_model(model, "gguf-q8_0")
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=_bpe_tokenizer(), float_type="f32")
    assert res.report["architecture"] == family and res.report["readback"]["bit_identical"]
    reader = gguf.GGUFReader(str(res.path))
    names = {t.name for t in reader.tensors}
    own = ({"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} if family == "qwen2"
           else {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"})
    assert own <= names and reader.fields[f"{family}.attention.head_count_kv"].contents() == 2
    q_rows = torch.from_numpy(np.array(reader.get_tensor(names_index(reader, "blk.1.attn_q.weight")).data))
    assert torch.equal(q_rows, model.model.layers[1].self_attn.q_proj.qdata)  # not permuted

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert loaded.config.model_type == family
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=2e-5, rtol=2e-5)


def names_index(reader, name: str) -> int:
    return [t.name for t in reader.tensors].index(name)


def test_a_mixed_recipe_float_head_and_float_file(tmp_path):
    """llama.cpp's Q2_K mix: q3_k for v_proj, o_proj and down_proj, q2_k for the rest; the file type is Q2_K."""
    model = quantize_model(_llama(vocab=320), "gguf-q2_k-mix")
    res = export_gguf(model, tmp_path / "q2.gguf", tokenizer=_bpe_tokenizer())
    r = res.report
    assert r["tensor_types"] == {"q2_k": 8, "q3_k": 6, "q8_0": 2, "f32": 5} and r["readback"]["bit_identical"]
    reader = gguf.GGUFReader(str(res.path))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.1.attn_v.weight"] == kinds["blk.1.attn_output.weight"] == kinds["blk.1.ffn_down.weight"] == "Q3_K"
    assert kinds["blk.1.attn_q.weight"] == kinds["blk.1.ffn_up.weight"] == "Q2_K"
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q2_K)
    # an all-float file (what llama.cpp's own quantizer starts from)
    flt = export_gguf(_llama(), tmp_path / "f32.gguf", tokenizer=_bpe_tokenizer(), float_type="f32")
    assert set(flt.report["tensor_types"]) == {"f32"} and flt.report["readback"]["tensors"] == 0
    with pytest.raises(OutputExists):
        export_gguf(_llama(), tmp_path / "f32.gguf", tokenizer=_bpe_tokenizer())


@pytest.mark.parametrize("recipe, words", [("w4g128", "no GGUF block type"), ("w8a8-dynamic", "activations")])
def test_what_gguf_cannot_state_is_refused_naming_the_layer(recipe, words, tmp_path):
    model = quantize_model(_llama(), recipe)
    with pytest.raises(UnsupportedOp, match=rf"model\.layers\.0\.self_attn\.q_proj: .*{words}.*gguf-q4_k"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=_bpe_tokenizer())
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.iterdir())


def test_cli_writes_a_gguf_file_and_refuses_onnx_options(tmp_path, capsys):
    folder = tmp_path / "model"
    _llama().save_pretrained(folder)
    _bpe_tokenizer().save_pretrained(folder)
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(folder), "--recipe", "gguf-q8_0", "--out", str(out),
                 "--float-type", "f32"]) == 0
    said = capsys.readouterr().out
    assert "read back bit-identical (16 quantized tensors)" in said and "file type q8_0" in said
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert main(["export", "--format", "gguf", "--model", str(folder), "--recipe", "gguf-q8_0", "--out",
                 str(tmp_path / "b.gguf"), "--target", "tensorrt"]) == 2
    assert "--target: ONNX export options" in capsys.readouterr().err
    assert main(["export", "--model", str(folder), "--recipe", "w8", "--out", str(tmp_path / "o"),
                 "--float-type", "f16"]) == 2
    assert "--float-type is for --format gguf" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--model", str(folder), "--recipe", "gguf-q8_0", "--out",
                 str(out)]) == 2  # exists
    assert not any(isinstance(m, QLinear) for m in _llama().modules())


def test_gptq_preset_keeps_a_tied_table_stored_once(tmp_path):
    """GPTQ rounds the block linears; the tied lm_head shares the embedding's round-to-nearest q8_0 table, so
    the file holds token_embd only, as llama.cpp's own files do."""
    calib = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    model = quantize_model(_llama(tie=True), "gguf-q4_k-gptq", calibration=calib)
    assert model.lm_head.qdata is model.model.embed_tokens.qdata
    rtn = quantize_model(_llama(tie=True), "gguf-q4_k")
    assert torch.equal(model.model.embed_tokens.qdata, rtn.model.embed_tokens.qdata)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.qdata, rtn.model.layers[0].mlp.down_proj.qdata)
    res = export_gguf(model, tmp_path / "g.gguf", tokenizer=_bpe_tokenizer())
    assert res.report["tensor_types"] == {"q4_k": 14, "q8_0": 1, "f32": 5}


def test_a_saved_folder_exports_as_it_is(tmp_path):
    from qexport.checkpoint import load_quantized, save_quantized

    model = quantize_model(_llama(tie=True), "gguf-q6_k")
    save_quantized(model, tmp_path / "q", _bpe_tokenizer())
    res = export_gguf(str(tmp_path / "q"), tmp_path / "q.gguf")
    assert res.report["recipe"] == "gguf-q6_k" and res.report["tensor_types"] == {"q6_k": 14, "q8_0": 1, "f32": 5}
    loaded = load_quantized(tmp_path / "q")
    reader = gguf.GGUFReader(str(res.path))
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert torch.equal(torch.from_numpy(np.array(down.data)), loaded.model.layers[0].mlp.down_proj.qdata)


def _gemma_or_phi(family: str):
    """Tiny Gemma 2 / Gemma 3 / Phi-3 models as transformers' GGUF loader rebuilds them: what it does not read
    from the file (Gemma's query_pre_attn_scalar, its layer types, its soft-capping) left at the defaults, so
    head_dim is Gemma's 256."""
    import transformers
    from transformers import AutoModelForCausalLM

    sizes = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    cfg = {"gemma2": lambda: transformers.Gemma2Config(**sizes, num_key_value_heads=1, head_dim=256, sliding_window=8),
           "gemma3": lambda: transformers.Gemma3TextConfig(**sizes, num_key_value_heads=1, head_dim=256,
                                                            sliding_window=8),
           "phi3": lambda: transformers.Phi3Config(**sizes, num_key_value_heads=2, pad_token_id=0)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # not the constants transformers initializes them to
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
@torch.no_grad()
def test_gemma_and_phi3_read_back_in_transformers(family, tmp_path):
    """Gemma's (1 + w) norms stored as 1 + w, its soft-capping and sliding-window layers in the metadata, the tied
    table read for the logits; Phi-3's fused qkv_proj and gate_up_proj stored fused. transformers' GGUF loader
    (which subtracts Gemma's 1 again) rebuilds the quantized model."""
    from transformers import AutoModelForCausalLM

    model = quantize_model(_gemma_or_phi(family), "gguf-q8_0")
    tokenizer = _bpe_tokenizer()
    tokenizer.pad_token = "<unk>"  # Phi-3's loader takes its pad id from the file (its default is out of range)
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, float_type="f32")
    arch = res.report["architecture"]
    assert arch == family and res.report["readback"]["bit_identical"]
    reader = gguf.GGUFReader(str(res.path))
    names = {t.name for t in reader.tensors}
    fields = reader.fields
    assert ("output.weight" in names) == (family == "phi3")  # Gemma ties its lm_head to the embedding
    layer = model.model.layers[0]
    if family == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.attn_q.weight" not in names
        assert fields["phi3.rope.dimension_count"].contents() == 16
        assert fields["phi3.attention.sliding_window"].contents() == 0
    else:
        norm = np.array(reader.get_tensor(names_index(reader, "blk.0.post_attention_norm.weight")).data)
        torch.testing.assert_close(torch.from_numpy(norm), layer.post_attention_layernorm.weight + 1, atol=0, rtol=0)
        assert fields[f"{arch}.attention.key_length"].contents() == 256
        assert fields[f"{arch}.attention.sliding_window"].contents() == 8
        assert fields[f"{arch}.attention.sliding_window_pattern"].contents() == [
            t == "sliding_attention" for t in model.config.layer_types]
        if family == "gemma2":
            assert fields["gemma2.attn_logit_softcapping"].contents() == 50.0
            assert fields["gemma2.final_logit_softcapping"].contents() == 30.0
        else:
            assert "blk.0.attn_q_norm.weight" in names
            assert fields["gemma3.rope.freq_base"].contents() == 1e6
            assert fields["gemma3.rope.freq_base_swa"].contents() == 1e4

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=2e-5, rtol=2e-5)


def test_what_llama_cpp_would_run_differently_is_refused(tmp_path):
    """llama.cpp derives Gemma's query scale from head_dim and always soft-caps Gemma 2; Phi-3's long-context
    RoPE needs factor tensors the export does not write: each refused before a file is written."""
    gemma = _gemma_or_phi("gemma2")
    gemma.config.query_pre_attn_scalar = 128
    with pytest.raises(UnsupportedOp, match="query_pre_attn_scalar=128.*1/sqrt\\(256\\)"):
        export_gguf(quantize_model(gemma, "gguf-q8_0"), tmp_path / "g.gguf", tokenizer=_bpe_tokenizer())
    gemma.config.query_pre_attn_scalar, gemma.config.final_logit_softcapping = 256, None
    with pytest.raises(UnsupportedOp, match="soft-cap"):
        export_gguf(quantize_model(gemma, "gguf-q8_0"), tmp_path / "g.gguf", tokenizer=_bpe_tokenizer())
    phi = _gemma_or_phi("phi3")
    phi.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                  "long_factor": [1.0] * 8, "original_max_position_embeddings": 128}
    with pytest.raises(UnsupportedOp, match="'longrope'"):
        export_gguf(quantize_model(phi, "gguf-q8_0"), tmp_path / "p.gguf", tokenizer=_bpe_tokenizer())
    assert not list(tmp_path.iterdir())


def test_a_sentencepiece_tokenizer_is_written_as_llama_cpps_llama_tokenizer(tmp_path):
    """A folder with a SentencePiece tokenizer.model (Gemma's, Llama 2's, Phi-3's): the fields gguf's
    SentencePieceVocab reads, padded with unused tokens to the model's vocabulary, Gemma's no-space-prefix flag,
    and the special tokens."""
    import io

    spm = pytest.importorskip("sentencepiece")
    n = 316  # 256 byte pieces, the text's characters and a few merges
    model_file = io.BytesIO()
    text = EMMA.read_text(encoding="utf-8")[:20000].splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model_file, vocab_size=n,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    folder = tmp_path / "gemma"
    _gemma_or_phi("gemma2").save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    model = quantize_model(_gemma_or_phi("gemma2"), "gguf-q8_0")
    model.config._name_or_path = str(folder)
    res = export_gguf(model, tmp_path / "m.gguf")
    assert res.report["tokenizer"] == "from tokenizer.model"
    fields = gguf.GGUFReader(str(res.path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    proc = spm.SentencePieceProcessor(model_proto=model_file.getvalue())
    assert len(tokens) == 320 and tokens[:n] == [proc.id_to_piece(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)]
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and types[n] == gguf.TokenType.UNUSED  # <0x00>, padding
    assert fields["tokenizer.ggml.scores"].contents()[:n] == pytest.approx([proc.get_score(i) for i in range(n)])
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False


def test_a_byte_fallback_bpe_tokenizer_gets_scores_in_merge_order(tmp_path):
    """A SentencePiece-style BPE kept as tokenizer.json only (byte fallback, no tokenizer.model): gguf's
    LlamaHfVocab gives the tokens and their types, and each token's score is -(rank of the merge that makes it),
    so llama.cpp's SentencePiece tokenizer merges in the BPE's order (checked once in llama.cpp: 60 of 60
    paragraphs of Emma tokenized to the same ids, against 4 with LlamaHfVocab's uniform -1000)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] +
                                  [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([EMMA.read_text(encoding="utf-8")[:20000]], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    res = export_gguf(quantize_model(LlamaForCausalLM(cfg).eval(), "gguf-q8_0"), tmp_path / "m.gguf", tokenizer=hf)
    assert res.report["tokenizer"] == "from tokenizer.json (SentencePiece-style BPE)"
    fields = gguf.GGUFReader(str(res.path)).fields
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    vocab = hf.get_vocab()
    assert fields["tokenizer.ggml.model"].contents() == "llama" and len(tokens) == 400
    assert all(vocab[t] == i for i, t in enumerate(tokens))
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<s>"]] == gguf.TokenType.CONTROL
    merges = json.loads(hf.backend_tokenizer.to_str())["model"]["merges"]
    for rank in (0, 1, len(merges) // 2, len(merges) - 1):
        left, right = merges[rank] if isinstance(merges[rank], list) else merges[rank].split(" ")
        assert scores[vocab[left + right]] == -rank
    assert scores[vocab["<s>"]] == 0.0
