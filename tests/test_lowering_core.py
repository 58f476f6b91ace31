"""The ONNX lowering core (qexport.lowering.core): every emitter of every target on a one-node graph, by node
counts and by ONNX Runtime's output against the reference (qexport.formats / qexport.ops); the compile
back-end's ONNX Runtime target and the export lowering write the same ONNX; TensorRT's rules refuse the same
things before export, in the lowering and in the graph lint.

Tolerances: products with a random input differ from the reference only by float summation order (atol 1e-4
on outputs of size ~10, rtol 1e-5); lookups, conv weights and the rotate-half permutation are exact. TensorRT
graphs are run by ONNX Runtime with its graph optimizations off, so that a Q -> DQ -> MatMul runs as written
(ORT would otherwise pick a u8s8 integer kernel that saturates on CPUs without VNNI).
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import torch

from qexport import QuantSpec
from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.formats import dequantize_stored, quantize_weight
from qexport.lowering.core import EMITTERS, LINEAR_FORMS, lower

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F, N, K = TensorProto.FLOAT, 24, 96
NF4_G32 = QuantSpec(bits=4, format="nf4", group_size=32)
COVERS: set[tuple] = set()  # (target, op type): declared by the tests below, at import, for the coverage test


def covers(*entries):
    """Declare the ``(target, op type)`` emitters a test exercises (it fails if they do not do what it checks)."""
    COVERS.update(entries)
    return lambda test: test


def _graph(nodes, inputs, inits, out_shape, opset=21, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, out_shape)], inits,
                              value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("qexport", 1)])


def _weight_inits(qw, prefix="m.lin"):
    inits = [numpy_helper.from_array(qw.qdata.numpy(), f"{prefix}.qdata"),
             numpy_helper.from_array(qw.scales().numpy(), f"{prefix}.scale")]
    if qw.zero_point is not None:
        inits.append(numpy_helper.from_array(qw.zero_point.numpy(), f"{prefix}.zero_point"))
    return inits, [i.name for i in inits] + [""] * (3 - len(inits))


def _attrs(qw):
    s = qw.spec
    return dict(fmt=s.format.value, bits=s.bits, group=qw.group, in_features=qw.shape[1], symmetric=int(s.symmetric))


def _reference_weight(qw):
    """The reference: qexport.formats' dequantization of the stored tensors."""
    s = qw.spec
    return dequantize_stored(qw.qdata, qw.scales(), qw.zero_point, s.format.value, s.bits, qw.group, qw.shape[1],
                             s.symmetric)


def _run(model, target, feeds, **kw):
    """Lower ``model`` for ``target``; (op type counts, ORT's output, report, lowered model)."""
    lowered, report = lower(model, target, **kw)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if target == "tensorrt":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(lowered.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
    return Counter(n.op_type for n in lowered.graph.node), out, report, lowered


def linear_model(qw, bias=None):
    inits, names = _weight_inits(qw)
    ins = ["x", *names]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.numpy(), "m.lin.bias"))
        ins.append("m.lin.bias")
    node = helper.make_node("QLinear", ins, ["y"], name="lin", domain="qexport", **_attrs(qw))
    return _graph([node], [helper.make_tensor_value_info("x", F, [None, qw.shape[1]])], inits, [None, qw.shape[0]])


