"""MatMulNBits and MatMulBnb4 tensors and NF4's lookup form built from qexport's packed weights, run by ONNX
Runtime against the reference.

Tolerances: an identity input makes ONNX Runtime return the dequantized weight itself (each output is one
product by 1 plus zeros), which must equal the reference bit for bit; products with a random input differ
only by summation order (atol 1e-4 on outputs of size ~10).
"""

import pytest
import torch

from qexport import QuantSpec
from qexport.errors import UnsupportedOp
from qexport.formats import quantize_weight
from qexport.kernels.reference import qlinear
from qexport.lowering.ort_matmul import (
    bnb4_block_size,
    block_size_for,
    matmulbnb4_tensors,
    matmulnbits_tensors,
    nf4_lookup,
)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def run_matmulnbits(qw, spec, x, accuracy_level=0):
    from onnx import TensorProto, helper, numpy_helper

    n, k = qw.shape
    b, s, z, bs = matmulnbits_tensors(qw.qdata, qw.scale, qw.zero_point, "int", spec.bits, qw.group, k,
                                      spec.symmetric)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")]
    if z is not None:
        inits.append(numpy_helper.from_array(z, "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if z is not None else []), ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=spec.bits, block_size=bs,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"A": x.numpy()})[0])


@pytest.mark.parametrize("spec,n,k", [
    (QuantSpec(bits=4, group_size=128, symmetric=False), 48, 576),  # 4.5 groups: padded last block
    (QuantSpec(bits=4, group_size=128), 32, 576),
    (QuantSpec(bits=2, group_size=64, symmetric=False), 24, 576),
    (QuantSpec(bits=4, group_size=32, symmetric=False), 40, 200),
    (QuantSpec(bits=4, group_size=256, symmetric=False), 16, 512),  # two blocks share a group's scale
    (QuantSpec(bits=8), 32, 576),  # per-channel: blocks of 64 repeat the row's scale
    (QuantSpec(bits=8, granularity="per_tensor", symmetric=False), 16, 96),  # one scale and zero point for all rows
    (QuantSpec(bits=4, granularity="per_tensor"), 16, 96),
])
def test_matmulnbits_matches_reference(spec, n, k):
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(n, k), spec)
    x = torch.randn(5, k)
    want = qlinear(x, qw.qdata, qw.scale, qw.zero_point, None, "int", spec.bits, qw.group, k, spec.symmetric)
    torch.testing.assert_close(run_matmulnbits(qw, spec, x), want, atol=1e-4, rtol=1e-5)


def test_block_size_and_unsupported_formats():
    assert [block_size_for(g) for g in (32, 64, 128, 256, 576, 1536)] == [32, 64, 128, 128, 64, 128]
    with pytest.raises(UnsupportedOp, match="not a multiple of 16"):
        block_size_for(200)
    qw = quantize_weight(torch.randn(8, 64), QuantSpec(bits=4, format="nf4", group_size=64))
    with pytest.raises(UnsupportedOp, match="no nf4"):
        matmulnbits_tensors(qw.qdata, qw.scales(), None, "nf4", 4, 64, 64, True)


# ----------------------------------------------------------------------------------------------------
# NF4: MatMulBnb4 and the lookup form
# ----------------------------------------------------------------------------------------------------
def _session(nodes, inits, k, n, opset=21, out="Y"):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_bnb4(qw, x):
    from onnx import helper, numpy_helper

    n, k = qw.shape
    b, absmax, bs = matmulbnb4_tensors(qw.qdata, qw.scales(), qw.group, k)
    node = helper.make_node("MatMulBnb4", ["A", "B", "absmax"], ["Y"], domain="com.microsoft", K=k, N=n,
                            block_size=bs, quant_type=1)
    sess = _session([node], [numpy_helper.from_array(b, "B"), numpy_helper.from_array(absmax, "absmax")], k, n)
    return torch.from_numpy(sess.run(None, {"A": x.numpy()})[0])


def run_lookup(qw, x, uint4=True):
    from onnx import helper

    n, k = qw.shape
    nodes, inits, w = nf4_lookup("l", qw.qdata, qw.scales(), qw.group, k, uint4=uint4)
    nodes.append(helper.make_node("MatMul", ["A", w], ["Y"]))
    sess = _session(nodes, inits, k, n, opset=21 if uint4 else 18)
    return torch.from_numpy(sess.run(None, {"A": x.numpy()})[0])


NF4_CASES = [  # (spec, n, k)
    (QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True), 24, 576),  # nf4-dq on SmolLM2's K
    (QuantSpec(bits=4, format="nf4", group_size=64), 16, 128),
    (QuantSpec(bits=4, format="nf4", group_size=48), 8, 112),  # groups 48, 48, 16: partial last group
    (QuantSpec(bits=4, format="nf4"), 12, 96),  # per-channel: blocks of 32 repeat the row's scale
    (QuantSpec(bits=4, format="nf4", granularity="per_tensor"), 8, 64),
    (QuantSpec(bits=4, format="nf4", group_size=512, double_quant=True, double_quant_block=4), 8, 1024),
]


