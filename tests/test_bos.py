"""BOS in every perplexity and calibration window: detection from what the tokenizer does, the windows, the
override, the record in provenance and JSON, and the tokenizer files of an export folder."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qexport.algorithms.calibration import sample_windows
from qexport.cli import main
from qexport.errors import CalibrationError, InvalidConfig, NoBosToken
from qexport.eval import adds_bos, perplexity, resolve_bos, tokenize
from qexport.models import read_text
from qexport.prepare import CalibrationSet, _tokens

from tiny import EMMA, tiny_llama, word_tokenizer

TEXT = EMMA.read_text()
BOS = 1  # [BOS] in word_tokenizer's vocabulary


def bos_word_tokenizer():
    """word_tokenizer whose post-processor puts [BOS] in front, as Llama / Gemma tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = word_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="[BOS] $A", pair="[BOS] $A [BOS] $B",
                                                              special_tokens=[("[BOS]", BOS)])
    return tok


def no_bos_token_tokenizer():
    """A tokenizer without a BOS token at all."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=word_tokenizer().backend_tokenizer, pad_token="[PAD]",
                                   eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_adds_bos_from_what_the_tokenizer_does():
    assert adds_bos(bos_word_tokenizer()) is True
    assert adds_bos(word_tokenizer()) is False  # has a BOS token, but does not add it
    assert adds_bos(no_bos_token_tokenizer()) is False
    assert resolve_bos(bos_word_tokenizer(), False) is False and resolve_bos(word_tokenizer(), True) is True
    with pytest.raises(NoBosToken, match="has none"):
        resolve_bos(no_bos_token_tokenizer(), True)
    with pytest.raises(InvalidConfig):
        resolve_bos(word_tokenizer(), "yes")


def _reference(model, windows):
    """exp(mean cross-entropy) over explicit windows, every token after the first predicted."""
    total, n = 0.0, 0
    for w in windows:
        w = torch.tensor(w)
        logits = model(input_ids=w[None]).logits[0]
        total += float(F.cross_entropy(logits[:-1].float(), w[1:], reduction="sum"))
        n += w.numel() - 1
    return math.exp(total / n), n


@torch.no_grad()
def test_perplexity_windows_with_and_without_bos(model):
    tokens, window = 200, 64
    ids = tokenize(word_tokenizer(), TEXT)[:tokens].tolist()

    res = perplexity(model, bos_word_tokenizer(), TEXT, tokens=tokens, window=window)
    with_bos = [[BOS] + ids[i:i + window - 1] for i in range(0, tokens, window - 1)]
    ppl, predicted = _reference(model, with_bos)
    assert res.bos is True and res.tokens == tokens and res.predicted == tokens == predicted
    assert res.windows == 4 and res.window == window  # 63 + 63 + 63 + 11 text tokens, each behind BOS
    assert res.ppl == pytest.approx(ppl, rel=1e-5)

    plain = perplexity(model, word_tokenizer(), TEXT, tokens=tokens, window=window)
    without = [ids[i:i + window] for i in range(0, tokens, window)]
    ppl, predicted = _reference(model, without)
    assert plain.bos is False and plain.tokens == tokens and plain.predicted == tokens - 4 == predicted
    assert plain.ppl == pytest.approx(ppl, rel=1e-5)
    assert plain.to_dict()["bos"] is False

    # the override, both ways
    off = perplexity(model, bos_word_tokenizer(), TEXT, tokens=tokens, window=window, bos=False)
    assert off == plain
    on = perplexity(model, word_tokenizer(), TEXT, tokens=tokens, window=window, bos=True)
    assert on == res
    with pytest.raises(NoBosToken):
        perplexity(model, no_bos_token_tokenizer(), TEXT, tokens=tokens, window=window, bos=True)


def test_calibration_windows_start_with_bos():
    ids = tokenize(word_tokenizer(), read_text(CalibrationSet().path))
    calib = CalibrationSet(samples=3, seq_len=16, seed=2)
    with_bos = calib.tokens(bos_word_tokenizer())
    assert with_bos.shape == (3, 16) and (with_bos[:, 0] == BOS).all()
    assert torch.equal(with_bos[:, 1:], sample_windows(ids, 3, 15, 2))
    plain = calib.tokens(word_tokenizer())  # no BOS: the windows are what they always were
    assert torch.equal(plain, sample_windows(ids, 3, 16, 2))
    assert torch.equal(CalibrationSet(samples=3, seq_len=16, seed=2, bos=False).tokens(bos_word_tokenizer()), plain)
    with pytest.raises(CalibrationError):
        CalibrationSet(bos=1)
    with pytest.raises(CalibrationError, match="no text token after BOS"):
        CalibrationSet(samples=1, seq_len=1).tokens(bos_word_tokenizer())


def test_calibration_provenance_records_and_restores_bos():
    tokens, recorded = _tokens(CalibrationSet(samples=2, seq_len=16), bos_word_tokenizer())
    assert recorded["bos"] is True and (tokens[:, 0] == BOS).all()
    restored = CalibrationSet.from_provenance(recorded)
    assert restored.bos is True and torch.equal(restored.tokens(bos_word_tokenizer()), tokens)
    assert _tokens(CalibrationSet(samples=2, seq_len=16), word_tokenizer())[1]["bos"] is False
    assert _tokens(CalibrationSet(samples=2, seq_len=16, bos=False), bos_word_tokenizer())[1]["bos"] is False
    old = {k: v for k, v in recorded.items() if k != "bos"}  # recorded before BOS was: windows had none
    assert CalibrationSet.from_provenance(old).bos is False


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bos") / "ckpt"
    tiny_llama().save_pretrained(path, safe_serialization=True)
    bos_word_tokenizer().save_pretrained(path)
    return path


def test_cli_eval_records_bos(bos_dir, tmp_path, capsys):
    base = ["eval", "--model", str(bos_dir), "--recipe", "w8", "--text", str(EMMA), "--tokens", "256",
            "--window", "64"]
    assert main(base + ["--json", str(tmp_path / "on.json")]) == 0
    assert "each behind BOS" in capsys.readouterr().out
    on = json.loads((tmp_path / "on.json").read_text())
    assert main(base + ["--no-bos", "--json", str(tmp_path / "off.json")]) == 0
    off = json.loads((tmp_path / "off.json").read_text())
    assert on["bos"] is True and off["bos"] is False
    assert on["tokens"] == off["tokens"] == 256 and on["windows"] == 5 and off["windows"] == 4
    assert on["fp_ppl"] != off["fp_ppl"]


def test_cli_quantize_records_bos_in_recipe_provenance(bos_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(bos_dir), "--recipe", "w8a8-static", "--calib-samples", "2",
                 "--no-bos", "--out", str(out)]) == 0
    provenance = json.loads((out / "recipe.json").read_text())["provenance"]
    assert provenance["calibration"]["bos"] is False


def test_cli_bos_errors(tmp_path, capsys):
    path = tmp_path / "nobos"
    tiny_llama().save_pretrained(path, safe_serialization=True)
    no_bos_token_tokenizer().save_pretrained(path)
    assert main(["eval", "--model", str(path), "--recipe", "w8", "--text", str(EMMA), "--tokens", "128",
                 "--window", "64", "--bos"]) == 2
    err = capsys.readouterr().err
    assert "has none" in err and len(err.strip().splitlines()) == 1
    assert main(["verify", str(tmp_path / "any"), "--no-bos"]) == 2  # refused before the folder is read
    assert "--calib-text" in capsys.readouterr().err


def test_export_folder_tokenizer_files_and_ort_perplexity(bos_dir, tmp_path, capsys):
    """An export carries tokenizer.json & co., not a sentencepiece tokenizer.model; ONNX Runtime perplexity
    uses the same BOS windows as PyTorch."""
    pytest.importorskip("onnxruntime")
    from qexport.export.onnx import save_tokenizer

    class WithModelFile:  # a tokenizer whose save_pretrained also writes a (large) sentencepiece model
        def __init__(self, tok, json_file=True):
            self.tok, self.json_file = tok, json_file

        def save_pretrained(self, folder):
            self.tok.save_pretrained(folder)
            (Path(folder) / "tokenizer.model").write_bytes(b"x")
            if not self.json_file:
                (Path(folder) / "tokenizer.json").unlink()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kept = save_tokenizer(WithModelFile(bos_word_tokenizer()), tmp_path / "a")
    assert "tokenizer.json" in kept and "tokenizer.model" not in kept
    assert sorted(kept) == sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.model" in save_tokenizer(WithModelFile(bos_word_tokenizer(), json_file=False), tmp_path / "b")

    out = tmp_path / "x"
    assert main(["export", "--model", str(bos_dir), "--recipe", "fp32", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names and "tokenizer.model" not in names
    capsys.readouterr()
    assert main(["eval", "--backend", "onnxruntime", str(out), "--text", str(EMMA), "--tokens", "256",
                 "--window", "64", "--reference", "--json", str(tmp_path / "ort.json")]) == 0
    data = json.loads((tmp_path / "ort.json").read_text())
    assert data["bos"] is True and data["windows"] == 5
    assert data["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert main(["verify", str(out), "--decode-steps", "2", "--json", str(tmp_path / "v.json")]) == 0
    verified = json.loads((tmp_path / "v.json").read_text())  # its rows start with BOS too
    assert verified["bos"] is True and verified["top1_agreement"] == 1.0


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_bos():
    """SmolLM2's tokenizer adds no BOS, so its windows, and its perplexities, are what they always were."""
    from transformers import AutoTokenizer

    from qexport.models import smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    assert adds_bos(tok) is False
