"""Export a quantized causal LM as a folder: ONNX (QDQ) for ONNX Runtime / TensorRT, and what serves it.

* :func:`export_onnx` writes ``model.onnx`` (+ ``model.onnx.data`` when large), config, tokenizer, recipe
  and export report (:mod:`qexport.export.onnx`).
* :class:`OnnxCausalLM` runs the folder in ONNX Runtime with its KV cache: logits, perplexity, greedy
  generation; :func:`verify` compares it with the PyTorch reference (:mod:`qexport.export.runtime`).
* :func:`lint_tensorrt` checks a graph against TensorRT's QDQ rules; :func:`build_engine` builds a TensorRT
  engine when TensorRT is installed (:mod:`qexport.export.tensorrt`).
* :func:`compare_runtimes` runs the PyTorch reference, ONNX Runtime and (with TensorRT) an engine through
  polygraphy's ``Comparator`` (:mod:`qexport.export.polygraphy_check`).
"""

from qexport.export.onnx import ExportResult, export_onnx
from qexport.export.polygraphy_check import PolygraphyUnavailable, compare_runtimes
from qexport.export.runtime import OnnxCausalLM, verify
from qexport.export.tensorrt import TensorRTUnavailable, Violation, build_engine, lint_tensorrt

__all__ = ["export_onnx", "ExportResult", "OnnxCausalLM", "verify", "lint_tensorrt", "Violation", "build_engine",
           "TensorRTUnavailable", "compare_runtimes", "PolygraphyUnavailable"]
