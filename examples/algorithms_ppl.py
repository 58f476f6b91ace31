"""Perplexity of RTN, GPTQ and AWQ at int4 g128 on SmolLM2 (or any local checkpoint), side by side.

    python examples/algorithms_ppl.py                       # SmolLM2, 64 x 512 calibration tokens, Emma 8192 tokens
    python examples/algorithms_ppl.py --samples 32 --seq-len 512 --tokens 2048
    python examples/algorithms_ppl.py --model DIR --tokens 512

Calibration samples are drawn (with ``--seed``) from the bundled *Sense and Sensibility* slice; perplexity
is measured on the bundled *Emma* slice with qexport's protocol (windows of 512), so calibration never sees
evaluation text. Each variant starts from a fresh copy of the float model.
"""

from __future__ import annotations

import argparse
import copy
import time

import qexport
from qexport.algorithms import calibration_tokens
from qexport.eval import perplexity
from qexport.models import bundled_text, read_text

from _common import model_and_emma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens of Emma (default 8192)")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    ap.add_argument("--recipes", default="w4g128,w4g128-gptq,w4g128-awq", help="comma-separated presets")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    model, tok, text = model_and_emma(args.model, args.threads)
    calib = calibration_tokens(read_text(bundled_text("sensesensibility")), tok, samples=args.samples,
                               seq_len=args.seq_len, seed=args.seed)
    print(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens of sensesensibility (seed {args.seed}); "
          f"evaluation: first {args.tokens} tokens of emma, windows of 512", flush=True)
    fp = perplexity(model, tok, text, tokens=args.tokens).ppl
    print(f"{'variant':<14} {'ppl':>9} {'x fp32':>7} {'quantize s':>11}")
    print(f"{'fp32':<14} {fp:9.3f} {1:7.3f} {'-':>11}", flush=True)
    for name in [r for r in args.recipes.split(",") if r]:
        recipe = qexport.load_recipe(name)
        t0 = time.perf_counter()
        q = qexport.quantize(copy.deepcopy(model), recipe,
                             calibration=calib if recipe.algorithm_needs_data else None)
        seconds = time.perf_counter() - t0
        ppl = perplexity(q, tok, text, tokens=args.tokens).ppl
        print(f"{name:<14} {ppl:9.3f} {ppl / fp:7.3f} {seconds:11.1f}", flush=True)


if __name__ == "__main__":
    main()
