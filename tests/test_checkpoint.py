"""Saved quantized folders (qexport.checkpoint): every preset and recipe option round-trips bit for bit, the
tensors are safetensors that the safetensors package reads, bad folders give one-line errors, and every
command takes a saved folder as its model without quantizing again.

Bit-identical means ``torch.equal`` on the logits: the loaded model holds the very codes, scales and float
tensors that were saved, and runs the same reference kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qexport
from qexport.checkpoint import (INDEX_FILE, MANIFEST_FILE, WEIGHTS_FILE, is_quantized_folder, load_quantized,
                                save_quantized)
from qexport.cli import main
from qexport.config import QuantSpec, Recipe, Rule
from qexport.errors import CalibrationError, CheckpointError, InvalidConfig, QExportError
from qexport.modules import QLinear
from qexport.prepare import CalibrationSet, quantize_model

from tiny import EMMA, save_tiny_checkpoint, tiny_llama, word_tokenizer

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(4, 512, (4, 32), generator=torch.Generator().manual_seed(2))
STATIC_FALLBACK = Recipe(name="static-fallback", rules=(
    Rule("*.down_proj", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor", static_fallback_ratio=1.5)),
    Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor", symmetric=False)),
))
MIXED = Recipe(name="mixed", rules=(
    Rule("*.q_proj", QuantSpec(bits=8, granularity="per_tensor")),
    Rule("*.k_proj", QuantSpec(bits=4, group_size=48)),  # a partial last group on K = 64
    Rule("*.v_proj", None),
    Rule("*", QuantSpec(bits=2, group_size=32, symmetric=False, observer="mse")),
))
G32_SYM = Recipe(name="w4g32-sym", rules=(Rule("*", QuantSpec(bits=4, group_size=32)),))  # 32 divides 64 and 160
G32_ASYM = Recipe(name="w4g32", rules=(Rule("*", QuantSpec(bits=4, group_size=32, symmetric=False)),))
ATTN8_MLP4 = Recipe(name="attn8-mlp4", rules=(
    Rule("*.self_attn.*", QuantSpec(bits=8)),
    Rule("*.down_proj", None),
    Rule("*", QuantSpec(bits=4, group_size=32)),
))
GPTQ_SYM = Recipe(name="gptq-g32-sym", algorithm="gptq", rules=(Rule("*", QuantSpec(bits=4, group_size=32)),))
AWQ_SYM = Recipe(name="awq-g32-sym", algorithm="awq", rules=(Rule("*", QuantSpec(bits=4, group_size=32)),))


def _quantized(recipe, tie=False, calibration=None):
    model = tiny_llama(tie=tie)
    return quantize_model(model, recipe, calibration=calibration)


@torch.no_grad()
def _round_trip(model, path, **kw):
    ref = model(IDS).logits
    saved = save_quantized(model, path, word_tokenizer(), **kw)
    loaded = load_quantized(path)
    return saved, loaded, ref, loaded(IDS).logits


@pytest.mark.parametrize("recipe", ["w8", "w4g128", "w4g128-sym", "w4g64", "nf4-dq", "w2g64", "w8-trt",
                                    "w8a8-dynamic", "w8a8-llmint8", MIXED])
@pytest.mark.parametrize("tie", [False, True])
def test_presets_round_trip_bit_identical(recipe, tie, tmp_path):
    model = _quantized(recipe, tie=tie)
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got)
    assert is_quantized_folder(saved.path)
    before = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    after = {n: m for n, m in loaded.named_modules() if isinstance(m, QLinear)}
    assert before.keys() == after.keys()
    for name, m in before.items():
        for key, t in m.quantized_weight().tensors().items():
            assert torch.equal(t, after[name].quantized_weight().tensors()[key]), (name, key)
        assert m.spec == after[name].spec and m.act_spec == after[name].act_spec
    assert loaded.qexport_report.to_dict() == model.qexport_report.to_dict()
    if tie:  # stored once, tied again
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def test_static_activations_and_fallback_layers_round_trip(tmp_path):
    model = _quantized(STATIC_FALLBACK, calibration=CALIB)
    fallen = [n for n, m in model.named_modules() if isinstance(m, QLinear) and m.activation_fallback]
    assert fallen, "the planted ratio should leave some down_proj with float activations"
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got)
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            twin = loaded.get_submodule(name)
            assert twin.activation_fallback == m.activation_fallback and twin.act_zero_point == m.act_zero_point
            if m.needs_calibration:
                assert torch.equal(twin.act_scale, m.act_scale)
    assert saved.layout == "qexport"
    assert loaded.qexport_report.calibration["samples"] == 4  # token ids given: their shape and hash are recorded


def test_rotation_gptq_and_kv_cache_round_trip(tmp_path):
    recipe = Recipe(name="rot-gptq-kv", algorithm="gptq", options={"rotate": "hadamard"}, kv_cache="int8",
                    rules=(Rule("*", QuantSpec(bits=4, group_size=32, symmetric=False)),))
    model = _quantized(recipe, calibration=CALIB)
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got)
    mlps = [layer.mlp for layer in loaded.model.layers]
    assert all(type(m).__name__ == "RotatedMLP" for m in mlps)
    assert mlps[0].online_rotation is mlps[1].online_rotation  # one shared matrix, stored once
    names = json.loads((saved.path / MANIFEST_FILE).read_text())["aliases"]
    assert "model.layers.1.mlp.online_rotation.matrix" in names
    assert loaded.qexport_report.recipe["kv_cache"] == {"bits": 8, "group_size": None, "symmetric": False}
    assert saved.layout == "qexport" and "rotation" in saved.engines["transformers"]


def test_sharded_folder_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    model = _quantized("w4g128")
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q", max_shard_bytes=64 * 1024)
    assert torch.equal(ref, got)
    index = json.loads((saved.path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (saved.path / WEIGHTS_FILE).exists()
    state = model.state_dict()
    for shard in shards:  # the safetensors package reads what the streaming writer wrote, tensor for tensor
        with safe_open(str(saved.path / shard), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                if name in state:
                    assert torch.equal(f.get_tensor(name), state[name])


def test_transformers_refuses_a_qexport_layout_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    saved = save_quantized(_quantized("nf4-dq"), tmp_path / "q", word_tokenizer())
    assert saved.layout == "qexport" and saved.engines["transformers"].startswith("refuses")
    with pytest.raises(ValueError, match="model type `qexport`"):
        AutoModelForCausalLM.from_pretrained(saved.path)


def test_same_codes_from_quantize_eval_and_export(tmp_path):
    """One preparation path: `qexport quantize`, the export and quantize_model give the same GPTQ codes."""
    ck = save_tiny_checkpoint(tmp_path / "ck")
    calib = CalibrationSet(samples=2, seq_len=64, seed=3)
    assert main(["quantize", "--model", str(ck), "--recipe", "w4g128-gptq", "--out", str(tmp_path / "q"),
                 "--calib-samples", "2"]) == 0
    from qexport.export.onnx import _prepare
    from qexport.models import load_model

    model, tok = load_model(ck)
    via_export, _, _ = _prepare(str(ck), "w4g128-gptq", None, CalibrationSet(samples=2))
    direct = quantize_model(model, "w4g128-gptq", tok, CalibrationSet(samples=2))
    saved = load_quantized(tmp_path / "q")
    for name, m in direct.named_modules():
        if isinstance(m, QLinear):
            for other in (via_export, saved):
                assert torch.equal(other.get_submodule(name).qdata, m.qdata), name
    other_seed = quantize_model(load_model(ck)[0], "w4g128-gptq", tok, calib)
    assert not all(torch.equal(other_seed.get_submodule(n).qdata, m.qdata)
                   for n, m in direct.named_modules() if isinstance(m, QLinear))
    prov = saved.qexport_report.calibration
    assert prov["samples"] == 2 and prov["seq_len"] == 512 and prov["seed"] == 0 and len(prov["sha256"]) == 64
    recipe = json.loads((tmp_path / "q" / "recipe.json").read_text())
    assert recipe["provenance"]["versions"]["torch"] == torch.__version__
    assert recipe["provenance"]["source_model"] == str(ck)


# ----------------------------------------------------------------------------------------------------
# Every command takes the folder
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    ck = save_tiny_checkpoint(root / "ck")
    assert main(["quantize", "--model", str(ck), "--recipe", "w4g128", "--out", str(root / "q")]) == 0
    return root


def test_eval_of_a_folder_equals_eval_of_its_recipe(saved_dir, tmp_path, capsys):
    args = ["--text", str(EMMA), "--tokens", "1024", "--json"]
    assert main(["eval", "--model", str(saved_dir / "q"), *args, str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--model", str(saved_dir / "ck"), "--recipe", "w4g128", *args, str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["ppl"] == b["ppl"] and a["fp_ppl"] == b["fp_ppl"]
    assert main(["eval", "--model", str(saved_dir / "q"), "--recipe", "w8", "--text", str(EMMA)]) == 2
    assert "quantized already" in capsys.readouterr().err


def test_export_and_verify_a_folder_without_quantizing(saved_dir, tmp_path, monkeypatch, capsys):
    def no_quantize(*a, **k):
        raise AssertionError("a saved folder must not be quantized again")

    monkeypatch.setattr(qexport.api, "quantize", no_quantize)
    monkeypatch.setattr(qexport, "quantize", no_quantize)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(saved_dir / "q"), "--out", str(out)]) == 0
    assert main(["verify", str(out), "--json", str(tmp_path / "v.json")]) == 0
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["max_abs"] < 1e-4 and res["top1_agreement"] == 1.0
    assert main(["export", "--model", str(saved_dir / "q"), "--recipe", "w8", "--out", str(tmp_path / "x")]) == 2


def test_verify_of_a_calibrated_export_rebuilds_it_from_the_recorded_windows(saved_dir, tmp_path):
    """An export made from a recipe (not a folder) records its calibration windows; verify draws the same."""
    out = tmp_path / "gptq"
    assert main(["export", "--model", str(saved_dir / "ck"), "--recipe", "w4g128-gptq", "--calib-samples", "2",
                 "--out", str(out)]) == 0
    recorded = json.loads((out / "export_report.json").read_text())["calibration"]
    assert recorded["samples"] == 2 and recorded["seed"] == 0
    assert main(["verify", str(out), "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["max_abs"] < 1e-4


def test_calibration_set_from_its_provenance_checks_the_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text")
    recorded = CalibrationSet(str(text), samples=3, seq_len=8, seed=1).provenance()
    assert CalibrationSet.from_provenance(recorded) == CalibrationSet(str(text), 3, 8, 1)
    text.write_text("another text")
    with pytest.raises(CalibrationError, match="has changed since it was used"):
        CalibrationSet.from_provenance(recorded)
    with pytest.raises(CalibrationError, match="token ids given in memory"):
        CalibrationSet.from_provenance({"token_ids_sha256": "0" * 64, "samples": 2, "seq_len": 8})


def test_tensorrt_export_of_a_folder(tmp_path):
    from qexport.export import export_onnx, lint_tensorrt

    saved = save_quantized(_quantized("w8-trt"), tmp_path / "q", word_tokenizer())
    res = export_onnx(saved.path, tmp_path / "trt", target="tensorrt")
    assert res.report["target"] == "tensorrt" and not lint_tensorrt(res.path / "model.onnx")
    assert res.report["source_model"] == str(saved.path.resolve())


def test_bench_measures_a_folder_eagerly_and_exported(saved_dir, tmp_path):
    q = str(saved_dir / "q")
    argv = ["bench", "--model", str(saved_dir / "ck"), "--variants", f"eager:{q},onnx:{q}", "--prompt-tokens", "8",
            "--new-tokens", "3", "--ppl-tokens", "256", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["results"]}
    eager, onnx = rows[f"eager:{q}"], rows[f"onnx:{q}"]
    assert eager["decode_tok_s"] > 0 and onnx["decode_tok_s"] > 0
    assert eager["size_bytes"] == qexport.model_size(load_quantized(q)).total_bytes
    assert abs(onnx["ppl"] / eager["ppl"] - 1) < 1e-3  # the same codes, in ORT (accuracy level 0 for int4)


def test_quantize_command_refuses_in_one_line(saved_dir, capsys):
    ck, q = str(saved_dir / "ck"), str(saved_dir / "q")
    for argv, message in ((["--recipe", "w8", "--out", q], "already exists"),
                          (["--recipe", "nf4-dq", "--out", q + "-ct", "--layout", "compressed-tensors"], "NF4"),
                          (["--recipe", "w9", "--out", q + "-x"], "unknown recipe preset")):
        assert main(["quantize", "--model", ck, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["quantize", "--model", q, "--recipe", "w8", "--out", q + "-again"]) == 2
    assert "quantized already" in capsys.readouterr().err
    assert not Path(q + "-ct").exists() and not Path(q + "-again").exists()


@torch.no_grad()
def test_compile_backend_runs_a_loaded_folder_as_it_is(tmp_path):
    """No recipe option: the layers the saved recipe kept float stay float (not the back-end's default w8)."""
    from qexport.backend import reports

    torch._dynamo.reset()
    keep_v = Recipe(name="v-float", rules=(Rule("*.v_proj", None), Rule("*", QuantSpec(bits=4, group_size=32))))
    model = load_quantized(save_quantized(_quantized(keep_v), tmp_path / "q").path)
    ref = model(IDS).logits
    earlier = len(reports())  # graphs other tests compiled in this process
    compiled = torch.compile(model, backend="qexport", options={"target": "eager"})
    assert torch.allclose(compiled(IDS).logits, ref, atol=1e-6, rtol=1e-6)
    assert {r.recipe for r in reports()[earlier:]} == {"as-quantized"}
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    return save_quantized(_quantized("w4g128"), tmp_path / "q", word_tokenizer()).path


def _rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _missing_tensor(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / WEIGHTS_FILE)
    state.pop("model.layers.0.mlp.up_proj.scale")
    save_file(state, folder / WEIGHTS_FILE)


def _misshaped_tensor(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / WEIGHTS_FILE)
    state["model.layers.1.self_attn.q_proj.qdata"] = state["model.layers.1.self_attn.q_proj.qdata"][:-1]
    save_file(state, folder / WEIGHTS_FILE)


def _truncated(folder):
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _escaping_index(folder):
    (folder / WEIGHTS_FILE).rename(folder / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(folder / "model-00001-of-00001.safetensors"), framework="pt") as f:
        names = list(f.keys())
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map[names[0]] = "../outside.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _pickle(folder):
    torch.save({"x": torch.zeros(2)}, folder / WEIGHTS_FILE)  # what a loader must never unpickle


def _unknown_layout(folder):
    _rewrite_json(folder / MANIFEST_FILE, lambda d: d.update(layout="gguf"))


def _unknown_version(folder):
    _rewrite_json(folder / MANIFEST_FILE, lambda d: d.update(version=99))


def _group_missing(folder):
    _rewrite_json(folder / MANIFEST_FILE, lambda d: d["layers"]["model.layers.0.mlp.up_proj"].pop("group"))


def _weight_dtype_not_a_dtype(folder):
    _rewrite_json(folder / MANIFEST_FILE,
                  lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(weight_dtype="save"))


def _weight_map_not_a_map(folder):
    (folder / WEIGHTS_FILE).rename(folder / "model-00001-of-00001.safetensors")
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": []}))


@pytest.mark.parametrize("damage, message", [
    (_missing_tensor, "lacks the tensor 'model.layers.0.mlp.up_proj.scale'"),
    (_misshaped_tensor, "model.layers.1.self_attn.q_proj.qdata' has shape"),
    (_truncated, "not a readable safetensors file"),
    (_escaping_index, "not a file inside"),
    (_pickle, "never unpickles"),
    (_unknown_layout, "'gguf'"),
    (_unknown_version, "format version 99"),
    (_group_missing, "unreadable entry"),
    (_weight_dtype_not_a_dtype, "dtype 'save'"),
    (_weight_map_not_a_map, "weight_map must map"),
])
def test_damaged_folders_are_refused_in_one_line(folder, damage, message, capsys):
    damage(folder)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_quantized(folder)
    assert main(["eval", "--model", str(folder), "--text", str(EMMA), "--tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_save_refuses_what_it_cannot_save(tmp_path):
    with pytest.raises(InvalidConfig, match="no quantized layer"):
        save_quantized(tiny_llama(), tmp_path / "f")
    uncalibrated = qexport.quantize(tiny_llama(), "w8a8-static")
    with pytest.raises(CalibrationError, match="not calibrated"):
        save_quantized(uncalibrated, tmp_path / "s")
    done = save_quantized(_quantized("w8"), tmp_path / "q")
    before = (done.path / WEIGHTS_FILE).read_bytes()
    with pytest.raises(QExportError, match="already exists"):
        save_quantized(_quantized("w4g128"), tmp_path / "q")
    assert (done.path / WEIGHTS_FILE).read_bytes() == before  # nothing the user had is touched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temporary folder
    save_quantized(_quantized("w4g128"), tmp_path / "q", force=True)
    assert load_quantized(tmp_path / "q").qexport_report.recipe["name"] == "w4g128"


def test_a_failed_save_leaves_the_old_folder_and_no_temporary_one(tmp_path, monkeypatch):
    from qexport import compressed

    done = save_quantized(_quantized(G32_SYM), tmp_path / "q")
    before = {p.name: p.read_bytes() for p in done.path.iterdir()}

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(compressed, "write_quantization_config", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(_quantized("w8"), tmp_path / "q", force=True)
    assert {p.name: p.read_bytes() for p in done.path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_a_header_whose_length_starts_like_a_pickle_is_read(tmp_path):
    """The first byte of a safetensors file is its header length's low byte: 0x80 there is no pickle."""
    from qexport._safetensors import SafetensorsFolder, TensorEntry, write_safetensors

    for n in range(1, 200):
        path = tmp_path / f"m{n}.safetensors"
        write_safetensors(path, [TensorEntry.of("a" * n, torch.arange(3.0))])
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no name length gave a 128-byte header")
    path.rename(tmp_path / WEIGHTS_FILE)
    assert torch.equal(SafetensorsFolder(tmp_path).get("a" * n), torch.arange(3.0))


def test_bfloat16_model_round_trip(tmp_path):
    """A bfloat16 model as transformers loads one (rotary tables, which are not saved, computed in float32)."""
    from transformers import AutoModelForCausalLM

    ck = save_tiny_checkpoint(tmp_path / "ck")
    model = quantize_model(AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16).eval(), G32_SYM)
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got) and loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert saved.layout == "qexport" and "bfloat16" in saved.engines["transformers"]


# ----------------------------------------------------------------------------------------------------
# The compressed-tensors layout, read by transformers
# ----------------------------------------------------------------------------------------------------
def _transformers_logits(path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert hf.dtype == torch.float32  # config.json's dtype; the default would be float16
    with torch.no_grad():
        return hf(IDS).logits


@pytest.mark.parametrize("recipe", ["w8", G32_SYM, ATTN8_MLP4, GPTQ_SYM, AWQ_SYM])
def test_compressed_tensors_folder_gives_transformers_the_same_logits(recipe, tmp_path):
    """transformers dequantizes exactly the same codes: logits within 1e-4 of the largest (observed: equal)."""
    model = _quantized(recipe, calibration=CALIB)
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got) and saved.layout == "compressed-tensors"
    assert saved.engines["transformers"].startswith("loads, same logits")
    config = json.loads((saved.path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and "lm_head" in config["ignore"]
    hf = _transformers_logits(saved.path)
    assert float((hf - ref).abs().max() / ref.abs().max()) < 1e-4


DYNAMIC_PER_TENSOR = Recipe(name="w8a8-dynamic-tensor", rules=(
    Rule("*", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor", dynamic=True)),))


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", DYNAMIC_PER_TENSOR, "w8a8-static"])
def test_compressed_tensors_w8a8_runs_activations_by_its_own_rule(recipe, tmp_path):
    """W8A8: the same int8 weights. transformers fake-quantizes activations with compressed-tensors' rule:
    dynamic scales absmax / 127.5 where qexport (and vLLM) use absmax / 127, so those logits are close, not
    equal (measured 7.7e-3 of the largest); static scales are the calibrated ``input_scale``, used as they are."""
    model = _quantized(recipe, calibration=CALIB)
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got) and saved.layout == "compressed-tensors"
    dynamic = recipe != "w8a8-static"
    assert ("127.5" in saved.engines["transformers"]) == dynamic
    scheme = json.loads((saved.path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert scheme["input_activations"]["strategy"] == ("token" if recipe == "w8a8-dynamic" else "tensor")
    assert scheme["input_activations"]["dynamic"] == dynamic
    hf = _transformers_logits(saved.path)
    err = float((hf - ref).abs().max() / ref.abs().max())
    assert err < (0.05 if dynamic else 1e-4), err


def test_asymmetric_groups_are_written_as_compressed_tensors_packs_them(tmp_path):
    """Asymmetric codes in the standard pack-quantized layout (zero points packed along the output rows, what
    vLLM reads). transformers 4.57 + compressed-tensors 0.20.1 cannot load that layout (llm-compressor issue
    1618): it must refuse loudly, as the engines note says, never run garbage."""
    from safetensors import safe_open

    model = _quantized(G32_ASYM)
    saved, loaded, ref, got = _round_trip(model, tmp_path / "q")
    assert torch.equal(ref, got) and saved.layout == "compressed-tensors"
    with safe_open(str(saved.path / WEIGHTS_FILE), framework="pt") as f:
        zp = f.get_tensor("model.layers.0.self_attn.q_proj.weight_zero_point")
        assert zp.dtype == torch.int32 and tuple(zp.shape) == (64 * 4 // 32, 2)
    assert saved.engines["transformers"].startswith("refuses")
    with pytest.raises(Exception, match="weight_zero_point|ignore_mismatched_sizes"):
        _transformers_logits(saved.path)


def test_layout_choice_and_unknown_formats(tmp_path):
    with pytest.raises(InvalidConfig, match="NF4"):
        save_quantized(_quantized("nf4-dq"), tmp_path / "n", layout="compressed-tensors")
    own = save_quantized(_quantized(G32_SYM), tmp_path / "own", layout="qexport")
    assert own.layout == "qexport"
    assert torch.equal(load_quantized(own.path)(IDS).logits, _quantized(G32_SYM)(IDS).logits)
    ct = save_quantized(_quantized(G32_SYM), tmp_path / "ct")

    def unknown(d):
        d["quantization_config"]["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"

    _rewrite_json(ct.path / "config.json", unknown)
    with pytest.raises(CheckpointError, match="'nvfp4-pack-quantized', which qexport does not read"):
        load_quantized(ct.path)
    from safetensors.torch import load_file, save_file

    ct = save_quantized(_quantized(G32_SYM), tmp_path / "ct2")
    state = load_file(ct.path / WEIGHTS_FILE)
    state.pop("model.layers.1.mlp.down_proj.weight_packed")
    save_file(state, ct.path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="lacks the tensor 'model.layers.1.mlp.down_proj.weight_packed'"):
        load_quantized(ct.path)
