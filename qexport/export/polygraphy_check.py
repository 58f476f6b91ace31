"""An export folder through polygraphy's ``Comparator``: the PyTorch reference, ONNX Runtime, and a TensorRT
engine where TensorRT is installed, on the same feeds, element by element.

:func:`compare_runtimes` builds one polygraphy runner per back-end and lets ``Comparator.run`` feed them
identical inputs: a prefill of the sample tokens with an empty past, then ``decode_steps`` single-token steps
whose past key / values are ONNX Runtime's own ``present`` outputs (so every step compares the runtimes on
the same cache, and errors do not accumulate across steps). Every output is compared, the logits and each
layer's ``present`` key / value, with ``CompareFunc.simple``: an element passes when its absolute error is
at most ``atol`` *or* its relative error at most ``rtol``.

Runners:

* ``pytorch``: the folder's PyTorch reference (:func:`qexport.export.runtime.reference_model`), with a
  ``DynamicCache`` filled from the fed past;
* ``onnxruntime``: polygraphy's ``OnnxrtRunner`` on the folder's session (its ``ort_session_config``, e.g.
  the MatMulNBits accuracy level, applied);
* ``tensorrt`` (``engine=``): polygraphy's ``TrtRunner`` on a serialized engine
  (``qexport build-engine``); needs the ``tensorrt`` package (:class:`TensorRTUnavailable` otherwise).

Exports with a quantized KV cache feed codes and scales as the past, which the PyTorch cache does not
take: they are refused here (``qexport verify`` without polygraphy covers them).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from qexport.errors import InvalidConfig, ModelLoadError, QExportError

__all__ = ["compare_runtimes", "check_polygraphy_runners", "PolygraphyUnavailable"]


class PolygraphyUnavailable(QExportError):
    """polygraphy is not installed."""


def _polygraphy():
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata
        from polygraphy.comparator import Comparator, CompareFunc
        from polygraphy.datatype import DataType
    except ImportError:
        raise PolygraphyUnavailable("polygraphy is not installed: pip install 'qexport[polygraphy]'") from None
    return BaseRunner, TensorMetadata, Comparator, CompareFunc, DataType


def check_polygraphy_runners(engine: str | os.PathLike | None = None) -> None:
    """Raise now if the comparison cannot run: polygraphy missing, or an engine given without TensorRT or
    that is not a file."""
    _polygraphy()
    if engine is None:
        return
    if importlib.util.find_spec("tensorrt") is None:
        from qexport.export.tensorrt import TensorRTUnavailable

        raise TensorRTUnavailable(f"comparing the engine {str(engine)!r} needs TensorRT, which is not installed here")
    if not os.path.isfile(engine):
        raise ModelLoadError(f"engine {str(engine)!r} does not exist or is not a file")


def _simple(CompareFunc, atol: float, rtol: float):
    """polygraphy's element-wise comparison (``SimpleCompareFunc`` in newer versions, else ``CompareFunc.simple``)."""
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        return CompareFunc.simple(atol=atol, rtol=rtol)
    return SimpleCompareFunc(atol=atol, rtol=rtol)


def _torch_runner(model, session, layers: int):
    """A polygraphy runner that runs the PyTorch reference on the ONNX model's feeds and names its outputs
    as the ONNX model does (``logits``, ``present.{i}.key`` / ``.value``)."""
    BaseRunner, TensorMetadata, _, _, DataType = _polygraphy()
    from transformers import DynamicCache

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name="pytorch")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for i in session.get_inputs():
                meta.add(i.name, dtype=DataType.from_dtype(i.type, "onnxruntime"), shape=i.shape)
            return meta

        @torch.no_grad()
        def infer_impl(self, feed_dict):
            start = time.time()
            cache = DynamicCache()
            for i in range(layers):
                key, value = feed_dict[f"past_key_values.{i}.key"], feed_dict[f"past_key_values.{i}.value"]
                if key.shape[2]:
                    cache.update(torch.from_numpy(np.ascontiguousarray(key)),
                                 torch.from_numpy(np.ascontiguousarray(value)), i)
            ids, mask = feed_dict["input_ids"], feed_dict["attention_mask"]
            positions = feed_dict.get("position_ids")  # the GroupQueryAttention form has none: from the mask
            if positions is None:
                positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(np.ascontiguousarray(positions)),
                        cache=cache, use_cache=True)
            outputs = OrderedDict(logits=out.logits.float().numpy())
            for i, layer in enumerate(out.cache.layers[:layers]):
                outputs[f"present.{i}.key"] = layer.keys.float().numpy()
                outputs[f"present.{i}.value"] = layer.values.float().numpy()
            self.inference_time = time.time() - start
            return outputs

    return TorchRunner()


