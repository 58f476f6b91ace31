"""torch.compile(backend="qexport"): registration, options, numerics against the eager reference, calibration,
fallbacks and attention fusion on a real (tiny) Llama graph. Most tests use target="eager" (the rewritten graph
run as is) to avoid inductor's cold-compile cost; a few go through inductor."""

import copy
import importlib.metadata

import pytest
import torch
from torch import nn

import qexport
import qexport.backend as B
from qexport.errors import CalibrationError, InvalidConfig
from qexport.kernels.dispatch import use_kernel

from tiny import tiny_llama

IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(model, **options):
    return torch.compile(model, backend="qexport", options=options)


def last_counts():
    return B.reports()[-1].counts()


def test_backend_is_registered_through_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "qexport" and ep.value == "qexport.backend:qexport_backend" for ep in eps)
    assert "qexport" in torch._dynamo.list_backends()


@pytest.mark.parametrize("options,match", [
    ({"recipe": "w4g128", "colour": "red"}, "unknown qexport backend option"),
    ({"recipe": "nope"}, "unknown recipe preset 'nope'"),
    ({"mode": "fast"}, "mode='fast' is not valid"),
    ({"target": "tpu"}, "target='tpu' is not valid"),
    ({"fuse_attention": "yes"}, "fuse_attention must be true or false"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(InvalidConfig, match=match):
        B.BackendOptions.from_dict(options)
    with pytest.raises(Exception, match=match):  # through torch.compile, wrapped by dynamo
        with torch.no_grad():
            compiled(nn.Linear(4, 4), **options)(torch.randn(2, 4))


# of the gguf presets, q4_k (q5_0 and q8_0 blocks on this model: its K-quant layers fall back) and q2_k (q4_0)
# stand for the rest
@pytest.mark.parametrize("preset", sorted(n for n, r in qexport.PRESETS.items() if not r.needs_data
                                          and n not in ("gguf-q8_0", "gguf-q4_0", "gguf-q6_k", "gguf-q3_k",
                                                        "gguf-q2_k-mix")))
def test_compiled_matches_eager_quantized_model(preset):
    model = tiny_llama(seed=7)
    eager = qexport.quantize(copy.deepcopy(model), preset)
    c = compiled(copy.deepcopy(model), recipe=preset, target="eager")
    with torch.no_grad():
        got, want = c(IDS).logits, eager(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    counts = last_counts()
    # lm_head excluded, except by these; the embedding too, except by w4g64-sym-emb8 and the gguf presets
    with_table = preset == "w4g64-sym-emb8" or preset.startswith("gguf-")
    layers = 15 if preset == "w4g128-head8" or with_table else 14
    embeddings = 1 if with_table else 0
    assert counts["annotate"]["linear"] == layers and counts["annotate"].get("embedding", 0) == embeddings
    assert counts["convert"]["layers"] == layers + embeddings
    if preset == "w8a8-dynamic":
        assert counts["convert"]["w8a8_dynamic"] == 14


def test_mode_option_adds_dynamic_activations_to_int8_rules():
    model = tiny_llama(seed=7)
    eager = qexport.quantize(copy.deepcopy(model), "w8a8-dynamic")
    c = compiled(copy.deepcopy(model), recipe="w8", mode="dynamic", target="eager")
    with torch.no_grad():
        torch.testing.assert_close(c(IDS).logits, eager(IDS).logits, atol=1e-5, rtol=1e-5)
    assert last_counts()["convert"]["w8a8_dynamic"] == 14


def test_static_mode_requires_calibration_then_matches_reference():
    model = tiny_llama(seed=8)
    calib = [torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    c = compiled(copy.deepcopy(model), recipe="w8a8-static", target="eager")
    with pytest.raises(CalibrationError, match="qexport.calibrate"):
        with torch.no_grad():
            c(IDS)
    torch._dynamo.reset()
    c = compiled(copy.deepcopy(model), recipe="w8a8-static", target="eager")
    with pytest.raises(CalibrationError, match="empty"):
        qexport.calibrate(c, [])
    assert qexport.calibrate(c, calib) == 3
    with torch.no_grad():
        got = c(IDS).logits
    assert last_counts()["convert"]["w8a8_static"] == 14
    # the reference: the same model quantized eagerly, calibrated on the same data
    eager = qexport.quantize(copy.deepcopy(model), "w8a8-static")
    qexport.calibrate(eager, calib)
    with torch.no_grad():
        want = eager(IDS).logits
        fp = model(IDS).logits
    sqnr = lambda a, b: float(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()))  # noqa: E731
    assert sqnr(want, got) > 30  # observers see float (graph) vs weight-quantized (eager) inputs
    assert sqnr(fp, got) > 20
    # calibration changed the output: an uncalibrated-looking weight-only model differs
    wo = qexport.quantize(copy.deepcopy(model), "w8")
    with torch.no_grad():
        assert not torch.allclose(wo(IDS).logits, got, atol=1e-4)


def test_calibrating_a_compiled_model_without_static_layers_is_an_error():
    # a static model compiled in the same process, still alive, must not make the w8 model look calibratable
    static = compiled(tiny_llama(seed=8), recipe="w8a8-static", target="eager")
    assert qexport.calibrate(static, [IDS]) == 1
    c = compiled(tiny_llama(seed=8), recipe="w8", target="eager")
    with pytest.raises(CalibrationError, match="no static-activation layers"):
        qexport.calibrate(c, [IDS])
    del static


class WithOddOps(nn.Module):
    """A NaN-weight layer, an activation x activation matmul and a graph break."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.bad = nn.Linear(16, 16)
        self.b = nn.Linear(16, 8)
        with torch.no_grad():
            self.bad.weight[0, 0] = float("nan")

    def forward(self, x):
        h = self.a(x)
        h = torch.matmul(h, h.transpose(-1, -2)) @ h
        torch._dynamo.graph_break()
        return self.b(torch.nan_to_num(self.bad(h)))


def test_unquantizable_layers_and_graph_breaks_fall_back_to_float():
    torch.manual_seed(0)
    model = WithOddOps()
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="bad stays float"):
        with torch.no_grad():
            got = compiled(copy.deepcopy(model), recipe="w8", target="eager")(x)
    graphs = B.reports()[-2:]
    assert len(graphs) == 2  # the graph break splits the model
    skipped = [reason for g in graphs for r in g.results for _, reason in r.skipped]
    assert "matmul of two activations (attention scores); not quantized" in skipped
    assert any("NaN" in s for s in skipped)
    eager = qexport.quantize(copy.deepcopy(model), "w8")
    with torch.no_grad():
        torch.testing.assert_close(got, eager(x), atol=1e-5, rtol=1e-5)


def test_hand_written_llama_attention_is_fused():
    model = tiny_llama(seed=9, attn_implementation="eager")
    eager = qexport.quantize(copy.deepcopy(model), "w4g128")
    c = compiled(copy.deepcopy(model), recipe="w4g128", target="eager")
    with torch.no_grad():
        got = c(IDS).logits
        want = eager(IDS).logits
    assert last_counts()["fuse_attention"] == {"sdpa": 2}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    compiled(copy.deepcopy(model), recipe="w4g128", target="eager", fuse_attention=False)(IDS)
    assert "fuse_attention" not in last_counts()


def assert_generate_matches_eager(seed: int, target: str) -> None:
    """Greedy generate() with the KV cache through the compiled forward gives the eager model's tokens."""
    model = tiny_llama(seed=seed)
    eager = qexport.quantize(copy.deepcopy(model), "w4g128")
    c = copy.deepcopy(model)
    c.forward = torch.compile(c.forward, backend="qexport", options={"recipe": "w4g128", "target": target})
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(c.generate(IDS[:1], **kw), eager.generate(IDS[:1], **kw), atol=0, rtol=0)


def test_generate_with_kv_cache_matches_eager():
    assert_generate_matches_eager(10, "eager")


@pytest.mark.parametrize("preset,kernel,tol", [("w4g128", "int4", 1e-2), ("w8a8-dynamic", "int8_int8", 1e-5)])
def test_inductor_target(preset, kernel, tol):
    """On the CPU the linears run torch's integer kernels: W8A8 exactly as the reference, int4 weights with
    bfloat16 activations (tolerance of qexport.kernels.cpu); with QEXPORT_KERNEL=reference, the reference."""
    model = tiny_llama(seed=11)
    eager = qexport.quantize(copy.deepcopy(model), preset)
    with torch.no_grad():
        want = eager(IDS).logits
        got = compiled(copy.deepcopy(model), recipe=preset, target="inductor")(IDS).logits
        report = B.reports()[-1]
        with use_kernel("reference"):
            torch._dynamo.reset()
            ref = compiled(copy.deepcopy(model), recipe=preset, target="inductor")(IDS).logits
    assert report.target == "inductor"
    kernels = next(r for r in report.results if r.name == "cpu_kernels")
    assert kernels.changed[kernel] == 7 * 2 and not kernels.skipped  # q, k, v, o, gate, up, down in 2 layers
    assert float((got - want).abs().max() / want.abs().max()) < tol
    torch.testing.assert_close(ref, want, atol=1e-4, rtol=1e-4)


def test_default_target_follows_the_machine(monkeypatch):
    import importlib.util

    assert B.BackendOptions.from_dict({}).target == B.default_target()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    assert B.default_target() == "inductor"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert B.default_target() == "inductor"


@pytest.mark.parametrize("preset", ["w4g128", "w2g64", "nf4-dq", "w8a8-dynamic"])
def test_onnxruntime_target_matches_eager(preset):
    pytest.importorskip("onnxruntime")
    model = tiny_llama(seed=12)
    eager = qexport.quantize(copy.deepcopy(model), preset)
    c = compiled(copy.deepcopy(model), recipe=preset, target="onnxruntime")
    with torch.no_grad():
        got = c(IDS).logits
        torch.testing.assert_close(got, eager(IDS).logits, atol=1e-4, rtol=1e-4)
        c(IDS)  # same shapes: the cached session runs again
    ort_graph = [g for g in B._LIVE if g.report is B.reports()[-1]][0].compiled
    assert len(ort_graph.sessions) == 1
    report = ort_graph.reports[-1]
    if preset == "nf4-dq":  # ORT's MatMulBnb4 (bitsandbytes' NF4 kernel), g64 blocks on K = 64 and 160
        assert report.matmulbnb4 == 14 and report.matmulnbits == 0 and not report.float_fallback
    elif preset == "w8a8-dynamic":
        assert report.matmulinteger == 14
    else:
        assert report.matmulnbits == 14 and not report.float_fallback


def test_onnxruntime_target_static_w8a8():
    pytest.importorskip("onnxruntime")
    model = tiny_llama(seed=13)
    calib = [torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ref = compiled(copy.deepcopy(model), recipe="w8a8-static", target="eager")
    qexport.calibrate(ref, calib)
    with torch.no_grad():
        want = ref(IDS).logits
    torch._dynamo.reset()
    c = compiled(copy.deepcopy(model), recipe="w8a8-static", target="onnxruntime")
    qexport.calibrate(c, calib)
    with torch.no_grad():
        torch.testing.assert_close(c(IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_onnxruntime_target_generate_with_dynamic_shapes():
    """Decode steps change the cache length: dynamo's symbolic graph is exported once with dynamic axes."""
    pytest.importorskip("onnxruntime")
    assert_generate_matches_eager(14, "onnxruntime")
    ort_graphs = [g.compiled for g in B._LIVE if g.opts.target == "onnxruntime" and g.compiled is not None]
    dynamic = [o for o in ort_graphs if o.dynamic_shapes]
    assert dynamic and all(len(o.sessions) == 1 for o in dynamic)  # one session serves every later step
    assert sum(len(o.sessions) for o in ort_graphs) <= 4  # not one export per generated token
    # the ONNX fusions ran on the decode graph, under the pass manager: 2 norms per layer + the final one, q and k
    # rotations, one grouped-query attention per layer with its cache update and without repeat_kv's copies
    # (tiny_llama: 2 layers, 4 heads, 2 kv heads)
    counts = [g.report.counts() for g in B._LIVE if g.compiled in dynamic]
    fused = [{k: v for name in ("fuse_rmsnorm", "fuse_rotary", "fuse_gqa", "fuse_kv_attention")
              for k, v in c[name].items()} for c in counts]
    decode = {"rms_norm": 5, "rotary": 4, "gqa": 2, "attention": 2, "with_past": 2, "heads_3d": 2}
    # transformers 5 passes enable_gqa itself when the decode step has no mask: nothing left for fuse_gqa
    assert decode in fused or {k: v for k, v in decode.items() if k != "gqa"} in fused, fused
    assert all(r.attention == 2 for o in dynamic for r in o.reports)  # opset 23: one Attention node per layer


@pytest.mark.parametrize("target", ["eager", "onnxruntime"])
def test_dynamic_per_tensor_activations_match_eager(target):
    if target == "onnxruntime":
        pytest.importorskip("onnxruntime")
    recipe = qexport.Recipe("w8a8-dyn-tensor", rules=(qexport.Rule(
        "*", qexport.QuantSpec(bits=8), qexport.QuantSpec(bits=8, granularity="per_tensor", dynamic=True)),))
    model = tiny_llama(seed=15)
    eager = qexport.quantize(copy.deepcopy(model), recipe)
    c = compiled(copy.deepcopy(model), recipe=recipe, target=target)
    with torch.no_grad():
        torch.testing.assert_close(c(IDS).logits, eager(IDS).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(eager(IDS).logits, qexport.quantize(copy.deepcopy(model), "w8")(IDS).logits,
                                  atol=1e-4)  # activations really are quantized
    assert last_counts()["convert"]["w8a8_dynamic"] == 14


def test_onnxruntime_target_freezes_parameters_and_picks_accuracy_per_bits():
    """Parameters become initializers (the session takes the token ids only); 8-bit weights run MatMulNBits
    with int8 activations by default (accuracy level 4: close to, not equal to, the reference), and
    ``ort_accuracy_level=0`` gives back the reference numerics."""
    pytest.importorskip("onnxruntime")
    from qexport.lowering.core import matmulnbits_accuracy

    assert [matmulnbits_accuracy(b, None) for b in (8, 4, 2)] == [4, 0, 0]
    assert matmulnbits_accuracy(4, 4) == 4 and matmulnbits_accuracy(8, 0) == 0
    model = tiny_llama(seed=15)
    eager = qexport.quantize(copy.deepcopy(model), "w8")
    with torch.no_grad():
        want = eager(IDS).logits
        for level, bound in ((None, 30.0), (0, 80.0)):
            torch._dynamo.reset()
            options = {} if level is None else {"ort_accuracy_level": level}
            got = compiled(copy.deepcopy(model), recipe="w8", target="onnxruntime", **options)(IDS).logits
            err = (got - want).pow(2).mean() / want.pow(2).mean()
            sqnr = -10 * torch.log10(err.clamp_min(1e-30)).item()
            assert sqnr > bound, (level, sqnr)
            if level is None:
                assert sqnr < 80.0  # int8 activations really are used
            graph = [g for g in B._LIVE if g.report is B.reports()[-1]][0].compiled
            (sess, feeds), = graph.sessions.values()
            assert len(feeds) == 1, [n for n, _ in feeds]  # input_ids only: no parameter is a graph input
