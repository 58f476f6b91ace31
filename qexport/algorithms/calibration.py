"""Calibration data for GPTQ and AWQ: N samples of L tokens, from a text or from token tensors.

    from qexport.algorithms import calibration_tokens
    calib = calibration_tokens(read_text(bundled_text("sensesensibility")), tok, samples=128, seq_len=512)
    qexport.quantize(model, "w4g128-gptq", calibration=calib)

Sampling: the text is tokenized as the perplexity protocol does (no special tokens). When it holds at least
``samples * seq_len`` tokens, the samples are distinct non-overlapping windows, chosen at random (with a
random shift) from the ``len // seq_len`` windows it holds; otherwise each sample starts at a random
position and samples overlap (with a warning). The choice depends only on ``seed``.

BOS, as in :mod:`qexport.eval`: when the tokenizer adds a BOS token by default (or ``bos=True``), each sample is
``[BOS]`` followed by ``seq_len - 1`` text tokens (the windows above are drawn with length ``seq_len - 1``), so
the model is calibrated on activations it sees in use; otherwise the sampling is exactly as above.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from qexport.errors import CalibrationError

__all__ = ["calibration_tokens", "calibration_from_file", "calibration_batches", "DEFAULT_BATCH"]

DEFAULT_BATCH = 8  # sequences per forward pass while calibrating


def calibration_tokens(text: str, tokenizer, samples: int = 128, seq_len: int = 512, seed: int = 0,
                       bos: bool | None = None) -> torch.Tensor:
    """``[samples, seq_len]`` int64 token ids drawn from ``text`` (see the module docstring). ``bos``: start
    every sample with the tokenizer's BOS token (True), never (False), or as the tokenizer does by default
    (None, :func:`qexport.eval.adds_bos`)."""
    from qexport.eval import resolve_bos, tokenize, with_bos

    for name, v in (("samples", samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CalibrationError(f"calibration {name} must be a positive integer, got {v!r}")
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError("the calibration text is empty: give a text of at least one sample's length")
    bos = resolve_bos(tokenizer, bos)
    if bos and seq_len < 2:
        raise CalibrationError(f"calibration seq_len {seq_len} leaves no text token after BOS: give seq_len >= 2 "
                               "or bos=False (--no-bos)")
    ids = tokenize(tokenizer, text)
    if not bos:
        return sample_windows(ids, samples, seq_len, seed)
    text_windows = sample_windows(ids, samples, seq_len - 1, seed)
    return with_bos(text_windows, tokenizer.bos_token_id)


def calibration_from_file(path: str | os.PathLike, tokenizer, samples: int = 128, seq_len: int = 512,
                          seed: int = 0, bos: bool | None = None) -> torch.Tensor:
    """:func:`calibration_tokens` of a UTF-8 text file."""
    from qexport.errors import DataError
    from qexport.models import read_text

    try:
        text = read_text(Path(path))
    except DataError as e:
        raise CalibrationError(f"calibration text: {e}") from None
    return calibration_tokens(text, tokenizer, samples, seq_len, seed, bos)


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[samples, seq_len]`` windows of the 1-D token sequence ``ids``, chosen with ``seed``."""
    n = ids.numel()
    if n < seq_len:
        raise CalibrationError(
            f"the calibration text has {n} tokens, fewer than one sample of {seq_len}: give a longer text "
            f"or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    slots = n // seq_len
    if samples <= slots:
        shift = int(torch.randint(0, n - slots * seq_len + 1, (1,), generator=gen))
        chosen = torch.randperm(slots, generator=gen)[:samples].sort().values
        starts = shift + chosen * seq_len
    else:
        warnings.warn(
            f"qexport: the calibration text has {n} tokens, fewer than {samples} x {seq_len}; samples overlap",
            stacklevel=3,
        )
        starts = torch.randint(0, n - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).to(torch.long)


def calibration_batches(calibration, batch_size: int = DEFAULT_BATCH) -> list[torch.Tensor]:
    """Calibration data as a list of batches to run the model on.

    Accepted: a 2-D tensor ``[N, L]`` of token ids (or, for models that take float inputs such as a plain
    ``nn.Sequential``, a float tensor ``[N, ...]``), or a list / tuple of 1-D token tensors (sequences of
    equal length are stacked; otherwise each sequence is its own batch).
    """
    if calibration is None:
        raise CalibrationError("no calibration data: give token ids [N, L] or a list of 1-D token tensors")
    if isinstance(calibration, torch.Tensor):
        t = calibration.detach()
        if t.numel() == 0 or t.dim() == 0 or t.shape[0] == 0:
            raise CalibrationError(f"the calibration set is empty (shape {tuple(t.shape)}): give at least one sample")
        if not t.is_floating_point() and t.dim() != 2:
            raise CalibrationError(
                f"calibration token ids must be a 2-D tensor [samples, seq_len], got shape {tuple(t.shape)}"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError("the calibration inputs contain NaN or inf")
        return list(t.split(batch_size))
    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise CalibrationError("the calibration set is empty: give at least one token sequence")
        seqs = []
        for i, s in enumerate(calibration):
            if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.is_floating_point():
                raise CalibrationError(
                    f"calibration sample {i} must be a 1-D tensor of token ids, got "
                    f"{type(s).__name__}{'' if not isinstance(s, torch.Tensor) else ' ' + str(tuple(s.shape))}"
                )
            if s.numel() < 2:
                raise CalibrationError(f"calibration sample {i} has {s.numel()} token(s); give at least 2 per sample")
            seqs.append(s.detach().to(torch.long))
        if len({s.numel() for s in seqs}) == 1:
            return list(torch.stack(seqs).split(batch_size))
        return [s[None] for s in seqs]
    raise CalibrationError(
        f"calibration must be token ids [N, L] or a list of 1-D token tensors, got {type(calibration).__name__}; "
        "from a text: qexport.algorithms.calibration_tokens(text, tokenizer, samples, seq_len)"
    )
