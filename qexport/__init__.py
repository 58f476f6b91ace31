"""qexport: quantize PyTorch models (LLMs first) to 8, 4 and 2 bits and export them for serving.

Importing qexport is light: it loads torch, but never transformers, onnx, triton or tensorrt, and never
initialises CUDA.
"""

from qexport.api import QuantizationReport, SizeReport, calibrate, model_size, quantize
from qexport.config import PRESETS, QuantSpec, Recipe, Rule, get_preset, load_recipe
from qexport.errors import (
    CalibrationError,
    DataError,
    InvalidConfig,
    InvalidTensor,
    ModelLoadError,
    QExportError,
    UnknownPreset,
    UnsupportedOp,
)
from qexport.formats import QuantizedWeight, fake_quantize, quantize_weight
from qexport.modules import QLinear

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "calibrate",
    "model_size",
    "QuantizationReport",
    "SizeReport",
    "QuantSpec",
    "Recipe",
    "Rule",
    "PRESETS",
    "get_preset",
    "load_recipe",
    "QuantizedWeight",
    "quantize_weight",
    "fake_quantize",
    "QLinear",
    "QExportError",
    "InvalidConfig",
    "UnknownPreset",
    "InvalidTensor",
    "ModelLoadError",
    "DataError",
    "CalibrationError",
    "UnsupportedOp",
]
