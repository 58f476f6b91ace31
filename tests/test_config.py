"""Tests of :mod:`qexport.config` and :mod:`qexport.presets`: QuantSpec / Rule / Recipe validation, the preset
table, JSON round-trips, matching."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qexport
import qexport.config
import qexport.presets
from qexport.algorithms import ALGORITHMS
from qexport.config import (
    Granularity,
    NumberFormat,
    Observer,
    QuantSpec,
    Recipe,
    Rule,
    load_recipe,
    match_pattern,
)
from qexport.errors import CalibrationError, InvalidConfig, QExportError, UnknownPreset
from qexport.presets import PRESETS, get_preset

PRESET_NAMES = list(PRESETS)
# the presets that need calibration data: for their algorithm at quantize() time, or for static activations
NEEDS_DATA = {"w8a8-static", "w8a8-static-hadamard", "w8a8-dynamic-sq", "w8a8-static-sq", "w4g128-gptq",
              "w4g64-gptq", "w2g64-gptq", "w2g64-gptq-hadamard", "w2g64-gptq-hadamard-attn4", "w4g128-awq",
              "w4g128-awq-gptq", "gguf-q4_k-gptq", "gguf-q2_k-gptq", "gguf-q2_k-mix-gptq",
              "gguf-q4_k-awq", "gguf-q2_k-mix-awq"}


# ------------------------------------------------------------------------------------------------
# Presets: validation and round-trips
# ------------------------------------------------------------------------------------------------
def test_preset_names():
    assert set(PRESET_NAMES) == {"w8", "w4g128", "w4g128-sym", "w4g64", "w4g64-sym", "nf4-dq", "w2g64", "w2g64-mse",
                                 "w8a8-dynamic", "w8a8-llmint8", "w8a8-static", "w8-trt", "w4g128-trt",
                                 "w4g128-head8", "w4g64-sym-emb8", "gguf-q8_0", "gguf-q4_0", "gguf-q6_k",
                                 "gguf-q4_k", "gguf-q3_k", "gguf-q2_k", "gguf-q2_k-mix"} | NEEDS_DATA
    for name, recipe in PRESETS.items():
        assert recipe.name == name
        assert get_preset(name) is recipe
        assert load_recipe(name) is recipe
    assert qexport.PRESETS is PRESETS and qexport.get_preset is get_preset


def test_one_preset_table():
    """Every named recipe is in PRESETS, in no other table, and `qexport recipes` lists every one."""
    assert not hasattr(qexport.presets, "CALIBRATED_PRESETS")
    for name in ("PRESETS", "CALIBRATED_PRESETS", "KV_CACHE_PRESETS", "get_preset"):
        assert not hasattr(qexport.config, name), name
    assert {n for n, r in PRESETS.items() if r.needs_data} == NEEDS_DATA
    from qexport.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["recipes"]) == 0
    firsts = [line.split()[0] for line in out.getvalue().splitlines() if line.strip()]
    assert [w for w in firsts if w in PRESETS] == PRESET_NAMES


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_needs_data_mark_is_what_quantizing_requires(name):
    """A preset's needs_data mark agrees with quantize() / calibrate(): presets whose algorithm needs data
    refuse to quantize without it; static-activation presets quantize, then refuse to run until calibrated;
    the others give a working model from the weights alone."""
    from tiny import tiny_llama

    r = PRESETS[name]
    assert r.needs_data == (r.algorithm_needs_data or r.needs_calibration)
    assert r.algorithm_needs_data == ALGORITHMS[r.algorithm].needs_data
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    if r.algorithm_needs_data:
        with pytest.raises(CalibrationError, match="needs calibration data"):
            qexport.quantize(model, name)
        return
    qexport.quantize(model, name)
    with torch.no_grad():
        if r.needs_calibration:
            with pytest.raises(CalibrationError, match="calibrate"):
                model(ids)
            qexport.calibrate(model, [ids])
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_validates_and_roundtrips_dict(name):
    r = PRESETS[name]
    assert isinstance(r, Recipe) and r.rules and r.algorithm in ALGORITHMS and r.algorithm in qexport.config.ALGORITHMS
    for rule in r.rules:
        assert isinstance(rule, Rule) and isinstance(rule.weight, QuantSpec)
        # re-validating the spec from its own fields gives the same spec
        assert QuantSpec(**rule.weight.to_dict()) == rule.weight
    d = r.to_dict()
    # plain JSON types only (enums are written as their string values)
    assert json.loads(json.dumps(d)) == d
    assert d["rules"][0]["weight"]["format"] in [f.value for f in NumberFormat]
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(json.loads(json.dumps(d))) == r


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_roundtrips_json_file(name, tmp_path):
    r = PRESETS[name]
    path = tmp_path / "sub" / f"{name}.json"  # parent folder is created
    out = r.to_json(path)
    assert Path(out) == path and path.is_file()
    assert json.loads(path.read_text(encoding="utf-8")) == r.to_dict()
    back = Recipe.from_json(path)
    assert back == r
    assert back.rules[0].weight.describe() == r.rules[0].weight.describe()
    assert load_recipe(path) == r  # a PathLike
    assert load_recipe(str(path)) == r  # a string ending in .json
    # no temporary files are left next to it
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{name}.json"]


def test_to_json_refuses_to_overwrite(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("precious", encoding="utf-8")
    with pytest.raises(QExportError, match="already exists") as ei:
        PRESETS["w8"].to_json(path)
    assert isinstance(ei.value, FileExistsError)
    assert path.read_text(encoding="utf-8") == "precious"
    PRESETS["w4g64"].to_json(path, overwrite=True)
    assert Recipe.from_json(path) == PRESETS["w4g64"]
    # and once written, writing again without overwrite is refused too
    with pytest.raises(QExportError):
        PRESETS["w8"].to_json(path)
    assert Recipe.from_json(path) == PRESETS["w4g64"]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("w8", "int8 per-channel sym"),
        ("w4g128", "int4 g128 asym"),
        ("w4g128-sym", "int4 g128 sym"),
        ("w4g128-trt", "int4 g128 sym restricted"),
        ("w8-trt", "int8 per-channel sym restricted"),
        ("w4g64", "int4 g64 asym"),
        ("nf4-dq", "nf4 g64 dq"),
        ("w2g64", "int2 g64 asym"),
        ("w2g64-mse", "int2 g64 asym mse"),
    ],
)
def test_preset_describe(name, expected):
    assert PRESETS[name].rules[0].weight.describe() == expected


@pytest.mark.parametrize(
    "spec,expected",
    [
        (QuantSpec(bits=8, granularity="per_tensor"), "int8 per-tensor sym"),
        (QuantSpec(bits=8, granularity="per_tensor", dynamic=True), "int8 per-tensor sym dynamic"),
        (QuantSpec(bits=4, format="nf4"), "nf4 per-channel"),
        (QuantSpec(bits=4, group_size=32, observer="percentile", percentile=99.9), "int4 g32 sym percentile"),
        (QuantSpec(bits=2, group_size=7, symmetric=False), "int2 g7 asym"),
    ],
)
def test_describe_other_specs(spec, expected):
    assert spec.describe() == expected


def test_preset_specs_are_as_documented():
    w = {n: r.rules[0].weight for n, r in PRESETS.items()}
    assert (w["w8"].bits, w["w8"].granularity, w["w8"].symmetric) == (8, Granularity.PER_CHANNEL, True)
    assert (w["w4g128"].bits, w["w4g128"].group_size, w["w4g128"].symmetric) == (4, 128, False)
    assert w["nf4-dq"].format is NumberFormat.NF4 and w["nf4-dq"].double_quant and w["nf4-dq"].double_quant_block == 256
    assert w["w2g64-mse"].observer is Observer.MSE
    head8 = PRESETS["w4g128-head8"]  # the one preset that quantizes lm_head (int8), ahead of the int4 rule
    assert head8.exclude == ("*embed*",) and head8.rule_for("model.embed_tokens") is None
    assert head8.rule_for("lm_head").weight == w["w8"]
    assert head8.rule_for("model.layers.0.mlp.up_proj").weight == w["w4g128"]
    emb8 = PRESETS["w4g64-sym-emb8"]  # the one preset that quantizes the embedding (int8 rows, tied lm_head too)
    assert emb8.exclude == () and emb8.rule_for("model.embed_tokens", embedding=True).weight == w["w8"]
    assert emb8.rule_for("lm_head").weight == w["w8"] and emb8.rule_for("model.embed_positions", embedding=True) is None
    assert emb8.rule_for("model.layers.0.mlp.up_proj").weight == w["w4g64-sym"]
    q8_0 = QuantSpec(format="q8_0")
    for name in (n for n in PRESETS if n.startswith("gguf-")):  # llama.cpp's types; the table q8_0, stored once
        r = PRESETS[name]
        assert r.exclude == () and r.rule_for("model.embed_tokens", embedding=True).weight == q8_0
        assert r.rule_for("lm_head").weight == q8_0
        assert r.rule_for("model.layers.0.mlp.up_proj").weight.format.value == name.split("-")[1]
    for r in PRESETS.values():
        if r is head8 or r is emb8 or r.name == "w2g64-gptq-hadamard-attn4" or r.name.startswith("gguf-"):
            continue  # attn4: int4 attention rule first
        assert r.exclude == ("lm_head", "*.lm_head", "*embed*")
        assert r.rules[0].pattern == "*"
        assert (r.rules[0].activation is None) == (not r.name.startswith("w8a8"))


# ------------------------------------------------------------------------------------------------
# QuantSpec: inference, defaults and validation
# ------------------------------------------------------------------------------------------------
def test_granularity_inferred_and_strings_converted():
    assert QuantSpec().granularity is Granularity.PER_CHANNEL
    assert QuantSpec(group_size=32).granularity is Granularity.GROUP
    s = QuantSpec(bits=4, format="nf4", granularity="group", group_size=64, observer="mse")
    assert s.format is NumberFormat.NF4 and s.granularity is Granularity.GROUP and s.observer is Observer.MSE
    assert QuantSpec(bits=4, group_size=128) == QuantSpec(bits=4, granularity=Granularity.GROUP, group_size=128)
    assert QuantSpec(granularity="per_tensor").group_size is None


@pytest.mark.parametrize("bits,sym,qmin,qmax", [(8, True, -128, 127), (8, False, 0, 255), (4, True, -8, 7),
                                                (4, False, 0, 15), (2, True, -2, 1), (2, False, 0, 3)])
def test_qmin_qmax(bits, sym, qmin, qmax):
    s = QuantSpec(bits=bits, symmetric=sym)
    assert (s.qmin, s.qmax) == (qmin, qmax)


def test_quantspec_is_frozen():
    s = QuantSpec()
    with pytest.raises(Exception):
        s.bits = 4  # type: ignore[misc]


BAD_SPECS = [
    (dict(group_size=0), "group_size"),
    (dict(group_size=-8), "group_size"),
    (dict(granularity="group"), "group_size"),  # group without a size
    (dict(group_size=2.5), "group_size"),
    (dict(bits=3, format="nf4"), "bits"),
    (dict(bits=8, format="nf4"), "bits"),  # the default bits=8 is not 4
    (dict(bits=3), "bits"),
    (dict(bits=5), "bits"),
    (dict(bits=16), "bits"),
    (dict(bits=1), "bits"),
    (dict(bits="4"), "bits"),
    (dict(bits=4.0), "bits"),
    (dict(format="fp8"), "format"),
    (dict(granularity="per_row"), "granularity"),
    (dict(observer="histogram"), "observer"),
    (dict(group_size=64, granularity="per_channel"), "group_size"),
    (dict(group_size=64, granularity="per_tensor"), "group_size"),
    (dict(bits=4, format="nf4", symmetric=False), "symmetric"),
    (dict(double_quant=True), "double_quant"),
    (dict(bits=4, group_size=64, double_quant=True, symmetric=False), "double_quant"),
    (dict(observer="percentile", percentile=50), "percentile"),
    (dict(observer="percentile", percentile=100.01), "percentile"),
    (dict(percentile=0), "percentile"),
    (dict(percentile=float("nan")), "percentile"),
    (dict(percentile="99"), "percentile"),
    (dict(symmetric="yes"), "symmetric"),
    (dict(symmetric=1), "symmetric"),
    (dict(double_quant="true"), "double_quant"),
    (dict(bits=4, format="nf4", double_quant=True, double_quant_block=0), "double_quant_block"),
    (dict(dynamic=True, observer="mse"), "minmax"),
]


@pytest.mark.parametrize("kw,field", BAD_SPECS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_SPECS)])
def test_invalid_spec_raises_invalid_config_naming_field(kw, field):
    with pytest.raises(InvalidConfig) as ei:
        QuantSpec(**kw)
    assert isinstance(ei.value, QExportError) and isinstance(ei.value, ValueError)
    assert field in str(ei.value)
    # the same through from_dict (what a JSON recipe goes through)
    with pytest.raises(InvalidConfig, match=field):
        QuantSpec.from_dict(kw)


@pytest.mark.parametrize("field,value,allowed", [
    ("format", "fp8", ["'int'", "'nf4'"]),
    ("granularity", "row", ["'per_tensor'", "'per_channel'", "'group'"]),
    ("observer", "hist", ["'minmax'", "'percentile'", "'mse'"]),
])
def test_unknown_enum_lists_allowed_values(field, value, allowed):
    with pytest.raises(InvalidConfig) as ei:
        QuantSpec(**{field: value})
    msg = str(ei.value)
    assert f"{field}='{value}'" in msg
    for a in allowed:
        assert a in msg


def test_valid_edge_specs():
    assert QuantSpec(observer="percentile", percentile=100).percentile == 100
    assert QuantSpec(observer="percentile", percentile=50.001).percentile == 50.001
    assert QuantSpec(group_size=1).group_size == 1
    assert QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True, double_quant_block=1).double_quant
    for b in (2, 4, 8):
        QuantSpec(bits=b, symmetric=False)


def test_unknown_keys_in_from_dict():
    with pytest.raises(InvalidConfig, match="bitz"):
        QuantSpec.from_dict({"bitz": 4})
    with pytest.raises(InvalidConfig, match="weights"):
        Rule.from_dict({"pattern": "*", "weights": {"bits": 8}})
    with pytest.raises(InvalidConfig, match="rulez"):
        Recipe.from_dict({"name": "x", "rules": [{"pattern": "*", "weight": {"bits": 8}}], "rulez": []})
    with pytest.raises(InvalidConfig, match="bitz"):  # nested inside a recipe
        Recipe.from_dict({"name": "x", "rules": [{"pattern": "*", "weight": {"bitz": 8}}]})
    with pytest.raises(InvalidConfig):
        QuantSpec.from_dict([("bits", 8)])
    with pytest.raises(InvalidConfig, match="pattern"):
        Rule.from_dict({"weight": {"bits": 8}})
    with pytest.raises(InvalidConfig, match="name"):
        Recipe.from_dict({"rules": [{"pattern": "*", "weight": {"bits": 8}}]})
    with pytest.raises(InvalidConfig, match="JSON object"):
        Recipe.from_dict([{"pattern": "*"}])


@st.composite
def valid_specs(draw):
    fmt = draw(st.sampled_from(["int", "nf4"]))
    bits = 4 if fmt == "nf4" else draw(st.sampled_from([2, 4, 8]))
    gran = draw(st.sampled_from(["per_tensor", "per_channel", "group", None]))
    group_size = draw(st.integers(1, 4096)) if gran == "group" or (gran is None and draw(st.booleans())) else None
    observer = draw(st.sampled_from(["minmax", "percentile", "mse"]))
    return QuantSpec(
        bits=bits, format=fmt, granularity=gran, group_size=group_size,
        symmetric=True if fmt == "nf4" else draw(st.booleans()), observer=observer,
        percentile=draw(st.floats(50.0, 100.0, exclude_min=True)),
        double_quant=fmt == "nf4" and draw(st.booleans()), double_quant_block=draw(st.integers(1, 1024)),
        dynamic=observer == "minmax" and draw(st.booleans()),
    )


@settings(max_examples=60, deadline=None)
@given(valid_specs())
def test_spec_json_roundtrip_property(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    back = QuantSpec.from_dict(d)
    assert back == spec and back.describe() == spec.describe()
    assert back.granularity is not None
    assert (back.group_size is not None) == (back.granularity is Granularity.GROUP)


# ------------------------------------------------------------------------------------------------
# Rule / Recipe validation
# ------------------------------------------------------------------------------------------------
W8 = QuantSpec(bits=8)
W4 = QuantSpec(bits=4, group_size=128, symmetric=False)


def test_recipe_validation_errors():
    with pytest.raises(InvalidConfig, match="no rules"):
        Recipe("r", rules=())
    with pytest.raises(InvalidConfig, match="no rules"):
        Recipe.from_dict({"name": "r", "rules": []})
    with pytest.raises(InvalidConfig, match="rules"):
        Recipe("r", rules="*")
    with pytest.raises(InvalidConfig, match="not a rule"):
        Recipe("r", rules=(W8,))
    with pytest.raises(InvalidConfig, match="name"):
        Recipe("", rules=(Rule("*", W8),))
    with pytest.raises(InvalidConfig, match=r"unknown algorithm 'hqq'") as ei:
        Recipe("r", rules=(Rule("*", W8),), algorithm="hqq")
    assert "rtn" in str(ei.value) and "gptq" in str(ei.value)
    with pytest.raises(InvalidConfig, match="exclude"):
        Recipe("r", rules=(Rule("*", W8),), exclude="lm_head")
    with pytest.raises(InvalidConfig, match="exclude pattern"):
        Recipe("r", rules=(Rule("*", W8),), exclude=("",))


def test_invalid_regex_patterns():
    with pytest.raises(InvalidConfig, match=r"regular expression") as ei:
        Rule("re:(", W8)
    assert "re:(" in str(ei.value)
    with pytest.raises(InvalidConfig, match=r"exclude pattern 're:\['"):
        Recipe("r", rules=(Rule("*", W8),), exclude=("re:[",))
    with pytest.raises(InvalidConfig, match="regular expression"):
        Recipe.from_dict({"name": "r", "rules": [{"pattern": "re:(", "weight": None}]})


def test_rule_validation():
    with pytest.raises(InvalidConfig, match="pattern"):
        Rule("", W8)
    with pytest.raises(InvalidConfig, match="pattern"):
        Rule(None, W8)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfig, match="weight"):
        Rule("*", "int8")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfig, match="activations must be 8-bit 'int'"):
        Rule("*", W8, QuantSpec(bits=4, format="nf4"))
    r = Rule("*", {"bits": 8}, {"bits": 8, "dynamic": True, "granularity": "per_tensor"})
    assert r.weight == QuantSpec(bits=8)
    assert r.activation.dynamic and r.activation.granularity is Granularity.PER_TENSOR
    assert Rule.from_dict(r.to_dict()) == r


def test_recipe_with_activation_and_float_rule_roundtrips(tmp_path):
    r = Recipe(
        "mixed",
        rules=[Rule("*.mlp.down_proj", None),
               Rule("re:.*\\.self_attn\\..*", W8, QuantSpec(bits=8, granularity="per_token", dynamic=True)),
               Rule("*", W4)],
        exclude=["lm_head"],
        description="keep down_proj float",
    )
    assert isinstance(r.rules, tuple) and r.exclude == ("lm_head",)
    r.to_json(tmp_path / "m.json")
    back = Recipe.from_json(tmp_path / "m.json")
    assert back == r and back.description == "keep down_proj float"
    assert back.rules[0].weight is None and back.rules[1].activation.dynamic


def test_from_json_errors(tmp_path):
    with pytest.raises(InvalidConfig, match="does not exist"):
        Recipe.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidConfig, match="not valid JSON") as ei:
        Recipe.from_json(bad)
    assert "bad.json" in str(ei.value)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidConfig, match="not valid JSON"):
        Recipe.from_json(binary)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InvalidConfig, match="JSON object"):
        Recipe.from_json(lst)
    with pytest.raises(InvalidConfig, match="does not exist"):
        load_recipe(str(tmp_path / "missing.json"))
    with pytest.raises(InvalidConfig):
        load_recipe(bad)


def test_unknown_preset_lists_available():
    for call in (get_preset, load_recipe):
        with pytest.raises(UnknownPreset) as ei:
            call("w3g7")
        e = ei.value
        assert isinstance(e, InvalidConfig) and isinstance(e, QExportError) and isinstance(e, KeyError)
        msg = str(e)
        assert "'w3g7'" in msg and not msg.startswith('"')  # not quoted like a plain KeyError
        for name in PRESET_NAMES:
            assert name in msg
    with pytest.raises(InvalidConfig, match="preset name"):
        load_recipe(42)  # type: ignore[arg-type]
    r = PRESETS["w8"]
    assert load_recipe(r) is r


# ------------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------------
def test_first_matching_rule_wins():
    r = Recipe("r", rules=(Rule("*.mlp.*", W4), Rule("*q_proj", W8), Rule("*", QuantSpec(bits=2, group_size=64))))
    assert r.rule_for("model.layers.0.mlp.up_proj").weight == W4
    assert r.rule_for("model.layers.0.self_attn.q_proj").weight == W8
    assert r.rule_for("model.layers.0.self_attn.k_proj").weight.bits == 2
    # order matters: put the catch-all first and it wins everything
    r2 = Recipe("r2", rules=(Rule("*", W8), Rule("*.mlp.*", W4)))
    assert r2.rule_for("model.layers.0.mlp.up_proj").weight == W8


def test_default_excludes_keep_layers_float():
    r = Recipe("r", rules=(Rule("*", W8),))
    assert r.exclude == ("lm_head", "*.lm_head", "*embed*")
    assert r.rule_for("lm_head") is None
    assert r.rule_for("model.embed_tokens") is None
    assert r.rule_for("embed") is None
    assert r.rule_for("model.layers.0.mlp.gate_proj").weight == W8
    assert r.rule_for("transformer.wte").weight == W8
    # exclude wins even over an explicit rule for the module
    r2 = Recipe("r2", rules=(Rule("lm_head", W8), Rule("*", W4)))
    assert r2.rule_for("lm_head") is None
    # with exclude emptied, lm_head can be quantized
    r3 = Recipe("r3", rules=(Rule("lm_head", W8), Rule("*", W4)), exclude=())
    assert r3.rule_for("lm_head").weight == W8


def test_unmatched_and_float_rules():
    r = Recipe("r", rules=(Rule("*.down_proj", None), Rule("*.mlp.*", W4)), exclude=())
    assert r.rule_for("model.layers.1.self_attn.o_proj") is None  # no rule matches
    rule = r.rule_for("model.layers.1.mlp.down_proj")
    assert rule is not None and rule.weight is None  # matched, kept float by the rule
    assert r.rule_for("model.layers.1.mlp.up_proj").weight == W4


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("*", "a.b.c", True),
        ("*proj", "model.layers.0.mlp.up_proj", True),  # * crosses dots
        ("model.*.q_proj", "model.layers.12.self_attn.q_proj", True),
        ("*.mlp.*", "model.layers.0.mlp.up_proj", True),
        ("*.mlp.*", "model.layers.0.mlp", False),
        ("layers.?.mlp", "layers.1.mlp", True),
        ("layers.?.mlp", "layers.10.mlp", False),
        ("*Proj", "up_proj", False),  # case sensitive
        ("lm_head", "lm_head", True),
        ("lm_head", "model.lm_head", False),  # a plain name is a whole-name match
        ("re:.*q_proj", "a.q_proj", True),
        ("re:q_proj", "a.q_proj", False),  # full match, not search
        ("re:a\\.q", "a.q_proj", False),
        ("re:layers\\.\\d+\\.mlp\\..*", "layers.3.mlp.up", True),
        ("re:layers\\.\\d+\\.mlp", "model.layers.3.mlp", False),
        ("re:(q|k)_proj", "k_proj", True),
    ],
)
def test_match_pattern(pattern, name, expected):
    assert match_pattern(pattern, name) is expected
    r = Recipe("r", rules=(Rule(pattern, W8),), exclude=())
    assert (r.rule_for(name) is not None) is expected


def test_nested_lm_head_excluded_by_default():
    r = PRESETS["w8"]
    assert r.rule_for("language_model.lm_head") is None
    assert r.rule_for("model.layers.0.mlp.up_proj") is not None


def test_rule_without_weight_key_is_an_error():
    with pytest.raises(InvalidConfig, match="'weight'"):
        Rule.from_dict({"pattern": "*"})


def test_activation_specs_validated():
    w8 = QuantSpec(bits=8)
    assert PRESETS["w8a8-dynamic"].rules[0].activation.describe() == "int8 per-token sym dynamic"
    assert PRESETS["w8a8-static"].needs_calibration and not PRESETS["w8a8-dynamic"].needs_calibration
    with pytest.raises(InvalidConfig, match="per_token"):
        QuantSpec(bits=8, granularity="per_token")  # per-token scales only exist at run time
    with pytest.raises(InvalidConfig, match="8-bit"):
        Rule("*", w8, QuantSpec(bits=4, granularity="per_tensor"))
    with pytest.raises(InvalidConfig, match="int8 weights"):
        Rule("*", QuantSpec(bits=4, group_size=32), QuantSpec(bits=8, granularity="per_tensor"))
    with pytest.raises(InvalidConfig, match="activation granularity"):
        Rule("*", w8, QuantSpec(bits=8, group_size=32))
    with pytest.raises(InvalidConfig, match="not weights"):
        Rule("*", QuantSpec(bits=8, granularity="per_tensor", dynamic=True))


@pytest.mark.parametrize("weight", [QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8, group_size=64)])
def test_activation_rules_reject_weights_the_int8_kernels_cannot_apply(weight):
    # qlinear_a8 applies one scale per output channel and no weight zero point: anything else would be wrong
    with pytest.raises(InvalidConfig, match="symmetric per-channel or per-tensor int8 weights"):
        Rule("*", weight, QuantSpec(bits=8, granularity="per_token", dynamic=True))
