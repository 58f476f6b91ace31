"""``qexport allocate`` from Python: a model name, calibration windows and a cache of the sensitivities.

:func:`allocate_model` loads the model, draws the calibration windows, reads the per-layer sensitivities from a
JSON cache when it holds those of the same model and windows (else measures them and writes the cache), and
plans the mixed-precision recipe (:func:`qexport.algorithms.allocate.plan_allocation`). Only the allocation
itself is in :mod:`qexport.algorithms.allocate`; this module adds the files around it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from qexport.errors import InvalidConfig

__all__ = ["AllocationRun", "sensitivity_key", "read_sensitivities", "allocate_model"]


@dataclass
class AllocationRun:
    """The plan (:class:`~qexport.algorithms.allocate.Allocation`), the BOS setting of its windows, and where
    its sensitivities came from (``cached``: read from the cache file) ."""

    plan: Any
    bos: bool
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        """What ``qexport allocate --json`` writes."""
        return {**self.plan.to_dict(), "bos": self.bos}


def sensitivity_key(model: str, calib_text: str | None, samples: int, seq_len: int, seed: int,
                    bos: bool) -> dict[str, Any]:
    """What a cache of sensitivities must match to be reused: model, calibration text and windows."""
    return {"model": str(model), "calib_text": str(calib_text), "samples": samples, "seq_len": seq_len,
            "seed": seed, "bos": bos}


def read_sensitivities(cache: str | Path, key: dict[str, Any]):
    """The :class:`~qexport.algorithms.allocate.Sensitivity` cached in ``cache`` for ``key``
    (:func:`sensitivity_key`); None when the file does not exist; an error when it holds another key."""
    from qexport.algorithms.allocate import Sensitivity

    cache = Path(cache)
    if not cache.is_file():
        return None
    data = json.loads(cache.read_text(encoding="utf-8"))
    if isinstance(data.get("key"), dict):  # caches from before BOS was recorded: windows without BOS
        data["key"] = {"bos": False, **data["key"]}
    if data.get("key") != key:
        raise InvalidConfig(f"{str(cache)!r} holds sensitivities of another calibration set ({data.get('key')}); "
                            "give another --sensitivities file or remove it")
    return Sensitivity.from_dict(data)


def allocate_model(model: str, *, target_bits: float | None = None, target_bytes: int | None = None,
                   candidates: Sequence[str] = ("w8", "w4g128", "w4g64", "w2g64"), method: str = "fisher",
                   algorithm: str = "rtn", name: str | None = None, calib_text: str | None = None,
                   samples: int = 4, seq_len: int = 512, seed: int = 0, bos: bool | None = None,
                   sensitivities: str | Path | None = None, progress: bool = True) -> AllocationRun:
    """Plan a mixed-precision recipe for ``model`` (an alias or checkpoint folder) meeting exactly one of
    ``target_bits`` (bits per weight of the quantized linears) or ``target_bytes``, choosing among the
    single-format presets ``candidates`` by ``method`` (``"fisher"`` or ``"loss"``).

    Calibration: ``samples`` windows of ``seq_len`` tokens of ``calib_text`` (default: the bundled *Sense and
    Sensibility* slice) drawn with ``seed``. ``sensitivities``: a JSON cache, read when it exists (it must hold
    the same model and windows), written otherwise."""
    from qexport.algorithms.allocate import plan_allocation, resolve_candidates
    from qexport.config import DEFAULT_EXCLUDE
    from qexport.eval import resolve_bos
    from qexport.models import load_model

    if (target_bits is None) == (target_bytes is None):
        raise InvalidConfig("give exactly one of --target-bits (bits per weight of the linears) or --target-size")
    specs = resolve_candidates(list(candidates))
    model_obj, tok = load_model(model)
    bos = resolve_bos(tok, bos)
    key = sensitivity_key(model, calib_text, samples, seq_len, seed, bos)
    sens = read_sensitivities(sensitivities, key) if sensitivities is not None else None
    if sens is not None and sens.method != method:
        raise InvalidConfig(f"{str(sensitivities)!r} holds {sens.method} sensitivities, not {method}: give another "
                            f"--sensitivities file or --method {sens.method}")
    calibration = None
    if sens is None:
        from qexport.algorithms import calibration_tokens
        from qexport.models import bundled_text, read_text

        calibration = calibration_tokens(read_text(calib_text or bundled_text("sensesensibility")), tok,
                                         samples=samples, seq_len=seq_len, seed=seed, bos=bos)
    plan = plan_allocation(model_obj, calibration, target_bytes=target_bytes, bits_per_weight=target_bits,
                           candidates=specs, method=method, exclude=DEFAULT_EXCLUDE, algorithm=algorithm, name=name,
                           sensitivity=sens, progress=progress)
    if sensitivities is not None and sens is None:
        from qexport._io import atomic_write_text

        atomic_write_text(sensitivities, json.dumps({**plan.sensitivity.to_dict(), "key": key}, indent=2) + "\n",
                          overwrite=True)
    return AllocationRun(plan, bos, sens is not None)
