"""Streamed quantization (qexport.stream): one decoder block at a time from the checkpoint's safetensors files,
bit-identical to quantizing the loaded model in memory, with peak memory far below the model's float size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qexport import QuantSpec, Recipe, Rule
from qexport.checkpoint import load_quantized, save_quantized
from qexport.errors import UnsupportedOp
from qexport.modules import QEmbedding, QLinear
from qexport.prepare import quantize_model
from qexport.stream import quantize_streamed, write_random_llama

from tiny import tiny_llama, word_tokenizer

CALIB = torch.randint(4, 512, (6, 32), generator=torch.Generator().manual_seed(0))


def _checkpoint(tmp_path: Path, tie: bool = False, **sizes) -> Path:
    folder = tmp_path / "float"
    model = tiny_llama(seed=3, tie=tie, **sizes).to(torch.bfloat16)  # stored as bf16, as checkpoints are
    model.save_pretrained(folder, max_shard_size="200KB")  # several shards with an index
    word_tokenizer().save_pretrained(folder)
    return folder


def _in_memory(folder: Path, recipe: str, out: Path):
    from qexport.models import load_model

    model, tok = load_model(folder)
    quantize_model(model, recipe, tok, CALIB if _calibrated(recipe) else None)
    save_quantized(model, out, tok)
    return load_quantized(out)


def _calibrated(recipe) -> bool:
    name = recipe if isinstance(recipe, str) else recipe.name
    return "gptq" in name or "awq" in name or name.endswith("-sq")


def _tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QLinear, QEmbedding)):
            out.update({f"{name}.{k}": v for k, v in mod.quantized_weight().tensors().items()})
    out.update({k: v for k, v in model.state_dict().items() if k not in out})
    return out


ROTATED_RTN = Recipe(name="w4g32-random", rules=(Rule("*", QuantSpec(bits=4, group_size=32)),),
                     options={"rotate": "random", "rotate_seed": 3})


@pytest.mark.parametrize("recipe, tie", [("w4g128", False), ("w4g128-gptq", False), ("w4g128-awq", False),
                                         ("gguf-q4_k-gptq", True), ("w8a8-dynamic", True),
                                         ("w2g64-gptq-hadamard", True), (ROTATED_RTN, False),
                                         ("w8a8-dynamic-sq", True)])
def test_streamed_is_bit_identical_to_in_memory(recipe, tie, tmp_path):
    """Every stored tensor, the report and the manifest the same. Rotated recipes too: the rotation made from
    the skeleton, each block rotated as it is read, a tied lm_head untied, the shared online rotation written
    once (the others its aliases)."""
    folder = _checkpoint(tmp_path, tie=tie, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    ref = _in_memory(folder, recipe, tmp_path / "mem")
    res = quantize_streamed(folder, recipe, tmp_path / "stream", tokenizer=word_tokenizer(),
                            calibration=CALIB if _calibrated(recipe) else None)
    assert res.blocks == 2 and res.report.to_dict()["layers"] == ref.qexport_report.to_dict()["layers"]
    got = load_quantized(res.folder.path)
    a, b = _tensors(got), _tensors(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    if recipe == "w8a8-dynamic-sq":  # smoothed (the scales folded into the norms), not left as it was
        from qexport._safetensors import SafetensorsFolder

        norm = SafetensorsFolder(folder).get("model.layers.0.input_layernorm.weight").float()
        assert not torch.equal(got.model.layers[0].input_layernorm.weight, norm)
    mem = json.loads((tmp_path / "mem" / "qexport_quantization.json").read_text())
    st = json.loads((res.folder.path / "qexport_quantization.json").read_text())
    for key in ("layout", "layers", "aliases", "rotation"):
        assert st[key] == mem[key], key
    if not isinstance(recipe, str) or "hadamard" in recipe:  # one stored online rotation, the rest aliases
        assert st["rotation"] and len(st["aliases"]) == 1
    recipe_file = json.loads((res.folder.path / "recipe.json").read_text())
    assert recipe_file["provenance"]["streamed"] is True
    if _calibrated(recipe):  # the same calibration forwards, whichever way the model is read
        a = recipe_file["report"]["algorithm"]
        b = json.loads((tmp_path / "mem" / "recipe.json").read_text())["report"]["algorithm"]
        assert a["name"] == b["name"] and {"smoothquant": "sq"}.get(a["name"], a["name"]) in recipe
        if a["name"] != "smoothquant":  # SmoothQuant's first pass runs the blocks, not the whole model
            assert a["forwards"] == b["forwards"] > 0 and a["forward_flops"] == b["forward_flops"] > 0
    else:
        assert "algorithm" not in recipe_file["report"]
    # one shard per block and one for the rest, each block's tensors together
    index = json.loads((res.folder.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    assert len({f for k, f in index.items() if k.startswith("model.layers.1.")}) == 1


def test_a_gemma_with_its_scaled_embedding_streams_bit_identical(tmp_path):
    """Gemma 3: (1 + w) norms, sliding-window layers, q/k norms, and the scaled embedding, whose factor the
    checkpoint does not store (rebuilt from the module), quantized with the table."""
    from families import tiny_model

    folder = tmp_path / "float"
    tiny_model("gemma3").to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    word_tokenizer().save_pretrained(folder)
    ref = _in_memory(folder, "w4g64-sym-emb8", tmp_path / "mem")
    res = quantize_streamed(folder, "w4g64-sym-emb8", tmp_path / "stream", tokenizer=word_tokenizer())
    got = load_quantized(res.folder.path)
    assert float(got.model.embed_tokens.embed_scale) == 8.0
    a, b = _tensors(got), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = CALIB[:2, :12]
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("recipe", ["w4g128-gptq", "w4g128-awq", "w8a8-dynamic-sq"])
def test_activations_spilled_to_disk_give_the_same_folder(recipe, tmp_path, monkeypatch):
    """max_activation_bytes=0: every block boundary's calibration activations on disk, read back batch by
    batch; the folder is the in-memory one (GPTQ then keeps its batches apart, in memory too:
    ONE_PASS_BYTES=0), and the spill files are gone afterwards."""
    from qexport.algorithms import gptq

    monkeypatch.setattr(gptq, "ONE_PASS_BYTES", 0)
    folder = _checkpoint(tmp_path, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    calib = torch.randint(4, 512, (12, 32), generator=torch.Generator().manual_seed(0))  # two batches of 8 and 4
    from qexport.models import load_model

    model, tok = load_model(folder)
    quantize_model(model, recipe, tok, calib)
    save_quantized(model, tmp_path / "mem", tok)
    res = quantize_streamed(folder, recipe, tmp_path / "stream", tokenizer=word_tokenizer(), calibration=calib,
                            max_activation_bytes=0)
    assert res.spilled_bytes >= 2 * 12 * 32 * 128 * 4  # the first block's inputs and outputs at least
    a, b = _tensors(load_quantized(res.folder.path)), _tensors(load_quantized(tmp_path / "mem"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "mem", "stream"]  # no spill folder left


def test_recipes_that_need_the_whole_model_are_refused(tmp_path):
    folder = _checkpoint(tmp_path)
    for recipe, words in (("w8a8-static", "static activation scales"), ("w8a8-static-sq", "static activation")):
        with pytest.raises(UnsupportedOp, match=words):
            quantize_streamed(folder, recipe, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


_CHILD = textwrap.dedent("""
    import json, sys
    from qexport.stream import quantize_streamed

    def kb(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    warm, out, *folders = sys.argv[1:]
    quantize_streamed(warm, "w4g128", out + "-warm")  # imports and first calls, on a small model
    runs = []
    for i, folder in enumerate(folders):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = kb("VmRSS")
        res = quantize_streamed(folder, "w4g128", f"{out}-{i}")
        runs.append({"base": base * 1024, "peak": kb("VmHWM") * 1024, "blocks": res.blocks})
    print(json.dumps(runs))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through Linux's /proc")
def test_peak_memory_is_one_block_whatever_the_depth(tmp_path):
    """The same random Llama at 4 and 16 blocks (hidden 512; 188 MB in fp32 at 16), quantized one after the
    other in a child process (Linux: the peak is reset through /proc before each, after a first run has
    imported everything): their peak RSS is the same within 10%, and at 16 blocks what the peak adds to the
    process's resident memory is under 40% of the float32 size: one block, the embedding and lm_head, the
    output being written (a larger model's share is smaller: docs/streaming.md's 1.2B model)."""
    write_random_llama(tmp_path / "warm", layers=1, hidden=128, intermediate=256, vocab=512)
    params = {n: write_random_llama(tmp_path / f"m{n}", layers=n, hidden=512, intermediate=1408, vocab=4096)
              for n in (4, 16)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "warm"), str(tmp_path / "q"),
                           str(tmp_path / "m4"), str(tmp_path / "m16")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(zip((4, 16), json.loads(proc.stdout.strip().splitlines()[-1])))
    assert [out[n]["blocks"] for n in (4, 16)] == [4, 16]
    runs = {n: (out[n]["peak"], out[n]["peak"] - out[n]["base"], 4 * params[n]) for n in (4, 16)}
    (peak4, _, _), (peak16, added, fp32) = runs[4], runs[16]
    assert peak16 < 1.1 * peak4 and added < 0.4 * fp32, {k: [v / 2**20 for v in r] for k, r in runs.items()}


def test_cli_quantize_stream(tmp_path, capsys):
    from qexport.cli import main

    folder = _checkpoint(tmp_path, hidden_size=128, intermediate_size=256)
    assert main(["quantize", "--model", str(folder), "--recipe", "w4g128", "--out", str(tmp_path / "q"),
                 "--stream"]) == 0
    said = capsys.readouterr().out
    assert "quantized streamed, 2 blocks" in said and "peak RSS" in said and "layout compressed-tensors" in said
    assert main(["quantize", "--model", str(folder), "--recipe", "w8a8-static", "--out", str(tmp_path / "s"),
                 "--stream"]) == 2
    assert "cannot be quantized block by block: static activation scales" in capsys.readouterr().err
    assert main(["quantize", "--model", str(folder), "--recipe", "w4g128-gptq", "--out", str(tmp_path / "g"),
                 "--stream", "--max-activation-gb", "0", "--calib-samples", "2"]) == 0
    assert "MB of activations spilled to disk" in capsys.readouterr().out
    assert main(["quantize", "--model", str(folder), "--recipe", "w4g128", "--out", str(tmp_path / "m"),
                 "--max-activation-gb", "1"]) == 2
    assert "--max-activation-gb is for --stream" in capsys.readouterr().err
