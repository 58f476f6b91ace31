"""Errors raised by qexport.

Every error a user can cause is a :class:`QExportError`; the CLI prints its message on one line and exits
with status 2. Messages name the offending thing and say what to do about it.
"""

from __future__ import annotations


class QExportError(Exception):
    """Base class of every error qexport raises on bad input."""


class InvalidConfig(QExportError, ValueError):
    """A QuantSpec, Recipe or option has a value outside what is allowed."""


class UnknownPreset(InvalidConfig, KeyError):
    """A recipe preset name that does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InvalidTensor(QExportError, ValueError):
    """A tensor cannot be quantized as asked (NaN/inf values, wrong shape or dtype)."""


class ModelLoadError(QExportError):
    """A model could not be found or loaded."""


class DataError(QExportError):
    """Evaluation or calibration data is missing, empty or too short."""


class UnsupportedOp(QExportError):
    """An operation or layer that qexport cannot quantize."""


class CalibrationError(QExportError):
    """Calibration data is missing, empty or of the wrong kind, or a static model was used uncalibrated."""


class CheckpointError(ModelLoadError):
    """A saved quantized folder is incomplete, malformed, or in a form qexport does not read."""


class NoBosToken(InvalidConfig):
    """Windows were asked to start with a BOS token (``bos=True`` / ``--bos``) that the tokenizer does not have."""