def _feeds(lm, input_ids: np.ndarray, decode_steps: int) -> list[dict[str, np.ndarray]]:
    """Prefill + teacher-forced decode feeds, the past of each step from ONNX Runtime's previous outputs."""
    prefill = input_ids.shape[1] - decode_steps
    ids = input_ids[:, :prefill]
    mask = np.ones(ids.shape, np.int64)
    past = lm.empty_past(ids.shape[0])
    feeds = []
    for t in range(prefill, input_ids.shape[1] + 1):
        feeds.append(lm.feed(ids, mask, past))
        if t == input_ids.shape[1]:
            break
        past = lm.session.run(None, feeds[-1])[1:]
        ids = input_ids[:, t:t + 1]
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
    return feeds


def compare_runtimes(path: str | os.PathLike, reference=None, engine: str | os.PathLike | None = None,
                     input_ids: torch.Tensor | None = None, decode_steps: int = 4, atol: float = 1e-2,
                     rtol: float = 1e-2, threads: int | None = None, calibration=None,
                     session_config: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an export folder's back-ends through polygraphy's ``Comparator`` (see the module docstring).

    Returns ``passed`` (every element of every output of every runner within tolerance of the PyTorch
    reference), ``runners``, ``atol`` / ``rtol``, ``feeds`` (1 prefill + ``decode_steps``) and
    ``outputs``: per runner, per output name, the largest ``max_abs`` / ``max_rel`` over the feeds and
    whether it passed.
    """
    _, _, Comparator, CompareFunc, _ = _polygraphy()
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from qexport.export.runtime import OnnxCausalLM, _sample_ids, reference_model

    if not (atol >= 0 and rtol >= 0):
        raise InvalidConfig(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    if decode_steps < 0:
        raise InvalidConfig(f"decode_steps must be >= 0, got {decode_steps}")
    check_polygraphy_runners(engine)
    lm = OnnxCausalLM(path, threads=threads, session_config=session_config)
    if lm.kv_cache is not None:
        raise InvalidConfig(f"{str(lm.path)!r} has a quantized KV cache: the polygraphy comparison feeds float "
                            "past key / values; use `qexport verify` without --polygraphy for this export")
    runners = []
    if engine is not None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        runners.append(TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt"))
    if reference is None:
        reference = reference_model(lm.report, lm.path, calibration)
    reference.eval()
    if input_ids is None:
        input_ids, _ = _sample_ids(lm.path, reference.config.vocab_size, 32 + decode_steps)
    if input_ids.shape[1] <= decode_steps:
        raise InvalidConfig(f"input_ids need more than decode_steps={decode_steps} tokens")
    feeds = _feeds(lm, input_ids.numpy().astype(np.int64), decode_steps)
    runners = [_torch_runner(reference, lm.session, lm.layers),
               OnnxrtRunner(lm.session, name="onnxruntime"), *runners]
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    colors, G_LOGGER.colors = G_LOGGER.colors, False  # no "install colored" notice on the first message
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the returned summary replaces polygraphy's own log
            results = Comparator.run(runners, data_loader=feeds)
            accuracy = Comparator.compare_accuracy(results, compare_func=_simple(CompareFunc, atol, rtol))
    except PolygraphyException as e:
        raise ModelLoadError(f"polygraphy could not run {str(lm.path)!r}: {str(e).strip().splitlines()[-1]}") from None
    finally:
        G_LOGGER.colors = colors
    outputs: dict[str, dict[str, dict[str, Any]]] = {}
    # one AccuracyResult ({(reference, runner): [per feed: {output: result}]}), or in newer polygraphy
    # versions an AccuracyResults list of them, one per compare function
    for (_, other), iterations in (pair for result in ([accuracy] if hasattr(accuracy, "items") else accuracy)
                                   for pair in result.items()):
        stats = outputs.setdefault(other, {})
        for iteration in iterations:
            for name, res in iteration.items():
                s = stats.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "passed": True})
                s["max_abs"] = max(s["max_abs"], float(res.max_absdiff))
                s["max_rel"] = max(s["max_rel"], float(res.max_reldiff))
                s["passed"] = s["passed"] and bool(res)
    return {"path": str(lm.path), "passed": bool(accuracy), "runners": [r.name for r in runners],
            "atol": atol, "rtol": rtol, "feeds": len(feeds), "outputs": outputs}
