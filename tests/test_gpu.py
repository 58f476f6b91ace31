"""Quantized models end to end on a CUDA GPU: the Triton kernels inside a whole model, eager and compiled.

``tests/test_triton_kernels.py`` checks each kernel alone; here a tiny Llama quantized by every kernel-backed
preset runs on the GPU, where ``auto`` dispatch must pick Triton, and its logits are compared with the same
model forced onto the reference kernels (``qexport.kernels.reference``, the oracle):

* float32 activations: ``rtol=atol=1e-4`` (the dequantized weights are identical; only the order of the
  float32 sums differs, through two layers and the head);
* float16 model (``model.half()``): ``rtol=atol=2e-2`` on logits of magnitude O(1) (both sides round
  activations to fp16 between layers, at different points of the sum).

``torch.compile(backend="qexport", options={"target": "inductor"})`` on the GPU must match the eager
quantized model on the GPU (``rtol=atol=1e-4``).

Everything here is skipped without CUDA and Triton (CI has no GPU).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import qexport
from qexport.kernels import dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs a CUDA GPU and triton")

from tiny import tiny_llama  # noqa: E402

IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
# preset -> the Triton entry point its linears must go through
KERNEL_PRESETS = {
    "w8": "qlinear",
    "w4g128": "qlinear",
    "w4g64": "qlinear",
    "w2g64": "qlinear",
    "nf4-dq": "qlinear",  # the scales are double-dequantized first (qexport::double_dequantize)
    "w8a8-dynamic": "qlinear_a8",  # after qexport::quantize_per_token
}


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls into ``qexport.kernels.triton`` by entry point."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_kernel(None)
    qt = dispatch.triton_kernels()
    assert qt is not None, "qexport.kernels.triton does not import on this GPU machine"
    calls: dict[str, int] = {}
    for name in ("qlinear", "qlinear_nf4_dq", "qlinear_a8", "qlinear_a8_dynamic"):
        real = getattr(qt, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(qt, name, spy)
    yield calls
    dispatch.set_kernel(None)


@pytest.mark.parametrize("preset", KERNEL_PRESETS)
def test_quantized_llama_runs_triton_and_matches_reference(preset, triton_calls):
    model = qexport.quantize(tiny_llama(seed=3), preset).cuda()
    ids = IDS.cuda()
    with torch.no_grad():
        got = model(ids).logits
        assert triton_calls.get(KERNEL_PRESETS[preset], 0) == 14, triton_calls  # 2 layers x 7 linears
        with dispatch.use_kernel("reference"):
            want = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if preset != "w8a8-dynamic":  # int8 x int8 is exact in any float type: only the float32 check
            half = copy.deepcopy(model).half()
            got16 = half(ids).logits
            with dispatch.use_kernel("reference"):
                want16 = half(ids).logits
            assert got16.dtype == torch.float16
            torch.testing.assert_close(got16.float(), want16.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("preset", ["w4g128", "w8a8-dynamic"])
def test_compiled_inductor_on_gpu_matches_eager(preset, triton_calls):
    torch._dynamo.reset()
    model = tiny_llama(seed=5)
    eager = qexport.quantize(copy.deepcopy(model), preset).cuda()
    compiled = torch.compile(copy.deepcopy(model).cuda(), backend="qexport",
                             options={"recipe": preset, "target": "inductor"})
    ids = IDS.cuda()
    try:
        with torch.no_grad():
            got, want = compiled(ids).logits, eager(ids).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    counts = qexport.backend.reports()[-1].counts()
    assert counts["convert"]["layers"] == 14
