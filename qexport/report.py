"""Perplexity-and-size reports: the evaluations behind ``qexport eval`` and ``qexport demo``, usable from Python.

* :func:`measure_variant`: one variant of a loaded model (float, a recipe applied eagerly or through
  ``torch.compile(backend="qexport")``, or a saved quantized model as it is): perplexity with the protocol of
  :mod:`qexport.eval`, sizes (:func:`qexport.model_size`), optionally a greedy generation. One dict per variant.
* :func:`comparison_table`: rows of :func:`measure_variant` as the plain-text table ``qexport eval`` /
  ``qexport demo`` print (perplexity, ratio to fp32, model and linear-layer sizes in MB, bits per weight).
* :func:`evaluate_recipe`, :func:`evaluate_saved`, :func:`evaluate_export`: a recipe against fp32, a saved
  quantized folder (next to its float source model), an export folder in ONNX Runtime; each returns an
  :class:`Evaluation` whose ``summary`` is what ``qexport eval --json`` writes.
* :func:`resolve_recipe`: a preset name, recipe JSON file or ``"fp32"`` (float weights) with a KV-cache format.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexport.errors import InvalidConfig
from qexport.prepare import CalibrationSet, quantize_model

__all__ = ["Evaluation", "mb", "measure_variant", "comparison_table", "resolve_recipe", "is_saved",
           "evaluate_recipe", "evaluate_saved", "evaluate_export", "bos_note"]


def mb(n: int) -> str:
    """``n`` bytes in MB (10^6), one decimal: ``"12.3"``."""
    return f"{n / 1e6:.1f}"


def bos_note(bos: bool) -> str:
    """The words a report adds when every window starts with BOS (empty otherwise)."""
    return ", each behind BOS" if bos else ""


def _report_columns(model) -> dict[str, Any]:
    """Recipe and layer counts of a quantized model (its ``qexport_report``)."""
    report = model.qexport_report
    return {"recipe": report.recipe, "layers_quantized": len(report.quantized),
            "layers_float": len(report.kept_float)}


def _compiled(model, recipe, tok, target: str | None, calibration: CalibrationSet):
    """``model`` copied, its forward compiled by the qexport back-end with ``recipe`` (calibrated when the
    recipe has static activation scales); also the size of the same recipe applied eagerly (the sizes of
    what the compiled graphs hold)."""
    import torch

    import qexport
    from qexport.algorithms.calibration import calibration_batches

    torch._dynamo.reset()
    qmodel = copy.deepcopy(model)
    qmodel.forward = torch.compile(qmodel.forward, backend="qexport", options={"recipe": recipe, "target": target})
    if recipe.needs_calibration:
        qexport.calibrate(qmodel, calibration_batches(calibration.tokens(tok)), progress=True)
    return qmodel, qexport.model_size(qexport.quantize(copy.deepcopy(model), recipe.weights_only()))


def measure_variant(name: str, model, tok, text: str, tokens: int, window: int, recipe=None,
                    prompt: str | None = None, max_new_tokens: int = 0, backend: str = "eager",
                    target: str | None = None, calibration: CalibrationSet | None = None, bos: bool | None = None
                    ) -> dict[str, Any]:
    """Perplexity, size and (with ``prompt`` and ``max_new_tokens``) a greedy generation of one variant.

    ``model`` is not changed: with a ``recipe`` (a :class:`~qexport.config.Recipe`, preset name or JSON file) a
    copy is quantized (``backend="eager"``; calibrated on ``calibration`` when the recipe needs data) or compiled
    by the qexport back-end (``backend="compile"``, running on ``target``). Without a recipe ``model`` is measured
    as it is (a float model, or a saved quantized model whose recipe, KV-cache format included, is read from it).

    Returns a dict: ``variant``, ``ppl``, ``nll``, ``tokens``, ``windows``, ``window``, ``bos``, ``eval_s``,
    ``size_bytes``, ``quantized_linear_bytes``, ``fp16_size_bytes``, ``quantized_ratio_vs_fp16``,
    ``bits_per_weight``; for a quantized variant ``recipe`` (and eagerly ``layers_quantized``, ``layers_float``,
    ``quantize_s``; compiled ``backend``), ``kv_cache`` when the cache is quantized, ``generation`` and
    ``generate_s`` when asked.
    """
    import qexport
    from qexport.config import load_recipe
    from qexport.eval import generate, perplexity

    recipe = None if recipe is None else load_recipe(recipe)
    row: dict[str, Any] = {"variant": name}
    t0 = time.perf_counter()
    calibration = calibration or CalibrationSet()
    if recipe is not None and backend == "compile":
        from qexport.backend import default_target

        row["recipe"] = recipe.to_dict()
        row["backend"] = f"compile/{target or default_target()}"
        model, size = _compiled(model, recipe, tok, target, calibration)
    elif recipe is not None:
        model = quantize_model(copy.deepcopy(model), recipe, tok, calibration, progress=True)
        row.update(_report_columns(model))
        row["quantize_s"] = round(time.perf_counter() - t0, 2)
        size = qexport.model_size(model)
    else:
        if getattr(model, "qexport_report", None) is not None:  # a saved quantized folder
            row.update(_report_columns(model))
        size = qexport.model_size(model)
    t1 = time.perf_counter()
    if recipe is not None:
        kv_cache = recipe.kv_cache
    else:  # a saved quantized model records its KV-cache spec in its recipe (None for a float model)
        from qexport.export.onnx import kv_cache_spec

        kv_cache = kv_cache_spec(model)
    res = perplexity(model, tok, text, tokens=tokens, window=window, progress=True, desc=f"ppl {name}",
                     kv_cache=kv_cache, bos=bos)
    if kv_cache is not None:
        row["kv_cache"] = kv_cache.to_dict()
    row.update(ppl=res.ppl, nll=res.nll, tokens=res.tokens, windows=res.windows, window=res.window, bos=res.bos,
               eval_s=round(time.perf_counter() - t1, 2))
    row.update(size_bytes=size.total_bytes, quantized_linear_bytes=size.quantized_bytes,
               fp16_size_bytes=size.quantized_fp16_bytes, quantized_ratio_vs_fp16=size.quantized_ratio_vs_fp16,
               bits_per_weight=size.bits_per_weight)
    if prompt and max_new_tokens:
        t2 = time.perf_counter()
        row["generation"] = generate(model, tok, prompt, max_new_tokens=max_new_tokens)
        row["generate_s"] = round(time.perf_counter() - t2, 2)
    return row


def comparison_table(rows: list[dict[str, Any]], fp_ppl: float) -> str:
    """Rows of :func:`measure_variant` as a plain-text table: variant, perplexity, its ratio to ``fp_ppl``,
    model MB, quantized-linear MB, their ratio to the same linears in fp16, bits per weight (32 when float)."""
    head = ["variant", "ppl", "x fp32", "model MB", "linears MB", "vs fp16", "bits/w"]
    lines = []
    for r in rows:
        ratio = r.get("quantized_ratio_vs_fp16")
        bpw = r.get("bits_per_weight")
        lines.append([
            r["variant"],
            f"{r['ppl']:.3f}" if r["ppl"] < 1e5 else f"{r['ppl']:.3g}",
            f"{r['ppl'] / fp_ppl:.4f}" if r["ppl"] < 1e5 else f"{r['ppl'] / fp_ppl:.3g}",
            mb(r["size_bytes"]),
            mb(r["quantized_linear_bytes"]) if r["quantized_linear_bytes"] else "-",
            f"{ratio:.3f}" if ratio else "-",
            f"{bpw:.2f}" if bpw else "32",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def resolve_recipe(recipe: str, kv_cache: str | None = None):
    """The :class:`~qexport.config.Recipe` named ``recipe`` (a preset name or recipe JSON file; ``"fp32"``: float
    weights, which needs ``kv_cache``), with ``kv_cache`` (a :data:`~qexport.presets.KV_CACHE_PRESETS` name)
    added when given."""
    from qexport.config import Recipe, Rule, load_recipe

    if recipe == "fp32":
        if kv_cache is None:
            raise InvalidConfig("--recipe fp32 only makes sense with --kv-cache (float weights, quantized KV cache)")
        resolved = Recipe(name="fp32", rules=(Rule("*", None),), description="float weights")
    else:
        resolved = load_recipe(recipe)
    return resolved.with_kv_cache(kv_cache) if kv_cache is not None else resolved


def is_saved(model: str | Path) -> bool:
    """Whether ``model`` names a saved quantized folder (``qexport quantize``), not a model alias."""
    from qexport.checkpoint import is_quantized_folder
    from qexport.models import MODEL_ALIASES

    return str(model) not in MODEL_ALIASES and is_quantized_folder(model)


@dataclass
class Evaluation:
    """What an evaluation measured: ``rows`` for :func:`comparison_table` (fp32 first when measured),
    ``summary`` (the JSON ``qexport eval --json`` writes), ``header`` (one line naming model, text and
    windows) and ``notes`` (what could not be measured, one line each)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    header: str
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """:func:`comparison_table` of the rows, ratios against the first row."""
        return comparison_table(self.rows, self.rows[0]["ppl"])


