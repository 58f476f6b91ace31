"""The ``qexport`` command line: ``eval``, ``demo``, ``recipes``, ``bench``, ``export``, ``verify``, ``lint-trt``,
``build-engine``, ``allocate``.

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
from qexport.prepare import CalibrationSet, quantize_model

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
def _measure(name: str, model, tok, text: str, tokens: int, window: int, recipe=None,
             prompt: str | None = None, max_new_tokens: int = 0, backend: str = "eager",
             target: str | None = None, calibration: CalibrationSet | None = None, bos: bool | None = None
             ) -> dict[str, Any]:
    import qexport
    from qexport.eval import generate, perplexity

    row: dict[str, Any] = {"variant": name}
    t0 = time.perf_counter()
    calibration = calibration or CalibrationSet()
    if recipe is not None and backend == "compile":
        import torch

        torch._dynamo.reset()
        qmodel = copy.deepcopy(model)
        qmodel.forward = torch.compile(qmodel.forward, backend="qexport",
                                       options={"recipe": recipe, "target": target})
        row["recipe"] = recipe.to_dict()
        from qexport.algorithms.calibration import calibration_batches
        from qexport.backend import default_target

        row["backend"] = f"compile/{target or default_target()}"
        if recipe.needs_calibration:
            qexport.calibrate(qmodel, calibration_batches(calibration.tokens(tok)), progress=True)
        # sizes of what the compiled graphs hold are those of the same recipe applied eagerly
        size = qexport.model_size(qexport.quantize(copy.deepcopy(model), recipe.weights_only()))
        model = qmodel
    elif recipe is not None:
        model = quantize_model(copy.deepcopy(model), recipe, tok, calibration, progress=True)
        _report_row(row, model)
        row["quantize_s"] = round(time.perf_counter() - t0, 2)
        size = qexport.model_size(model)
    else:
        if getattr(model, "qexport_report", None) is not None:  # a saved quantized folder
            _report_row(row, model)
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


def _report_row(row: dict[str, Any], model) -> None:
    report = model.qexport_report
    row["recipe"] = report.recipe
    row["layers_quantized"] = len(report.quantized)
    row["layers_float"] = len(report.kept_float)


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


def _check_output(path: str | None, force: bool) -> None:
    """Fail before the long work, not after it, when the output file would be overwritten."""
    if path and Path(path).exists() and not force:
        from qexport._io import OutputExists

        raise OutputExists(f"{path!r} already exists; pass --force to replace it")


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from qexport.models import load_model, read_text

    if args.backend == "onnxruntime":
        return _eval_onnxruntime(args)
    if args.folder:
        raise InvalidConfig(f"an export folder ({args.folder}) is evaluated with --backend onnxruntime")
    if _is_saved(args.model):
        return _eval_saved(args)
    if not args.recipe:
        raise InvalidConfig("--recipe is required (a preset name or a recipe JSON file), unless --model is a "
                            "quantized folder (`qexport quantize`)")
    tokens = _positive_int("--tokens", args.tokens)
    window = _positive_int("--window", args.window)
    recipe = _with_kv_cache(args.recipe, args.kv_cache)
    if recipe.kv_cache is not None and args.backend == "compile":
        raise InvalidConfig("--kv-cache is measured with --backend eager (or an export folder with --backend "
                            "onnxruntime); the compile back-end keeps a float cache")
    text = read_text(args.text)
    _check_output(args.json, args.force)
    _threads()
    model, tok = load_model(args.model)
    fp = _measure("fp32", model, tok, text, tokens, window, bos=args.bos)
    q = _measure(recipe.name, model, tok, text, tokens, window, recipe=recipe, backend=args.backend,
                 target=args.target, calibration=_calibration(args), bos=args.bos)
    print(f"model {args.model}  text {args.text}  {q['tokens']} tokens in {q['windows']} windows of {window}"
          f"{_bos_note(q['bos'])}")
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
            "bos": q["bos"],
            "layers_quantized": q.get("layers_quantized"),
            "layers_float": q.get("layers_float"),
            "backend": q.get("backend", "eager"),
        }
        _write_json(args.json, out, args.force)
    return 0


def _is_saved(model: str) -> bool:
    from qexport.checkpoint import is_quantized_folder
    from qexport.models import MODEL_ALIASES

    return model not in MODEL_ALIASES and is_quantized_folder(model)


def _eval_saved(args: argparse.Namespace) -> int:
    """Perplexity of a saved quantized folder as it is (nothing is quantized again), next to its float source
    model's when that can be loaded here."""
    from qexport.checkpoint import read_provenance
    from qexport.models import load_model, read_text

    if args.recipe or args.kv_cache or args.backend != "eager":
        raise InvalidConfig(f"{args.model!r} is quantized already: evaluate it without --recipe / --kv-cache, with "
                            "--backend eager (its ONNX export: `qexport export --model DIR`, then --backend "
                            "onnxruntime)")
    tokens = _positive_int("--tokens", args.tokens)
    window = _positive_int("--window", args.window)
    text = read_text(args.text)
    _check_output(args.json, args.force)
    _threads()
    model, tok = load_model(args.model)
    name = model.qexport_report.recipe.get("name", "saved") if model.qexport_report.recipe else "saved"
    q = _measure(name, model, tok, text, tokens, window, bos=args.bos)
    rows, source = [q], read_provenance(args.model).get("source_model")
    if args.float_reference and source:
        from qexport.errors import ModelLoadError

        try:
            rows.insert(0, _measure("fp32", load_model(source)[0], tok, text, tokens, window, bos=args.bos))
        except ModelLoadError as e:
            print(f"qexport: no float reference: the source model cannot be loaded here ({e})", file=sys.stderr)
    print(f"model {args.model}  text {args.text}  {q['tokens']} tokens in {q['windows']} windows of {window}"
          f"{_bos_note(q['bos'])}")
    print(_table(rows, rows[0]["ppl"]))
    if args.json:
        out = {"model": str(args.model), "text": str(args.text), "recipe": model.qexport_report.recipe,
               "ppl": q["ppl"], "nll": q["nll"], "tokens": q["tokens"], "window": window, "windows": q["windows"],
               "bos": q["bos"], "size_bytes": q["size_bytes"], "bits_per_weight": q["bits_per_weight"],
               "backend": "eager", "source_model": source, **({"fp_ppl": rows[0]["ppl"]} if len(rows) > 1 else {})}
        _write_json(args.json, out, args.force)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qexport.checkpoint import save_quantized
    from qexport.models import load_model, source_name

    recipe = _with_kv_cache(args.recipe, args.kv_cache)
    _check_output(args.out, args.force)
    if _is_saved(args.model):
        raise InvalidConfig(f"{args.model!r} is quantized already; quantize its float source model instead")
    _threads()
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    model = quantize_model(model, recipe, tok, _calibration(args), progress=True)
    quantize_s = time.perf_counter() - t0
    saved = save_quantized(model, args.out, tok, force=args.force, layout=args.layout,
                           provenance={"source_model": source_name(args.model), "quantize_s": round(quantize_s, 1)})
    report = model.qexport_report
    print(f"wrote {saved.path}: {_mb(saved.bytes)} MB, layout {saved.layout}; {len(report.quantized)} layers "
          f"quantized, {len(report.kept_float)} float; quantized in {quantize_s:.0f} s")
    for engine, status in saved.engines.items():
        print(f"  {engine:<13} {status}")
    return 0


