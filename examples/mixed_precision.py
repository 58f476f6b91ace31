"""Quantize SmolLM2 with a hand-written mixed-precision recipe and compare it with a uniform preset.

    python examples/mixed_precision.py                 # SmolLM2, 2048 tokens of Emma
    python examples/mixed_precision.py --model DIR --tokens 512

Attention projections are sensitive and small in this model, so they get int8; the MLPs, which hold
most of the weights, get int4 in groups of 64; the first and last blocks stay at int8.
"""

from __future__ import annotations

import argparse
import copy

import qexport
from qexport import QuantSpec, Recipe, Rule
from qexport.eval import perplexity
from qexport.models import bundled_text, load_model, read_text

INT8 = QuantSpec(bits=8)
INT4_G64 = QuantSpec(bits=4, group_size=64, symmetric=False)

MIXED = Recipe(
    name="attn8-mlp4g64",
    description="int8 attention and outer blocks, int4 g64 MLPs",
    rules=(
        Rule("re:model\\.layers\\.(0|29)\\..*", INT8),
        Rule("*.self_attn.*", INT8),
        Rule("*.mlp.*", INT4_G64),
    ),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    text = read_text(bundled_text("emma"))
    fp = perplexity(model, tok, text, tokens=args.tokens).ppl
    print(f"{'variant':<16} {'ppl':>9} {'x fp32':>7} {'bits/w':>7}")
    print(f"{'fp32':<16} {fp:9.3f} {1:7.3f} {32:7.2f}")
    for recipe in (MIXED, "w4g64", "w8"):
        q = qexport.quantize(copy.deepcopy(model), recipe)
        ppl = perplexity(q, tok, text, tokens=args.tokens).ppl
        size = qexport.model_size(q)
        name = recipe if isinstance(recipe, str) else recipe.name
        print(f"{name:<16} {ppl:9.3f} {ppl / fp:7.3f} {size.bits_per_weight:7.2f}")


if __name__ == "__main__":
    main()
