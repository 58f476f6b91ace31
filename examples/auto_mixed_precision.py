"""Automatic mixed precision against uniform round-to-nearest recipes of the same size.

    python examples/auto_mixed_precision.py                          # SmolLM2, 8192 tokens of Emma
    python examples/auto_mixed_precision.py --sensitivities sens.json  # measure once, reuse afterwards
    python examples/auto_mixed_precision.py --model DIR --tokens 512

Sensitivities (diagonal-Fisher estimate of each layer's loss increase in each format) are measured on
windows of Sense and Sensibility; for each uniform preset in --targets (w2g64, w4g128, w4g64) the allocator
gets the same byte budget for the linears, and for each number that many bits per weight (3.0).
Perplexity on Emma.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import qexport
from qexport.algorithms import calibration_tokens
from qexport.algorithms.allocate import Sensitivity, measure_sensitivity, plan_allocation
from qexport.eval import perplexity
from qexport.models import bundled_text, load_model, read_text

TARGETS = "w2g64,3.0,w4g128,w4g64"  # a preset: the same bytes as that uniform recipe; a number: bits per weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192, help="Emma tokens for perplexity")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sensitivities", help="JSON file: read if it exists, else written after measuring")
    ap.add_argument("--fp32-ppl", type=float, help="skip the fp32 evaluation and use this perplexity")
    ap.add_argument("--targets", default=TARGETS, help=f"comma-separated presets (same size) or bits per weight "
                                                        f"(default {TARGETS})")
    ap.add_argument("--auto-only", action="store_true", help="evaluate only the allocated recipes (the uniform "
                                                             "presets' sizes are still measured)")
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    text = read_text(bundled_text("emma"))
    cache = Path(args.sensitivities) if args.sensitivities else None
    if cache is not None and cache.is_file():
        sens = Sensitivity.from_json(cache)
    else:
        calib = calibration_tokens(read_text(bundled_text("sensesensibility")), tok, samples=args.calib_samples,
                                   seq_len=args.seq_len, seed=0)
        sens = measure_sensitivity(model, calib)
        if cache is not None:
            sens.to_json(cache)
    print(f"sensitivity: {sens.method} on {sens.tokens} calibration tokens in {sens.seconds:.0f} s")

    fp = args.fp32_ppl or perplexity(model, tok, text, tokens=args.tokens).ppl
    rows = [{"variant": "fp32", "bits_per_weight": 32.0, "linear_bytes": None, "ppl": fp}]

    def measure(name: str, recipe, plan=None) -> None:
        q = qexport.quantize(copy.deepcopy(model), recipe)
        size = qexport.model_size(q)
        if plan is not None:
            assert size.quantized_bytes == plan.total_bytes  # the allocator's byte accounting is exact
        row = {"variant": name, "bits_per_weight": size.bits_per_weight, "linear_bytes": size.quantized_bytes,
               "ppl": perplexity(q, tok, text, tokens=args.tokens).ppl}
        if plan is not None:
            row["formats"] = plan.counts()
            row["predicted_loss_increase"] = plan.predicted_loss_increase
        rows.append(row)
        print(f"  {name:<22} {row['bits_per_weight']:6.3f} bits/w  ppl {row['ppl']:.3f}  {row.get('formats', '')}",
              flush=True)

    for target in [t for t in args.targets.split(",") if t]:
        try:
            bits = float(target)
        except ValueError:
            bits = None
        if bits is None:
            if args.auto_only:
                size = qexport.model_size(qexport.quantize(copy.deepcopy(model), target))
                print(f"  {target:<22} {size.bits_per_weight:6.3f} bits/w  (not evaluated)", flush=True)
                budget = size.quantized_bytes
            else:
                measure(target, target)
                budget = rows[-1]["linear_bytes"]
            plan = plan_allocation(model, target_bytes=budget, sensitivity=sens)
            measure(f"auto @ {target} size", plan.recipe, plan)
        else:
            plan = plan_allocation(model, bits_per_weight=bits, sensitivity=sens)
            measure(f"auto @ {bits} bits/w", plan.recipe, plan)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rows": rows},
                                                  indent=2))

    print(f"\n{'variant':<22} {'bits/w':>7} {'linears MB':>10} {'ppl':>9} {'x fp32':>7}  formats")
    for r in rows:
        mb = f"{r['linear_bytes'] / 1e6:.2f}" if r["linear_bytes"] else "-"
        formats = ", ".join(f"{k} x{v}" for k, v in r.get("formats", {}).items())
        print(f"{r['variant']:<22} {r['bits_per_weight']:7.3f} {mb:>10} {r['ppl']:9.3f} {r['ppl'] / fp:7.3f}  {formats}")


if __name__ == "__main__":
    main()
