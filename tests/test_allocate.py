"""Automatic mixed precision: knapsack optimality, exact byte accounting, sensitivity sanity, recipes, errors."""

import copy
import itertools
import json
import random

import pytest
import torch
from torch import nn

import qexport
from qexport import QuantSpec, Recipe
from qexport.algorithms import calibration_tokens
from qexport.algorithms.allocate import (
    DEFAULT_CANDIDATES,
    Sensitivity,
    layer_bytes,
    measure_sensitivity,
    parse_size,
    plan_allocation,
    solve_mckp,
)
from qexport.cli import main
from qexport.errors import CalibrationError, InvalidConfig, UnknownPreset
from qexport.modules import QLinear

from tiny import EMMA, save_tiny_checkpoint, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def calib(tok):
    return calibration_tokens(EMMA.read_text(), tok, samples=2, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def sens(calib):
    """Fisher sensitivities of the tiny model, measured once for the tests that only allocate."""
    return measure_sensitivity(tiny_llama(), calib)


# ----------------------------------------------------------------------------------------------------
# Knapsack
# ----------------------------------------------------------------------------------------------------
def _brute(costs, values, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, pick)) <= budget:
            v = sum(v[j] for v, j in zip(values, pick))
            best = v if best is None else min(best, v)
    return best


def _instance(rng, n=6, k=4):
    costs = [sorted(rng.randrange(10, 400) for _ in range(k)) for _ in range(n)]
    values = [[rng.uniform(-0.1, 1.0) for _ in range(k)] for _ in range(n)]
    lo, hi = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    return costs, values, rng.randrange(lo, hi + 1)


def test_knapsack_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(25):
        costs, values, budget = _instance(rng)
        sol = solve_mckp(costs, values, budget)
        assert sol.exact
        assert sol.cost == sum(c[j] for c, j in zip(costs, sol.choice)) <= budget
        assert sol.value == pytest.approx(_brute(costs, values, budget), abs=1e-12)


def test_knapsack_with_coarse_units_fits_and_keeps_its_bound():
    # a table too small for byte units: costs are rounded up to a coarser unit u; the answer must still fit
    # and be at least as good as the optimum of budget - n * u
    rng = random.Random(1)
    for _ in range(15):
        costs, values, budget = _instance(rng, n=5)
        sol = solve_mckp(costs, values, budget, max_cells=5 * 40)
        assert not sol.exact and sol.unit > 1
        assert sol.cost <= budget
        assert sol.value >= _brute(costs, values, budget) - 1e-12
        reduced = _brute(costs, values, budget - len(costs) * sol.unit)
        if reduced is not None:
            assert sol.value <= reduced + 1e-12


def test_knapsack_rejects_an_impossible_budget():
    with pytest.raises(InvalidConfig, match="smallest possible size, 30 bytes"):
        solve_mckp([[10, 20], [20, 30]], [[1, 0], [1, 0]], 29)
    assert solve_mckp([[10, 20], [20, 30]], [[1, 0], [1, 0]], 30).choice == [0, 0]


# ----------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [*DEFAULT_CANDIDATES, qexport.get_preset("nf4-dq").rules[0].weight,
                                  QuantSpec(bits=4, group_size=48, symmetric=True),
                                  QuantSpec(bits=2, granularity="per_tensor", symmetric=False)],
                         ids=lambda s: s.describe())
def test_layer_bytes_equal_what_quantize_stores(spec):
    # K = 100 and 160 leave partial groups of 128 and 64; one layer has a bias
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 48, bias=True), nn.ReLU(), nn.Linear(48, 160, bias=False),
                          nn.Linear(160, 30))
    expected = sum(layer_bytes(m, spec) for m in model if isinstance(m, nn.Linear))
    q = qexport.quantize(copy.deepcopy(model), Recipe("one", rules=[{"pattern": "*", "weight": spec.to_dict()}]))
    assert qexport.model_size(q).quantized_bytes == expected


