"""LLM.int8() on SmolLM2: perplexity against fp32 and plain W8A8, and how many input columns are outliers.

    python examples/llm_int8_ppl.py                                   # SmolLM2, 8192 tokens of Emma
    python examples/llm_int8_ppl.py --ppl-thresholds 6,3 --json out.json
    python examples/llm_int8_ppl.py --model DIR --tokens 512          # any local checkpoint

Outlier columns are counted on the float model's linear inputs during its perplexity run, per window of 512
tokens (one forward call, as the decomposition sees them), and averaged over the windows and over the layers
of each kind.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import qexport
from qexport.config import QuantSpec
from qexport.eval import perplexity
from qexport.llm_int8 import counting_outliers
from qexport.models import bundled_text, load_model, read_text
from qexport.presets import PRESETS


def with_threshold(threshold: float) -> qexport.Recipe:
    """The w8a8-llmint8 preset with another outlier threshold."""
    base = PRESETS["w8a8-llmint8"]
    rule = base.rules[0]
    act = QuantSpec.from_dict({**rule.activation.to_dict(), "outlier_threshold": threshold})
    return dataclasses.replace(base, name=f"w8a8-llmint8-t{threshold:g}",
                               rules=(dataclasses.replace(rule, activation=act),))


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--thresholds", type=floats, default=[8.0, 6.0, 4.0, 3.0, 2.0],
                    help="thresholds at which outlier columns are counted")
    ap.add_argument("--ppl-thresholds", type=floats, default=[6.0],
                    help="LLM.int8() thresholds whose perplexity is measured")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    text = read_text(bundled_text("emma"))
    with counting_outliers(model, args.thresholds) as stats:  # counted on the fp32 run's windows
        fp = perplexity(model, tok, text, tokens=args.tokens)
    windows = fp.windows
    fp = fp.ppl
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in stats.calls))  # in model order
    print(f"mean outlier input columns per layer and window of 512 tokens ({windows} windows), fp32 model")
    print(f"{'layer kind':<12} {'K':>5} " + " ".join(f"{'|x|>=' + format(t, 'g'):>9}" for t in args.thresholds))
    for kind in kinds + ["all"]:
        suffix = "" if kind == "all" else "." + kind
        k = "" if kind == "all" else str(next(v for n, v in stats.in_features.items() if n.endswith(suffix)))
        cells = " ".join(f"{stats.mean_over_layers(t, suffix):9.2f}" for t in args.thresholds)
        print(f"{kind:<12} {k:>5} {cells}", flush=True)

    rows = [("fp32", fp)]
    print(f"\n{'variant':<22} {'ppl':>9} {'x fp32':>7}")
    print(f"{'fp32':<22} {fp:9.3f} {1:7.3f}", flush=True)
    thresholds = [with_threshold(t) for t in args.ppl_thresholds]
    for recipe in thresholds[:1] + ["w8a8-dynamic"] + thresholds[1:]:
        q = qexport.quantize(copy.deepcopy(model), recipe)
        ppl = perplexity(q, tok, text, tokens=args.tokens).ppl
        name = recipe if isinstance(recipe, str) else recipe.name
        rows.append((name, ppl))
        print(f"{name:<22} {ppl:9.3f} {ppl / fp:7.3f}", flush=True)
        if args.json:  # after every variant: a long run that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps({"model": args.model, "tokens": args.tokens,
                                                   "perplexity": dict(rows), "outliers": stats.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
