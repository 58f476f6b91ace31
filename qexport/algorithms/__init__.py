"""Quantization algorithms: round to nearest, GPTQ, AWQ and SmoothQuant, and the calibration data they use.

Every algorithm registers itself in :data:`ALGORITHMS` (:mod:`qexport.algorithms.registry`) beside its
code, with its recipe options and whether it needs calibration data. An algorithm's ``run`` is a function
``fn(model, tasks, batches, options, progress) -> {name: QuantizedWeight | QExportError}``: ``tasks`` are the
linears the recipe quantizes (:class:`~qexport.algorithms.common.LayerTask`), ``batches`` the calibration
batches, ``options`` the recipe's (validated) algorithm options. It returns the stored weight of every task,
in qexport's own format, or the error that keeps that layer float; the caller (:func:`qexport.quantize`)
swaps in the :class:`~qexport.modules.QLinear` modules. The algorithm modules need only torch, so importing
them keeps ``import qexport`` light.

    from qexport.algorithms import calibration_tokens
    calib = calibration_tokens(text, tokenizer, samples=128, seq_len=512, seed=0)
    qexport.quantize(model, "w4g128-gptq", calibration=calib)
"""

from __future__ import annotations

from qexport.algorithms import rtn, gptq, awq, smoothquant  # isort: skip (registered in this order)
from qexport.algorithms.calibration import calibration_batches, calibration_from_file, calibration_tokens
from qexport.algorithms.registry import ALGORITHMS, Algorithm, Option, get_algorithm, register

BUILTIN = (rtn, gptq, awq, smoothquant)  # the modules of the built-in algorithms: each registers itself on import

__all__ = ["ALGORITHMS", "Algorithm", "Option", "register", "get_algorithm", "calibration_tokens",
           "calibration_from_file", "calibration_batches"]