def test_allocation_bytes_equal_model_size_and_meet_the_target(sens):
    model = tiny_llama()
    for bits in (2.7, 3.3, 4.4):
        plan = plan_allocation(model, bits_per_weight=bits, sensitivity=sens)
        q = qexport.quantize(copy.deepcopy(model), plan.recipe)
        size = qexport.model_size(q)
        assert size.quantized_bytes == plan.total_bytes <= plan.target_bytes
        assert size.quantized_params == plan.params
        assert plan.bits_per_weight == pytest.approx(size.bits_per_weight)
        chosen = {la.name: la.spec for la in plan.layers}
        qmods = {n: m for n, m in q.named_modules() if isinstance(m, QLinear)}
        assert set(qmods) == set(chosen) and all(qmods[n].spec == chosen[n] for n in chosen)
        assert plan.predicted_loss_increase == pytest.approx(sum(la.sensitivity for la in plan.layers))
    # the smallest target that fits puts every layer in its smallest format; a roomy one picks the least
    # sensitive format of every layer
    smallest = sum(min(la.options[c.describe()][0] for c in DEFAULT_CANDIDATES) for la in plan.layers)
    low = plan_allocation(model, target_bytes=smallest, sensitivity=sens)
    assert {la.spec.describe() for la in low.layers} == {"int2 g64 asym"} and low.total_bytes == smallest
    high = plan_allocation(model, bits_per_weight=16, sensitivity=sens)
    assert all(la.sensitivity == min(v for _, v in la.options.values()) for la in high.layers)


