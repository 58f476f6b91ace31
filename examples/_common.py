"""What the example scripts share: ONNX Runtime's presence and a model's config, each with a one-line message."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def onnxruntime_missing() -> bool:
    """True (after saying how to install them) when onnx or onnxruntime cannot be imported."""
    import importlib.util

    if all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")):
        return False
    print("needs onnx and onnxruntime: pip install 'qexport[onnx]'", file=sys.stderr)
    return True


def model_config(model: str, smollm2: dict) -> dict | None:
    """``smollm2`` (the fields a script needs of SmolLM2-135M's config) for ``'smollm2'``, else the ``config.json``
    of the checkpoint directory ``model``; None (after a message) when it has none."""
    if model == "smollm2":
        return smollm2
    path = Path(model) / "config.json"
    if not path.is_file():
        print(f"{model!r} has no config.json: pass 'smollm2' or a checkpoint directory", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def output_exists(path: str | Path | None, flag: str) -> bool:
    """True (after a message) when ``path`` is given and exists: results are never overwritten."""
    if path is not None and Path(path).exists():
        print(f"{str(path)!r} exists; choose another {flag}", file=sys.stderr)
        return True
    return False


def model_and_emma(model: str, threads: int | None):
    """``(model, tokenizer, Emma's text)`` for the perplexity scripts, with torch's CPU threads set when given."""
    import torch

    from qexport.models import bundled_text, load_model, read_text

    if threads:
        torch.set_num_threads(threads)
    loaded, tok = load_model(model)
    return loaded, tok, read_text(bundled_text("emma"))