def _header(model, text, row: dict[str, Any], window: int) -> str:
    return (f"model {model}  text {text}  {row['tokens']} tokens in {row['windows']} windows of {window}"
            f"{bos_note(row['bos'])}")


def evaluate_recipe(model: str, recipe, text: str | Path, tokens: int = 8192, window: int = 512,
                    backend: str = "eager", target: str | None = None, calibration: CalibrationSet | None = None,
                    bos: bool | None = None) -> Evaluation:
    """Perplexity and size of ``recipe`` (a :class:`~qexport.config.Recipe`, preset name or JSON file) applied
    to ``model`` (an alias or checkpoint folder), next to the float model, on the text file ``text``.

    ``backend``: ``"eager"`` (quantized modules) or ``"compile"`` (``torch.compile(backend="qexport")`` running
    on ``target``; its KV cache stays float). ``calibration``: the windows of recipes that need data."""
    from qexport.config import load_recipe
    from qexport.models import load_model, read_text

    recipe = load_recipe(recipe)
    if backend not in ("eager", "compile"):
        raise InvalidConfig(f"backend must be 'eager' or 'compile', got {backend!r} (an export folder: "
                            "evaluate_export)")
    if recipe.kv_cache is not None and backend == "compile":
        raise InvalidConfig("--kv-cache is measured with --backend eager (or an export folder with --backend "
                            "onnxruntime); the compile back-end keeps a float cache")
    body = read_text(text)
    model_obj, tok = load_model(model)
    fp = measure_variant("fp32", model_obj, tok, body, tokens, window, bos=bos)
    q = measure_variant(recipe.name, model_obj, tok, body, tokens, window, recipe=recipe, backend=backend,
                        target=target, calibration=calibration, bos=bos)
    summary = {
        "model": str(model), "text": str(text), "recipe": recipe.to_dict(), "ppl": q["ppl"], "fp_ppl": fp["ppl"],
        "ppl_ratio": q["ppl"] / fp["ppl"], "size_bytes": q["size_bytes"], "fp_size_bytes": fp["size_bytes"],
        "fp16_size_bytes": q["fp16_size_bytes"], "quantized_linear_bytes": q["quantized_linear_bytes"],
        "quantized_ratio_vs_fp16": q["quantized_ratio_vs_fp16"], "bits_per_weight": q["bits_per_weight"],
        "tokens": q["tokens"], "window": window, "windows": q["windows"], "bos": q["bos"],
        "layers_quantized": q.get("layers_quantized"), "layers_float": q.get("layers_float"),
        "backend": q.get("backend", "eager"),
    }
    if "kv_cache" in q:
        summary["kv_cache"] = q["kv_cache"]
    return Evaluation([fp, q], summary, _header(model, text, q, window))