# ----------------------------------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------------------------------
PLANTED = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def sampled():
    """The tiny model, made confident (lm_head x 8), with calibration sequences sampled from itself: on its own
    samples the float model is at a minimum of the expected loss, so quantizing a layer raises the loss
    (on text an untrained model is not, and the change has a random sign). Every 32nd hidden channel of the
    last MLP is zero (its up_proj rows are), so large weights can be planted on them without changing the
    float model."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        model.model.layers[1].mlp.up_proj.weight[::32] = 0
        torch.manual_seed(0)
        calib = model.generate(torch.ones(2, 1, dtype=torch.long), do_sample=True, max_new_tokens=63,
                               min_new_tokens=63, pad_token_id=0)
    return model, calib


@pytest.mark.parametrize("method", ["fisher", "loss"])
def test_planted_large_weights_make_a_layer_more_sensitive_at_2_bits(method, sampled):
    base, calib = sampled
    planted = copy.deepcopy(base)
    with torch.no_grad():
        w = planted.get_submodule(PLANTED).weight
        w[:, ::32] = 30 * w.abs().max()  # on the zero channels: two per group of 64 stretch its 2-bit grid
    before = copy.deepcopy(planted.state_dict())
    layers = [PLANTED, "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
              "model.layers.1.self_attn.o_proj"]
    w8, w2 = qexport.get_preset("w8").rules[0].weight, qexport.get_preset("w2g64").rules[0].weight
    a = measure_sensitivity(base, calib, [w8, w2], method=method, layers=layers)
    b = measure_sensitivity(planted, calib, [w8, w2], method=method, layers=layers)
    assert b.base_loss == pytest.approx(a.base_loss, rel=1e-6)  # the float model is the same
    assert a.value(PLANTED, w2) > 0
    assert b.value(PLANTED, w2) > 2 * a.value(PLANTED, w2)
    assert b.value(PLANTED, w8) < b.value(PLANTED, w2)
    for name in layers[1:]:  # the other layers see the same model
        for spec in (w8, w2):
            assert b.value(name, spec) == pytest.approx(a.value(name, spec), rel=1e-3, abs=1e-6)
    # the model is left as it was
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items())


def test_sensitivity_is_deterministic_and_round_trips(calib, sens, tmp_path):
    again = measure_sensitivity(tiny_llama(), calib)
    assert again.values == sens.values and again.base_loss == sens.base_loss
    sens.to_json(tmp_path / "s.json")
    back = Sensitivity.from_json(tmp_path / "s.json")
    assert back.values == sens.values and back.candidates == sens.candidates and back.names == sens.names


# ----------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------
def test_recipe_round_trips_json_with_exact_layer_names(sens, tmp_path):
    plan = plan_allocation(tiny_llama(), bits_per_weight=3.0, sensitivity=sens, name="auto3")
    path = plan.recipe.to_json(tmp_path / "auto3.json")
    back = qexport.load_recipe(str(path))
    assert back == plan.recipe and back.name == "auto3"
    for la in plan.layers:
        assert back.rule_for(la.name).weight == la.spec
    assert back.rule_for("model.layers.10.mlp.up_proj") is None  # exact names: layer 1 does not match layer 10
    assert back.rule_for("lm_head") is None
    table = plan.table()
    assert all(la.name in table for la in plan.layers) and "bits/weight" in table
    json.dumps(plan.to_dict())


def test_gptq_recipe_with_per_layer_rules(sens, calib):
    model = tiny_llama()
    plan = plan_allocation(model, bits_per_weight=3.5, sensitivity=sens, algorithm="gptq")
    assert plan.recipe.algorithm == "gptq" and len({la.spec for la in plan.layers}) > 1
    q = qexport.quantize(copy.deepcopy(model), Recipe.from_dict(json.loads(json.dumps(plan.recipe.to_dict()))),
                         calibration=calib)
    assert qexport.model_size(q).quantized_bytes == plan.total_bytes
    chosen = {la.name: la.spec for la in plan.layers}
    assert all(m.spec == chosen[n] for n, m in q.named_modules() if isinstance(m, QLinear))


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(sens, calib):
    model = tiny_llama()
    with pytest.raises(InvalidConfig, match="below the smallest size these candidates allow"):
        plan_allocation(model, bits_per_weight=2.0, sensitivity=sens)
    with pytest.raises(InvalidConfig, match="exactly one of"):
        plan_allocation(model, bits_per_weight=3.0, target_bytes=10_000, sensitivity=sens)
    with pytest.raises(InvalidConfig, match="exactly one of"):
        plan_allocation(model, sensitivity=sens)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        qexport.allocate(model, bits_per_weight=3.0)
    with pytest.raises(CalibrationError, match="empty"):
        qexport.allocate(model, torch.zeros(0, 64, dtype=torch.long), bits_per_weight=3.0)
    with pytest.raises(InvalidConfig, match="unknown sensitivity method"):
        measure_sensitivity(model, calib, method="hessian")
    with pytest.raises(InvalidConfig, match="not a single weight-only format"):
        measure_sensitivity(model, calib, ["w8a8-dynamic"])
    with pytest.raises(UnknownPreset):
        measure_sensitivity(model, calib, ["w3"])
    with pytest.raises(InvalidConfig, match="lacks"):
        plan_allocation(model, bits_per_weight=3.0, sensitivity=sens, candidates=["w4g128", "nf4-dq"])
    with pytest.raises(InvalidConfig, match="no nn.Linear"):
        qexport.allocate(nn.Sequential(nn.ReLU()), calib, bits_per_weight=3.0)
    assert parse_size("60MB") == 60_000_000 and parse_size("1MiB") == 2**20 and parse_size(1234) == 1234
    for bad in ("sixty", "-5MB", "0"):
        with pytest.raises(InvalidConfig):
            parse_size(bad)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def test_cli_allocate_then_eval(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cache = tmp_path / "sens.json"
    common = ["allocate", "--model", str(ckpt), "--calib-samples", "2", "--seq-len", "64",
              "--sensitivities", str(cache)]
    assert main([*common, "--target-bits", "3", "--out", str(tmp_path / "r3.json")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "bits/weight" in out and cache.is_file()
    # a second target reuses the cached sensitivities
    assert main([*common, "--target-size", "40kB", "--out", str(tmp_path / "r40k.json"),
                 "--json", str(tmp_path / "plan.json")]) == 0
    assert "sensitivities from" in capsys.readouterr().err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["total_bytes"] <= 40_000 == plan["target_bytes"]

    assert main(["eval", "--model", str(ckpt), "--recipe", str(tmp_path / "r40k.json"), "--text", str(EMMA),
                 "--tokens", "512", "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["quantized_linear_bytes"] == plan["total_bytes"]
    capsys.readouterr()

    # errors: one line, status 2, no traceback
    assert main([*common, "--target-bits", "1.0", "--out", str(tmp_path / "r1.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("qexport: error: target of") and "below the smallest size" in err
    assert "Traceback" not in err and not (tmp_path / "r1.json").exists()
    assert main([*common, "--out", str(tmp_path / "r.json")]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main([*common, "--target-bits", "3", "--out", str(tmp_path / "r3.json")]) == 2
    assert "already exists" in capsys.readouterr().err
