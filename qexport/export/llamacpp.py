"""llama.cpp as a runtime and as a peer quantizer, through ``llama-cpp-python`` (optional: it builds
llama.cpp from source when installed, see docs/gguf.md).

:class:`LlamaCppLM` runs a GGUF file and is called like a Hugging Face causal LM
(``model(input_ids=ids).logits``), so :func:`qexport.eval.perplexity` measures it with the same protocol as
every other back-end; :meth:`LlamaCppLM.greedy` and :meth:`LlamaCppLM.decode_speed` give its greedy tokens
and decode tokens/s. :func:`llama_quantize` runs llama.cpp's own quantizer (``llama_model_quantize``, what
the ``llama-quantize`` tool calls) on a float GGUF file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from qexport._io import OutputExists
from qexport.errors import InvalidConfig, QExportError

__all__ = ["LlamaCppLM", "llama_quantize", "LLAMA_FTYPES", "LlamaCppMissing"]

# the file types llama_quantize is offered here, by the names its quantize tool takes (gguf.LlamaFileType values)
LLAMA_FTYPES = ("f32", "f16", "q4_0", "q4_1", "q8_0", "q5_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m",
                "q6_k", "iq4_nl")


class LlamaCppMissing(QExportError):
    """llama-cpp-python is not installed."""


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing("running GGUF files needs llama-cpp-python: `pip install llama-cpp-python` (it builds "
                              "llama.cpp from source; docs/gguf.md gives the time it takes)") from None
    return llama_cpp


class LlamaCppLM:
    """A GGUF file in llama.cpp, with a context of ``n_ctx`` tokens and ``threads`` threads (default: torch's)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None):
        llama_cpp = _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise InvalidConfig(f"{str(path)!r} is not a GGUF file")
        threads = threads or torch.get_num_threads()
        self.path, self.n_ctx = path, n_ctx
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)

    def parameters(self):  # where inputs go (qexport.eval.perplexity asks): the CPU
        yield torch.empty(0)

    def _eval(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.n_ctx:
            raise InvalidConfig(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        """Logits ``[1, L, vocab]`` of one row of token ids (every position)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InvalidConfig(f"llama.cpp runs one row of token ids at a time, got shape {tuple(input_ids.shape)}")
        return SimpleNamespace(logits=self._eval(input_ids[0].tolist())[None])

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """The ``new_tokens`` greedy continuation of ``ids`` (argmax of llama.cpp's logits, KV cache)."""
        out = []
        logits = self._eval(list(ids))[-1]
        for _ in range(new_tokens):
            nxt = int(logits.argmax())
            out.append(nxt)
            self.llm.eval([nxt])
            logits = torch.from_numpy(self.llm.scores[self.llm.n_tokens - 1].copy())
        return out

    def decode_speed(self, ids: list[int], new_tokens: int = 64) -> float:
        """Decode tokens/s: greedy tokens after a prefill of ``ids``, from the first generated token to the last."""
        self._eval(list(ids))
        nxt = int(torch.from_numpy(self.llm.scores[len(ids) - 1].copy()).argmax())
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([nxt])
            nxt = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        return new_tokens / (time.perf_counter() - t0)


def llama_quantize(src: str | os.PathLike, out: str | os.PathLike, ftype: str, threads: int | None = None,
                   force: bool = False) -> Path:
    """llama.cpp's own quantizer: ``src`` (an f32 / f16 GGUF file, e.g. ``qexport export --format gguf --recipe
    fp32``) to ``out`` in llama.cpp's file type ``ftype`` (:data:`LLAMA_FTYPES`: ``q8_0``, ``q4_0``,
    ``q4_k_m``, ``q2_k``, ...), with its per-tensor type choices and fallbacks."""
    from qexport.export.gguf import llama_file_type

    llama_cpp = _llama_cpp()
    if ftype not in LLAMA_FTYPES:
        raise InvalidConfig(f"ftype {ftype!r} is not one of {', '.join(LLAMA_FTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise OutputExists(f"{str(out)!r} already exists; pass force=True to replace it")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_file_type(ftype)
    params.nthread = threads or torch.get_num_threads()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise QExportError(f"llama.cpp could not quantize {src} to {ftype} (llama_model_quantize returned {rc})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
