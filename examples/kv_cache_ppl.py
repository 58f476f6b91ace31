"""Perplexity cost of a quantized KV cache (int8, int4) on SmolLM2 (or any local checkpoint) at a long context.

    python examples/kv_cache_ppl.py                     # SmolLM2, Emma 8192 tokens in windows of 2048
    python examples/kv_cache_ppl.py --kv int8,int4,int4-g64 --weights fp32 --tokens 4096
    python examples/kv_cache_ppl.py --model DIR --tokens 512

Protocol (``qexport.eval.perplexity`` with ``kv_cache=``): the first ``--tokens`` tokens of the bundled *Emma*
slice, non-overlapping windows of ``--window`` tokens; each window is one prefill into a fresh quantized
cache, so every token attends to the quantized keys and values of all earlier tokens of its window (and of
itself), exactly as when decoding token by token. Each weight recipe (``fp32`` or a preset) is run with a
float cache and with each ``--kv`` format.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import qexport
from qexport.eval import perplexity
from qexport.export.onnx import kv_geometry
from qexport.presets import KV_CACHE_PRESETS

from _common import model_and_emma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens of Emma (default 8192)")
    ap.add_argument("--window", type=int, default=2048, help="window length (default 2048)")
    ap.add_argument("--kv", default="int8,int4", help=f"KV formats, comma-separated ({', '.join(KV_CACHE_PRESETS)})")
    ap.add_argument("--weights", default="fp32,w4g128", help="'fp32' and/or weight presets, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    model, tok, text = model_and_emma(args.model, args.threads)
    window = min(args.window, args.tokens)
    kv_names = [k for k in args.kv.split(",") if k]
    head_dim = kv_geometry(model.config)[2]
    specs = {}
    for name in kv_names:  # a format whose groups do not fit this model's heads gets one group per head
        spec = KV_CACHE_PRESETS[name]
        if spec.group_size is not None and head_dim % spec.group_size:
            print(f"kv {name}: groups of {spec.group_size} do not divide head_dim {head_dim}; one group per head")
            spec = dataclasses.replace(spec, group_size=None)
        specs[name] = spec
    rows = []
    base = None
    print(f"{'weights':<10} {'kv cache':<26} {'ppl':>9} {'vs fp32':>8}")
    for weights in [w for w in args.weights.split(",") if w]:
        m = model if weights == "fp32" else qexport.quantize(copy.deepcopy(model), weights)
        for kv in [None, *kv_names]:
            t0 = time.perf_counter()
            res = perplexity(m, tok, text, tokens=args.tokens, window=window, kv_cache=specs.get(kv),
                             desc=f"{weights} {kv or 'float'}")
            base = base or res.ppl
            desc = specs[kv].describe() if kv else "float"
            rows.append((weights, desc, res.ppl))
            print(f"{weights:<10} {desc:<26} {res.ppl:9.3f} {res.ppl / base:7.4f}x   "
                  f"({res.tokens} tokens, {res.windows} windows of {window}, {time.perf_counter() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
