"""Quantization algorithms that use calibration data: GPTQ, AWQ and SmoothQuant.

Each algorithm is a function ``fn(model, tasks, batches, options, progress) -> {name: QuantizedWeight |
QExportError}``: ``tasks`` are the linears the recipe quantizes (:class:`~qexport.algorithms.common.LayerTask`),
``batches`` the calibration batches, ``options`` the recipe's (validated) algorithm options. It returns the
stored weight of every task, in qexport's own format, or the error that keeps that layer float; the caller
(:func:`qexport.quantize`) swaps in the :class:`~qexport.modules.QLinear` modules. Modules are imported when
an algorithm is first used, so ``import qexport`` stays light.

    from qexport.algorithms import calibration_tokens
    calib = calibration_tokens(text, tokenizer, samples=128, seq_len=512, seed=0)
    qexport.quantize(model, "w4g128-gptq", calibration=calib)
"""

from __future__ import annotations

from typing import Callable

from qexport.algorithms.calibration import calibration_batches, calibration_from_file, calibration_tokens
from qexport.errors import InvalidConfig

__all__ = ["ALGORITHMS", "get_algorithm", "calibration_tokens", "calibration_from_file", "calibration_batches"]


def _gptq(*args, **kwargs):
    from qexport.algorithms.gptq import quantize_model_gptq

    return quantize_model_gptq(*args, **kwargs)


def _awq(*args, **kwargs):
    from qexport.algorithms.awq import quantize_model_awq

    return quantize_model_awq(*args, **kwargs)


def _smoothquant(*args, **kwargs):
    from qexport.algorithms.smoothquant import quantize_model_smoothquant

    return quantize_model_smoothquant(*args, **kwargs)


ALGORITHMS: dict[str, Callable] = {"gptq": _gptq, "awq": _awq, "smoothquant": _smoothquant}


def get_algorithm(name: str) -> Callable:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise InvalidConfig(f"no calibrated algorithm {name!r}; available: {', '.join(ALGORITHMS)}") from None
