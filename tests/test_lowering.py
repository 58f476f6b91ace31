"""MatMulNBits tensors built from qexport's packed weights, run by ONNX Runtime against the reference."""

import pytest
import torch

from qexport import QuantSpec
from qexport.errors import UnsupportedOp
from qexport.formats import quantize_weight
from qexport.kernels.reference import qlinear
from qexport.lowering.ort_matmul import block_size_for, matmulnbits_tensors

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