def _with_kv_cache(recipe_name: str, kv_cache: str | None):
    """The recipe named ``recipe_name`` ('fp32': float weights) with ``--kv-cache`` added when given."""
    from qexport.config import Recipe, Rule, load_recipe

    if recipe_name == "fp32":
        if kv_cache is None:
            raise InvalidConfig("--recipe fp32 only makes sense with --kv-cache (float weights, quantized KV cache)")
        recipe = Recipe(name="fp32", rules=(Rule("*", None),), description="float weights")
    else:
        recipe = load_recipe(recipe_name)
    return recipe.with_kv_cache(kv_cache) if kv_cache is not None else recipe


def _calibration(args: argparse.Namespace) -> CalibrationSet:
    """The calibration windows ``--calib-text`` / ``--calib-samples`` ask for (one sampler for every command)."""
    samples = 16 if args.calib_samples is None else args.calib_samples
    return CalibrationSet(args.calib_text, _positive_int("--calib-samples", samples), bos=args.bos)


def _bos_note(bos: bool) -> str:
    return ", each behind BOS" if bos else ""


def _reference_calibration(args: argparse.Namespace) -> CalibrationSet | None:
    """For the PyTorch reference of an export made from a recipe: the calibration windows given on the command
    line, else None (the export's own, as its report records them)."""
    return None if args.calib_text is None and args.calib_samples is None else _calibration(args)


