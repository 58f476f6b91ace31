"""Triton kernels for qexport's stored weight formats (installed as ``qexport.kernels.triton``).

Importing this package needs ``triton`` (``pip install 'qexport[triton]'``) and registers the custom ops
of :mod:`.library`. The kernels are in :mod:`.gemm` (layouts and block sizes are documented there); the
GEMV over a weight repacked for coalesced loads, with its tuning table, is in :mod:`.packed`.

``INTERPRETED`` tells whether the kernels were built for Triton's interpreter: Triton decides when a
kernel is defined, i.e. when this package is first imported, from ``TRITON_INTERPRET=1`` in the
environment. Interpreted kernels run on CPU tensors (slowly; for tests); compiled ones need CUDA tensors.
"""

from __future__ import annotations

from triton.runtime.interpreter import InterpretedFunction

from qexport.kernels.triton import gemm, library, packed
from qexport.kernels.triton.gemm import (
    Blocks,
    pick_blocks,
    qlinear,
    qlinear_a8,
    qlinear_a8_dynamic,
    qlinear_nf4_dq,
)
from qexport.kernels.triton.packed import PackedWeight, qlinear_packed, repack

INTERPRETED: bool = isinstance(gemm._qlinear_gemm_kernel, InterpretedFunction)

__all__ = [
    "INTERPRETED",
    "Blocks",
    "pick_blocks",
    "qlinear",
    "qlinear_nf4_dq",
    "qlinear_a8",
    "qlinear_a8_dynamic",
    "library",
    "packed",
    "PackedWeight",
    "repack",
    "qlinear_packed",
]
