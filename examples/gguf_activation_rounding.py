"""Where llama.cpp's perplexity on a qexport GGUF file parts from the eager model's: its 8-bit activations.

    python examples/gguf_activation_rounding.py --recipe gguf-q2_k
    python examples/gguf_activation_rounding.py --recipe gguf-q4_k --tokens 4096

Needs llama-cpp-python (docs/gguf.md). The file's weights read back bit-identical to the eager model's, yet
llama.cpp's perplexity is higher: its CPU matmuls round each row of activations to 8 bits before the dot
product with quantized weights (the weight type's ``vec_dot_type``: ``q8_K``, blocks of 256 with scale
``-127 / max``, for the K-quants; ``q8_0``, blocks of 32 with an fp16 scale ``amax / 127``, for ``q4_0``,
``q5_0``, ``iq4_nl`` and ``q8_0``). This script measures three perplexities with qexport's protocol on the
first ``--tokens`` tokens of *Emma*: the eager model, the eager model with every quantized linear's input
rounded that way, and llama.cpp on the exported file. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

NEEDS_LLAMA_CPP = True
K_QUANTS = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}


def round_like_llama_cpp(x: torch.Tensor, block: int, k_quant: bool) -> torch.Tensor:
    """``x`` rounded to 8 bits per ``block`` values of its last dimension as llama.cpp's reference
    ``quantize_row_q8_K`` (``k_quant``) or ``quantize_row_q8_0`` does, and dequantized."""
    xb = x.float().reshape(-1, block)
    if k_quant:
        signed_max = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        iscale = torch.where(signed_max != 0, -127.0 / signed_max, torch.zeros_like(signed_max))
        q = torch.clamp(torch.round(iscale * xb), max=127)
        d = torch.where(signed_max != 0, 1 / iscale, torch.zeros_like(signed_max))
    else:
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.round(xb * torch.where(d != 0, 1 / d, torch.zeros_like(d)))
        d = d.half().float()  # stored as fp16
    return (q * d).reshape(x.shape).to(x.dtype)


def main() -> int:
    from qexport.bench import cpu_features
    from qexport.eval import perplexity
    from qexport.export.gguf import export_gguf
    from qexport.export.llamacpp import LlamaCppLM
    from qexport.models import bundled_text, load_model, read_text
    from qexport.modules import QLinear
    from qexport.prepare import CalibrationSet, quantize_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipe", default="gguf-q2_k")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        print("needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp; docs/gguf.md)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    text = read_text(bundled_text("emma"))
    from qexport.config import load_recipe

    calib = CalibrationSet(samples=args.calib_samples) if load_recipe(args.recipe).needs_data else None
    qmodel = quantize_model(model, args.recipe, tok, calib)
    row = {"recipe": args.recipe, "tokens": args.tokens, "cpu": cpu_features()}
    t0 = time.perf_counter()
    row["eager"] = perplexity(qmodel, tok, text, tokens=args.tokens).ppl
    hooks = []
    for mod in qmodel.modules():
        if isinstance(mod, QLinear):
            k_quant = mod.spec.format.value in K_QUANTS
            block = 256 if k_quant else 32
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, block=block, k=k_quant: (round_like_llama_cpp(a[0], block, k), *a[1:])))
    row["eager_8bit_activations"] = perplexity(qmodel, tok, text, tokens=args.tokens).ppl
    for h in hooks:
        h.remove()
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "model.gguf"
        export_gguf(qmodel, path, tokenizer=tok)
        row["llama_cpp"] = perplexity(LlamaCppLM(path, n_ctx=2048, threads=args.threads), tok, text,
                                      tokens=args.tokens).ppl
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