def _eval_onnxruntime(args: argparse.Namespace) -> int:
    """Perplexity of an export folder in ONNX Runtime (the protocol of qexport.eval), with --reference also
    the PyTorch perplexity of the same quantized model."""
    from transformers import AutoTokenizer

    from qexport.eval import perplexity
    from qexport.export import OnnxCausalLM
    from qexport.models import read_text

    if not args.folder:
        raise InvalidConfig("--backend onnxruntime evaluates an export folder: qexport eval --backend onnxruntime DIR")
    tokens = _positive_int("--tokens", args.tokens)
    window = _positive_int("--window", args.window)
    text = read_text(args.text)
    _check_output(args.json, args.force)
    _threads()
    import torch

    lm = OnnxCausalLM(args.folder, threads=torch.get_num_threads())
    try:
        tok = AutoTokenizer.from_pretrained(lm.path, local_files_only=True)
    except Exception as e:
        raise InvalidConfig(f"{args.folder!r} has no tokenizer to evaluate text with: {str(e).splitlines()[0]}") from e
    t0 = time.perf_counter()
    res = perplexity(lm, tok, text, tokens=tokens, window=window, progress=True, desc="ppl onnxruntime",
                     bos=args.bos)
    out = {"folder": str(args.folder), "recipe": lm.report.get("recipe"), "backend": "onnxruntime",
           "ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "window": window, "windows": res.windows,
           "bos": res.bos,
           "eval_s": round(time.perf_counter() - t0, 2), "onnx_bytes": lm.report.get("onnx_bytes"),
           "ort_session_config": lm.session_config}
    print(f"{args.folder}: recipe {out['recipe']}, onnxruntime perplexity {res.ppl:.4f} on {res.tokens} tokens "
          f"({res.windows} windows of {window}{_bos_note(res.bos)})")
    if args.reference:
        from qexport.export.runtime import reference_model

        reference = reference_model(lm.report, lm.path, _reference_calibration(args))
        ref = perplexity(reference, tok, text, tokens=tokens, window=window, progress=True, desc="ppl pytorch",
                         kv_cache=lm.kv_cache, bos=res.bos)
        out.update(torch_ppl=ref.ppl, ppl_ratio=res.ppl / ref.ppl)
        print(f"pytorch perplexity of the same model {ref.ppl:.4f}; onnxruntime / pytorch = "
              f"{res.ppl / ref.ppl:.5f}")
    if args.json:
        _write_json(args.json, out, args.force)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qexport.export import export_onnx

    if _is_saved(args.model):
        if args.recipe or args.kv_cache:
            raise InvalidConfig(f"{args.model!r} is quantized already: export it without --recipe / --kv-cache")
        if args.bos is not None:
            raise InvalidConfig(f"{args.model!r} is quantized already (its calibration windows, BOS or not, are "
                                "recorded in it): export it without --bos / --no-bos")
    elif not args.recipe:
        raise InvalidConfig("--recipe is required (a preset name, a recipe JSON file, or 'fp32'), unless --model is "
                            "a quantized folder (`qexport quantize`)")
    recipe = None if args.recipe in (None, "fp32") and args.kv_cache is None else args.recipe
    if recipe is not None:  # a bad recipe fails before the model loads
        recipe = _with_kv_cache(recipe, args.kv_cache)
    _check_output(args.out, args.force)
    _threads()
    res = export_onnx(args.model, args.out, recipe, target=args.target, force=args.force,
                      calibration=_calibration(args), fuse=args.fuse, ort_accuracy_level=args.ort_accuracy_level,
                      embedding_form=args.embedding_form)
    r = res.report
    quantized = sum(1 for layer in r["layers"] if layer["status"] == "quantized")
    print(f"wrote {res.path}: {', '.join(f'{f} {_mb(n)} MB' for f, n in r['files'].items())}; opset {r['opset']}, "
          f"target {r['target']}; {quantized} layers quantized, {len(r['layers']) - quantized} float "
          f"(see {res.path / 'export_report.json'})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from qexport.export import verify
    from qexport.export.polygraphy_check import check_polygraphy_runners
    from qexport.export.runtime import load_export_report, reference_model

    if args.bos is not None and args.calib_text is None and args.calib_samples is None:
        raise InvalidConfig("verify: --bos / --no-bos shape the calibration windows of the reference given with "
                            "--calib-text / --calib-samples; without them the windows the export records are used")
    _check_output(args.json, args.force)
    _threads()
    report = load_export_report(args.folder)
    session_config = (None if args.ort_accuracy_level is None
                      else {"session.qdq_matmulnbits_accuracy_level": str(args.ort_accuracy_level)})
    if args.polygraphy or args.engine:  # what the comparison needs, before the reference is built
        check_polygraphy_runners(args.engine)
    reference = reference_model(report, Path(args.folder), _reference_calibration(args))  # one for both comparisons
    res = verify(args.folder, reference=reference, decode_steps=_positive_int("--decode-steps", args.decode_steps),
                 session_config=session_config)
    print(f"{args.folder}: onnxruntime vs pytorch on {res['positions']} positions ({res['prefill_tokens']} prefill "
          f"+ {res['decode_steps']} KV-cache steps, batch 2): max abs {res['max_abs']:.3g}, max rel "
          f"{res['max_rel']:.3g}, mean abs {res['mean_abs']:.3g}, top-1 agreement {res['top1_agreement']:.4f}")
    status = 0
    if args.polygraphy or args.engine:
        from qexport.export import compare_runtimes

        pg = compare_runtimes(args.folder, reference=reference, engine=args.engine, decode_steps=args.decode_steps,
                              atol=args.atol, rtol=args.rtol, session_config=session_config)
        res["polygraphy"] = pg
        failed = [f"{runner}:{name}" for runner, outs in pg["outputs"].items()
                  for name, o in outs.items() if not o["passed"]]
        worst = {runner: max(o["max_abs"] for o in outs.values()) for runner, outs in pg["outputs"].items()}
        print(f"polygraphy Comparator ({', '.join(pg['runners'])}; {pg['feeds']} feeds; atol {pg['atol']:g}, rtol "
              f"{pg['rtol']:g}): {'PASSED' if pg['passed'] else 'FAILED'}; max abs "
              + ", ".join(f"{r} {w:.3g}" for r, w in worst.items())
              + (f"; outside tolerance: {', '.join(failed[:8])}{' ...' if len(failed) > 8 else ''}" if failed else ""))
        status = 0 if pg["passed"] else 1
    if args.prompt:
        from transformers import AutoTokenizer

        from qexport.export import OnnxCausalLM

        lm = OnnxCausalLM(args.folder)
        tok = AutoTokenizer.from_pretrained(lm.path, local_files_only=True)
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
        new = lm.generate(ids, max_new_tokens=_positive_int("--max-new-tokens", args.max_new_tokens),
                          eos_token_id=tok.eos_token_id)
        res["generation"] = tok.decode(new, skip_special_tokens=True)
        print(f"greedy generation: {res['generation']!r}")
    if args.json:
        _write_json(args.json, res, args.force)
    return status


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
    import torch

    from qexport.config import load_recipe
    from qexport.models import bundled_text, load_model, read_text

    tokens = _positive_int("--tokens", args.tokens)
    recipes = [load_recipe(r) for r in args.recipes.split(",") if r]
    text_path = args.text or bundled_text("emma")
    text = read_text(text_path)
    _check_output(args.json, args.force)
    _threads()
    t0 = time.perf_counter()
    print(f"qexport demo: {args.model}, perplexity on {Path(text_path).name} ({tokens} tokens, windows of 512), "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    model, tok = load_model(args.model)
    rows = [_measure("fp32", model, tok, text, tokens, 512, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                     bos=args.bos)]
    calibration = CalibrationSet(bos=args.bos)
    for recipe in recipes:
        print(f"  {recipe.name}: {recipe.description or recipe.rules[0].weight.describe()}", file=sys.stderr)
        rows.append(_measure(recipe.name, model, tok, text, tokens, 512, recipe=recipe, prompt=args.prompt,
                             max_new_tokens=args.max_new_tokens, calibration=calibration, bos=args.bos))
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
                                "bos": rows[0]["bos"], "fp_ppl": fp_ppl, "variants": rows}, args.force)
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


