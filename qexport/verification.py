"""``qexport verify``: an export folder in ONNX Runtime against the PyTorch reference of the same quantized model.

:func:`verify_export` runs the logits comparison (:func:`qexport.export.verify`), optionally polygraphy's
output-by-output comparison (:func:`qexport.export.compare_runtimes`, a TensorRT engine included) and a greedy
generation from the folder, building the PyTorch reference once for both comparisons. :func:`verify_lines`
gives the lines ``qexport verify`` prints for its result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qexport.errors import InvalidConfig

__all__ = ["verify_export", "verify_lines"]


def verify_export(folder: str | os.PathLike, decode_steps: int = 8, calibration=None,
                  ort_accuracy_level: int | None = None, polygraphy: bool = False, engine: str | None = None,
                  atol: float = 1e-2, rtol: float = 1e-2, prompt: str | None = None,
                  max_new_tokens: int = 24) -> dict[str, Any]:
    """Compare ``folder`` in ONNX Runtime with its PyTorch reference (rebuilt from the folder's report; with
    ``calibration``, a :class:`~qexport.prepare.CalibrationSet`, on those windows instead of the recorded ones).

    ``ort_accuracy_level``: run MatMulNBits at this level instead of the folder's. ``polygraphy`` (implied by
    ``engine``, a TensorRT engine file): also compare output by output within ``atol`` / ``rtol`` (the result's
    ``polygraphy``). ``prompt``: also a greedy generation of ``max_new_tokens`` tokens (``generation``).

    Returns the result of :func:`qexport.export.verify` with those keys added and ``passed`` (False only when
    the polygraphy comparison failed)."""
    from qexport.export import verify
    from qexport.export.polygraphy_check import check_polygraphy_runners
    from qexport.export.runtime import load_export_report, reference_model

    for name, value in (("decode_steps", decode_steps), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidConfig(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    report = load_export_report(folder)
    session_config = (None if ort_accuracy_level is None
                      else {"session.qdq_matmulnbits_accuracy_level": str(ort_accuracy_level)})
    polygraphy = polygraphy or engine is not None
    if polygraphy:  # what the comparison needs, before the reference is built
        check_polygraphy_runners(engine)
    reference = reference_model(report, Path(folder), calibration)  # one for both comparisons
    res = verify(folder, reference=reference, decode_steps=decode_steps, session_config=session_config)
    res["passed"] = True
    if polygraphy:
        from qexport.export import compare_runtimes

        res["polygraphy"] = compare_runtimes(folder, reference=reference, engine=engine, decode_steps=decode_steps,
                                             atol=atol, rtol=rtol, session_config=session_config)
        res["passed"] = res["polygraphy"]["passed"]
    if prompt:
        from transformers import AutoTokenizer

        from qexport.export import OnnxCausalLM

        lm = OnnxCausalLM(folder, session_config=session_config)
        tok = AutoTokenizer.from_pretrained(lm.path, local_files_only=True)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = lm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
        res["generation"] = tok.decode(new, skip_special_tokens=True)
    return res


def verify_lines(folder: str | os.PathLike, res: dict[str, Any]) -> list[str]:
    """The lines ``qexport verify`` prints for a :func:`verify_export` result."""
    lines = [f"{folder}: onnxruntime vs pytorch on {res['positions']} positions ({res['prefill_tokens']} prefill "
             f"+ {res['decode_steps']} KV-cache steps, batch 2): max abs {res['max_abs']:.3g}, max rel "
             f"{res['max_rel']:.3g}, mean abs {res['mean_abs']:.3g}, top-1 agreement {res['top1_agreement']:.4f}"]
    pg = res.get("polygraphy")
    if pg is not None:
        failed = [f"{runner}:{name}" for runner, outs in pg["outputs"].items()
                  for name, o in outs.items() if not o["passed"]]
        worst = {runner: max(o["max_abs"] for o in outs.values()) for runner, outs in pg["outputs"].items()}
        lines.append(f"polygraphy Comparator ({', '.join(pg['runners'])}; {pg['feeds']} feeds; atol {pg['atol']:g}, "
                     f"rtol {pg['rtol']:g}): {'PASSED' if pg['passed'] else 'FAILED'}; max abs "
                     + ", ".join(f"{r} {w:.3g}" for r, w in worst.items())
                     + (f"; outside tolerance: {', '.join(failed[:8])}{' ...' if len(failed) > 8 else ''}"
                        if failed else ""))
    if "generation" in res:
        lines.append(f"greedy generation: {res['generation']!r}")
    return lines
