"""``qexport demo``: the float model against a few presets, side by side: perplexity, size, greedy generation.

:func:`run_demo` measures (each variant with :func:`qexport.report.measure_variant`, windows of 512 tokens on the
bundled slice of *Emma* by default) and returns the result ``qexport demo --json`` writes; :func:`format_demo`
turns it into the text ``qexport demo`` prints (the table README quotes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from qexport.errors import InvalidConfig
from qexport.report import comparison_table, measure_variant

__all__ = ["DEMO_RECIPES", "DEMO_PROMPT", "DEMO_WINDOW", "run_demo", "format_demo"]

DEMO_RECIPES = ("w8", "w4g128", "nf4-dq", "w2g64")
DEMO_PROMPT = "What is the capital of France?"
DEMO_WINDOW = 512


def run_demo(model: str = "smollm2", recipes: Sequence = DEMO_RECIPES, text: str | Path | None = None,
             tokens: int = 8192, prompt: str = DEMO_PROMPT, max_new_tokens: int = 24, bos: bool | None = None,
             window: int = DEMO_WINDOW, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """fp32 and every recipe of ``recipes`` (preset names, JSON files or :class:`~qexport.config.Recipe`) on
    ``model``: perplexity on the first ``tokens`` tokens of ``text`` (default: the bundled slice of *Emma*) in
    windows of ``window``, sizes, and ``max_new_tokens`` greedy tokens after ``prompt`` (0: no generation).
    Recipes that need data are calibrated on the bundled calibration text. ``log`` receives progress lines.

    Returns ``{"model", "text", "tokens", "window", "bos", "fp_ppl", "variants"}``; ``variants`` are the rows
    of :func:`~qexport.report.measure_variant`, fp32 first, and ``total_s`` the time it all took."""
    import torch

    from qexport.config import load_recipe
    from qexport.models import bundled_text, load_model, read_text
    from qexport.prepare import CalibrationSet

    if max_new_tokens < 0:
        raise InvalidConfig(f"max_new_tokens must be 0 (no generation) or positive, got {max_new_tokens}")
    recipes = [load_recipe(r) for r in recipes]
    text_path = text or bundled_text("emma")
    body = read_text(text_path)
    log = log or (lambda line: None)
    t0 = time.perf_counter()
    log(f"qexport demo: {model}, perplexity on {Path(text_path).name} ({tokens} tokens, windows of {window}), "
        f"{torch.get_num_threads()} threads")
    model_obj, tok = load_model(model)
    rows = [measure_variant("fp32", model_obj, tok, body, tokens, window, prompt=prompt,
                            max_new_tokens=max_new_tokens, bos=bos)]
    calibration = CalibrationSet(bos=bos)
    for recipe in recipes:
        quantized = next((rule.weight for rule in recipe.rules if rule.weight is not None), None)
        log(f"  {recipe.name}: {recipe.description or (quantized.describe() if quantized else 'float')}")
        rows.append(measure_variant(recipe.name, model_obj, tok, body, tokens, window, recipe=recipe, prompt=prompt,
                                    max_new_tokens=max_new_tokens, calibration=calibration, bos=bos))
    return {"model": str(model), "text": str(text_path), "tokens": tokens, "window": window, "bos": rows[0]["bos"],
            "prompt": prompt, "fp_ppl": rows[0]["ppl"], "variants": rows,
            "total_s": round(time.perf_counter() - t0, 1)}


def format_demo(result: dict[str, Any]) -> str:
    """The text ``qexport demo`` prints for a :func:`run_demo` result: the comparison table, what its size
    columns mean, the generations (when there are any) and the total time."""
    rows = result["variants"]
    lines = ["", f"{result['model']}: perplexity on {Path(result['text']).name}, first {rows[0]['tokens']} tokens; "
             "sizes in MB", comparison_table(rows, result["fp_ppl"]),
             "\n'linears MB' and 'vs fp16': bytes the quantized linears hold, and their ratio to the same",
             "linears in fp16; embeddings and lm_head stay float (tied), so 'model MB' includes them.\n"]
    if any("generation" in r for r in rows):
        lines.append(f"greedy generation, prompt: {result['prompt']!r}")
        lines += [f"  {r['variant']:>8}: {r.get('generation', '')!r}" for r in rows]
    lines.append(f"\ntotal time {result['total_s']:.0f} s")
    return "\n".join(lines)
