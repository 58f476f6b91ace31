"""Evaluation: perplexity with one fixed protocol, and greedy generation.

Perplexity protocol (the same for every back-end, so numbers compare across tools): tokenize the text
with the model's tokenizer without special tokens, take the first ``tokens`` tokens (default 8192), split
them into non-overlapping windows of ``window`` tokens (default 512; a shorter last window is kept), run
each window independently, and report ``exp(mean NLL)`` over all predicted tokens (``window - 1`` per
window).

With a quantized KV cache (``kv_cache=``, :mod:`qexport.kvcache`) each window runs as one prefill into a fresh
:class:`~qexport.kvcache.QuantizedKVCache`: every token attends to the quantized keys and values of the
earlier tokens of its window and of itself. Tokens are quantized one by one, so this is exactly what
token-by-token decoding computes (``tests/test_kvcache.py`` checks it); KV-cache numbers use long windows
(2048) so that most tokens see a long quantized past.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qexport.errors import DataError, InvalidConfig

__all__ = ["PerplexityResult", "perplexity", "tokenize", "generate"]

DEFAULT_TOKENS = 8192
DEFAULT_WINDOW = 512


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens evaluated
    predicted: int  # tokens predicted (tokens - windows)
    windows: int
    window: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW,
               progress: bool = False, desc: str = "perplexity", kv_cache=None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with the protocol described in the module docstring.

    ``kv_cache``: a :class:`~qexport.config.KVCacheSpec` or its name (``'int8'``, ``'int4'``): run each window
    through a quantized KV cache (a Hugging Face model only; an ONNX export quantizes its cache itself)."""
    from qexport.config import KVCacheSpec

    kv_spec = KVCacheSpec.parse(kv_cache)
    if not isinstance(tokens, int) or tokens < 2:
        raise InvalidConfig(f"tokens must be an integer >= 2, got {tokens!r}")
    if not isinstance(window, int) or window < 2:
        raise InvalidConfig(f"window must be an integer >= 2, got {window!r}")
    ids = tokenize(tokenizer, text)
    if ids.numel() < window:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: give a longer text")
    if ids.numel() < tokens:
        warnings.warn(f"the text has {ids.numel()} tokens, fewer than the {tokens} asked for; using all of them",
                      stacklevel=2)
    ids = ids[:tokens]
    chunks = [c for c in ids.split(window) if c.numel() >= 2]

    iterator = chunks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chunks, desc=desc, unit="window", leave=False, disable=None)
    device = next(model.parameters()).device
    total_nll = 0.0
    predicted = 0
    for chunk in iterator:
        inp = chunk.unsqueeze(0).to(device)
        if kv_spec is None:
            logits = model(input_ids=inp, use_cache=False).logits
        else:
            from qexport.kvcache import QuantizedKVCache

            logits = model(input_ids=inp, cache=QuantizedKVCache(kv_spec), use_cache=True).logits
        nll = F.cross_entropy(logits[0, :-1].float(), inp[0, 1:], reduction="sum")
        total_nll += float(nll)
        predicted += chunk.numel() - 1
    mean = total_nll / predicted
    return PerplexityResult(math.exp(mean), mean, int(sum(c.numel() for c in chunks)), predicted, len(chunks), window)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
    """Greedy continuation of ``prompt`` (through the chat template when the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
