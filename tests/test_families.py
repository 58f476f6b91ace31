"""The support matrix, family x path (``qexport models``), checked cell by cell on tiny random models of each
family (tests/families.py): every cell behaves as :func:`qexport.models.architectures.support` says, with the
tolerances it states (``PATHS``); a refused cell raises UnsupportedOp with the reason. README's table is the
output of ``qexport models --markdown``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import qexport
from qexport.errors import UnsupportedOp
from qexport.models.architectures import (ARCHITECTURES, ONNX_FUSION_OPS, PATHS, describe, find_architecture,
                                         onnx_fusions, support, support_markdown)
from qexport.prepare import quantize_model

from families import FAMILIES, tiny_model
from tiny import word_tokenizer

IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))  # longer than Gemma's window (8)
CALIB = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(2))
EXACT_ORT = {"session.qdq_matmulnbits_accuracy_level": "0"}


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(512)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def logits(model, **kwargs) -> torch.Tensor:
    return model(input_ids=IDS, **kwargs).logits


def test_every_family_of_the_table_has_a_tiny_model_and_every_path_a_check():
    assert {find_architecture(tiny_model(f)).family for f in FAMILIES} == {a.family for a in ARCHITECTURES}
    assert set(CHECKS) == set(PATHS)


def test_folds_keep_the_float_model():
    """AWQ's and SmoothQuant's scale groups, read from the table, fold random scales exactly in every family."""
    from qexport.algorithms.awq import fold_scales, scale_groups

    for fam in FAMILIES:
        model = tiny_model(fam)
        ref = logits(model)
        facts = describe(model)
        g = torch.Generator().manual_seed(0)
        keys = []
        for block in model.get_submodule(facts.arch.layers):
            groups, notes = scale_groups(block, facts)
            assert not notes, (fam, notes)
            keys = [gr.key for gr in groups]
            with torch.no_grad():
                for group in groups:
                    fold_scales(group, torch.exp(torch.randn(group.n_prev, generator=g)))
        assert keys == (["attn_in", "attn_out", "mlp_in", "mlp_out"] if facts.arch.gated
                        else ["attn_in", "attn_out", "mlp_in"]), fam
        assert rel(logits(model), ref) < 1e-4, fam


def _rtn(fam, tok):
    return rel(logits(qexport.quantize(tiny_model(fam), "w8")), logits(tiny_model(fam))), 0.03


def _gptq(fam, tok):
    return rel(logits(quantize_model(tiny_model(fam), "w4g64-gptq", tok, CALIB)), logits(tiny_model(fam))), 0.3


def _awq(fam, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fold that had to be undone warns: none may
        q = quantize_model(tiny_model(fam), "w4g128-awq", tok, CALIB)
    return rel(logits(q), logits(tiny_model(fam))), 0.35


def _smoothquant(fam, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        q = quantize_model(tiny_model(fam), "w8a8-dynamic-sq", tok, CALIB)
    return rel(logits(q), logits(tiny_model(fam))), 0.05


def _rotation(fam, tok):
    from qexport.algorithms.rotate import rotate_model

    model = tiny_model(fam)
    rotate_model(model)
    return rel(logits(model), logits(tiny_model(fam))), 1e-5


def _kv_cache(fam, tok):
    from qexport.kvcache import QuantizedKVCache

    model = tiny_model(fam)
    return rel(logits(model, cache=QuantizedKVCache("int8"), use_cache=True), logits(model)), 0.02


def _compile(target, tol):
    def check(fam, tok):
        q = qexport.quantize(tiny_model(fam), "w8")
        eager = logits(q)
        torch._dynamo.reset()
        try:
            out = logits(torch.compile(q, backend="qexport", options={"target": target}))
        finally:
            torch._dynamo.reset()
        return rel(out, eager), tol
    return check


def _onnx_ort(fam, tok, tmp_path):
    from qexport.export import export_onnx, verify

    res = export_onnx(tiny_model(fam), tmp_path / "x", "w8", tok)
    # the ONNX fusions did what the architecture table says: each listed part fused, the others not
    changed = {p["name"]: sum(p["changed"].values()) for p in res.report["fusions"]}
    for what, why in onnx_fusions(find_architecture(tiny_model(fam))).items():
        assert (changed[ONNX_FUSION_OPS[what][0]] > 0) == (why is None), (fam, what, changed)
    v = verify(res.path, reference=qexport.quantize(tiny_model(fam), "w8"), session_config=EXACT_ORT, decode_steps=2)
    return v["max_rel"], 1e-5


def _onnx_tensorrt(fam, tok, tmp_path):
    from qexport.export import export_onnx, lint_tensorrt

    res = export_onnx(tiny_model(fam), tmp_path / "x", "w8", tok, target="tensorrt")
    assert lint_tensorrt(res.path / "model.onnx") == []
    return 0.0, 0.0


def _saved_folder(fam, tok, tmp_path):
    from qexport.checkpoint import load_quantized, save_quantized

    q = qexport.quantize(tiny_model(fam), "w4g64-sym")
    loaded = load_quantized(save_quantized(q, tmp_path / "q", tok).path)
    assert torch.equal(logits(loaded), logits(q))
    return 0.0, 0.0


def _gguf(fam, tok, tmp_path):
    from qexport.export.gguf import export_gguf

    from tiny import bpe_tokenizer

    res = export_gguf(quantize_model(tiny_model(fam), "gguf-q8_0"), tmp_path / "m.gguf", tokenizer=bpe_tokenizer())
    assert res.report["readback"]["bit_identical"] and res.report["readback"]["tensors"] >= 10
    return 0.0, 0.0


CHECKS = {"rtn": _rtn, "gptq": _gptq, "awq": _awq, "smoothquant": _smoothquant, "rotation": _rotation,
          "kv_cache": _kv_cache, "compile_inductor": _compile("inductor", 1e-2),
          "compile_onnxruntime": _compile("onnxruntime", 0.03), "onnx_ort": _onnx_ort,
          "onnx_tensorrt": _onnx_tensorrt, "saved_folder": _saved_folder, "gguf": _gguf}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fam", FAMILIES)
def test_cell(fam, path, tok, tmp_path):
    status, note = support(find_architecture(tiny_model(fam)))[path]
    check = CHECKS[path]
    args = (fam, tok, tmp_path) if path in ("onnx_ort", "onnx_tensorrt", "saved_folder", "gguf") else (fam, tok)
    if status == "refused":
        with pytest.raises(UnsupportedOp, match=re.escape(note[:60])):
            check(*args)
        return
    err, tol = check(*args)
    assert err <= tol, (fam, path, err, tol)


def test_models_command_lists_every_family_with_its_layout(capsys):
    import json

    from qexport.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  (")[0].strip() for line in lines[:len(ARCHITECTURES)]] == [a.family for a in ARCHITECTURES]
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["Phi-3"]["layout"]["qkv"] == ["qkv_proj"] and data["Gemma 2"]["layout"]["norm"] == "rms_1p"
    assert data["OPT"]["paths"]["rotation"]["status"] == "refused"
    assert set(data["Llama"]["paths"]) == set(PATHS)


def test_readme_table_is_the_command_output(capsys):
    from qexport.cli import main

    assert main(["models", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table == support_markdown()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table.strip() in readme, "README's support table is stale: paste the output of `qexport models --markdown`"
