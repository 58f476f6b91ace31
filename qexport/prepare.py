"""Recipe + calibration -> quantized model: the one path every command takes.

``qexport quantize``, ``eval``, ``export``, ``verify`` and ``bench`` all call :func:`quantize_model`, and all draw
calibration windows with one sampler (:class:`CalibrationSet`, through
:func:`qexport.algorithms.calibration.calibration_tokens`), so one recipe and one calibration text give the same
codes whichever command made them. GPTQ / AWQ / SmoothQuant and static activation scales see the same windows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexport.errors import CalibrationError

__all__ = ["CalibrationSet", "quantize_model"]


@dataclass(frozen=True)
class CalibrationSet:
    """Where calibration windows come from: ``samples`` windows of ``seq_len`` tokens of a UTF-8 text, drawn
    with ``seed`` (non-overlapping when the text is long enough). ``text`` None: the bundled *Sense and
    Sensibility* slice. ``bos``: every window starts with the tokenizer's BOS token (True: ``[BOS]`` and
    ``seq_len - 1`` text tokens), none does (False), or as the tokenizer does by default (None; resolved by
    :meth:`resolved`, which :func:`quantize_model` calls before it records the set)."""

    text: str | os.PathLike | None = None
    samples: int = 16
    seq_len: int = 512
    seed: int = 0
    bos: bool | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "seed"):
            v = getattr(self, name)
            least = 0 if name == "seed" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise CalibrationError(f"calibration {name} must be an integer >= {least}, got {v!r}")
        if not (self.bos is None or isinstance(self.bos, bool)):
            raise CalibrationError(f"calibration bos must be True, False or None (the tokenizer's default), got "
                                   f"{self.bos!r}")

    @property
    def path(self) -> Path:
        from qexport.models import bundled_text

        return Path(self.text).expanduser() if self.text is not None else bundled_text("sensesensibility")

    def tokens(self, tokenizer) -> torch.Tensor:
        """``[samples, seq_len]`` token ids."""
        from qexport.algorithms.calibration import calibration_from_file

        if tokenizer is None:
            raise CalibrationError("calibration windows of a text need the model's tokenizer")
        return calibration_from_file(self.path, tokenizer, self.samples, self.seq_len, self.seed, self.bos)

    def resolved(self, tokenizer) -> "CalibrationSet":
        """This set with ``bos`` decided: as given, else whether ``tokenizer`` adds BOS by default."""
        from qexport.eval import resolve_bos

        if tokenizer is None:
            raise CalibrationError("calibration windows of a text need the model's tokenizer")
        return replace(self, bos=resolve_bos(tokenizer, self.bos))

    def provenance(self) -> dict[str, Any]:
        """What to record: the text, its SHA-256, and the sampling (``bos`` as held: resolve the set first)."""
        from qexport.checkpoint import sha256_file

        return {"text": str(self.path), "sha256": sha256_file(self.path), "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed, "bos": self.bos}

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any]) -> "CalibrationSet":
        """The set :meth:`provenance` described, its text checked against the recorded SHA-256. A record without
        ``bos`` (made before it was recorded) had no BOS windows: False."""
        from qexport.checkpoint import sha256_file

        text = provenance.get("text")
        if not text:
            raise CalibrationError("the calibration was token ids given in memory, which were not recorded: pass "
                                   "the same calibration again")
        if not Path(text).is_file() or sha256_file(text) != provenance.get("sha256"):
            raise CalibrationError(f"the calibration text {text!r} is missing or has changed since it was used: give "
                                   "the text again (--calib-text / --calib-samples)")
        return cls(text, provenance["samples"], provenance["seq_len"], provenance["seed"],
                   provenance.get("bos", False))


def _tokens(calibration, tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids ``[N, L]`` and their provenance from a CalibrationSet, a tensor or a list of ``[1, L]`` rows."""
    import hashlib

    if isinstance(calibration, CalibrationSet):
        calibration = calibration.resolved(tokenizer)  # so the record says whether the windows start with BOS
        return calibration.tokens(tokenizer), calibration.provenance()
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, torch.Tensor) for t in calibration):
        calibration = torch.cat([t.reshape(1, -1) if t.dim() == 1 else t for t in calibration])
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise CalibrationError("calibration must be a CalibrationSet, token ids [N, L] or a list of [1, L] rows")
    ids = calibration.to(torch.long)
    digest = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()
    return ids, {"token_ids_sha256": digest, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}


def quantize_model(model: nn.Module, recipe, tokenizer=None, calibration=None, *, progress: bool = False
                   ) -> nn.Module:
    """``model`` quantized in place by ``recipe``; returns it.

    Calibration windows (a :class:`CalibrationSet`, token ids ``[N, L]``, or a list of ``[1, L]`` rows) are
    drawn only when the recipe needs them, and feed both the algorithm (GPTQ / AWQ / SmoothQuant) and static
    activation scales. Left out for such a recipe: the default :class:`CalibrationSet` (16 windows of 512
    tokens of the bundled calibration text, seed 0, starting with BOS when the tokenizer adds one). Where they
    came from (BOS included) is stored in ``model.qexport_report.calibration`` (and so in a saved folder's
    ``recipe.json``).
    """
    import qexport
    from qexport.algorithms.calibration import calibration_batches
    from qexport.config import load_recipe

    recipe = load_recipe(recipe)
    tokens, provenance = None, None
    if recipe.needs_data:
        tokens, provenance = _tokens(calibration if calibration is not None else CalibrationSet(), tokenizer)
    model.eval()
    qexport.quantize(model, recipe, calibration=tokens if recipe.algorithm_needs_data else None, progress=progress)
    if recipe.needs_calibration:
        qexport.calibrate(model, calibration_batches(tokens), progress=progress)
    model.qexport_report.calibration = provenance
    return model