def evaluate_saved(model: str | Path, text: str | Path, tokens: int = 8192, window: int = 512,
                   float_reference: bool = True, bos: bool | None = None) -> Evaluation:
    """Perplexity of a saved quantized folder as it is (nothing is quantized again), next to its float source
    model's when ``float_reference`` and that model can be loaded here (else a line in ``notes``)."""
    from qexport.checkpoint import read_provenance
    from qexport.errors import ModelLoadError
    from qexport.models import load_model, read_text

    body = read_text(text)
    model_obj, tok = load_model(model)
    recipe = model_obj.qexport_report.recipe
    q = measure_variant(recipe.get("name", "saved") if recipe else "saved", model_obj, tok, body, tokens, window,
                        bos=bos)
    rows, notes, source = [q], [], read_provenance(model).get("source_model")
    if float_reference and source:
        try:
            rows.insert(0, measure_variant("fp32", load_model(source)[0], tok, body, tokens, window, bos=bos))
        except ModelLoadError as e:
            notes.append(f"no float reference: the source model cannot be loaded here ({e})")
    summary = {"model": str(model), "text": str(text), "recipe": recipe, "ppl": q["ppl"], "nll": q["nll"],
               "tokens": q["tokens"], "window": window, "windows": q["windows"], "bos": q["bos"],
               "size_bytes": q["size_bytes"], "bits_per_weight": q["bits_per_weight"], "backend": "eager",
               "source_model": source, **({"fp_ppl": rows[0]["ppl"]} if len(rows) > 1 else {})}
    return Evaluation(rows, summary, _header(model, text, q, window), notes)


