"""The ``qexport`` command line: ``eval``, ``quantize``, ``demo``, ``recipes``, ``models``, ``bench``, ``export``,
``verify``, ``lint-trt``, ``build-engine``, ``allocate``.

This module only parses arguments, calls the library and prints; the work is in the library, usable from
Python: :mod:`qexport.report` (``eval``), :mod:`qexport.demo`, :mod:`qexport.verification` (``verify``),
:mod:`qexport.allocation` (``allocate``), :mod:`qexport.bench`, :mod:`qexport.checkpoint` (``quantize``) and
:mod:`qexport.export` (``export``, ``lint-trt``, ``build-engine``).

Errors in what the user gave (a bad recipe, a missing model or text, a flag that does not apply) print one
line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from qexport.demo import DEMO_PROMPT, DEMO_RECIPES
from qexport.errors import InvalidConfig, QExportError
from qexport.prepare import CalibrationSet
from qexport.report import bos_note, is_saved, mb, resolve_recipe

DEFAULT_MODEL = "smollm2"


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


def _write_json(path: str, data: dict[str, Any], force: bool) -> None:
    from qexport._io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n", overwrite=force)
    print(f"wrote {path}", file=sys.stderr)


def _check_output(path: str | None, force: bool) -> None:
    """Fail before the long work, not after it, when the output file would be overwritten."""
    if path and Path(path).exists() and not force:
        from qexport._io import OutputExists

        raise OutputExists(f"{path!r} already exists; pass --force to replace it")


def _calibration(args: argparse.Namespace) -> CalibrationSet:
    """The calibration windows ``--calib-text`` / ``--calib-samples`` ask for (one sampler for every command)."""
    samples = 16 if args.calib_samples is None else args.calib_samples
    return CalibrationSet(args.calib_text, _positive_int("--calib-samples", samples), bos=args.bos)


def _reference_calibration(args: argparse.Namespace) -> CalibrationSet | None:
    """For the PyTorch reference of an export made from a recipe: the calibration windows given on the command
    line, else None (the export's own, as its report records them)."""
    return None if args.calib_text is None and args.calib_samples is None else _calibration(args)


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from qexport.report import evaluate_export, evaluate_recipe, evaluate_saved

    if args.target is not None and args.backend != "compile":
        raise InvalidConfig("--target is where --backend compile runs the quantized graph: add --backend compile")
    if args.reference and args.backend != "onnxruntime":
        raise InvalidConfig("--reference compares an export folder with PyTorch: use it with --backend onnxruntime")
    tokens = _positive_int("--tokens", args.tokens)
    window = _positive_int("--window", args.window)
    if args.backend == "onnxruntime":
        if not args.folder:
            raise InvalidConfig("--backend onnxruntime evaluates an export folder: qexport eval --backend onnxruntime "
                                "DIR")
        if args.recipe or args.kv_cache or args.model is not None:
            raise InvalidConfig(f"{args.folder!r} is evaluated as it was exported: leave out --model, --recipe and "
                                "--kv-cache with --backend onnxruntime")
        _check_output(args.json, args.force)
        _threads()
        out = evaluate_export(args.folder, args.text, tokens, window, reference=args.reference,
                              calibration=_reference_calibration(args), bos=args.bos)
        print(f"{args.folder}: recipe {out['recipe']}, onnxruntime perplexity {out['ppl']:.4f} on {out['tokens']} "
              f"tokens ({out['windows']} windows of {window}{bos_note(out['bos'])})")
        if args.reference:
            print(f"pytorch perplexity of the same model {out['torch_ppl']:.4f}; onnxruntime / pytorch = "
                  f"{out['ppl_ratio']:.5f}")
        if args.json:
            _write_json(args.json, out, args.force)
        return 0
    if args.folder:
        raise InvalidConfig(f"an export folder ({args.folder}) is evaluated with --backend onnxruntime")
    model = args.model or DEFAULT_MODEL
    if is_saved(model):
        if args.recipe or args.kv_cache or args.backend != "eager":
            raise InvalidConfig(f"{model!r} is quantized already: evaluate it without --recipe / --kv-cache, with "
                                "--backend eager (its ONNX export: `qexport export --model DIR`, then --backend "
                                "onnxruntime)")
        _check_output(args.json, args.force)
        _threads()
        ev = evaluate_saved(model, args.text, tokens, window, float_reference=args.float_reference, bos=args.bos)
    else:
        if not args.recipe:
            raise InvalidConfig("--recipe is required (a preset name or a recipe JSON file), unless --model is a "
                                "quantized folder (`qexport quantize`)")
        if not args.float_reference:
            raise InvalidConfig("--no-float-reference applies to a quantized folder as --model (`qexport quantize`)")
        recipe = resolve_recipe(args.recipe, args.kv_cache)
        _check_output(args.json, args.force)
        _threads()
        ev = evaluate_recipe(model, recipe, args.text, tokens, window, backend=args.backend, target=args.target,
                             calibration=_calibration(args), bos=args.bos)
    for note in ev.notes:
        print(f"qexport: {note}", file=sys.stderr)
    print(ev.header)
    print(ev.table())
    if args.json:
        _write_json(args.json, ev.summary, args.force)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qexport.checkpoint import save_quantized
    from qexport.models import load_model, source_name
    from qexport.prepare import quantize_model

    recipe = resolve_recipe(args.recipe, args.kv_cache)
    _check_output(args.out, args.force)
    if is_saved(args.model):
        raise InvalidConfig(f"{args.model!r} is quantized already; quantize its float source model instead")
    _threads()
    t0 = time.perf_counter()
    if args.max_activation_gb is not None and not args.stream:
        raise InvalidConfig("--max-activation-gb is for --stream")
    if args.max_activation_gb is not None and args.max_activation_gb < 0:
        raise InvalidConfig(f"--max-activation-gb {args.max_activation_gb}: give 0 (always spill) or more")
    if args.stream:
        from qexport.models import checkpoint_folder, load_tokenizer
        from qexport.stream import quantize_streamed

        path = checkpoint_folder(args.model)
        tok = load_tokenizer(path)
        limit = None if args.max_activation_gb is None else int(args.max_activation_gb * 2**30)
        res = quantize_streamed(path, recipe, args.out, tokenizer=tok, calibration=_calibration(args),
                                force=args.force, layout=args.layout, progress=True,
                                provenance={"source_model": source_name(args.model)}, max_activation_bytes=limit)
        spilled = f", {mb(res.spilled_bytes)} MB of activations spilled to disk" if res.spilled_bytes else ""
        saved, report, how = res.folder, res.report, f"streamed, {res.blocks} blocks{spilled}"
    else:
        model, tok = load_model(args.model)
        model = quantize_model(model, recipe, tok, _calibration(args), progress=True)
        quantize_s = time.perf_counter() - t0
        saved = save_quantized(model, args.out, tok, force=args.force, layout=args.layout,
                               provenance={"source_model": source_name(args.model), "quantize_s": round(quantize_s, 1)})
        report, how = model.qexport_report, "in memory"
    from qexport.stream import peak_rss_bytes

    peak = peak_rss_bytes()
    print(f"wrote {saved.path}: {mb(saved.bytes)} MB, layout {saved.layout}; {len(report.quantized)} layers "
          f"quantized, {len(report.kept_float)} float; quantized {how} in {time.perf_counter() - t0:.0f} s"
          + (f", peak RSS {mb(peak)} MB" if peak else ""))
    if report.algorithm_summary():
        print(f"  {report.algorithm_summary()}")
    for engine, status in saved.engines.items():
        print(f"  {engine:<13} {status}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qexport.export import export_onnx

    if is_saved(args.model):
        if args.recipe or args.kv_cache:
            raise InvalidConfig(f"{args.model!r} is quantized already: export it without --recipe / --kv-cache")
        if args.bos is not None:
            raise InvalidConfig(f"{args.model!r} is quantized already (its calibration windows, BOS or not, are "
                                "recorded in it): export it without --bos / --no-bos")
    elif not args.recipe:
        raise InvalidConfig("--recipe is required (a preset name, a recipe JSON file, or 'fp32'), unless --model is "
                            "a quantized folder (`qexport quantize`)")
    recipe = None if args.recipe in (None, "fp32") and args.kv_cache is None else args.recipe
    if args.format == "gguf":
        return _export_gguf(args, recipe)
    if args.float_type is not None:
        raise InvalidConfig("--float-type is for --format gguf (an ONNX export keeps float32)")
    if args.triton_name is not None and args.layout != "triton-repo":
        raise InvalidConfig("--triton-name names the model in a --layout triton-repo repository")
    if recipe is not None:  # a bad recipe fails before the model loads
        recipe = resolve_recipe(recipe, args.kv_cache)
    options = dict(target=args.target, force=args.force, calibration=_calibration(args), fuse=args.fuse,
                   ort_accuracy_level=args.ort_accuracy_level, embedding_form=args.embedding_form,
                   attention_form=args.attention_form)
    if args.layout == "triton-repo":
        from qexport.export.triton_repo import export_triton_repository

        name = args.triton_name or _triton_name(args.model, recipe)
        _check_output(str(Path(args.out) / name), args.force)
        _threads()
        res = export_triton_repository(args.model, args.out, name, recipe, **options)
    else:
        _check_output(args.out, args.force)
        _threads()
        res = export_onnx(args.model, args.out, recipe, **options)
    r = res.report
    quantized = sum(1 for layer in r["layers"] if layer["status"] == "quantized")
    print(f"wrote {res.path}: {', '.join(f'{f} {mb(n)} MB' for f, n in r['files'].items())}; opset {r['opset']}, "
          f"target {r['target']}, {r['attention_form']['form']} attention; {quantized} layers quantized, "
          f"{len(r['layers']) - quantized} float "
          f"(see {res.path / 'export_report.json'})")
    return 0


def _triton_name(model: str, recipe) -> str:
    """A Triton model name from the model and the recipe: ``smollm2-w4g128``."""
    import re

    stem = Path(str(model).rstrip("/")).name
    parts = [stem] + ([recipe.name] if recipe is not None else [])
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-.") or "model"


def _export_gguf(args: argparse.Namespace, recipe) -> int:
    from qexport.export.gguf import export_gguf

    onnx_only = [flag for flag, on in (("--target", args.target != "ort"), ("--kv-cache", args.kv_cache is not None),
                                       ("--ort-accuracy-level", args.ort_accuracy_level is not None),
                                       ("--embedding-form", args.embedding_form != "auto"),
                                       ("--attention-form", args.attention_form != "auto"),
                                       ("--no-fuse", not args.fuse), ("--layout", args.layout != "folder"),
                                       ("--triton-name", args.triton_name is not None)) if on]
    if onnx_only:
        raise InvalidConfig(f"{', '.join(onnx_only)}: ONNX export options, not for --format gguf")
    if recipe is not None:
        recipe = resolve_recipe(recipe, None)
    _check_output(args.out, args.force)
    _threads()
    res = export_gguf(args.model, args.out, recipe, calibration=_calibration(args), float_type=args.float_type or "f16",
                      force=args.force)
    r = res.report
    types = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items(), key=lambda kv: -kv[1]))
    check = (f"; read back bit-identical ({r['readback']['tensors']} quantized tensors)" if r["readback"] else "")
    print(f"wrote {res.path}: {mb(r['bytes'])} MB, {r['bits_per_weight']:.2f} bits per weight, file type "
          f"{r['file_type']}; tensors: {types}{check}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from qexport.verification import verify_export, verify_lines

    if args.bos is not None and args.calib_text is None and args.calib_samples is None:
        raise InvalidConfig("verify: --bos / --no-bos shape the calibration windows of the reference given with "
                            "--calib-text / --calib-samples; without them the windows the export records are used")
    if (args.atol is not None or args.rtol is not None) and not (args.polygraphy or args.engine):
        raise InvalidConfig("--atol / --rtol are the tolerances of the polygraphy comparison: add --polygraphy")
    if args.max_new_tokens is not None and not args.prompt:
        raise InvalidConfig("--max-new-tokens is the length of the generation --prompt asks for: add --prompt")
    _check_output(args.json, args.force)
    _threads()
    res = verify_export(args.folder, decode_steps=args.decode_steps, calibration=_reference_calibration(args),
                        ort_accuracy_level=args.ort_accuracy_level, polygraphy=args.polygraphy, engine=args.engine,
                        atol=1e-2 if args.atol is None else args.atol, rtol=1e-2 if args.rtol is None else args.rtol,
                        prompt=args.prompt, max_new_tokens=24 if args.max_new_tokens is None else args.max_new_tokens)
    for line in verify_lines(args.folder, res):
        print(line)
    if args.json:
        _write_json(args.json, res, args.force)
    return 0 if res["passed"] else 1


def cmd_lint_trt(args: argparse.Namespace) -> int:
    from qexport.export import lint_tensorrt

    problems = lint_tensorrt(args.model)
    for p in problems:
        print(p)
    print(f"{args.model}: {len(problems)} TensorRT QDQ rule violation(s)" if problems else
          f"{args.model}: follows TensorRT's QDQ rules", file=sys.stderr)
    return 1 if problems else 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from qexport.export import build_engine

    path = build_engine(args.model, args.out, int8=args.int8, int4=args.int4,
                        max_batch=_positive_int("--max-batch", args.max_batch),
                        max_seq=_positive_int("--max-seq", args.max_seq),
                        max_past=_positive_int("--max-past", args.max_past),
                        timing_cache=args.timing_cache, force=args.force)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qexport.config import load_recipe
    from qexport.demo import format_demo, run_demo

    tokens = _positive_int("--tokens", args.tokens)
    if args.max_new_tokens < 0:
        raise InvalidConfig(f"--max-new-tokens must be 0 (no generation) or positive, got {args.max_new_tokens}")
    recipes = [load_recipe(r) for r in args.recipes.split(",") if r]  # a bad recipe fails before the model loads
    _check_output(args.json, args.force)
    _threads()
    result = run_demo(args.model, recipes, args.text, tokens, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                      bos=args.bos, log=lambda line: print(line, file=sys.stderr))
    print(format_demo(result))
    if args.json:
        _write_json(args.json, result, args.force)
    return 0


DATA_MARK = "[data]"  # in `qexport recipes`: the preset needs calibration data


def cmd_recipes(args: argparse.Namespace) -> int:
    from qexport.config import load_recipe
    from qexport.presets import PRESETS

    if args.show:
        print(json.dumps(load_recipe(args.show).to_dict(), indent=2))
        return 0
    width = max(len(n) for n in PRESETS)
    for name, r in PRESETS.items():
        print(f"{name.ljust(width)}  {DATA_MARK if r.needs_data else ' ' * len(DATA_MARK)}  {r.description}")
    print(f"\n{DATA_MARK}: needs calibration data (--calib-text / --calib-samples); any name plus -kv8 / -kv4g32 ... "
          "adds a quantized KV cache")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from qexport.models.architectures import ARCHITECTURES, PATHS, support, support_markdown

    if args.json:  # each family's layout (the table's entry) and what works for it
        print(json.dumps({a.family: {"layout": asdict(a),
                                     "paths": {p: {"status": st, "note": n} for p, (st, n) in support(a).items()}}
                          for a in ARCHITECTURES}, indent=2))
        return 0
    if args.markdown:
        print(support_markdown(), end="")
        return 0
    width = max(len(a.family) for a in ARCHITECTURES)
    for a in ARCHITECTURES:
        row = ", ".join(f"{PATHS[p][0]}: {st}" for p, (st, _) in support(a).items())
        print(f"{a.family.ljust(width)}  ({', '.join(a.model_types)})  {row}")
    print("\nqexport models --markdown: the table with notes and what each check compares")
    return 0


def _row_appender(path: Path):
    """A callback appending each row to the JSON-lines file ``path`` (emptied first) as soon as it is measured,
    so that a bench that is stopped keeps the rows it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def append(row) -> None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    return append


def cmd_bench(args: argparse.Namespace) -> int:
    from qexport.bench import ROWS_FILE, parse_variant, run_bench, to_markdown, write_results

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    if args.ppl_tokens < 0:
        raise InvalidConfig(f"--ppl-tokens must be 0 (off) or positive, got {args.ppl_tokens}")
    on_row = None
    if args.out:
        for name in ("bench.json", "bench.csv", "bench.md", "bench.png", ROWS_FILE):
            _check_output(str(Path(args.out) / name), args.force)
        on_row = _row_appender(Path(args.out) / ROWS_FILE)
    _threads()
    result = run_bench(args.model, variants, _positive_int("--prompt-tokens", args.prompt_tokens),
                       _positive_int("--new-tokens", args.new_tokens), ppl_tokens=args.ppl_tokens,
                       calib_samples=_positive_int("--calib-samples", args.calib_samples),
                       rounds=_positive_int("--rounds", args.rounds), baseline=args.baseline, bos=args.bos,
                       on_row=on_row, isolate=args.isolate)
    print(to_markdown(result))
    if args.out:
        for path in write_results(result, args.out, args.force):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from qexport.algorithms.allocate import parse_size
    from qexport.allocation import allocate_model

    if (args.target_bits is None) == (args.target_size is None):
        raise InvalidConfig("give exactly one of --target-bits (bits per weight of the linears) or --target-size")
    target_bytes = parse_size(args.target_size) if args.target_size is not None else None
    samples = _positive_int("--calib-samples", args.calib_samples)
    seq_len = _positive_int("--seq-len", args.seq_len)
    _check_output(args.out, args.force)
    _threads()
    run = allocate_model(args.model, target_bits=args.target_bits, target_bytes=target_bytes,
                         candidates=[c for c in args.candidates.split(",") if c], method=args.method,
                         algorithm=args.algorithm, name=args.name, calib_text=args.calib_text, samples=samples,
                         seq_len=seq_len, seed=args.seed, bos=args.bos, sensitivities=args.sensitivities)
    sens, plan = run.plan.sensitivity, run.plan
    if args.sensitivities:
        print(f"sensitivities from {args.sensitivities} ({sens.method})" if run.cached else
              f"wrote {args.sensitivities}", file=sys.stderr)
    print(plan.table())
    print(f"sensitivity: {sens.method} on {sens.tokens} calibration tokens, {sens.seconds:.0f} s; knapsack "
          f"{'optimal' if plan.optimal else f'unit {plan.unit} bytes'}")
    plan.recipe.to_json(args.out, overwrite=args.force)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        _write_json(args.json, run.to_dict(), args.force)
    return 0


def _bos_option(parser: argparse.ArgumentParser, windows: str) -> None:
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help=f"start every {windows} window with the tokenizer's BOS token (--bos) or not (--no-bos); "
                             "default: as the tokenizer does by default (recorded in the outputs)")


def _finish(parser: argparse.ArgumentParser, func, windows: str | None = None, json_what: str | None = None,
            force: str = "overwrite the --json file if it exists") -> None:
    """The options most commands share, last: --bos / --no-bos for ``windows``, --json, --force; then ``func``."""
    if windows:
        _bos_option(parser, windows)
    if json_what:
        parser.add_argument("--json", help=f"also write {json_what} as JSON to this file")
    parser.add_argument("--force", action="store_true", help=force)
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from qexport.presets import KV_CACHE_PRESETS

    p = _Parser(prog="qexport", description="Quantize PyTorch LLMs to 8, 4 and 2 bits and measure them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("eval", help="perplexity and size of one recipe against fp32")
    e.add_argument("--model", help="'smollm2' (default), a local Hugging Face checkpoint directory, or a quantized "
                                   "folder (`qexport quantize`; then no --recipe); not with --backend onnxruntime")
    e.add_argument("folder", nargs="?", help="with --backend onnxruntime: an export folder (`qexport export`)")
    e.add_argument("--recipe", help="preset name (see `qexport recipes`) or recipe JSON file")
    e.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    e.add_argument("--tokens", type=int, default=8192, help="tokens evaluated (default 8192)")
    e.add_argument("--window", type=int, default=512, help="window length (default 512)")
    e.add_argument("--backend", choices=("eager", "compile", "onnxruntime"), default="eager",
                   help="eager quantized modules (default), torch.compile(backend='qexport'), or an export folder "
                        "in ONNX Runtime")
    e.add_argument("--reference", action="store_true",
                   help="with --backend onnxruntime: also the PyTorch perplexity of the same quantized model")
    e.add_argument("--target", choices=("inductor", "onnxruntime", "eager"), default=None,
                   help="with --backend compile: where the quantized graph runs (default: onnxruntime on CPU "
                        "when installed, else inductor)")
    e.add_argument("--calib-text", help="calibration text for static, GPTQ and AWQ recipes (default: bundled Sense "
                                        "and Sensibility)")
    e.add_argument("--calib-samples", type=int, default=None,
                   help="windows of 512 calibration tokens for GPTQ / AWQ / SmoothQuant and static recipes (default "
                        "16; with --backend onnxruntime --reference: those the export's report records)")
    e.add_argument("--kv-cache", choices=tuple(KV_CACHE_PRESETS), default=None,
                   help="store the attention KV cache quantized (qexport.kvcache); --recipe fp32 keeps weights float")
    e.add_argument("--no-float-reference", dest="float_reference", action="store_false",
                   help="with a quantized folder as --model: skip the perplexity of its float source model")
    _finish(e, cmd_eval, "perplexity and calibration", "the results")

    q = sub.add_parser("quantize", help="quantize a model with a recipe and save the folder (load it anywhere)")
    q.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' or a local Hugging Face checkpoint directory")
    q.add_argument("--recipe", required=True, help="preset name (see `qexport recipes`) or recipe JSON file")
    q.add_argument("--out", required=True, help="folder to write (safetensors, config, tokenizer, recipe, manifest)")
    q.add_argument("--calib-text", help="calibration text for GPTQ / AWQ / SmoothQuant and static recipes "
                                        "(default: bundled Sense and Sensibility)")
    q.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    q.add_argument("--kv-cache", choices=tuple(KV_CACHE_PRESETS), default=None,
                   help="record a quantized KV cache in the recipe (qexport.kvcache)")
    q.add_argument("--layout", choices=("auto", "compressed-tensors", "qexport"), default="auto",
                   help="tensor layout: compressed-tensors where every layer has that form (transformers and vLLM "
                        "load it), else qexport's own (default auto)")
    q.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from the model's safetensors files and write it when "
                        "quantized: peak memory about one block, for models larger than memory (same result; rtn, "
                        "gptq, awq and smoothquant recipes, rotated or not)")
    q.add_argument("--max-activation-gb", type=float, default=None, metavar="GB",
                   help="with --stream: keep the calibration activations at a block boundary in memory up to this "
                        "size and spill them to disk beyond (0: always; default: a quarter of the available "
                        "memory)")
    _finish(q, cmd_quantize, "calibration", force="replace the --out folder if it exists")

    d = sub.add_parser("demo", help="fp32 vs w8, w4g128, nf4-dq, w2g64 on SmolLM2: perplexity, size, generation")
    d.add_argument("--model", default=DEFAULT_MODEL,
                   help="'smollm2' (default) or a local Hugging Face checkpoint directory (a tiny one for a quick run)")
    d.add_argument("--text", help="evaluation text (default: the bundled slice of Emma)")
    d.add_argument("--tokens", type=int, default=8192,
                   help="tokens of the text evaluated, in windows of 512 (default 8192; 512 for a quick run)")
    d.add_argument("--recipes", default=",".join(DEMO_RECIPES),
                   help=f"comma-separated presets or JSON files (default {','.join(DEMO_RECIPES)})")
    d.add_argument("--prompt", default=DEMO_PROMPT, help=f"prompt of the greedy generations (default {DEMO_PROMPT!r})")
    d.add_argument("--max-new-tokens", type=int, default=24,
                   help="tokens each variant generates after --prompt (default 24; 0: no generation)")
    _finish(d, cmd_demo, "perplexity and calibration", "the results")

    from qexport.bench import DEFAULT_VARIANTS

    b = sub.add_parser("bench", help="speed of variants side by side: compile time, prefill, decode tokens/s")
    b.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' (default) or a local checkpoint directory")
    b.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated: eager-fp32, inductor-fp32, inductor-fp32-frozen, eager:RECIPE, "
                        "qexport:RECIPE:TARGET, torchao:int8-dynamic|int8-weight-only|int4-weight-only, "
                        "onnx:fp32, onnx:RECIPE (exported, run by ONNX Runtime), onnx-dir:PATH (an export folder)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--ppl-tokens", type=int, default=0,
                   help="also measure perplexity on this many Emma tokens, size and bits per weight of every "
                        "variant, and plot perplexity against size (default 0: speed only)")
    b.add_argument("--calib-samples", type=int, default=16,
                   help="windows of 512 calibration tokens for GPTQ / AWQ recipes and static-activation exports")
    b.add_argument("--rounds", type=int, default=1,
                   help="measure the variant list this many times, round-robin, and summarize medians and "
                        "per-round ratios (default 1)")
    b.add_argument("--isolate", action="store_true",
                   help="measure each variant in a fresh process (loads the model again each time): no variant "
                        "inherits another's compiled state or memory; for long runs of many rounds")
    b.add_argument("--baseline", help="the variant the summary's ratios are against (default: onnx:fp32, else "
                                      "inductor-fp32-frozen, else inductor-fp32, else the first variant)")
    b.add_argument("--out", help="folder for bench.json, bench.csv, bench.md (and bench.png with --ppl-tokens)")
    _finish(b, cmd_bench, "perplexity and calibration", force="overwrite existing result files")

    x = sub.add_parser("export", help="export a quantized causal LM: an ONNX QDQ folder (KV cache in and out), or a "
                                      "GGUF file for llama.cpp")
    x.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2', a local Hugging Face checkpoint directory, or a "
                                                      "quantized folder (`qexport quantize`; then no --recipe)")
    x.add_argument("--recipe", help="preset name or recipe JSON file; 'fp32' for the float baseline; left out when "
                                    "--model is a quantized folder")
    x.add_argument("--out", required=True, help="folder to write (model.onnx, config, tokenizer, recipe, report); "
                                                "with --format gguf, the .gguf file")
    x.add_argument("--format", choices=("onnx", "gguf"), default="onnx",
                   help="onnx (default): an ONNX QDQ folder; gguf: one GGUF file for llama.cpp, from a gguf-* recipe "
                        "(llama.cpp's block formats) or 'fp32' (all float)")
    x.add_argument("--float-type", choices=("f16", "f32"), default=None,
                   help="--format gguf: the type of what stays float (embedding, float lm_head; default f16); norms "
                        "are f32")
    x.add_argument("--target", choices=("ort", "tensorrt"), default="ort",
                   help="ort: ONNX Runtime (default); tensorrt: TensorRT's QDQ rules")
    x.add_argument("--calib-text", help="calibration text for static / GPTQ / AWQ recipes (default: bundled)")
    x.add_argument("--calib-samples", type=int, default=16, help="calibration windows for GPTQ / AWQ (default 16)")
    x.add_argument("--kv-cache", choices=tuple(KV_CACHE_PRESETS), default=None,
                   help="past / present keys and values as int8 or packed int4 codes plus scales (qexport.kvcache)")
    x.add_argument("--ort-accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="MatMulNBits accuracy level saved in the folder's session settings: 0 fp32 activations "
                        "(exact), 4 int8 activations (faster); default 4 for all-int8 weights, else 0")
    x.add_argument("--embedding-form", choices=("auto", "gbq", "standard"), default="auto",
                   help="a quantized embedding: auto (ONNX Runtime's GatherBlockQuantized where it takes the weight, "
                        "the tied lm_head MatMulNBits on the same initializers; default), gbq (that or refuse), "
                        "standard (Gather + DequantizeLinear only)")
    x.add_argument("--attention-form", choices=("auto", "gqa", "standard"), default="auto",
                   help="ONNX Runtime target: gqa (com.microsoft.GroupQueryAttention, rotary inside, packed QKV, a KV "
                        "buffer past and present share: faster in onnxruntime-genai and OnnxCausalLM; no left "
                        "padding), standard (opset 23 Attention, a growing cache), auto (gqa where it applies; "
                        "default)")
    x.add_argument("--layout", choices=("folder", "triton-repo"), default="folder",
                   help="folder (default): the export folder at --out; triton-repo: --out is a Triton Inference "
                        "Server model repository, and the export becomes its model --triton-name (config.pbtxt "
                        "for the ONNX Runtime backend, the graph in version 1)")
    x.add_argument("--triton-name", default=None, help="--layout triton-repo: the model's name in the repository "
                                                       "(default: the model's and the recipe's names)")
    x.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="ONNX Runtime target: write attention, rotary embeddings and RMSNorm out in elementwise ops "
                        "(opset 21) instead of opset 23's Attention / RotaryEmbedding / RMSNormalization")
    _finish(x, cmd_export, "calibration", force="replace the --out folder if it exists")

    v = sub.add_parser("verify", help="an export folder in ONNX Runtime against the PyTorch reference")
    v.add_argument("folder", help="export folder")
    v.add_argument("--decode-steps", type=int, default=8, help="KV-cache steps after the prefill (default 8)")
    v.add_argument("--prompt", help="also print a greedy generation from the folder for this prompt")
    v.add_argument("--max-new-tokens", type=int, default=None, help="with --prompt: tokens generated (default 24)")
    v.add_argument("--calib-text", help="the calibration text the export used (static recipes)")
    v.add_argument("--calib-samples", type=int, default=None,
                   help="with --calib-text: the calibration windows of an export made from a recipe (default: "
                        "those its report records)")
    v.add_argument("--ort-accuracy-level", type=int, choices=(0, 4),
                   help="run ONNX Runtime's MatMulNBits at this accuracy level instead of the folder's (0: float "
                        "activations, the reference's numerics; 4: int8 activations)")
    v.add_argument("--polygraphy", action="store_true",
                   help="also compare PyTorch and ONNX Runtime output by output (logits, present key / values) "
                        "with polygraphy's Comparator; exit status 1 when an element is outside tolerance")
    v.add_argument("--engine", help="a TensorRT engine of this export to add to the polygraphy comparison "
                                    "(needs TensorRT; implies --polygraphy)")
    v.add_argument("--atol", type=float, default=None, help="polygraphy: absolute tolerance (default 0.01)")
    v.add_argument("--rtol", type=float, default=None,
                   help="polygraphy: relative tolerance; an element passes within either (default 0.01)")
    _finish(v, cmd_verify, "calibration (with --calib-text / --calib-samples)", "the results")

    lt = sub.add_parser("lint-trt", help="check an ONNX model against TensorRT's QDQ rules (exit 1 on violations)")
    lt.add_argument("model", help="model.onnx or an export folder")
    lt.set_defaults(func=cmd_lint_trt)

    be = sub.add_parser("build-engine", help="build a strongly typed TensorRT engine (needs TensorRT)")
    be.add_argument("model", help="model.onnx or an export folder")
    be.add_argument("--out", required=True, help="engine file to write (model.plan)")
    be.add_argument("--int8", action="store_true", help="require INT8 Q/DQ in the graph")
    be.add_argument("--int4", action="store_true", help="require INT4 weights in the graph")
    be.add_argument("--max-batch", type=int, default=1)
    be.add_argument("--max-seq", type=int, default=512, help="most new tokens in one call")
    be.add_argument("--max-past", type=int, default=1024, help="longest KV cache")
    be.add_argument("--timing-cache", help="timing cache file (default: <out>.timing.cache)")
    _finish(be, cmd_build_engine, force="replace --out if it exists")

    al = sub.add_parser("allocate", help="mixed precision: pick a format per linear layer to meet a size target")
    al.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' or a local Hugging Face checkpoint directory")
    al.add_argument("--target-bits", type=float, help="bits per weight of the quantized linears (codes + scales + "
                                                     "zero points), e.g. 3.0")
    al.add_argument("--target-size", help="bytes of the quantized linears, e.g. 60MB, 57MiB or 60000000")
    al.add_argument("--out", required=True, help="recipe JSON to write (one rule per layer)")
    al.add_argument("--candidates", default="w8,w4g128,w4g64,w2g64",
                    help="comma-separated single-format presets to choose from (default w8,w4g128,w4g64,w2g64)")
    al.add_argument("--method", choices=("fisher", "loss"), default="fisher",
                    help="fisher: diagonal-Fisher estimate of the loss increase (default, cheap); loss: measured, "
                         "one model run per layer and format")
    al.add_argument("--algorithm", choices=("rtn", "gptq", "awq"), default="rtn", help="algorithm of the recipe")
    al.add_argument("--name", help="recipe name (default auto-<bits>bpw)")
    al.add_argument("--calib-text", help="calibration text (default: bundled Sense and Sensibility)")
    al.add_argument("--calib-samples", type=int, default=4, help="calibration windows (default 4)")
    al.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    al.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    al.add_argument("--sensitivities", help="JSON cache of the sensitivities: read when it exists (same model and "
                                            "calibration), written otherwise; reuse it for several targets")
    _finish(al, cmd_allocate, "calibration", "the allocation (per-layer choices, bytes, sensitivities)",
            force="overwrite --out / --json if they exist")

    r = sub.add_parser("recipes", help="list the preset recipes, or print one as JSON")
    r.add_argument("--show", metavar="NAME", help="print this recipe as JSON")
    r.set_defaults(func=cmd_recipes)

    mo = sub.add_parser("models", help="the model families qexport knows and what works for each (support matrix)")
    fmt = mo.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="the Markdown table README shows, with notes")
    fmt.add_argument("--json", action="store_true", help="per family: its layout, and path -> status and note")
    mo.set_defaults(func=cmd_models)
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
