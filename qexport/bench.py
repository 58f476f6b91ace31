"""``qexport bench``: speed of model variants side by side, in one run, written as JSON, CSV and Markdown.

A variant is one of

    eager-fp32                 the float model, eager PyTorch
    inductor-fp32              torch.compile(backend="inductor")
    eager:RECIPE               qexport.quantize(model, RECIPE) (QLinear modules, reference kernels)
    qexport:RECIPE:TARGET      torch.compile(backend="qexport", options={"recipe": RECIPE, "target": TARGET})

and is measured with the same protocol (batch 1): a prompt of ``prompt_tokens`` tokens from the bundled
evaluation text; ``first_call_s`` is the first forward pass over the prompt (compilation included for
compiled variants); ``prefill_s`` is the median of three later forward passes; ``decode_tok_s`` is
the number of decode steps divided by the time from the first to the last generated token within one greedy
generate() call (KV cache; timestamps from a logits processor; median of three calls, after a warm-up
generate() that compiles or exports the decode graphs).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from qexport.errors import InvalidConfig

DEFAULT_VARIANTS = (
    "eager-fp32",
    "inductor-fp32",
    "qexport:w8:inductor",
    "qexport:w4g128:inductor",
    "qexport:w8a8-dynamic:inductor",
    "qexport:w8:onnxruntime",
    "qexport:w4g128:onnxruntime",
)


def parse_variant(text: str) -> dict[str, str]:
    from qexport.backend import TARGETS
    from qexport.config import load_recipe

    if text in ("eager-fp32", "inductor-fp32"):
        return {"kind": text}
    parts = text.split(":")
    if parts[0] == "eager" and len(parts) == 2:
        load_recipe(parts[1])
        return {"kind": "eager", "recipe": parts[1]}
    if parts[0] == "qexport" and len(parts) == 3:
        load_recipe(parts[1])
        if parts[2] not in TARGETS:
            raise InvalidConfig(f"variant {text!r}: target must be one of {', '.join(TARGETS)}")
        return {"kind": "qexport", "recipe": parts[1], "target": parts[2]}
    raise InvalidConfig(
        f"variant {text!r} is not valid; use eager-fp32, inductor-fp32, eager:RECIPE or qexport:RECIPE:TARGET"
    )


def _build(model, spec: dict[str, str]):
    import qexport

    m = copy.deepcopy(model)
    kind = spec["kind"]
    if kind == "inductor-fp32":
        m.forward = torch.compile(m.forward, backend="inductor")
    elif kind == "eager":
        qexport.quantize(m, spec["recipe"])
    elif kind == "qexport":
        m.forward = torch.compile(m.forward, backend="qexport",
                                  options={"recipe": spec["recipe"], "target": spec["target"]})
    return m


@torch.no_grad()
def measure(model, prompt: torch.Tensor, spec: dict[str, str], new_tokens: int) -> dict[str, Any]:
    torch._dynamo.reset()
    m = _build(model, spec)
    t0 = time.perf_counter()
    m(prompt, use_cache=False)
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m(prompt, use_cache=False)
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    row: dict[str, Any] = {"first_call_s": first, "prefill_s": prefill,
                           "prefill_tok_s": prompt.shape[1] / prefill, "decode_tok_s": None}

    stamps: list[float] = []

    def stamp(input_ids, scores):  # a logits processor: called once per generated token, after its forward
        stamps.append(time.perf_counter())
        return scores

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              logits_processor=[stamp])
    m.generate(prompt, **kw)  # warm-up: compiles the decode graphs
    # Decode time: from the first generated token to the last, within one generate() call, so prefill and
    # generate()'s set-up are not counted; the median of three calls, to resist interference.
    rates, totals = [], []
    for _ in range(3):
        stamps.clear()
        t0 = time.perf_counter()
        m.generate(prompt, **kw)
        totals.append(time.perf_counter() - t0)
        if len(stamps) > 1 and stamps[-1] > stamps[0]:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    row["generate_s"] = statistics.median(totals)
    row["decode_tok_s"] = statistics.median(rates) if rates else None
    return row


def run_bench(model_name: str = "smollm2", variants=DEFAULT_VARIANTS, prompt_tokens: int = 128,
              new_tokens: int = 64, progress: bool = True) -> dict[str, Any]:
    from qexport.eval import tokenize
    from qexport.models import bundled_text, load_model, read_text

    specs = [(v, parse_variant(v)) for v in variants]
    if prompt_tokens < 1 or new_tokens < 1:
        raise InvalidConfig("prompt and new token counts must be positive")
    model, tok = load_model(model_name)
    prompt = tokenize(tok, read_text(bundled_text("emma")))[:prompt_tokens][None]
    rows = []
    for name, spec in specs:
        if progress:
            print(f"bench: {name}", flush=True)
        row = {"variant": name, **measure(model, prompt, spec, new_tokens)}
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "inductor-fp32"), None)
    for r in rows:
        if base and base["decode_tok_s"] and r["decode_tok_s"]:
            r["decode_vs_inductor_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
        if base:
            r["prefill_vs_inductor_fp32"] = base["prefill_s"] / r["prefill_s"]
    return {"model": model_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "results": rows}


def to_markdown(result: dict[str, Any]) -> str:
    cols = ["variant", "first_call_s", "prefill_s", "prefill_tok_s", "decode_tok_s", "decode_vs_inductor_fp32"]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"{result['model']}, {result['threads']} threads, torch {result['torch']}, prompt "
             f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, batch 1", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["results"]:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    keys = sorted({k for r in result["results"] for k in r}, key=lambda k: (k != "variant", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in result["results"]:
        w.writerow(r)
    return buf.getvalue()


def write_results(result: dict[str, Any], out_dir: str | Path, force: bool = False) -> list[Path]:
    from qexport._io import atomic_write_text

    out = Path(out_dir)
    files = {"bench.json": json.dumps(result, indent=2) + "\n", "bench.csv": to_csv(result),
             "bench.md": to_markdown(result)}
    return [atomic_write_text(out / name, text, overwrite=force) for name, text in files.items()]
