"""onnxruntime-genai runs an export folder as it is (qexport.export.genai): ``genai_config.json`` describes the
graph, genai's greedy tokens equal OnnxCausalLM's, and an export genai cannot run gets no file and a reason.

The tiny model's word-level tokenizer is saved in the folder, but genai's tokenizer does not implement
WordLevel models (it encodes most words as -1), so the generation test feeds token ids directly.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qexport
from qexport.config import KVCacheSpec, QuantSpec, Recipe, Rule
from qexport.errors import UnsupportedOp

from tiny import tiny_llama, word_tokenizer

pytest.importorskip("onnxruntime")

from qexport.export import OnnxCausalLM, export_onnx  # noqa: E402
from qexport.export.genai import GENAI_CONFIG_FILE, genai_config  # noqa: E402
from qexport.export.onnx import input_names, output_names  # noqa: E402

W4G32 = Recipe(name="w4g32", rules=(Rule("lm_head", None), Rule("*", QuantSpec(bits=4, group_size=32))))


def tiny_report(layers: int = 2, **changes) -> dict:
    """The parts of an export report that genai_config reads, as export_onnx writes them."""
    report = {"inputs": input_names(layers), "outputs": output_names(layers),
              "kv_cache": {"layers": layers, "kv_heads": 2, "head_dim": 16, "quantized": None},
              "ort_session_config": {"session.qdq_matmulnbits_accuracy_level": "4"}}
    return {**report, **changes}


def test_genai_config_fields_follow_the_model_config():
    cfg = tiny_llama().config
    c = genai_config(cfg, tiny_report())
    model, dec = c["model"], c["model"]["decoder"]
    assert model["type"] == "llama" and model["vocab_size"] == 512 and model["context_length"] == 1024
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 0)
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"]) == (2, 4, 2)
    assert dec["head_size"] == 16 and dec["hidden_size"] == 64 and dec["filename"] == "model.onnx"
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                             "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                              "present_value_names": "present.%d.value"}
    assert dec["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "4"
    assert dec["session_options"]["provider_options"] == []  # CPU
    search = c["search"]
    assert search["past_present_share_buffer"] is False and search["do_sample"] is False
    assert search["max_length"] == 1024 and search["num_beams"] == 1
    # several EOS ids stay a list; a missing pad id becomes the (first) EOS id
    cfg = copy.deepcopy(cfg)
    cfg.eos_token_id, cfg.pad_token_id = [2, 7], None
    model = genai_config(cfg, tiny_report())["model"]
    assert model["eos_token_id"] == [2, 7] and model["pad_token_id"] == 2


def test_genai_config_of_the_gqa_form_shares_the_kv_buffer():
    report = tiny_report(inputs=input_names(2, attention_form="gqa"), attention_form={"form": "gqa"})
    c = genai_config(tiny_llama().config, report)
    assert "position_ids" not in c["model"]["decoder"]["inputs"] and c["search"]["past_present_share_buffer"]
    with pytest.raises(UnsupportedOp, match="not the KV-cache interface genai binds"):  # inputs of the other form
        genai_config(tiny_llama().config, tiny_report(attention_form={"form": "gqa"}))


def test_genai_config_refuses_what_genai_cannot_run():
    cfg = tiny_llama().config
    quantized = tiny_report(kv_cache={"quantized": {"bits": 8}, "describe": "int8 per-token"})
    with pytest.raises(UnsupportedOp, match="cannot run a quantized KV cache"):
        genai_config(cfg, quantized)
    with pytest.raises(UnsupportedOp, match="not the KV-cache interface genai binds"):
        genai_config(cfg, tiny_report(layers=1))
    other = copy.deepcopy(cfg)
    other.model_type = "gpt_neox"
    with pytest.raises(UnsupportedOp, match="no plain-decoder model type for 'gpt_neox'"):
        genai_config(other, tiny_report())


@pytest.mark.parametrize("form", ["gqa", "standard"])
def test_genai_generates_the_same_greedy_tokens_as_onnx_causal_lm(tmp_path, form):
    """The GroupQueryAttention form (the default) runs in genai over one shared KV buffer, the standard form over
    a growing cache; both pick OnnxCausalLM's tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    res = export_onnx(tiny_llama(), tmp_path / "w4g32", W4G32, word_tokenizer(),
                      attention_form="auto" if form == "gqa" else "standard")
    folder = res.path
    assert res.report["genai"] == {"written": True} and res.report["attention_form"]["form"] == form
    assert json.loads((folder / "export_report.json").read_text())["genai"] == {"written": True}
    assert {"tokenizer.json", "tokenizer_config.json", GENAI_CONFIG_FILE} <= {p.name for p in folder.iterdir()}
    written = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    assert written["search"]["past_present_share_buffer"] == (form == "gqa")
    assert ("position_ids" in written["model"]["decoder"]["inputs"]) == (form == "standard")
    for key, value in res.report["ort_session_config"].items():
        assert written["model"]["decoder"]["session_options"][key] == value

    prompt, n = [5, 17, 42, 99, 7, 300, 12, 64], 16
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    ref = OnnxCausalLM(folder, threads=2).generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=2)
    assert got == ref.tolist() and len(got) == n, (got, ref.tolist())


def test_quantized_kv_cache_export_gets_no_genai_config_and_says_why(tmp_path):
    recipe = Recipe(name="fp32", rules=(Rule("*", None),)).with_kv_cache(KVCacheSpec(8))
    res = export_onnx(qexport.quantize(tiny_llama(), recipe), tmp_path / "kv8", None)
    assert not (res.path / GENAI_CONFIG_FILE).exists()
    entry = json.loads((res.path / "export_report.json").read_text())["genai"]
    assert entry == res.report["genai"] and entry["written"] is False
    assert entry["reason"].startswith("onnxruntime-genai cannot run a quantized KV cache")