def cmd_bench(args: argparse.Namespace) -> int:
    from qexport.bench import parse_variant, run_bench, to_markdown, write_results

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    if args.ppl_tokens < 0:
        raise InvalidConfig(f"--ppl-tokens must be 0 (off) or positive, got {args.ppl_tokens}")
    if args.out:
        for name in ("bench.json", "bench.csv", "bench.md", "bench.png"):
            _check_output(str(Path(args.out) / name), args.force)
    _threads()
    result = run_bench(args.model, variants, _positive_int("--prompt-tokens", args.prompt_tokens),
                       _positive_int("--new-tokens", args.new_tokens), ppl_tokens=args.ppl_tokens,
                       calib_samples=_positive_int("--calib-samples", args.calib_samples),
                       rounds=_positive_int("--rounds", args.rounds), baseline=args.baseline, bos=args.bos)
    print(to_markdown(result))
    if args.out:
        for path in write_results(result, args.out, args.force):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from qexport.algorithms.allocate import Sensitivity, parse_size, plan_allocation, resolve_candidates
    from qexport.config import DEFAULT_EXCLUDE
    from qexport.models import load_model

    if (args.target_bits is None) == (args.target_size is None):
        raise InvalidConfig("give exactly one of --target-bits (bits per weight of the linears) or --target-size")
    target_bytes = parse_size(args.target_size) if args.target_size is not None else None
    candidates = resolve_candidates([c for c in args.candidates.split(",") if c])
    samples = _positive_int("--calib-samples", args.calib_samples)
    seq_len = _positive_int("--seq-len", args.seq_len)
    _check_output(args.out, args.force)
    _threads()
    model, tok = load_model(args.model)
    from qexport.eval import resolve_bos

    bos = resolve_bos(tok, args.bos)
    sens = None
    cache = Path(args.sensitivities) if args.sensitivities else None
    key = {"model": str(args.model), "calib_text": str(args.calib_text), "samples": samples, "seq_len": seq_len,
           "seed": args.seed, "bos": bos}
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(data.get("key"), dict):  # caches from before BOS was recorded: windows without BOS
            data["key"] = {"bos": False, **data["key"]}
        if data.get("key") != key:
            raise InvalidConfig(f"{str(cache)!r} holds sensitivities of another calibration set ({data.get('key')}); "
                                "give another --sensitivities file or remove it")
        sens = Sensitivity.from_dict(data)
        print(f"sensitivities from {cache} ({sens.method})", file=sys.stderr)
    calibration = None
    if sens is None:
        from qexport.algorithms import calibration_tokens
        from qexport.models import bundled_text, read_text

        calibration = calibration_tokens(read_text(args.calib_text or bundled_text("sensesensibility")), tok,
                                         samples=samples, seq_len=seq_len, seed=args.seed, bos=bos)
    plan = plan_allocation(model, calibration, target_bytes=target_bytes, bits_per_weight=args.target_bits,
                           candidates=candidates, method=args.method, exclude=DEFAULT_EXCLUDE,
                           algorithm=args.algorithm, name=args.name, sensitivity=sens, progress=True)
    if cache is not None and sens is None:
        _write_json(str(cache), {**plan.sensitivity.to_dict(), "key": key}, True)
    print(plan.table())
    print(f"sensitivity: {plan.sensitivity.method} on {plan.sensitivity.tokens} calibration tokens, "
          f"{plan.sensitivity.seconds:.0f} s; knapsack {'optimal' if plan.optimal else f'unit {plan.unit} bytes'}")
    plan.recipe.to_json(args.out, overwrite=args.force)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        _write_json(args.json, {**plan.to_dict(), "bos": bos}, args.force)
    return 0


