"""qexport's GGUF files against llama.cpp's own quantizer, in llama.cpp: perplexity, file size, decode speed.

    python examples/gguf_bench.py --out gguf-bench.json --md gguf-bench.md
    python examples/gguf_bench.py --llama q4_k_m,q2_k --qexport gguf-q4_k,gguf-q4_k-gptq --tokens 4096

Needs llama-cpp-python (``pip install llama-cpp-python``: it builds llama.cpp from source; docs/gguf.md).

1. qexport writes SmolLM2 as an all-f32 GGUF file (``export_gguf(recipe=None, float_type='f32')``), and
   llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) makes each ``--llama``
   file type from it, with its own per-tensor choices (a wider type for some layers, fallbacks where a row is
   not a multiple of 256).
2. qexport quantizes with each ``--qexport`` recipe (GPTQ on ``--calib-samples`` windows of the bundled
   *Sense and Sensibility*), measures the eager model's perplexity, and writes the GGUF file.
3. llama.cpp runs every file: perplexity on the first ``--tokens`` tokens of *Emma* with qexport's protocol
   (:func:`qexport.eval.perplexity`: the same windows and token ids, llama.cpp's logits for every position),
   decode tokens/s (``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt; median of 3), and, for
   qexport's files, how many of the first 16 greedy tokens match the eager model's.

Every number comes from this run on this machine; the CPU's flags are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

NEEDS_LLAMA_CPP = True
LLAMA_TYPES = "q8_0,q4_0,q4_k_s,q4_k_m,q2_k"
QEXPORT_RECIPES = "gguf-q8_0,gguf-q4_0,gguf-q4_k,gguf-q4_k-gptq,gguf-q2_k-mix,gguf-q2_k-mix-gptq"


def _types(path: Path) -> dict[str, int]:
    """Parameters per tensor type in a GGUF file."""
    import gguf
    import numpy as np

    out: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        out[t.tensor_type.name.lower()] = out.get(t.tensor_type.name.lower(), 0) + int(np.prod(t.shape))
    return out


def _run(path: Path, tok, text: str, args, bos: bool, prompt: list[int], eager_tokens: list[int] | None) -> dict:
    from qexport.eval import perplexity
    from qexport.export.llamacpp import LlamaCppLM

    lm = LlamaCppLM(path, n_ctx=512, threads=args.threads)
    t0 = time.perf_counter()
    ppl = perplexity(lm, tok, text, tokens=args.tokens, bos=bos).ppl
    row = {"file": path.name, "bytes": path.stat().st_size, "ppl": ppl, "ppl_s": round(time.perf_counter() - t0, 1),
           "decode_tok_s": statistics.median(lm.decode_speed(prompt, args.new_tokens) for _ in range(3))}
    types = _types(path)
    total = sum(types.values())
    row["bits_per_weight"] = 8 * row["bytes"] / total
    row["types"] = {k: round(v / total, 3) for k, v in sorted(types.items(), key=lambda kv: -kv[1])}
    if eager_tokens is not None:
        got = lm.greedy(prompt, len(eager_tokens))
        row["greedy_match"] = next((i for i, (a, b) in enumerate(zip(got, eager_tokens)) if a != b), len(got))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (default) or a checkpoint folder")
    p.add_argument("--llama", default=LLAMA_TYPES, help=f"llama.cpp file types (default {LLAMA_TYPES})")
    p.add_argument("--qexport", default=QEXPORT_RECIPES, help=f"qexport recipes (default {QEXPORT_RECIPES})")
    p.add_argument("--tokens", type=int, default=8192, help="perplexity tokens of Emma (default 8192)")
    p.add_argument("--calib-samples", type=int, default=64, help="GPTQ calibration windows of 512 (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="keep the GGUF files here (default: a temporary folder)")
    p.add_argument("--out", help="JSON results")
    p.add_argument("--md", help="Markdown table")
    args = p.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp; docs/gguf.md)", file=sys.stderr)
        return 2
    for path in (args.out, args.md):
        if path and Path(path).exists():
            print(f"{path!r} exists; choose another name", file=sys.stderr)
            return 2
    import torch

    from qexport.bench import cpu_features
    from qexport.eval import perplexity, resolve_bos, tokenize
    from qexport.export.gguf import export_gguf
    from qexport.export.llamacpp import llama_quantize
    from qexport.models import bundled_text, load_model, read_text
    from qexport.prepare import CalibrationSet, quantize_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    text = read_text(bundled_text("emma"))
    bos = resolve_bos(tok, None)
    prompt = tokenize(tok, text)[: args.prompt_tokens].tolist()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    f32 = work / "model-f32.gguf"
    if not f32.exists():
        export_gguf(args.model, f32, None, float_type="f32")
    for ftype in filter(None, args.llama.split(",")):
        path = work / f"llama-{ftype}.gguf"
        t0 = time.perf_counter()
        if not path.exists():
            llama_quantize(f32, path, ftype, threads=args.threads)
        row = {"variant": f"llama.cpp {ftype}", "quantize_s": round(time.perf_counter() - t0, 1)}
        row.update(_run(path, tok, text, args, bos, prompt, None))
        rows.append(row)
        print(json.dumps(row), flush=True)
    for recipe in filter(None, args.qexport.split(",")):
        import copy

        from qexport.config import load_recipe

        calib = CalibrationSet(samples=args.calib_samples) if load_recipe(recipe).needs_data else None
        t0 = time.perf_counter()
        qmodel = quantize_model(copy.deepcopy(model), recipe, tok, calib)
        row = {"variant": f"qexport {recipe}", "quantize_s": round(time.perf_counter() - t0, 1)}
        with torch.no_grad():
            row["eager_ppl"] = perplexity(qmodel, tok, text, tokens=args.tokens, bos=bos).ppl
            eager = qmodel.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                    pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        path = work / f"qexport-{recipe}.gguf"
        export_gguf(qmodel, path, tokenizer=tok, force=True)
        row.update(_run(path, tok, text, args, bos, prompt, eager))
        row["ppl_vs_eager"] = row["ppl"] / row["eager_ppl"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "tokens": args.tokens, "threads": args.threads, "cpu": cpu_features(),
              "machine": platform.processor() or platform.machine(), "calib_samples": args.calib_samples,
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    md = [f"{args.model}, perplexity on {args.tokens} tokens of Emma in llama.cpp, {args.threads} threads; "
          f"CPU {result['cpu']['name']}: {', '.join(result['cpu']['features'])}", "",
          "| variant | file MB | bits/weight | tensor types (share of weights) | ppl (llama.cpp) | eager ppl | "
          "decode tok/s |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        types = ", ".join(f"{k} {v:.0%}" for k, v in r["types"].items() if v >= 0.01)
        md.append(f"| {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | {types} | "
                  f"{r['ppl']:.3f} | {r.get('eager_ppl', float('nan')):.3f} | {r['decode_tok_s']:.1f} |")
    print("\n".join(md))
    if args.md:
        Path(args.md).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
