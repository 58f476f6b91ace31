"""Time the inductor target's CPU integer kernels against a float linear, layer by layer.

    python examples/cpu_kernels_bench.py                       # SmolLM2-135M's linear shapes, M = 1 and 128
    python examples/cpu_kernels_bench.py --model DIR --tokens 512 --out cpu-kernels.json

For every linear shape of the model (q/o, k/v, gate/up, down, lm_head) and M = 1 (decode) and M = --tokens
(prefill, at most 128 by default), it times (median of repeated calls, 2 threads unless QEXPORT_THREADS says):

* ``fp32``: ``F.linear`` with the float weight, what inductor runs for a float layer;
* ``reference w4g128``: what the quantized op ran before: dequantize the stored weight, then ``F.linear``;
* ``int8``, ``int4 g128``, ``int2 g64``: ``qexport.kernels.cpu`` on the repacked weight (bfloat16 activations);
* ``w8a8``: per-token int8 quantization of the input, then the ``torch._int_mm`` kernel;
* ``int4 g128, fp32 input``: the int4 kernel given float32 activations and scales, the path it was not chosen for.

A small layer's weight stays in the CPU's caches between calls here, while a decode step streams every weight
from memory once, so these are per-kernel costs, not a prediction of tokens/s (``qexport bench`` measures that).
Prints the CPU's features; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _common import model_config, output_exists
from qexport import QuantSpec
from qexport._io import atomic_write_text
from qexport.bench import cpu_features
from qexport.formats import quantize_weight
from qexport.kernels import cpu, reference
from qexport.ops import per_token_int8

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152}
FORMATS = {"int8": QuantSpec(bits=8, granularity="per_channel", symmetric=True),
           "int4 g128": QuantSpec(bits=4, group_size=128, symmetric=False),
           "int2 g64": QuantSpec(bits=2, group_size=64, symmetric=False)}


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """layer -> (in_features K, out_features N)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads) * cfg.get("head_dim", h // heads)
    return {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, cfg["intermediate_size"]),
            "down": (cfg["intermediate_size"], h), "lm_head": (h, cfg["vocab_size"])}


def timed(fn, seconds: float = 0.3) -> float:
    """Median microseconds per call over batches of calls filling about ``seconds``."""
    for _ in range(3):
        fn()
    batches = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(batches) < 3:
        t0, n = time.perf_counter(), 0
        while n < 5:
            fn()
            n += 1
        batches.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a checkpoint directory (its config.json)")
    ap.add_argument("--tokens", type=int, default=128, help="M of the prefill rows (default 128)")
    ap.add_argument("--out", help="JSON file for the results (never overwritten)")
    args = ap.parse_args()
    cfg = model_config(args.model, SMOLLM2)
    if cfg is None or output_exists(args.out, "--out"):
        return 2
    torch.set_num_threads(int(os.environ.get("QEXPORT_THREADS", "2")))
    features = cpu_features()
    print(f"CPU: {features['name']}; features: {', '.join(features['features'])}; "
          f"torch kernels: {features['torch_capability']}; {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layer, (k, n) in shapes(cfg).items():
        w = torch.randn(n, k, generator=gen) * 0.05
        stored = {}  # format -> the stored tensors and format arguments, as qexport::qlinear takes them
        for name, spec in FORMATS.items():
            qw = quantize_weight(w, spec)
            stored[name] = (qw.qdata, qw.scale, qw.zero_point, "int", spec.bits, qw.group, k, spec.symmetric)
        packed = {name: (cpu.pack_int8 if a[4] == 8 else cpu.pack_int4)(*a) for name, a in stored.items()}
        a8 = cpu.pack_int8_int8(stored["int8"][0], stored["int8"][1], 0)
        ref4 = stored["int4 g128"]
        for m in sorted({1, max(1, min(args.tokens, 128))}):
            x = torch.randn(m, k, generator=gen)
            times = {"fp32": timed(lambda: F.linear(x, w)),
                     "reference w4g128": timed(lambda: reference.qlinear(x, *ref4[:3], None, *ref4[3:]))}
            for name, p in packed.items():
                times[name] = timed(lambda p=p: cpu.run(p, (x,), None))
            times["w8a8"] = timed(lambda: cpu.run(a8, per_token_int8(x), None))
            p4 = packed["int4 g128"]  # the same kernel fed float32 (its scalar path): why activations are bf16
            sz32 = p4.tensors["scales_zeros"].float()
            x32 = x if p4.args[2] == k else F.pad(x, (0, p4.args[2] - k))
            times["int4 g128, fp32 input"] = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x32, p4.tensors["packed"], p4.args[0], sz32))
            rows.append({"layer": layer, "K": k, "N": n, "M": m, "us": times})
            print(f"{layer:8s} {k:>5}x{n:<6} M={m:<4} " + "  ".join(
                f"{name} {t:8.1f}us ({times['fp32'] / t:4.2f}x)" for name, t in times.items()), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"cpu": features, "threads": torch.get_num_threads(), "rows": rows},
                                               indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