@pytest.mark.parametrize("spec,n,k", NF4_CASES)
def test_matmulbnb4_is_bit_exact_against_reference(spec, n, k):
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(n, k), spec)
    w = qw.dequantize()
    assert torch.equal(run_bnb4(qw, torch.eye(k)), w.t())  # the dequantized weight itself
    x = torch.randn(5, k)
    want = qlinear(x, qw.qdata, qw.scales(), None, None, "nf4", 4, qw.group, k, True)
    torch.testing.assert_close(run_bnb4(qw, x), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("uint4", [True, False], ids=["uint4", "uint8"])
@pytest.mark.parametrize("spec,n,k", NF4_CASES + [(QuantSpec(bits=4, format="nf4", group_size=24), 8, 60)])
def test_nf4_lookup_is_bit_exact_against_reference(spec, n, k, uint4):
    torch.manual_seed(1)
    qw = quantize_weight(torch.randn(n, k), spec)
    assert torch.equal(run_lookup(qw, torch.eye(k), uint4), qw.dequantize().t())
    x = torch.randn(3, k)
    want = qlinear(x, qw.qdata, qw.scales(), None, None, "nf4", 4, qw.group, k, True)
    torch.testing.assert_close(run_lookup(qw, x, uint4), want, atol=1e-4, rtol=1e-5)


def test_bnb4_block_size_and_layout():
    assert [bnb4_block_size(g, k) for g, k in ((64, 576), (128, 1536), (48, 112), (576, 576), (512, 1024))] \
        == [64, 128, 16, 64, 256]
    for g, k in ((24, 64), (64, 72)):  # no block of 16 .. 256 divides both: lookup form
        with pytest.raises(UnsupportedOp, match="no MatMulBnb4 block size"):
            bnb4_block_size(g, k)
    # bitsandbytes' order: first element of each pair in the high nibble, blocks along the flat [N, K]
    qw = quantize_weight(torch.tensor([[1.0, -1.0] + [0.0] * 14, [0.0] * 15 + [2.0]]),
                         QuantSpec(bits=4, format="nf4", group_size=16))
    b, absmax, bs = matmulbnb4_tensors(qw.qdata, qw.scales(), 16, 16)
    assert bs == 16 and b.shape == (16,) and absmax.tolist() == [1.0, 2.0]
    assert b[0] == (15 << 4 | 0) and b[1] == (7 << 4 | 7) and b[15] == (7 << 4 | 15)


def test_compile_target_lowers_nf4_to_matmulbnb4_or_lookup():
    """torch.compile(target='onnxruntime'): NF4 layers become MatMulBnb4 where its blocks fit and the lookup
    form elsewhere (q_proj's groups of 24 on K = 64), with the eager quantized model's logits."""
    import copy

    import qexport
    import qexport.backend as B
    from qexport.config import Recipe, Rule
    from tiny import tiny_llama

    recipe = Recipe(name="nf4-mix", rules=(
        Rule("*.q_proj", QuantSpec(bits=4, format="nf4", group_size=24)),
        Rule("*", QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True, double_quant_block=16)),
    ))
    torch._dynamo.reset()
    model = tiny_llama(seed=12)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    eager = qexport.quantize(copy.deepcopy(model), recipe)
    compiled = torch.compile(copy.deepcopy(model), backend="qexport",
                             options={"target": "onnxruntime", "recipe": recipe})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=1e-4, rtol=1e-4)
    ort_graph = [g for g in B._LIVE if g.report is B.reports()[-1]][0].compiled
    report = ort_graph.reports[-1]
    assert (report.matmulbnb4, report.nf4_lookup, report.matmulnbits) == (12, 2, 0) and not report.float_fallback
    torch._dynamo.reset()