def _bos_option(parser: argparse.ArgumentParser, windows: str) -> None:
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help=f"start every {windows} window with the tokenizer's BOS token (--bos) or not (--no-bos); "
                             "default: as the tokenizer does by default (recorded in the outputs)")


def build_parser() -> argparse.ArgumentParser:
    from qexport.config import KV_CACHE_PRESETS

    p = _Parser(prog="qexport", description="Quantize PyTorch LLMs to 8, 4 and 2 bits and measure them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("eval", help="perplexity and size of one recipe against fp32")
    e.add_argument("--model", default="smollm2", help="'smollm2', a local Hugging Face checkpoint directory, or a "
                                                      "quantized folder (`qexport quantize`; then no --recipe)")
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
    _bos_option(e, "perplexity and calibration")
    e.add_argument("--json", help="also write the results as JSON to this file")
    e.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("quantize", help="quantize a model with a recipe and save the folder (load it anywhere)")
    q.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face checkpoint directory")
    q.add_argument("--recipe", required=True, help="preset name (see `qexport recipes`) or recipe JSON file")
    q.add_argument("--out", required=True, help="folder to write (safetensors, config, tokenizer, recipe, manifest)")
    q.add_argument("--calib-text", help="calibration text for GPTQ / AWQ / SmoothQuant and static recipes "
                                        "(default: bundled Sense and Sensibility)")
    q.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    q.add_argument("--kv-cache", choices=tuple(KV_CACHE_PRESETS), default=None,
                   help="record a quantized KV cache in the recipe (qexport.kvcache)")
    _bos_option(q, "calibration")
    q.add_argument("--layout", choices=("auto", "compressed-tensors", "qexport"), default="auto",
                   help="tensor layout: compressed-tensors where every layer has that form (transformers and vLLM "
                        "load it), else qexport's own (default auto)")
    q.add_argument("--force", action="store_true", help="replace the --out folder if it exists")
    q.set_defaults(func=cmd_quantize)

    d = sub.add_parser("demo", help="fp32 vs w8, w4g128, nf4-dq, w2g64 on SmolLM2: perplexity, size, generation")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--text", help="evaluation text (default: the bundled slice of Emma)")
    d.add_argument("--tokens", type=int, default=8192)
    d.add_argument("--recipes", default=",".join(DEMO_RECIPES), help="comma-separated presets or JSON files")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=24)
    _bos_option(d, "perplexity and calibration")
    d.add_argument("--json", help="also write the results as JSON to this file")
    d.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    d.set_defaults(func=cmd_demo)

    from qexport.bench import DEFAULT_VARIANTS

    b = sub.add_parser("bench", help="speed of variants side by side: compile time, prefill, decode tokens/s")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated: eager-fp32, inductor-fp32, eager:RECIPE, qexport:RECIPE:TARGET, "
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
    b.add_argument("--baseline", help="the variant the summary's ratios are against (default: onnx:fp32, else "
                                      "inductor-fp32, else the first variant)")
    _bos_option(b, "perplexity and calibration")
    b.add_argument("--out", help="folder for bench.json, bench.csv, bench.md (and bench.png with --ppl-tokens)")
    b.add_argument("--force", action="store_true", help="overwrite existing result files")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", help="export a quantized causal LM with KV cache as an ONNX QDQ folder")
    x.add_argument("--model", default="smollm2", help="'smollm2', a local Hugging Face checkpoint directory, or a "
                                                      "quantized folder (`qexport quantize`; then no --recipe)")
    x.add_argument("--recipe", help="preset name or recipe JSON file; 'fp32' for the float baseline; left out when "
                                    "--model is a quantized folder")
    x.add_argument("--format", choices=("onnx",), default="onnx")
    x.add_argument("--out", required=True, help="folder to write (model.onnx, config, tokenizer, recipe, report)")
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
    x.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="ONNX Runtime target: write attention, rotary embeddings and RMSNorm out in elementwise ops "
                        "(opset 21) instead of opset 23's Attention / RotaryEmbedding / RMSNormalization")
    _bos_option(x, "calibration")
    x.add_argument("--force", action="store_true", help="replace the --out folder if it exists")
    x.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="an export folder in ONNX Runtime against the PyTorch reference")
    v.add_argument("folder", help="export folder")
    v.add_argument("--decode-steps", type=int, default=8, help="KV-cache steps after the prefill (default 8)")
    v.add_argument("--prompt", help="also print a greedy generation from the folder for this prompt")
    v.add_argument("--max-new-tokens", type=int, default=24)
    v.add_argument("--calib-text", help="the calibration text the export used (static recipes)")
    v.add_argument("--calib-samples", type=int, default=None,
                   help="with --calib-text: the calibration windows of an export made from a recipe (default: "
                        "those its report records)")
    _bos_option(v, "calibration (with --calib-text / --calib-samples)")
    v.add_argument("--ort-accuracy-level", type=int, choices=(0, 4),
                   help="run ONNX Runtime's MatMulNBits at this accuracy level instead of the folder's (0: float "
                        "activations, the reference's numerics; 4: int8 activations)")
    v.add_argument("--polygraphy", action="store_true",
                   help="also compare PyTorch and ONNX Runtime output by output (logits, present key / values) "
                        "with polygraphy's Comparator; exit status 1 when an element is outside tolerance")
    v.add_argument("--engine", help="a TensorRT engine of this export to add to the polygraphy comparison "
                                    "(needs TensorRT; implies --polygraphy)")
    v.add_argument("--atol", type=float, default=1e-2, help="polygraphy: absolute tolerance (default 0.01)")
    v.add_argument("--rtol", type=float, default=1e-2,
                   help="polygraphy: relative tolerance; an element passes within either (default 0.01)")
    v.add_argument("--json", help="also write the results as JSON to this file")
    v.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    v.set_defaults(func=cmd_verify)

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
    be.add_argument("--force", action="store_true", help="replace --out if it exists")
    be.set_defaults(func=cmd_build_engine)

    al = sub.add_parser("allocate", help="mixed precision: pick a format per linear layer to meet a size target")
    al.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face checkpoint directory")
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
    _bos_option(al, "calibration")
    al.add_argument("--json", help="also write the allocation (per-layer choices, bytes, sensitivities) as JSON")
    al.add_argument("--force", action="store_true", help="overwrite --out / --json if they exist")
    al.set_defaults(func=cmd_allocate)

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
