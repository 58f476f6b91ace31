"""Evaluation: perplexity with one fixed protocol, and greedy generation.

Perplexity protocol (the same for every back-end, so numbers compare across tools): tokenize the text
with the model's tokenizer without special tokens and take the first ``tokens`` tokens (default 8192).
When the tokenizer adds a BOS token by default (:func:`adds_bos`; the lm-evaluation-harness convention),
every window starts with it: the tokens are split into non-overlapping chunks of ``window - 1``, each window
is ``[BOS] + chunk``, and every text token is predicted (the first one from BOS). Otherwise the tokens are
split into non-overlapping windows of ``window`` tokens and the first token of each window is context only
(``window - 1`` predictions per window). ``bos=True`` / ``False`` overrides the tokenizer's default. A
shorter last window is kept; each window runs independently, and the result is ``exp(mean NLL)`` over all
predicted tokens. Calibration windows (:mod:`qexport.algorithms.calibration`) follow the same BOS rule.

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

from qexport.errors import DataError, InvalidConfig, NoBosToken

__all__ = ["PerplexityResult", "perplexity", "perplexity_windows", "tokenize", "adds_bos", "resolve_bos",
           "generate"]

DEFAULT_TOKENS = 8192
DEFAULT_WINDOW = 512


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens evaluated
    predicted: int  # tokens predicted (tokens - windows without BOS, tokens with BOS)
    windows: int
    window: int  # window length, BOS included
    bos: bool = False  # whether every window started with the tokenizer's BOS token

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


_BOS_PROBE = "Hello, world."


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` starts its encodings with its BOS token by default: what it does, not what a config
    flag says (encoding a short text with and without special tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    special = tokenizer(_BOS_PROBE, add_special_tokens=True, verbose=False)["input_ids"]
    plain = tokenizer(_BOS_PROBE, add_special_tokens=False, verbose=False)["input_ids"]
    return bool(special) and special[0] == bos and (not plain or plain[0] != bos)


def resolve_bos(tokenizer, bos: bool | None = None) -> bool:
    """``bos`` as given, or the tokenizer's default when None (:func:`adds_bos`).

    Raises:
        NoBosToken: ``bos=True`` and the tokenizer has no BOS token.
    """
    if bos is None:
        return adds_bos(tokenizer)
    if not isinstance(bos, bool):
        raise InvalidConfig(f"bos must be True, False or None (the tokenizer's default), got {bos!r}")
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise NoBosToken(f"windows cannot start with a BOS token: the tokenizer ({type(tokenizer).__name__}) has "
                         "none; pass bos=False (--no-bos) or leave it to the tokenizer's default")
    return bos


def with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """Token ids ``rows`` (any shape, tokens last) with ``bos_id`` in front of each row; unchanged when None: the one
    place a BOS token is put before text (calibration windows, perplexity windows, verify's sample rows)."""
    if bos_id is None:
        return rows
    return torch.cat([torch.full((*rows.shape[:-1], 1), bos_id, dtype=rows.dtype), rows], dim=-1)


def perplexity_windows(ids: torch.Tensor, window: int, bos_id: int | None = None) -> list[torch.Tensor]:
    """The perplexity windows of the 1-D token ids ``ids`` (see the module docstring): with ``bos_id``, chunks of
    ``window - 1`` tokens each behind ``bos_id``; without, chunks of ``window``. Windows of one token are dropped
    (they predict nothing)."""
    if bos_id is None:
        return [c for c in ids.split(window) if c.numel() >= 2]
    return [with_bos(c, bos_id) for c in ids.split(window - 1) if c.numel() >= 1]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW,
               progress: bool = False, desc: str = "perplexity", kv_cache=None, bos: bool | None = None
               ) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with the protocol described in the module docstring.

    ``kv_cache``: a :class:`~qexport.config.KVCacheSpec` or its name (``'int8'``, ``'int4'``): run each window
    through a quantized KV cache (a Hugging Face model only; an ONNX export quantizes its cache itself).
    ``bos``: start every window with the tokenizer's BOS token (True), never (False), or as the tokenizer does
    by default (None)."""
    from qexport.config import KVCacheSpec

    kv_spec = KVCacheSpec.parse(kv_cache)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise InvalidConfig(f"tokens must be an integer >= 2, got {tokens!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise InvalidConfig(f"window must be an integer >= 2, got {window!r}")
    bos = resolve_bos(tokenizer, bos)
    ids = tokenize(tokenizer, text)
    text_per_window = window - 1 if bos else window
    if ids.numel() < text_per_window:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: give a longer text")
    if ids.numel() < tokens:
        warnings.warn(f"the text has {ids.numel()} tokens, fewer than the {tokens} asked for; using all of them",
                      stacklevel=2)
    ids = ids[:tokens]
    chunks = perplexity_windows(ids, window, tokenizer.bos_token_id if bos else None)

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
    text_tokens = sum(c.numel() for c in chunks) - (len(chunks) if bos else 0)
    return PerplexityResult(math.exp(mean), mean, int(text_tokens), predicted, len(chunks), window, bos)


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