# (id, target, spec, options, expected op counts of the lowered graph); every case has a bias
LINEAR_CASES = [
    ("int4-g32", "ort", QuantSpec(bits=4, group_size=32), {}, {"DequantizeLinear": 1, "MatMul": 1}),
    ("uint4-g32", "ort", QuantSpec(bits=4, group_size=32, symmetric=False), {}, {"DequantizeLinear": 1, "MatMul": 1}),
    ("int8-channel", "ort", QuantSpec(bits=8), {}, {"DequantizeLinear": 1, "MatMul": 1}),
    ("uint2-g32", "ort", QuantSpec(bits=2, group_size=32, symmetric=False), {}, {"DequantizeLinear": 1, "MatMul": 1}),
    ("int4-tensor", "ort", QuantSpec(bits=4, granularity="per_tensor"), {}, {"DequantizeLinear": 1, "MatMul": 1}),
    ("nf4-bnb4", "ort", NF4_G32, {}, {"MatMulBnb4": 1}),
    ("nf4-lookup", "ort", NF4_G32, {"nf4_form": "lookup"}, {"Cast": 1, "Gather": 2, "Mul": 1, "MatMul": 1}),
    ("nf4-g24", "ort", QuantSpec(bits=4, format="nf4", group_size=24), {},  # no MatMulBnb4 block divides 24
     {"Cast": 1, "Gather": 2, "Mul": 1, "MatMul": 1}),
    ("int4-g32-trt", "tensorrt", QuantSpec(bits=4, group_size=32, restricted_range=True), {},
     {"DequantizeLinear": 1, "MatMul": 1}),
    ("int8-trt", "tensorrt", QuantSpec(bits=8, restricted_range=True), {}, {"DequantizeLinear": 1, "MatMul": 1}),
    ("nf4-trt", "tensorrt", NF4_G32, {}, {"MatMul": 1}),  # float, with a warning
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_emitters(case, recwarn):
    name, target, spec, options, want = case
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(N, K), spec)
    bias, x = torch.randn(N), torch.randn(5, K)
    ops, got, report, lowered = _run(linear_model(qw, bias), target, {"x": x}, **options)
    assert ops == Counter({**want, "Add": 1}), ops  # the bias Add, once
    torch.testing.assert_close(got, x @ _reference_weight(qw).t() + bias, atol=1e-4, rtol=1e-5)
    assert {o.domain for o in lowered.opset_import} <= {"", "com.microsoft"}
    assert lowered.opset_import[0].version == (25 if spec.bits == 2 else 21)
    assert ("lin", ) == tuple(report.layers) and bool(report.float_fallback) == (name == "nf4-trt")
    if name == "nf4-trt":
        assert any("stay float in the TensorRT export" in str(w.message) for w in recwarn)
    if target == "tensorrt":
        from qexport.export.tensorrt import lint_tensorrt

        assert lint_tensorrt(lowered) == []
        if spec.restricted_range:
            assert report.negated_groups == 0  # scales > 0: nothing negated or saturated


def test_full_range_weights_are_negated_for_tensorrt():
    torch.manual_seed(1)
    qw = quantize_weight(torch.randn(N, K), QuantSpec(bits=4, group_size=32))
    x = torch.randn(5, K)
    with pytest.warns(UserWarning, match="negated"):
        ops, got, report, lowered = _run(linear_model(qw), "tensorrt", {"x": x})
    from qexport.export.tensorrt import lint_tensorrt

    assert lint_tensorrt(lowered) == [] and 0 < report.saturated_groups <= report.negated_groups
    # one quantization step (the group's |scale|) on at most one code per saturated group
    step = qw.scales().abs().max()
    assert (got - x @ _reference_weight(qw).t()).abs().max() <= step * x.abs().max() * report.saturated_codes


@covers(("ort", "DequantizeWeight"), ("tensorrt", "DequantizeWeight"))
def test_conv_weights_stay_float():
    torch.manual_seed(2)
    qw = quantize_weight(torch.randn(8, 36), QuantSpec(bits=4, group_size=32))
    inits, names = _weight_inits(qw, "m.conv")
    for target in ("ort", "tensorrt"):
        node = helper.make_node("DequantizeWeight", names, ["y"], name="conv", domain="qexport", **_attrs(qw))
        model = _graph([node], [], [*inits], [8, 36])
        ops, got, report, _ = _run(model, target, {})
        assert ops == Counter({"Identity": 1}) and torch.equal(got, _reference_weight(qw))
        assert report.float_fallback == [("conv", "conv weights are dequantized at export")]


# ----------------------------------------------------------------------------------------------------
# Embeddings, alone and tied to a linear
# ----------------------------------------------------------------------------------------------------
def embedding_model(qw, tied: bool):
    inits, names = _weight_inits(qw, "m.emb")
    nodes = [helper.make_node("QEmbedding", ["ids", *names], ["rows"], name="emb", domain="qexport", **_attrs(qw))]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])]
    if tied:  # a tied lm_head: the same initializers, on the rows looked up
        nodes.append(helper.make_node("QLinear", ["rows", *names, ""], ["y"], name="head", domain="qexport",
                                      **_attrs(qw)))
        return _graph(nodes, inputs, inits, [2, 3, qw.shape[0]])
    nodes[0].output[0] = "y"
    return _graph(nodes, inputs, inits, [2, 3, qw.shape[1]])


EMBEDDING_CASES = [  # (id, target, options, tied, expected op counts)
    ("gbq", "ort", {}, False, {"GatherBlockQuantized": 1, "Reshape": 2}),
    ("gbq-tied", "ort", {}, True, {"GatherBlockQuantized": 1, "Reshape": 2, "MatMulNBits": 1}),
    ("standard", "ort", {"embedding_form": "standard"}, False,
     {"Gather": 2, "Transpose": 2, "Cast": 1, "DequantizeLinear": 1}),
    ("standard-tied", "ort", {"embedding_form": "standard"}, True,
     {"Gather": 2, "Transpose": 2, "Cast": 3, "DequantizeLinear": 2, "MatMul": 1}),  # private copies: 2 more Casts
    ("float-trt", "tensorrt", {}, False, {"Gather": 1}),
]


