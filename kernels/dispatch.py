"""Which implementation runs ``qexport::qlinear`` and ``qexport::qlinear_a8``: Triton or the reference.

The choice, made at every call:

``auto`` (default)
    Triton when the input is on a CUDA device and ``triton`` imports; the reference
    (:mod:`qexport.kernels.reference`) otherwise, and for the cases the Triton kernels do not cover (for
    example float64 inputs), so ``auto`` never fails where the reference would work.
``triton``
    Always the Triton kernels; an error (:class:`qexport.errors.InvalidConfig`) when they cannot run:
    ``triton`` is not installed, the case is not covered, or the input is on the CPU and the kernels were
    not built for Triton's interpreter (``TRITON_INTERPRET=1`` must be in the environment before
    ``qexport.kernels.triton`` is first imported; the interpreter is slow and meant for tests).
``reference``
    Always the reference.

Set it with the environment variable ``QEXPORT_KERNEL=auto|triton|reference`` (read at each call), or in
code with :func:`set_kernel` / the :func:`use_kernel` context manager, which take precedence over the
variable. Importing this module never imports ``triton``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Iterator

import torch

from qexport.errors import InvalidConfig
from qexport.kernels import reference

__all__ = ["ENV_VAR", "KERNELS", "set_kernel", "get_kernel", "use_kernel", "select", "triton_kernels", "qlinear",
           "qlinear_a8"]

ENV_VAR = "QEXPORT_KERNEL"
KERNELS = ("auto", "triton", "reference")

_override: str | None = None
_triton_module: ModuleType | None = None
_triton_error: str | None = None


def _check_name(name: str, where: str) -> str:
    value = name.strip().lower() if isinstance(name, str) else name
    if value not in KERNELS:
        raise InvalidConfig(f"{where}: unknown kernel choice {name!r}; use one of {', '.join(KERNELS)}")
    return value


def set_kernel(name: str | None) -> None:
    """Force the implementation (``"auto"``, ``"triton"``, ``"reference"``) for this process; ``None``
    goes back to the ``QEXPORT_KERNEL`` environment variable."""
    global _override
    _override = None if name is None else _check_name(name, "set_kernel()")


def get_kernel() -> str:
    """The setting in force: the :func:`set_kernel` override, else ``QEXPORT_KERNEL``, else ``"auto"``."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    if env is None or env.strip() == "":
        return "auto"
    return _check_name(env, f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_kernel(name: str | None) -> Iterator[None]:
    """``with use_kernel("triton"): ...``: force the implementation inside the block, then restore."""
    global _override
    previous = _override
    set_kernel(name)
    try:
        yield
    finally:
        _override = previous


def triton_kernels() -> ModuleType | None:
    """:mod:`qexport.kernels.triton`, imported on first use; ``None`` when ``triton`` cannot be imported."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("qexport.kernels.triton")
        except Exception as e:  # ImportError without triton; a broken install can raise other errors
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton_module


def select(device: torch.device, unsupported: str | None = None) -> str:
    """``"triton"`` or ``"reference"`` for an input on ``device``.

    ``unsupported``: why the Triton kernels cannot take this call (``None`` when they can); ``auto`` then
    uses the reference, a forced ``triton`` raises with this reason.
    """
    choice = get_kernel()
    if choice == "reference":
        return "reference"
    if choice == "auto":
        if device.type != "cuda" or unsupported is not None or triton_kernels() is None:
            return "reference"
        return "triton"
    forced = f"{ENV_VAR}=triton (or set_kernel('triton'))"
    module = triton_kernels()
    if module is None:
        raise InvalidConfig(f"{forced}: the Triton kernels cannot be imported ({_triton_error}); install them with "
                            "pip install 'qexport[triton]' (Linux x86-64), or use the reference kernels")
    if unsupported is not None:
        raise InvalidConfig(f"{forced}: {unsupported}; use {ENV_VAR}=auto to fall back to the reference for it")
    if device.type not in ("cpu", "cuda"):
        raise InvalidConfig(f"{forced}: inputs on {device.type} are not supported by the Triton kernels (CUDA only)")
    if device.type == "cpu" and not module.INTERPRETED:
        raise InvalidConfig(f"{forced}: the input is on the CPU, where Triton kernels run only in Triton's "
                            "interpreter: set TRITON_INTERPRET=1 in the environment before qexport.kernels.triton "
                            f"is first imported (slow, for testing), or use {ENV_VAR}=auto / reference on CPU")
    return "triton"


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _qlinear_unsupported(x: torch.Tensor, fmt: str, bits: int) -> str | None:
    if x.dtype not in _TRITON_DTYPES:
        return f"input dtype {x.dtype} is not supported by the Triton qlinear kernel (float16, bfloat16, float32)"
    if (fmt, bits) not in (("int", 8), ("int", 4), ("int", 2), ("nf4", 4)):
        return f"{bits}-bit {fmt!r} weights are not supported by the Triton qlinear kernel"
    return None


def qlinear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            bias: torch.Tensor | None, fmt: str, bits: int, group: int, in_features: int,
            symmetric: bool) -> torch.Tensor:
    """``qexport::qlinear`` by the selected implementation (same arguments, same result)."""
    if select(x.device, _qlinear_unsupported(x, fmt, bits)) == "triton":
        return triton_kernels().qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric)
    return reference.qlinear(x, qdata, scale, zero_point, bias, fmt, bits, group, in_features, symmetric)


def _a8_unsupported(xq: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> str | None:
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        return f"the Triton qlinear_a8 kernel takes int8 activations and weights, got {xq.dtype} and {wq.dtype}"
    if w_scale.numel() not in (1, wq.shape[0]):
        return f"the Triton qlinear_a8 kernel takes one weight scale per output row, got shape {tuple(w_scale.shape)}"
    return None


def qlinear_a8(xq: torch.Tensor, x_scale: torch.Tensor, x_zero_point: int, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``qexport::qlinear_a8`` by the selected implementation (same arguments, bit-identical result)."""
    if select(xq.device, _a8_unsupported(xq, wq, w_scale)) == "triton":
        return triton_kernels().qlinear_a8(xq, x_scale, x_zero_point, wq, w_scale, bias)
    return reference.qlinear_a8(xq, x_scale, x_zero_point, wq, w_scale, bias)
