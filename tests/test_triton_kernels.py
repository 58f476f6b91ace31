"""Triton kernels (``qexport.kernels.triton``) against the reference kernels, and the kernel dispatcher.

Where the kernels run
    With CUDA the kernels are compiled and run on the GPU, and the ``needs_cuda`` tests add real layer
    shapes. Without CUDA they run in Triton's interpreter on the CPU. The interpreter needs
    ``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is first imported (Triton's own
    ``tl.sum`` / ``tl.max`` are defined then) and for the rest of the process; this module sets it when it
    is the first to import Triton (the file run on its own, or first). When something imported Triton
    earlier (``torch._dynamo`` does, so in a run of the whole tests/ folder), the kernel tests are skipped
    here and ``test_interpreter_tests_in_a_fresh_process`` runs this file again in a new process that has
    the variable from the start.
    Everything that needs Triton is skipped when it is not installed.

Tolerances (against ``qexport.kernels.reference``, the oracle)
    * dequantization: bit-exact. With ``x`` = rows of the identity matrix, ``y = x @ W^T`` is a column
      of ``W`` (one product by 1, the rest by 0), so the weights the kernels rebuild in registers are
      compared with ``dequantize_stored`` with ``torch.equal``.
    * weight-only fp32: the dequantized weights are identical, only the order of the float32 sums differs:
      ``rtol=1e-5, atol=5e-5`` (outputs are O(10) at K = 67).
    * weight-only fp16: the reference rounds the weight to fp16 too; ``rtol=atol=2e-3``.
    * W8A8 (``qlinear_a8`` and the fused dynamic kernel): bit-exact (``torch.equal``): exact int32
      accumulation and the reference's float32 epilogue, in its order.
    bf16 ``tl.dot`` is wrong in the interpreter, so bf16 is only tested on a GPU. At real layer shapes
    (GPU only) the weight-only tolerances are ``1e-4`` (fp32), ``1e-2`` (fp16) and ``3e-2`` (bf16).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
CHILD_ENV = "QEXPORT_TRITON_TEST_CHILD"  # set in the fresh process that runs the interpreter tests
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
if _HAVE_TRITON and not CUDA and "triton" not in sys.modules:
    # Kept for the whole process: Triton also reads it when it imports parts of itself lazily, at a launch.
    # Without CUDA nothing else in the test suite runs Triton code.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from qexport import QLinear, QuantSpec  # noqa: E402
from qexport import ops  # noqa: E402
from qexport.errors import InvalidConfig, InvalidTensor  # noqa: E402
from qexport.formats import dequantize_stored, quantize_weight  # noqa: E402
from qexport.kernels import dispatch, reference  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
REPO = Path(__file__).resolve().parent.parent


def _kernels():
    """``(qexport.kernels.triton or None, why the kernel tests cannot run in this process or None)``."""
    if not _HAVE_TRITON:
        return None, "triton is not installed (pip install 'qexport[triton]')"
    if CUDA:
        import qexport.kernels.triton as kernels

        return kernels, None
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction) or os.environ.get("TRITON_INTERPRET") != "1":
        return None, "triton was imported before TRITON_INTERPRET=1 could be set: run in a fresh process"
    import qexport.kernels.triton as kernels

    if not kernels.INTERPRETED:
        return None, "qexport.kernels.triton was imported without TRITON_INTERPRET=1: run in a fresh process"
    return kernels, None


qt, _skip = _kernels()
IN_FRESH_PROCESS = _HAVE_TRITON and not CUDA and qt is None  # the kernel tests run in a child process
if IN_FRESH_PROCESS and os.environ.get(CHILD_ENV):
    raise RuntimeError(f"the child process cannot run the Triton interpreter either: {_skip}")
needs_triton = pytest.mark.skipif(qt is None, reason=_skip or "")
needs_cuda = pytest.mark.skipif(not CUDA or qt is None, reason="needs a CUDA GPU and triton")

N, K = 37, 67  # odd K: the last byte of an int4 / int2 row is partly padding
FORMATS = {
    "int8-sym-channel": QuantSpec(bits=8),
    "int8-asym-channel": QuantSpec(bits=8, symmetric=False),
    "int8-sym-tensor": QuantSpec(bits=8, granularity="per_tensor"),
    "int8-asym-g24": QuantSpec(bits=8, group_size=24, symmetric=False),
    "int4-sym-g32": QuantSpec(bits=4, group_size=32),
    "int4-asym-g24": QuantSpec(bits=4, group_size=24, symmetric=False),  # partial last group of 19
    "int4-asym-tensor": QuantSpec(bits=4, granularity="per_tensor", symmetric=False),
    "int4-sym-channel": QuantSpec(bits=4),
    "int2-sym-g16": QuantSpec(bits=2, group_size=16),
    "int2-asym-g24": QuantSpec(bits=2, group_size=24, symmetric=False),
    "int2-asym-channel": QuantSpec(bits=2, symmetric=False),
    "nf4-g32": QuantSpec(bits=4, format="nf4", group_size=32),
    "nf4-g24": QuantSpec(bits=4, format="nf4", group_size=24),
    "nf4-dq-g16": QuantSpec(bits=4, format="nf4", group_size=16, double_quant=True, double_quant_block=8),
}
FP32_TOL = dict(rtol=1e-5, atol=5e-5)
FP16_TOL = dict(rtol=2e-3, atol=2e-3)


def _weight(name: str, n: int = N, k: int = K, device=DEVICE):
    torch.manual_seed(sum(map(ord, name)))
    qw = quantize_weight(torch.randn(n, k), FORMATS[name])
    t = {key: v.to(device) for key, v in qw.tensors().items()}
    scale = qw.scales().to(device)
    args = (t["qdata"], scale, t.get("zero_point"))
    meta = (qw.spec.format.value, qw.spec.bits, qw.group, k, qw.spec.symmetric)
    return qw, args, meta


def _run_both(x, args, bias, meta, blocks=None):
    y = qt.qlinear(x, *args, bias, *meta, blocks=blocks)
    r = reference.qlinear(x, *args, bias, *meta)
    return y, r


# ------------------------------------------------------------------------------------------------
# Weight-only kernels
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("name", FORMATS)
def test_dequantization_in_registers_is_bit_exact(name):
    """Identity rows pick columns of W: every kernel path must rebuild exactly ``dequantize_stored``."""
    qw, args, meta = _weight(name)
    w = dequantize_stored(*args, *meta)
    eye = torch.eye(K, device=DEVICE)
    for rows in (slice(60, 64), slice(48, 60), slice(0, K)):  # GEMV sum (M=4), GEMV dot (M=12), GEMM (M=67)
        y = qt.qlinear(eye[rows], *args, None, *meta)
        assert torch.equal(y, w[:, rows].t()), f"{name}: columns {rows} differ"


@needs_triton
@pytest.mark.parametrize("m", [1, 3, 20])  # GEMV sum path (BLOCK_M 1 and 4, rows masked), GEMM
@pytest.mark.parametrize("name", FORMATS)
def test_weight_only_fp32_matches_reference(name, m):
    qw, args, meta = _weight(name)
    torch.manual_seed(m)
    x = torch.randn(m, K, device=DEVICE)
    if m == 20:
        x = x.reshape(2, 10, K)  # leading dimensions are flattened and restored
    bias = torch.randn(N, device=DEVICE)
    y, r = _run_both(x, args, bias, meta)
    assert y.shape == r.shape and y.dtype == r.dtype
    torch.testing.assert_close(y, r, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("name", ["int4-asym-g24", "int2-sym-g16"])
def test_weight_only_forced_small_tiles(name):
    """Tiles much smaller than the problem: edges in M, N and K, groups aligned (g16/g32) or not (g24)."""
    qw, args, meta = _weight(name)
    x = torch.randn(33, K, device=DEVICE)
    for blocks in (qt.Blocks("gemm", 16, 16, 16, group_m=2), qt.Blocks("gemv", 16, 8, 32)):
        xm = x if blocks.kernel == "gemm" else x[:16]
        y, r = _run_both(xm, args, None, meta, blocks=blocks)
        torch.testing.assert_close(y, r, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("name", ["int4-asym-g24", "int4-sym-g32", "nf4-g32"])
def test_gemv_split_k(name):
    """Split-K GEMV: K slices summed atomically in float32, then bias and cast. The identity rows stay
    bit-exact (one nonzero product per output); other inputs match within the float tolerances."""
    qw, args, meta = _weight(name)
    w = dequantize_stored(*args, *meta)
    bias = torch.randn(N, device=DEVICE)
    for bm, split in ((1, 3), (4, 2), (16, 5)):  # sum path (M = 1, M = 4), dot path; K = 67: 5 tiles of 16
        blocks = qt.Blocks("gemv", bm, 8, 16, split_k=split)
        eye = torch.eye(K, device=DEVICE)[:bm]
        assert torch.equal(qt.qlinear(eye, *args, None, *meta, blocks=blocks), w[:, :bm].t())
        x = torch.randn(bm, K, device=DEVICE)
        y, r = _run_both(x, args, bias, meta, blocks=blocks)
        torch.testing.assert_close(y, r, **FP32_TOL)
        y, r = _run_both(x.half(), args, bias.half(), meta, blocks=blocks)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y, r, **FP16_TOL)


@needs_triton
@pytest.mark.parametrize("m", [2, 12, 24])  # GEMV sum, GEMV dot, GEMM
def test_weight_only_fp16(m):
    qw, args, meta = _weight("int4-asym-g24")
    x = torch.randn(m, K, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(N, device=DEVICE, dtype=torch.float16)
    y, r = _run_both(x, args, bias, meta)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, r, **FP16_TOL)


@needs_triton
@pytest.mark.parametrize("m", [2, 20])
def test_nf4_double_quant_read_from_stored_scales(m):
    """``qlinear_nf4_dq`` rebuilds each scale from qscale / scale2 / offset as QLinear stores them."""
    qw, args, meta = _weight("nf4-dq-g16")
    dq = qw.double_quant
    stored = (dq.qscale.to(DEVICE), dq.scale2.to(DEVICE), dq.offset.to(DEVICE), dq.block)
    eye = torch.eye(K, device=DEVICE)[:m]
    w = qw.dequantize().to(DEVICE)
    assert torch.equal(qt.qlinear_nf4_dq(eye, args[0], *stored, None, qw.group, K), w[:, :m].t())
    x = torch.randn(m, K, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    torch.testing.assert_close(qt.qlinear_nf4_dq(x, args[0], *stored, bias, qw.group, K),
                               reference.qlinear(x, *args, bias, *meta), **FP32_TOL)


# ------------------------------------------------------------------------------------------------
# The GEMV over a repacked weight (qexport.kernels.triton.packed)
# ------------------------------------------------------------------------------------------------
def _packable(name: str, k: int = 84):
    """Weights whose groups are multiples of 16 (the packed layout's smallest K tile); K = 84 leaves a partial
    last word (int4: 10.5 words of 8 codes, int2: 5.25 of 16) and a partial last group (84 = 2 x 32 + 20)."""
    torch.manual_seed(sum(map(ord, name)))
    spec = {"int4-sym-g32": QuantSpec(bits=4, group_size=32), "int4-asym-g16": QuantSpec(bits=4, group_size=16,
                                                                                         symmetric=False),
            "int2-sym-g16": QuantSpec(bits=2, group_size=16), "int2-asym-g32": QuantSpec(bits=2, group_size=32,
                                                                                         symmetric=False)}[name]
    qw = quantize_weight(torch.randn(N, k), spec)
    t = {key: v.to(DEVICE) for key, v in qw.tensors().items()}
    args = (t["qdata"], qw.scales().to(DEVICE), t.get("zero_point"))
    return args, ("int", spec.bits, qw.group, k, spec.symmetric)


@needs_triton
@pytest.mark.parametrize("name", ["int4-sym-g32", "int4-asym-g16", "int2-sym-g16", "int2-asym-g32"])
def test_packed_gemv_matches_the_stored_layout(name):
    """Repacked codes rebuild the stored weight bit for bit (identity rows), and the GEMV (plain, split-K, the
    dot path for M = 16) matches the reference within the weight-only float tolerances."""
    from qexport.kernels.triton.packed import PackedBlocks, qlinear_packed, repack

    args, meta = _packable(name)
    fmt, bits, group, k, sym = meta
    w = repack(*args, bits, group, k, sym)
    assert w.codes.shape == (-(-k // (32 // bits)), N) and w.codes.dtype == torch.int32 and w.scale.shape[1] == N
    dense = dequantize_stored(*args, *meta)
    bias = torch.randn(N, device=DEVICE)
    for blocks in (PackedBlocks(1, 16, 16), PackedBlocks(4, 32, 16, split_k=3), PackedBlocks(16, 16, 16)):
        eye = torch.eye(k, device=DEVICE)[:blocks.block_m]
        assert torch.equal(qlinear_packed(eye, w, blocks=blocks), dense[:, :blocks.block_m].t())
        x = torch.randn(blocks.block_m, k, device=DEVICE)
        torch.testing.assert_close(qlinear_packed(x, w, bias, blocks=blocks),
                                   reference.qlinear(x, *args, bias, *meta), **FP32_TOL)
        y = qlinear_packed(x.half(), w, bias.half(), blocks=blocks)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y, reference.qlinear(x.half(), *args, bias.half(), *meta), **FP16_TOL)
    # the heuristic's blocks at M = 1 and 3 (batch dims kept)
    x = torch.randn(1, 3, k, device=DEVICE)
    torch.testing.assert_close(qlinear_packed(x, w), reference.qlinear(x, *args, None, *meta), **FP32_TOL)


@needs_triton
def test_packed_refusals_and_tuning_table(tmp_path):
    from qexport.kernels.triton import packed

    args, meta = _packable("int4-sym-g32")
    w = packed.repack(*args, 4, 32, meta[3], True)
    with pytest.raises(InvalidConfig, match="int4 and int2 only"):
        packed.repack(*args, 8, 32, meta[3], True)
    with pytest.raises(InvalidConfig, match="groups of 24"):
        packed.repack(*args, 4, 24, meta[3], True)
    with pytest.raises(InvalidTensor, match=r"expected an input \[\.\.\., 84\]"):
        packed.qlinear_packed(torch.randn(1, 83, device=DEVICE), w)
    with pytest.raises(InvalidConfig, match="M <= 16"):
        packed.packed_blocks(17, N, 84, 32)
    # tune() times each candidate, keeps the fastest for this shape; the table round-trips through JSON
    cands = [packed.PackedBlocks(1, 16, 16), packed.PackedBlocks(1, 32, 32, split_k=2)]
    x = torch.randn(1, 84, device=DEVICE)
    best, times = packed.tune(x, w, repeats=1, candidates=cands)
    assert best in cands and [b for b, _ in times] == cands
    path = tmp_path / "tuned.json"
    packed.save_table(path, "cpu-interpreter")
    with pytest.raises(Exception, match="exists"):
        packed.save_table(path, "cpu-interpreter")
    packed.TUNED.clear()
    assert packed.load_table(path) == "cpu-interpreter" and list(packed.TUNED.values()) == [best]
    torch.testing.assert_close(packed.qlinear_packed(x, w), reference.qlinear(x, *args, None, *meta), **FP32_TOL)
    packed.TUNED.clear()


@needs_triton
def test_bad_stored_tensors_are_named():
    qw, args, meta = _weight("int4-asym-g24")
    x = torch.randn(2, K, device=DEVICE)
    with pytest.raises(InvalidTensor, match="scale must be"):
        qt.qlinear(x, args[0], args[1][:, :1], args[2], None, *meta)
    with pytest.raises(InvalidTensor, match="zero_point"):
        qt.qlinear(x, args[0], args[1], args[2][:1], None, *meta)
    with pytest.raises(InvalidTensor, match="qdata"):
        qt.qlinear(x, args[0].to(torch.int8), args[1], args[2], None, *meta)
    with pytest.raises(InvalidConfig, match="bits=3"):
        qt.qlinear(x, args[0], args[1], args[2], None, "int", 3, *meta[2:])


@needs_triton
def test_block_heuristic():
    decode = qt.pick_blocks("weight_only", 1, 4096, 4096, 128)
    assert decode.kernel == "gemv" and decode.block_m == 1 and 128 % decode.block_k == 0
    assert decode.split_k == 8 and decode.block_n == 16  # split-K on a 4096 x 4096 layer (H100 sweep)
    assert qt.pick_blocks("weight_only", 1, 576, 1536, 128).split_k == 1  # small layer: no split
    assert qt.pick_blocks("weight_only", 1, 4096, 4096, 4096, bits=8).block_n == 32
    assert qt.pick_blocks("weight_only", 16, 4096, 4096, 128).block_m == 16
    prefill = qt.pick_blocks("weight_only", 128, 4096, 11008, 64)
    assert prefill.kernel == "gemm" and 64 % prefill.block_k == 0
    # no power-of-two divisor of 24 that is >= 16: keep the size, look groups up per element
    assert qt.pick_blocks("weight_only", 1, 64, 4096, 24).block_k == 128
    assert qt.pick_blocks("a8", 1, 4096, 4096).block_k >= 32  # int8 tl.dot needs K >= 32 per step


# ------------------------------------------------------------------------------------------------
# W8A8
# ------------------------------------------------------------------------------------------------
def _int8_weight(n, k, per_tensor=False):
    torch.manual_seed(n + k)
    spec = QuantSpec(bits=8, granularity="per_tensor" if per_tensor else "per_channel")
    qw = quantize_weight(torch.randn(n, k), spec)
    return qw.qdata.to(DEVICE), qw.scale.to(DEVICE)


def _activations(m, k):
    torch.manual_seed(m * k)
    x = torch.randn(m, k, device=DEVICE) * 3
    # row 0: max |x| = 127 gives scale 1, so 2.5, -3.5, 0.5, -0.5 are exact ties (round half to even)
    x[0, :5] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5])
    if m > 1:
        x[1] = 0.0  # an all-zero row: scale clamps to the smallest normal float
    return x


@needs_triton
@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("k", [67, 1100])  # K > 1024: the reference switches to float64 sums
def test_a8_per_token_bit_exact(m, k):
    wq, ws = _int8_weight(N, k)
    x = _activations(m, k)
    bias = torch.randn(N, device=DEVICE)
    xq, xs = ops.quantize_per_token(x)
    want = reference.qlinear_a8(xq, xs, 0, wq, ws, bias)
    assert torch.equal(qt.qlinear_a8(xq, xs, 0, wq, ws, bias), want)
    assert torch.equal(qt.qlinear_a8_dynamic(x, wq, ws, bias), want), "fused per-token quantization differs"


@needs_triton
@pytest.mark.parametrize("zero_point", [0, 7, -3])
def test_a8_static_per_tensor_bit_exact(zero_point):
    wq, ws = _int8_weight(N, K, per_tensor=True)  # one weight scale for every row
    x = _activations(20, K).reshape(4, 5, K)
    scale = torch.tensor(0.05, device=DEVICE)
    xq = ops.quantize_per_tensor(x, scale, zero_point)
    got = qt.qlinear_a8(xq, scale, zero_point, wq, ws, None)
    assert got.shape == (4, 5, N)
    assert torch.equal(got, reference.qlinear_a8(xq, scale, zero_point, wq, ws, None))


@needs_triton
def test_a8_dynamic_small_tiles_and_fp16_input():
    wq, ws = _int8_weight(N, K)
    x = _activations(33, K)
    want = reference.qlinear_a8(*ops.quantize_per_token(x), 0, wq, ws, None)
    assert torch.equal(qt.qlinear_a8_dynamic(x, wq, ws, None, blocks=qt.Blocks("a8", 16, 16, 32, group_m=2)), want)
    xh = x.half()
    want_h = reference.qlinear_a8(*ops.quantize_per_token(xh), 0, wq, ws, None)
    assert torch.equal(qt.qlinear_a8_dynamic(xh, wq, ws, None), want_h)


# ------------------------------------------------------------------------------------------------
# Dispatcher
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_kernel(None)
    yield monkeypatch
    dispatch.set_kernel(None)


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_setting_precedence_and_bad_values(clean_dispatch):
    mp = clean_dispatch
    assert dispatch.get_kernel() == "auto"
    mp.setenv("QEXPORT_KERNEL", "Reference")
    assert dispatch.get_kernel() == "reference"
    with dispatch.use_kernel("triton"):
        assert dispatch.get_kernel() == "triton"
        with dispatch.use_kernel("auto"):
            assert dispatch.get_kernel() == "auto"
        assert dispatch.get_kernel() == "triton"
    assert dispatch.get_kernel() == "reference"
    mp.setenv("QEXPORT_KERNEL", "cuda")
    with pytest.raises(InvalidConfig, match=r"QEXPORT_KERNEL.*'cuda'.*auto, triton, reference"):
        dispatch.get_kernel()
    with pytest.raises(InvalidConfig, match=r"set_kernel\(\).*'fast'"):
        dispatch.set_kernel("fast")
    dispatch.set_kernel("reference")
    assert dispatch.select(torch.device("cuda")) == "reference"  # the override wins over the bad variable
    dispatch.set_kernel(None)
    mp.setenv("QEXPORT_KERNEL", "")
    assert dispatch.get_kernel() == "auto"


def test_auto_on_cpu_runs_the_reference(clean_dispatch):
    calls = _spy(clean_dispatch, reference, "qlinear")
    qw, args, meta = _weight("int4-asym-g24", device="cpu")
    ops.qlinear(torch.randn(2, K), *args, None, *meta)
    assert calls == ["qlinear"]


def test_forced_triton_without_triton_is_a_clear_error(clean_dispatch):
    mp = clean_dispatch
    mp.setattr(dispatch, "_triton_module", None)
    mp.setattr(dispatch, "_triton_error", "ModuleNotFoundError: No module named 'triton'")
    mp.setenv("QEXPORT_KERNEL", "triton")
    qw, args, meta = _weight("int8-sym-channel", device="cpu")
    with pytest.raises(InvalidConfig, match=r"QEXPORT_KERNEL=triton.*No module named 'triton'.*pip install"):
        ops.qlinear(torch.randn(2, K), *args, None, *meta)
    mp.setenv("QEXPORT_KERNEL", "auto")
    assert dispatch.select(torch.device("cuda")) == "reference"


@needs_triton
def test_forced_triton_on_cpu_needs_the_interpreter(clean_dispatch):
    mp = clean_dispatch
    mp.setattr(qt, "INTERPRETED", False)
    dispatch.set_kernel("triton")
    with pytest.raises(InvalidConfig, match="TRITON_INTERPRET=1"):
        dispatch.select(torch.device("cpu"))


@needs_triton
def test_forced_triton_runs_the_ops_and_unsupported_cases_fall_back(clean_dispatch):
    mp = clean_dispatch
    wo_calls = _spy(mp, qt, "qlinear")
    a8_calls = _spy(mp, qt, "qlinear_a8")
    qw, args, meta = _weight("nf4-g24")
    x = torch.randn(3, K, device=DEVICE)
    mp.setenv("QEXPORT_KERNEL", "triton")
    y = ops.qlinear(x, *args, None, *meta)
    torch.testing.assert_close(y, reference.qlinear(x, *args, None, *meta), **FP32_TOL)
    wq, ws = _int8_weight(N, K)
    xq, xs = ops.quantize_per_token(_activations(3, K))
    assert torch.equal(ops.qlinear_a8(xq, xs, 0, wq, ws, None), reference.qlinear_a8(xq, xs, 0, wq, ws, None))
    assert wo_calls == ["qlinear"] and a8_calls == ["qlinear_a8"]
    # float64 is not covered: forced triton says so, auto uses the reference
    with pytest.raises(InvalidConfig, match="float64.*QEXPORT_KERNEL=auto"):
        ops.qlinear(x.double(), *args, None, *meta)
    mp.setenv("QEXPORT_KERNEL", "auto")
    ops.qlinear(x.double(), *args, None, *meta)
    assert wo_calls == ["qlinear"]


@needs_triton
@pytest.mark.parametrize("act", [None, QuantSpec(bits=8, granularity="per_token", dynamic=True)],
                         ids=["weight-only", "w8a8-dynamic"])
def test_qlinear_module_same_result_through_triton(clean_dispatch, act):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    spec = QuantSpec(bits=8) if act is not None else QuantSpec(bits=4, group_size=24, symmetric=False)
    layer = QLinear.from_linear(lin, spec, act_spec=act).to(DEVICE)
    x = torch.randn(2, 3, K, device=DEVICE)
    with dispatch.use_kernel("reference"):
        want = layer(x)
    with dispatch.use_kernel("triton"):
        got = layer(x)
    if act is None:
        torch.testing.assert_close(got, want, **FP32_TOL)
    else:
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_custom_op_passes_opcheck():
    qw, args, meta = _weight("int2-asym-g24")
    x = torch.randn(2, K, device=DEVICE)
    torch.library.opcheck(torch.ops.qexport.triton_qlinear.default, (x, *args, None, *meta))


@needs_triton
def test_torch_compile_with_the_fake_kernels(clean_dispatch):
    torch._dynamo.reset()
    qw, args, meta = _weight("int4-sym-g32")
    bias = torch.randn(N, device=DEVICE)

    def f(x):
        return torch.ops.qexport.triton_qlinear(x, *args, bias, *meta).relu() * 2

    x = torch.randn(2, K, device=DEVICE)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), **FP32_TOL)

    layer = QLinear.from_linear(torch.nn.Linear(K, N), QuantSpec(bits=4, format="nf4", group_size=16)).to(DEVICE)
    with dispatch.use_kernel("triton"):
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    with dispatch.use_kernel("reference"):
        torch.testing.assert_close(got, layer(x), **FP32_TOL)


@pytest.mark.skipif(not _HAVE_TRITON or bool(os.environ.get(CHILD_ENV)),
                    reason="triton is not installed" if not _HAVE_TRITON else "run by the parent process")
def test_kernels_compile_for_a_gpu_and_refuse_cpu_without_interpreter():
    """In a fresh process without TRITON_INTERPRET: the kernels compile for sm_90 (PTX and cubin, no GPU
    needed), the fused W8A8 kernel uses IEEE division and no FMA, and forcing Triton on CPU is refused."""
    script = textwrap.dedent("""
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from qexport import ops
        from qexport.errors import InvalidConfig
        from qexport.formats import quantize_weight
        from qexport.config import QuantSpec
        from qexport.kernels.triton import gemm, INTERPRETED
        assert not INTERPRETED

        def build(kernel, ptrs, consts, **options):
            sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.arg_names}
            return triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=4, num_stages=3, **options))

        wo = dict(x_ptr="*fp16", y_ptr="*fp16", b_ptr="*fp16", q_ptr="*u8", s_ptr="*fp32", z_ptr="*u8",
                  lut_ptr="*fp32", s2_ptr="*fp32", soff_ptr="*fp32")
        flags = dict(BITS=4, IS_NF4=False, SIGNED=False, HAS_ZP=True, HAS_DQ=False, HAS_BIAS=True,
                     GROUP_ALIGNED=False, IEEE_FP32=False)
        build(gemm._qlinear_gemv_kernel, wo, dict(flags, USE_DOT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64))
        a8 = dict(x_ptr="*bf16", xs_ptr="*fp32", w_ptr="*i8", ws_ptr="*fp32", b_ptr="*fp32", y_ptr="*fp32")
        k = build(gemm._qlinear_a8_kernel, a8, dict(DYNAMIC=True, HAS_ZP=False, HAS_BIAS=True, BLOCK_M=16,
                                                    BLOCK_N=64, BLOCK_K=128, GROUP_M=8), enable_fp_fusion=False)
        ptx = k.asm["ptx"]
        assert "div.rn.f32" in ptx and "fma.rn.f32" not in ptx, "fused W8A8 kernel: expected IEEE division, no FMA"

        qw = quantize_weight(torch.randn(8, 32), QuantSpec(bits=8))
        try:
            ops.qlinear(torch.randn(1, 32), qw.qdata, qw.scale, None, None, "int", 8, 32, 32, True)
        except InvalidConfig as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("forcing triton on CPU without the interpreter did not raise")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QEXPORT_KERNEL"] = "triton"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                       cwd=REPO)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@pytest.mark.skipif(not IN_FRESH_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_tests_in_a_fresh_process():
    """Triton was imported before the interpreter could be switched on: run this file in a new process."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env.pop(dispatch.ENV_VAR, None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    # the child refuses to start (see the top of this file) if it cannot run the interpreter either
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


# ------------------------------------------------------------------------------------------------
# GPU only: real layer shapes
# ------------------------------------------------------------------------------------------------
REAL_SPECS = {
    "int8": QuantSpec(bits=8),
    "int4g128": QuantSpec(bits=4, group_size=128, symmetric=False),
    "int2g64": QuantSpec(bits=2, group_size=64, symmetric=False),
    "nf4g64": QuantSpec(bits=4, format="nf4", group_size=64),
}


@needs_cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("name", REAL_SPECS)
def test_gpu_real_shapes_match_reference(name, shape):
    n, k = shape
    qw = quantize_weight(torch.randn(n, k) * 0.02, REAL_SPECS[name])
    t = {key: v.cuda() for key, v in qw.tensors().items()}
    args = (t["qdata"], qw.scales().cuda(), t.get("zero_point"))
    meta = (qw.spec.format.value, qw.spec.bits, qw.group, k, qw.spec.symmetric)
    for m in (1, 16, 128):
        x = torch.randn(m, k, device="cuda")
        # K up to 11008: float32 sums in another order differ by more than at K = 67
        for dtype, tol in ((torch.float32, dict(rtol=1e-4, atol=1e-4)), (torch.float16, dict(rtol=1e-2, atol=1e-2)),
                           (torch.bfloat16, dict(rtol=3e-2, atol=3e-2))):
            xd = x.to(dtype)
            torch.testing.assert_close(qt.qlinear(xd, *args, None, *meta), reference.qlinear(xd, *args, None, *meta),
                                       **tol)
    if name == "int8":
        for m in (1, 16, 128):
            x = torch.randn(m, k, device="cuda")
            xq, xs = ops.quantize_per_token(x)
            ref = reference.qlinear_a8(xq, xs, 0, t["qdata"], args[1], None)
            assert torch.equal(qt.qlinear_a8(xq, xs, 0, t["qdata"], args[1], None), ref)
            assert torch.equal(qt.qlinear_a8_dynamic(x, t["qdata"], args[1], None), ref)


@needs_cuda
def test_gpu_auto_dispatch_uses_triton(clean_dispatch):
    calls = _spy(clean_dispatch, qt, "qlinear")
    qw, args, meta = _weight("int4-asym-g24", device="cuda")
    ops.qlinear(torch.randn(2, K, device="cuda"), *args, None, *meta)
    assert calls == ["qlinear"]