def evaluate_export(folder: str | Path, text: str | Path, tokens: int = 8192, window: int = 512,
                    reference: bool = False, calibration: CalibrationSet | None = None, bos: bool | None = None,
                    threads: int | None = None) -> dict[str, Any]:
    """Perplexity of an export folder (``qexport export``) in ONNX Runtime, with the protocol of
    :mod:`qexport.eval`; with ``reference`` also the PyTorch perplexity of the same quantized model
    (``torch_ppl``, ``ppl_ratio``), rebuilt from the folder's report (its calibration windows, or
    ``calibration`` when given). Returns what ``qexport eval --backend onnxruntime --json`` writes."""
    import torch
    from transformers import AutoTokenizer

    from qexport.eval import perplexity
    from qexport.export import OnnxCausalLM
    from qexport.models import read_text

    body = read_text(text)
    lm = OnnxCausalLM(folder, threads=threads or torch.get_num_threads())
    try:
        tok = AutoTokenizer.from_pretrained(lm.path, local_files_only=True)
    except Exception as e:
        raise InvalidConfig(f"{str(folder)!r} has no tokenizer to evaluate text with: {str(e).splitlines()[0]}") from e
    t0 = time.perf_counter()
    res = perplexity(lm, tok, body, tokens=tokens, window=window, progress=True, desc="ppl onnxruntime", bos=bos)
    out = {"folder": str(folder), "recipe": lm.report.get("recipe"), "backend": "onnxruntime",
           "ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "window": window, "windows": res.windows,
           "bos": res.bos, "eval_s": round(time.perf_counter() - t0, 2), "onnx_bytes": lm.report.get("onnx_bytes"),
           "ort_session_config": lm.session_config}
    if reference:
        from qexport.export.runtime import reference_model

        model = reference_model(lm.report, lm.path, calibration)
        ref = perplexity(model, tok, body, tokens=tokens, window=window, progress=True, desc="ppl pytorch",
                         kv_cache=lm.kv_cache, bos=res.bos)
        out.update(torch_ppl=ref.ppl, ppl_ratio=res.ppl / ref.ppl)
    return out
