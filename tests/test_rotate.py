"""Rotation before quantizing (qexport.algorithms.rotate): Hadamard constructions, exact float equivalence of
the rotated tiny Llama (untied and tied), determinism, the recipe option, GPTQ / RTN after rotation, the
compile back-end and the ONNX export of the online rotation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import qexport
from qexport.algorithms.rotate import OnlineRotation, RotatedMLP, hadamard_matrix, orthogonal_matrix, rotate_model
from qexport.config import QuantSpec, Recipe, Rule, load_recipe
from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.modules import QLinear
from qexport.presets import PRESETS
from tiny import tiny_llama, word_tokenizer

W2G32 = QuantSpec(bits=2, group_size=32, symmetric=False)
IDS = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama(tie: bool = False, seed: int = 0) -> nn.Module:
    """The tiny Llama with norm weights far from 1 (so that folding them is tested) and outlier channels."""
    model = tiny_llama(seed=seed, tie=tie)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for layer in model.model.layers:  # a few large input channels, as trained LLMs have
            for lin in (layer.self_attn.q_proj, layer.mlp.up_proj, layer.mlp.gate_proj):
                lin.weight[:, :3] *= 8.0
    return model.requires_grad_(False)


def calib(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(4, 512, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 64, 160, 576, 1536])
def test_hadamard_matrices(n):
    h = hadamard_matrix(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), atol=0, rtol=0)


def test_no_hadamard_for_unknown_orders_falls_back_to_random_orthogonal():
    assert hadamard_matrix(9) is None and hadamard_matrix(36) is None and hadamard_matrix(0) is None
    q, kind = orthogonal_matrix(36, "hadamard", torch.Generator().manual_seed(0))
    assert kind == "random orthogonal"
    torch.testing.assert_close(q @ q.T, torch.eye(36, dtype=torch.float64), atol=1e-12, rtol=0)
    q, kind = orthogonal_matrix(64, "hadamard", torch.Generator().manual_seed(0))
    assert kind == "randomized hadamard" and torch.allclose(q.abs(), torch.full_like(q, 1 / 8))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", ["hadamard", "random"])
def test_rotated_float_model_has_the_same_logits(tie, method):
    model = llama(tie=tie)
    ref = model(IDS).logits
    rotated = copy.deepcopy(model)
    report = rotate_model(rotated, method, seed=5)
    out = rotated(IDS).logits
    # float32 weights rotated in float64: differences are float32 rounding, far below the logits' scale
    assert float((out - ref).abs().max()) < 2e-5 * float(ref.abs().max()) + 1e-6
    assert report.untied_lm_head is tie and rotated.config.tie_word_embeddings is False
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert report.online_rotations == 2 and len(report.folded_norms) == 5
    if method == "hadamard":  # 64 = 2^6, 16 = 2^4, 160 = 20 x 8
        assert report.residual == "randomized hadamard 64" and report.online.startswith("randomized hadamard 160")
    for name, p in rotated.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    mlps = [layer.mlp for layer in rotated.model.layers]
    assert all(isinstance(m, RotatedMLP) for m in mlps) and mlps[0].online_rotation is mlps[1].online_rotation
    # the weights did change: the rotation spread the planted outlier columns over all inputs
    w0 = model.model.layers[0].self_attn.q_proj.weight
    w1 = rotated.model.layers[0].self_attn.q_proj.weight
    col = lambda w: w.abs().amax(0)  # noqa: E731
    assert float(col(w1).max() / col(w1).median()) < 0.5 * float(col(w0).max() / col(w0).median())


def test_rotation_is_deterministic_for_a_seed():
    a, b, c = llama(), llama(), llama()
    rotate_model(a, seed=1)
    rotate_model(b, seed=1)
    rotate_model(c, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    wa = a.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(wa, c.model.layers[0].mlp.down_proj.weight)


def test_rotation_refuses_bad_input():
    with pytest.raises(UnsupportedOp, match="decoder layout of Sequential .*rotate='none'"):
        rotate_model(nn.Sequential(nn.Linear(4, 4)))
    model = llama()
    rotate_model(model)
    with pytest.raises(InvalidConfig, match="rotated already"):
        rotate_model(model)
    with pytest.raises(InvalidConfig, match="before quantizing"):
        rotate_model(qexport.quantize(llama(), "w4g128"))
    with pytest.raises(InvalidConfig, match="allowed: 'hadamard', 'random'"):
        rotate_model(llama(), "givens")
    recipe = Recipe("r", rules=(Rule("*", W2G32),), options={"rotate": "hadamard"})
    with pytest.raises(UnsupportedOp, match="decoder layout of Sequential"):
        qexport.quantize(nn.Sequential(nn.Linear(64, 64)), recipe)


def test_rotate_recipe_option_validation_and_json(tmp_path):
    r = Recipe("r", rules=(Rule("*", W2G32),), options={"rotate": "hadamard", "rotate_seed": 3})
    assert r.rotation == "hadamard" and r.to_dict()["options"] == {"rotate": "hadamard", "rotate_seed": 3}
    r.to_json(tmp_path / "r.json")
    assert load_recipe(tmp_path / "r.json") == r
    plain = Recipe("p", rules=(Rule("*", W2G32),))
    assert plain.rotation == "none" and "options" not in plain.to_dict()  # written as before
    assert "rotate" not in PRESETS["w4g128-gptq"].to_dict()["options"]
    preset = PRESETS["w2g64-gptq-hadamard"]
    assert preset.algorithm == "gptq" and preset.rotation == "hadamard" and preset.rules[0].weight.bits == 2
    with pytest.raises(InvalidConfig, match="option 'rotate' of algorithm 'rtn' must be one of 'none', 'hadamard'"):
        Recipe("r", rules=(Rule("*", W2G32),), options={"rotate": "quarot"})
    with pytest.raises(InvalidConfig, match=r"unknown option\(s\) \['rotate'\] for algorithm 'awq'"):
        Recipe("a", rules=(Rule("*", W2G32),), algorithm="awq", options={"rotate": "hadamard"})
    from qexport.backend import BackendOptions

    with pytest.raises(InvalidConfig, match=r"run qexport.quantize\(model, recipe\) first"):
        BackendOptions.from_dict({"recipe": r})


def _output_error(model, ref_logits) -> float:
    return float((model(IDS).logits - ref_logits).pow(2).mean())


def test_rtn_and_gptq_after_rotation_quantize_better():
    # int8 per channel: one range per row, which a planted outlier column spoils and the rotation repairs
    # (at 2 bits the random tiny model's outputs are noise with or without rotation)
    model = llama()
    ref = model(IDS).logits
    errors = {}
    for algorithm in ("rtn", "gptq"):
        for rotate in ("none", "hadamard"):
            recipe = Recipe(f"{algorithm}-{rotate}", rules=(Rule("*", QuantSpec(bits=8)),), algorithm=algorithm,
                            options={"rotate": rotate})
            q = qexport.quantize(copy.deepcopy(model), recipe,
                                 calibration=calib() if algorithm == "gptq" else None)
            assert sum(isinstance(m, QLinear) for m in q.modules()) == 14
            assert (q.qexport_report.rotation is not None) == (rotate != "none")
            errors[algorithm, rotate] = _output_error(q, ref)
    assert errors["rtn", "hadamard"] < 0.7 * errors["rtn", "none"], errors
    assert errors["gptq", "hadamard"] < 0.7 * errors["gptq", "none"], errors
    report = q.qexport_report.to_dict()
    assert report["rotation"]["online_rotations"] == 2 and report["recipe"]["options"]["rotate"] == "hadamard"


def test_rotated_quantized_model_compiles_and_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from qexport.export import export_onnx, verify

    model = tiny_llama(tie=True)
    model.model.layers = model.model.layers[:1]  # one layer keeps the export quick
    model.config.num_hidden_layers = 1
    recipe = Recipe("w2g32-hadamard", rules=(Rule("*", W2G32),), options={"rotate": "hadamard"})
    q = qexport.quantize(model, recipe)
    compiled = torch.compile(q, backend="qexport")
    torch.testing.assert_close(compiled(IDS).logits, q(IDS).logits, atol=1e-4, rtol=1e-4)

    res = export_onnx(q, tmp_path / "onnx", None, word_tokenizer())
    check = verify(res.path, reference=q, session_config={"session.qdq_matmulnbits_accuracy_level": "0"},
                   decode_steps=3)
    assert check["max_abs"] < 1e-4 and check["top1_agreement"] == 1.0, check
    graph = onnx.load(str(res.path / "model.onnx")).graph
    rotations = [t for t in graph.initializer if tuple(t.dims) == (160, 160)]
    assert len(rotations) == 1 and "online_rotation" in rotations[0].name
    # 7 linears; the GroupQueryAttention form packs q, k and v into one weight
    assert res.report["attention_form"]["qkv_packed"] == 1
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 5
    assert not res.report["tied_embeddings"]
    rows = {r["name"]: r for r in res.report["layers"]}
    assert rows["model.layers.0.mlp.down_proj"]["status"] == "quantized"


def test_online_rotation_module():
    q, _ = orthogonal_matrix(20, "hadamard", torch.Generator().manual_seed(0))
    rot = OnlineRotation(q.float())
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(rot(x), x @ q.float())
    torch.testing.assert_close(rot(x).norm(dim=-1), x.norm(dim=-1))
    assert math.isclose(float(rot.matrix.abs().max()), 1 / math.sqrt(20), rel_tol=1e-6)