@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=[c[0] for c in EMBEDDING_CASES])
def test_embedding_emitters(case):
    name, target, options, tied, want = case
    torch.manual_seed(3)
    qw = quantize_weight(torch.randn(40, 64), QuantSpec(bits=4, group_size=32))
    ids = torch.tensor([[0, 39, 5], [5, 17, 2]])
    ops, got, report, lowered = _run(embedding_model(qw, tied), target, {"ids": ids}, **options)
    assert ops == Counter(want), ops
    w = _reference_weight(qw)
    if tied:
        torch.testing.assert_close(got, w[ids] @ w.t(), atol=1e-4, rtol=1e-5)
        codes = [t for t in lowered.graph.initializer if t.data_type in (TensorProto.UINT8, TensorProto.INT4)
                 and len(t.raw_data) >= 40 * 64 // 2]
        assert len(codes) == 1  # the table is stored once
    else:
        assert torch.equal(got, w[ids])  # the rows, bit for bit
    assert bool(report.float_fallback) == (target == "tensorrt")


# ----------------------------------------------------------------------------------------------------
# Quantized activations
# ----------------------------------------------------------------------------------------------------
def a8_model(wq, ws, bias, static_scale=None):
    inits = [numpy_helper.from_array(wq.numpy(), "m.lin.wq"), numpy_helper.from_array(ws.numpy(), "m.lin.w_scale")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.numpy(), "m.lin.bias"))
    nodes, k = [], wq.shape[1]
    if static_scale is None:  # dynamic: the codes and their per-token scale are graph inputs
        inputs = [helper.make_tensor_value_info("xq", TensorProto.INT8, [None, k]),
                  helper.make_tensor_value_info("xs", F, [None, 1])]
    else:
        inputs = [helper.make_tensor_value_info("x", F, [None, k])]
        inits += [numpy_helper.from_array(torch.tensor(static_scale).numpy(), "xs"),
                  numpy_helper.from_array(torch.tensor(0, dtype=torch.int8).numpy(), "xzp")]
        nodes.append(helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"], name="q"))
    bias_name = "" if bias is None else "m.lin.bias"
    nodes.append(helper.make_node("QLinearA8", ["xq", "xs", "m.lin.wq", "m.lin.w_scale", bias_name], ["y"],
                                  name="lin", domain="qexport", x_zero_point=0))
    return _graph(nodes, inputs, inits, [None, wq.shape[0]])


def _w8():
    torch.manual_seed(4)
    w = torch.randn(N, K)
    ws = w.abs().amax(1) / 127
    return torch.round(w / ws[:, None]).clamp(-127, 127).to(torch.int8), ws, torch.randn(N)


@covers(("ort", "QLinearA8"), ("tensorrt", "QLinearA8"))
def test_w8a8_emitters():
    wq, ws, bias = _w8()
    x = torch.randn(5, K)
    xs = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / xs).clamp(-128, 127).to(torch.int8)
    chain = {"MatMulInteger": 1, "Cast": 1, "Mul": 2, "Sum": 1}
    ops, got, report, _ = _run(a8_model(wq, ws, bias), "ort", {"xq": xq, "xs": xs})
    assert ops == Counter(chain) and report.matmulinteger == 1
    # with ORT's graph optimizations: MatMulIntegerToFloat, and the bias outside it (an Add would be folded in
    # and scaled by the activation's per-token scale in ORT 1.32)
    want = torch.ops.qexport.qlinear_a8(xq, xs, 0, wq, ws, bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    ops, got, _, _ = _run(a8_model(wq, ws, None), "ort", {"xq": xq, "xs": xs})
    assert ops == Counter({**chain, "Sum": 0})
    torch.testing.assert_close(got, torch.ops.qexport.qlinear_a8(xq, xs, 0, wq, ws, None), atol=1e-4, rtol=1e-5)
    # static: QuantizeLinear from the exporter, then the same chain (ORT) or Q -> DQ (TensorRT)
    scale = float(x.abs().max() / 127)
    xq_static = torch.round(x / scale).clamp(-128, 127).to(torch.int8)
    want = torch.ops.qexport.qlinear_a8(xq_static, torch.tensor(scale), 0, wq, ws, bias)
    ops, got, _, _ = _run(a8_model(wq, ws, bias, scale), "ort", {"x": x})
    assert ops == Counter({**chain, "QuantizeLinear": 1})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    ops, got, report, lowered = _run(a8_model(wq, ws, bias, scale), "tensorrt", {"x": x})
    assert ops == Counter({"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1, "Add": 1}), ops
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    from qexport.export.tensorrt import lint_tensorrt

    assert lint_tensorrt(lowered) == []
    with pytest.raises(UnsupportedOp, match=r"dynamic activation quantization.*\[dynamic-quantization\]"):
        lower(a8_model(wq, ws, bias), "tensorrt")


def llm_int8_model(wq, ws, bias, threshold):
    inits = [numpy_helper.from_array(wq.numpy(), "m.lin.wq"), numpy_helper.from_array(ws.numpy(), "m.lin.w_scale"),
             numpy_helper.from_array(bias.numpy(), "m.lin.bias")]
    node = helper.make_node("QLinearLLMInt8", ["x", "m.lin.wq", "m.lin.w_scale", "m.lin.bias"], ["y"], name="lin",
                            domain="qexport", threshold=threshold)
    return _graph([node], [helper.make_tensor_value_info("x", F, [None, wq.shape[1]])], inits, [None, wq.shape[0]])


@covers(("ort", "QLinearLLMInt8"), ("tensorrt", "QLinearLLMInt8"))
def test_llm_int8_emitters():
    wq, ws, bias = _w8()
    x = torch.randn(5, K)
    x[:, [3, 50]] *= 20  # two outlier columns
    ops, got, report, _ = _run(llm_int8_model(wq, ws, bias, 6.0), "ort", {"x": x})
    assert ops["MatMulInteger"] == 1 and ops["NonZero"] == 1 and ops["MatMul"] == 1 and report.llm_int8 == 1
    want = torch.ops.qexport.qlinear_llm_int8(x, wq, ws, bias, 6.0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(UnsupportedOp, match=r"LLM.int8\(\) quantizes activations at run time.*w8a8-static"):
        lower(llm_int8_model(wq, ws, bias, 6.0), "tensorrt")


# ----------------------------------------------------------------------------------------------------
# An op without an emitter
# ----------------------------------------------------------------------------------------------------
def test_unknown_op_and_target_are_named():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="qexport")
    model = _graph([node], [helper.make_tensor_value_info("x", F, [1])], [], [1])
    with pytest.raises(UnsupportedOp, match="Mystery"):
        lower(model)
    with pytest.raises(InvalidConfig, match="unknown ONNX target 'tflite'"):
        lower(model, "tflite")


def test_every_emitter_is_exercised():
    """Every entry of both tables has a test: the case tables (linears per format, embeddings) and the tests that
    declare what they exercise (``covers``)."""
    covered = COVERS | {(t, "QLinear", spec.format.value) for _, t, spec, _, _ in LINEAR_CASES}
    covered |= {(t, "QLinear") for _, t, *_ in LINEAR_CASES} | {(t, "QEmbedding") for _, t, *_ in EMBEDDING_CASES}
    tables = {(t, op) for t, table in EMITTERS.items() for op in table}
    tables |= {(t, "QLinear", fmt) for t, forms in LINEAR_FORMS.items() for fmt in forms}
    assert tables - covered == set()


# ----------------------------------------------------------------------------------------------------
# One lowering: the compile back-end's ORT target and the export write the same ONNX
# ----------------------------------------------------------------------------------------------------
MIX = [  # (module, weight spec, activation spec)
    ("0", QuantSpec(bits=4, group_size=32), None),
    ("2", NF4_G32, None),
    ("4", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token", dynamic=True)),
    ("6", QuantSpec(bits=2, group_size=32, symmetric=False), None),
]


def _mlp():
    torch.manual_seed(6)
    layers = [torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64), torch.nn.ReLU(),
              torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)]
    return torch.nn.Sequential(*layers).eval()


def _signature(before, after):
    """What the lowering wrote into ``after`` (the lowered ``before``): its node types and its initializers
    (type, shape, bytes), names left out; and the qexport-domain nodes it replaced (op type, attributes)."""
    import copy

    old_nodes = {n.name for n in before.graph.node if n.domain != "qexport"}
    old_inits = {t.name for t in before.graph.initializer}
    nodes = Counter((n.domain, n.op_type) for n in after.graph.node if n.name not in old_nodes)
    inits = Counter((t.data_type, tuple(t.dims), hashlib.sha1(numpy_helper.to_array(t).tobytes()).hexdigest())
                    for t in after.graph.initializer if t.name not in old_inits)
    replaced = Counter((n.op_type, str(sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute)))
                       for n in copy.deepcopy(before).graph.node if n.domain == "qexport")
    return nodes, inits, replaced


def test_compile_target_and_export_lower_the_same_graph_the_same_way(monkeypatch):
    import copy

    import qexport
    import qexport.backend as B
    import qexport.lowering.onnx_ort as O
    from qexport.config import Recipe, Rule
    from qexport.lowering.translate import onnx_program
    seen = []  # the exported graphs, before lowering

    def recording_lower(model, *args, **kwargs):
        seen.append(copy.deepcopy(model))
        return lower(model, *args, **kwargs)

    monkeypatch.setattr(O, "lower", recording_lower)
    recipe = Recipe(name="mix", rules=tuple(Rule(m, w, a) for m, w, a in MIX))
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(_mlp(), backend="qexport", options={"target": "onnxruntime", "recipe": recipe})
        with torch.no_grad():
            got = compiled(x)
        graph = [g for g in B._LIVE if g.report is B.reports()[-1]][0].compiled
        compile_model, compile_report = O.export_graph(graph.gm, [x], graph.accuracy_level, graph.dynamic_shapes)
    finally:
        torch._dynamo.reset()
    qmodel = qexport.quantize(_mlp(), recipe)
    with torch.no_grad():
        want = qmodel(x)
        proto = onnx_program(qmodel, (x,))  # what qexport export calls, then lowers
    before = copy.deepcopy(proto)
    export_model, export_report = lower(proto, "ort")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # biased W8A8 included
    compile_ops, compile_inits, compile_replaced = _signature(seen[-1], compile_model)
    export_ops, export_inits, export_replaced = _signature(before, export_model)
    assert compile_replaced == export_replaced and sum(compile_replaced.values()) == 4  # the same qexport nodes
    assert compile_ops == export_ops, (compile_ops, export_ops)
    assert compile_inits == export_inits
    assert compile_ops[("", "DequantizeLinear")] == 2 and compile_ops[("com.microsoft", "MatMulBnb4")] == 1
    assert compile_ops[("", "MatMulInteger")] == 1
    assert compile_model.opset_import[0].version == export_model.opset_import[0].version == 25  # uint2
    assert [getattr(compile_report, c) for c in compile_report.COUNTERS] == \
        [getattr(export_report, c) for c in export_report.COUNTERS]
    assert compile_report.weight_bits == export_report.weight_bits == {2, 4, 8}


# ----------------------------------------------------------------------------------------------------
# TensorRT's rules: the same refusals before export, in the lowering and in the lint
# ----------------------------------------------------------------------------------------------------
TRT_CASES = [  # (id, weight spec, activation spec, rule refused, rules the lint finds in the ORT form)
    ("asymmetric", QuantSpec(bits=4, group_size=32, symmetric=False), None, "zero-point", {"zero-point", "type"}),
    # the ORT form keeps full-range symmetric grids' negative scales: positive-scale too
    ("int2", QuantSpec(bits=2, group_size=32), None, "type", {"type", "opset", "positive-scale"}),
    ("int4-per-channel", QuantSpec(bits=4), None, "int4-blocked", {"int4-blocked", "positive-scale"}),
    ("dynamic", QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_token", dynamic=True), "dynamic-quantization",
     {"integer-op"}),
    ("llm-int8", QuantSpec(bits=8),
     QuantSpec(bits=8, granularity="per_token", dynamic=True, outlier_threshold=6.0), "dynamic-quantization",
     {"integer-op"}),
]


@pytest.mark.parametrize("case", TRT_CASES, ids=[c[0] for c in TRT_CASES])
def test_tensorrt_rules_refuse_the_same_things_everywhere(case):
    import copy

    import qexport
    from qexport.config import Recipe, Rule
    from qexport.export.onnx import check_tensorrt_modules
    from qexport.export.tensorrt import lint_tensorrt
    from qexport.lowering.translate import translations

    _, wspec, aspec, rule, lint_rules = case
    torch.manual_seed(7)
    recipe = Recipe(name="r", rules=(Rule("*", wspec, aspec),))
    model = qexport.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), recipe)
    with pytest.raises(UnsupportedOp, match=rf"^0: .*\[{rule}\]"):
        check_tensorrt_modules(model)
    with torch.no_grad():
        prog = torch.onnx.export(model, (torch.randn(3, 64),), dynamo=True, custom_translation_table=translations(),
                                 opset_version=21, optimize=False, verbose=False, report=False)
    with pytest.raises(UnsupportedOp, match=rf"\[{rule}\]"):
        lower(copy.deepcopy(prog.model_proto), "tensorrt")
    ort_form, _ = lower(prog.model_proto, "ort")
    assert {v.rule for v in lint_tensorrt(ort_form)} == lint_rules
