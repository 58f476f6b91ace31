"""qexport: quantize PyTorch models (LLMs first) to 8, 4 and 2 bits and export them for serving.

Importing qexport is light: it loads torch, but never transformers, onnx, triton or tensorrt, and never
initialises CUDA.
"""

from qexport.algorithms.allocate import allocate, plan_allocation
from qexport.api import QuantizationReport, SizeReport, calibrate, model_size, quantize
from qexport.config import QuantSpec, Recipe, Rule, load_recipe
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
from qexport.modules import QEmbedding, QLinear
from qexport.presets import PRESETS, get_preset

__version__ = "0.1.0"


def export_onnx(model, out, recipe=None, tokenizer=None, **options):
    """Export a causal LM quantized by ``recipe`` as an ONNX QDQ folder with KV cache: see
    :func:`qexport.export.onnx.export_onnx` (imported on first use, so ``import qexport`` stays light)."""
    from qexport.export.onnx import export_onnx as _export_onnx

    return _export_onnx(model, out, recipe, tokenizer, **options)


def save_quantized(model, out, tokenizer=None, **options):
    """Save a quantized model as a folder that qexport (and, where it fits, transformers and vLLM) loads: see
    :func:`qexport.checkpoint.save_quantized`."""
    from qexport.checkpoint import save_quantized as _save

    return _save(model, out, tokenizer, **options)


def load_quantized(path):
    """The model saved by :func:`save_quantized`, rebuilt bit for bit: see :func:`qexport.checkpoint.load_quantized`."""
    from qexport.checkpoint import load_quantized as _load

    return _load(path)


def load_model(model="smollm2"):
    """``(model, tokenizer)``: ``'smollm2'``, a Hugging Face checkpoint folder, or a saved quantized folder (loaded
    as it is): see :func:`qexport.models.load_model`."""
    from qexport.models import load_model as _load_model

    return _load_model(model)


__all__ = [
    "save_quantized",
    "load_quantized",
    "load_model",
    "quantize",
    "calibrate",
    "allocate",
    "plan_allocation",
    "export_onnx",
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
    "QEmbedding",
    "QExportError",
    "InvalidConfig",
    "UnknownPreset",
    "InvalidTensor",
    "ModelLoadError",
    "DataError",
    "CalibrationError",
    "UnsupportedOp",
]
