"""The perplexity protocol, checked against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from qexport.errors import DataError, InvalidConfig
from qexport.eval import perplexity, tokenize

from tiny import EMMA, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def model_and_tok():
    return tiny_llama(seed=3), word_tokenizer()


def direct_ppl(model, ids, tokens, window):
    ids = ids[:tokens]
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window]
        if chunk.numel() < 2:
            continue
        with torch.no_grad():
            logits = model(chunk[None]).logits[0]
        for t in range(chunk.numel() - 1):  # token by token, deliberately naive
            nll -= F.log_softmax(logits[t], -1)[chunk[t + 1]].item()
            count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("tokens,window", [(256, 64), (300, 64), (129, 64)])
def test_perplexity_matches_direct_computation(model_and_tok, tokens, window):
    model, tok = model_and_tok
    text = EMMA.read_text()[:20000]
    res = perplexity(model, tok, text, tokens=tokens, window=window)
    want, count = direct_ppl(model, tokenize(tok, text), tokens, window)
    assert res.tokens == tokens - (1 if tokens % window == 1 else 0)
    assert res.predicted == count
    assert res.windows == math.ceil(tokens / window) - (1 if tokens % window == 1 else 0)
    assert res.ppl == pytest.approx(want, rel=1e-5)


def test_tokenize_has_no_special_tokens(model_and_tok):
    _, tok = model_and_tok
    ids = tokenize(tok, "Emma Woodhouse, handsome")
    assert tok.bos_token_id not in ids.tolist()
    assert ids.tolist() == tok("Emma Woodhouse, handsome", add_special_tokens=False)["input_ids"]


def test_text_shorter_than_a_window_is_an_error(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(DataError, match="fewer than one window of 512"):
        perplexity(model, tok, "Emma Woodhouse, handsome, clever, and rich.")


def test_fewer_tokens_than_asked_warns_and_uses_all(model_and_tok):
    model, tok = model_and_tok
    text = EMMA.read_text()[:3000]
    n = tokenize(tok, text).numel()
    with pytest.warns(UserWarning, match="fewer than the 100000"):
        res = perplexity(model, tok, text, tokens=100000, window=128)
    assert res.tokens == n


@pytest.mark.parametrize("kw", [{"tokens": 0}, {"tokens": 1}, {"window": 1}, {"tokens": "8192"}])
def test_bad_protocol_arguments(model_and_tok, kw):
    model, tok = model_and_tok
    with pytest.raises(InvalidConfig):
        perplexity(model, tok, EMMA.read_text()[:5000], **kw)


def test_comparison_table_format():
    """The table `qexport eval` / `qexport demo` print (README quotes it): columns, widths, number formats."""
    from qexport.report import comparison_table

    rows = [{"variant": "fp32", "ppl": 20.0, "size_bytes": 538_000_000, "quantized_linear_bytes": 0,
             "quantized_ratio_vs_fp16": None, "bits_per_weight": None},
            {"variant": "w8", "ppl": 20.5, "size_bytes": 200_049_999, "quantized_linear_bytes": 100_000_000,
             "quantized_ratio_vs_fp16": 0.5, "bits_per_weight": 8.0},
            {"variant": "w2g64", "ppl": 123456.0, "size_bytes": 90_000_000, "quantized_linear_bytes": 30_000_000,
             "quantized_ratio_vs_fp16": 0.15, "bits_per_weight": 2.5}]
    assert comparison_table(rows, 20.0).splitlines() == [
        "variant       ppl    x fp32  model MB  linears MB  vs fp16  bits/w",
        "-------  --------  --------  --------  ----------  -------  ------",
        "fp32       20.000    1.0000     538.0           -        -      32",
        "w8         20.500    1.0250     200.0       100.0    0.500    8.00",
        "w2g64    1.23e+05  6.17e+03      90.0        30.0    0.150    2.50",
    ]


def test_measure_variant_leaves_the_model_float(model_and_tok):
    from qexport.report import measure_variant

    model, tok = model_and_tok
    text = EMMA.read_text()[:20000]
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    row = measure_variant("w8", model, tok, text, tokens=256, window=64, recipe="w8")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # a copy was quantized
    assert row["layers_quantized"] == 14 and 7.9 < row["bits_per_weight"] < 8.5
    assert row["ppl"] == pytest.approx(perplexity(model, tok, text, tokens=256, window=64).ppl, rel=0.05)
    assert row["tokens"] == 256 and row["windows"] == 4 and "generation" not in row
