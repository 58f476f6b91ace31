"""The ``qexport`` command line: ``eval``, ``demo``, ``recipes``.

Errors in what the user gave (a bad recipe, a missing model or text) print one line and exit with
status 2; no traceback.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from qexport.errors import InvalidConfig, QExportError

DEMO_RECIPES = ("w8", "w4g128", "nf4-dq", "w2g64")
DEMO_PROMPT = "What is the capital of France?"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other qexport error
        self.exit(2, f"qexport: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(name: str, value: int) -> int:
    if value <= 0:
        raise InvalidConfig(f"{name} must be a positive integer, got {value}")
    return value


def _threads() -> None:
    import torch

    if "QEXPORT_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["QEXPORT_THREADS"]))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


# ----------------------------------------------------------------------------------------------------
# Measuring one variant
# ----------------------------------------------------------------------------------------------------
def _calibration_batches(tok, path: str | None, count: int = 8, length: int = 512):
    """``count`` windows of ``length`` tokens from the calibration text (default: bundled Sense and Sensibility)."""
    from qexport.errors import CalibrationError
    from qexport.eval import tokenize
    from qexport.models import bundled_text, read_text

    ids = tokenize(tok, read_text(path or bundled_text("sensesensibility")))
    if ids.numel() < length:
        raise CalibrationError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {length}")
    return [c[None] for c in ids[: count * length].split(length) if c.numel() == length]


def _measure(name: str, model, tok, text: str, tokens: int, window: int, recipe=None,
             prompt: str | None = None, max_new_tokens: int = 0, backend: str = "eager",
             target: str | None = None, calib_text: str | None = None, calib_samples: int = 16) -> dict[str, Any]:
    import qexport
    from qexport.eval import generate, perplexity

    row: dict[str, Any] = {"variant": name}
    t0 = time.perf_counter()
    if recipe is not None and backend == "compile":
        import torch

        torch._dynamo.reset()
        qmodel = copy.deepcopy(model)
        qmodel.forward = torch.compile(qmodel.forward, backend="qexport",
                                       options={"recipe": recipe, "target": target})
        row["recipe"] = recipe.to_dict()
        from qexport.backend import default_target

        row["backend"] = f"compile/{target or default_target()}"
        if recipe.needs_calibration:
            qexport.calibrate(qmodel, _calibration_batches(tok, calib_text), progress=True)
        # sizes of what the compiled graphs hold are those of the same recipe applied eagerly
        size = qexport.model_size(qexport.quantize(copy.deepcopy(model), _weights_only(recipe)))
        model = qmodel
    elif recipe is not None:
        calibration = None
        if recipe.algorithm != "rtn":  # GPTQ / AWQ: windows of the calibration text
            import torch

            calibration = torch.cat(_calibration_batches(tok, calib_text, count=calib_samples))
        model = qexport.quantize(copy.deepcopy(model), recipe, calibration=calibration, progress=True)
        report = model.qexport_report
        row["recipe"] = report.recipe
        row["layers_quantized"] = len(report.quantized)
        row["layers_float"] = len(report.kept_float)
        if recipe.needs_calibration:
            qexport.calibrate(model, _calibration_batches(tok, calib_text), progress=True)
        row["quantize_s"] = round(time.perf_counter() - t0, 2)
        size = qexport.model_size(model)
    else:
        size = qexport.model_size(model)
    t1 = time.perf_counter()
    res = perplexity(model, tok, text, tokens=tokens, window=window, progress=True, desc=f"ppl {name}")
    row.update(ppl=res.ppl, nll=res.nll, tokens=res.tokens, windows=res.windows, window=res.window,
               eval_s=round(time.perf_counter() - t1, 2))
    row.update(size_bytes=size.total_bytes, quantized_linear_bytes=size.quantized_bytes,
               fp16_size_bytes=size.quantized_fp16_bytes, quantized_ratio_vs_fp16=size.quantized_ratio_vs_fp16,
               bits_per_weight=size.bits_per_weight)
    if prompt and max_new_tokens:
        t2 = time.perf_counter()
        row["generation"] = generate(model, tok, prompt, max_new_tokens=max_new_tokens)
        row["generate_s"] = round(time.perf_counter() - t2, 2)
    return row


def _weights_only(recipe):
    from qexport.config import Recipe, Rule

    return Recipe(name=recipe.name, rules=tuple(Rule(r.pattern, r.weight) for r in recipe.rules),
                  exclude=recipe.exclude)


def _table(rows: list[dict[str, Any]], fp_ppl: float) -> str:
    head = ["variant", "ppl", "x fp32", "model MB", "linears MB", "vs fp16", "bits/w"]
    lines = []
    for r in rows:
        ratio = r.get("quantized_ratio_vs_fp16")
        bpw = r.get("bits_per_weight")
        lines.append([
            r["variant"],
            f"{r['ppl']:.3f}" if r["ppl"] < 1e5 else f"{r['ppl']:.3g}",
            f"{r['ppl'] / fp_ppl:.4f}" if r["ppl"] < 1e5 else f"{r['ppl'] / fp_ppl:.3g}",
            _mb(r["size_bytes"]),
            _mb(r["quantized_linear_bytes"]) if r["quantized_linear_bytes"] else "-",
            f"{ratio:.3f}" if ratio else "-",
            f"{bpw:.2f}" if bpw else "32",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def _write_json(path: str, data: dict[str, Any], force: bool) -> None:
    from qexport._io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n", overwrite=force)
    print(f"wrote {path}", file=sys.stderr)


def _check_json_target(path: str | None, force: bool) -> None:
    """Fail before the long work, not after it, when the output file would be overwritten."""
    if path and Path(path).exists() and not force:
        from qexport._io import OutputExists

        raise OutputExists(f"{path!r} already exists; pass --force to replace it")


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from qexport.config import load_recipe
    from qexport.models import load_model, read_text

    tokens = _positive_int("--tokens", args.tokens)
    window = _positive_int("--window", args.window)
    recipe = load_recipe(args.recipe)
    text = read_text(args.text)
    _check_json_target(args.json, args.force)
    _threads()
    model, tok = load_model(args.model)
    fp = _measure("fp32", model, tok, text, tokens, window)
    q = _measure(recipe.name, model, tok, text, tokens, window, recipe=recipe, backend=args.backend,
                 target=args.target, calib_text=args.calib_text,
                 calib_samples=_positive_int("--calib-samples", args.calib_samples))
    print(f"model {args.model}  text {args.text}  {q['tokens']} tokens in {q['windows']} windows of {window}")
    print(_table([fp, q], fp["ppl"]))
    if args.json:
        out = {
            "model": str(args.model),
            "text": str(args.text),
            "recipe": recipe.to_dict(),
            "ppl": q["ppl"],
            "fp_ppl": fp["ppl"],
            "ppl_ratio": q["ppl"] / fp["ppl"],
            "size_bytes": q["size_bytes"],
            "fp_size_bytes": fp["size_bytes"],
            "fp16_size_bytes": q["fp16_size_bytes"],
            "quantized_linear_bytes": q["quantized_linear_bytes"],
            "quantized_ratio_vs_fp16": q["quantized_ratio_vs_fp16"],
            "bits_per_weight": q["bits_per_weight"],
            "tokens": q["tokens"],
            "window": window,
            "windows": q["windows"],
            "layers_quantized": q.get("layers_quantized"),
            "layers_float": q.get("layers_float"),
            "backend": q.get("backend", "eager"),
        }
        _write_json(args.json, out, args.force)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from qexport.config import load_recipe
    from qexport.models import bundled_text, load_model, read_text

    tokens = _positive_int("--tokens", args.tokens)
    recipes = [load_recipe(r) for r in args.recipes.split(",") if r]
    text_path = args.text or bundled_text("emma")
    text = read_text(text_path)
    _check_json_target(args.json, args.force)
    _threads()
    t0 = time.perf_counter()
    print(f"qexport demo: {args.model}, perplexity on {Path(text_path).name} ({tokens} tokens, windows of 512), "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    model, tok = load_model(args.model)
    rows = [_measure("fp32", model, tok, text, tokens, 512, prompt=args.prompt, max_new_tokens=args.max_new_tokens)]
    for recipe in recipes:
        print(f"  {recipe.name}: {recipe.description or recipe.rules[0].weight.describe()}", file=sys.stderr)
        rows.append(_measure(recipe.name, model, tok, text, tokens, 512, recipe=recipe, prompt=args.prompt,
                             max_new_tokens=args.max_new_tokens))
    fp_ppl = rows[0]["ppl"]
    print()
    print(f"{args.model}: perplexity on {Path(text_path).name}, first {rows[0]['tokens']} tokens; sizes in MB")
    print(_table(rows, fp_ppl))
    print("\n'linears MB' and 'vs fp16': bytes the quantized linears hold, and their ratio to the same")
    print("linears in fp16; embeddings and lm_head stay float (tied), so 'model MB' includes them.\n")
    print(f"greedy generation, prompt: {args.prompt!r}")
    for r in rows:
        print(f"  {r['variant']:>8}: {r.get('generation', '')!r}")
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    if args.json:
        _write_json(args.json, {"model": str(args.model), "text": str(text_path), "tokens": tokens,
                                "fp_ppl": fp_ppl, "variants": rows}, args.force)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from qexport.config import PRESETS, load_recipe

    if args.show:
        print(json.dumps(load_recipe(args.show).to_dict(), indent=2))
        return 0
    width = max(len(n) for n in PRESETS)
    for name, r in PRESETS.items():
        print(f"{name.ljust(width)}  {r.description}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qexport.bench import parse_variant, run_bench, to_markdown, write_results

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    if args.ppl_tokens < 0:
        raise InvalidConfig(f"--ppl-tokens must be 0 (off) or positive, got {args.ppl_tokens}")
    if args.out:
        for name in ("bench.json", "bench.csv", "bench.md", "bench.png"):
            _check_json_target(str(Path(args.out) / name), args.force)
    _threads()
    result = run_bench(args.model, variants, _positive_int("--prompt-tokens", args.prompt_tokens),
                       _positive_int("--new-tokens", args.new_tokens), ppl_tokens=args.ppl_tokens,
                       calib_samples=_positive_int("--calib-samples", args.calib_samples))
    print(to_markdown(result))
    if args.out:
        for path in write_results(result, args.out, args.force):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qexport", description="Quantize PyTorch LLMs to 8, 4 and 2 bits and measure them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("eval", help="perplexity and size of one recipe against fp32")
    e.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face checkpoint directory")
    e.add_argument("--recipe", required=True, help="preset name (see `qexport recipes`) or recipe JSON file")
    e.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    e.add_argument("--tokens", type=int, default=8192, help="tokens evaluated (default 8192)")
    e.add_argument("--window", type=int, default=512, help="window length (default 512)")
    e.add_argument("--backend", choices=("eager", "compile"), default="eager",
                   help="eager quantized modules (default) or torch.compile(backend='qexport')")
    e.add_argument("--target", choices=("inductor", "onnxruntime", "eager"), default=None,
                   help="with --backend compile: where the quantized graph runs (default: onnxruntime on CPU "
                        "when installed, else inductor)")
    e.add_argument("--calib-text", help="calibration text for static recipes (default: bundled Sense and Sensibility)")
    e.add_argument("--calib-samples", type=int, default=16,
                   help="windows of 512 calibration tokens for GPTQ / AWQ recipes (default 16)")
    e.add_argument("--json", help="also write the results as JSON to this file")
    e.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="fp32 vs w8, w4g128, nf4-dq, w2g64 on SmolLM2: perplexity, size, generation")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--text", help="evaluation text (default: the bundled slice of Emma)")
    d.add_argument("--tokens", type=int, default=8192)
    d.add_argument("--recipes", default=",".join(DEMO_RECIPES), help="comma-separated presets or JSON files")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--json", help="also write the results as JSON to this file")
    d.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    d.set_defaults(func=cmd_demo)

    from qexport.bench import DEFAULT_VARIANTS

    b = sub.add_parser("bench", help="speed of variants side by side: compile time, prefill, decode tokens/s")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated: eager-fp32, inductor-fp32, eager:RECIPE, qexport:RECIPE:TARGET")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--ppl-tokens", type=int, default=0,
                   help="also measure perplexity on this many Emma tokens, size and bits per weight of every "
                        "variant, and plot perplexity against size (default 0: speed only)")
    b.add_argument("--calib-samples", type=int, default=16,
                   help="windows of 512 calibration tokens for eager:RECIPE variants of GPTQ / AWQ recipes")
    b.add_argument("--out", help="folder for bench.json, bench.csv, bench.md (and bench.png with --ppl-tokens)")
    b.add_argument("--force", action="store_true", help="overwrite existing result files")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("recipes", help="list the preset recipes, or print one as JSON")
    r.add_argument("--show", metavar="NAME", help="print this recipe as JSON")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*legacy.*", module="transformers")
    try:
        return args.func(args)
    except QExportError as e:
        print(f"qexport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qexport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
