"""Streamed quantization against depth: peak memory and time of `qexport quantize --stream` on the same random
Llama at several depths (and, for the shallowest, of quantizing in memory), each in a fresh child process.

    python examples/stream_bench.py --layers 6,12,24 --workdir /tmp/stream --out stream.json --md stream.md
    python examples/stream_bench.py --model DIR          # one checkpoint folder of your own instead

The model is TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads of 64, 4 KV heads, vocabulary 32000) with
random weights, written as bf16 safetensors (:func:`qexport.stream.write_random_llama`); at 24 layers it has
1.2B parameters, 4.8 GB in float32. Peak RSS is the child's own (``getrusage``), everything included: Python,
torch, transformers, the tensors. The CPU's features are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    folder, recipe, out, how = sys.argv[1:5]
    t0 = time.perf_counter()
    if how == "stream":
        from qexport.stream import quantize_streamed
        quantize_streamed(folder, recipe, out)
    else:
        import torch
        from transformers import AutoModelForCausalLM
        from qexport.checkpoint import save_quantized
        from qexport.prepare import quantize_model
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # as load_model, no tokenizer
        save_quantized(quantize_model(model, recipe), out)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def _run(folder: Path, recipe: str, out: Path, how: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), recipe, str(out), how], capture_output=True,
                       text=True)
    if p.returncode:
        raise SystemExit(f"quantizing {folder} ({how}) failed: {p.stderr.strip().splitlines()[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a checkpoint folder to quantize instead of the random models")
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)  # the examples' common flag: not used here
    p.add_argument("--layers", default="6,12,24", help="depths of the random model (default 6,12,24)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--recipe", default="w4g128", help="a round-to-nearest recipe (default w4g128)")
    p.add_argument("--no-in-memory", dest="in_memory", action="store_false",
                   help="skip quantizing the shallowest model in memory")
    p.add_argument("--workdir", help="keep the checkpoints and outputs here (default: a temporary folder)")
    p.add_argument("--out", help="JSON results")
    p.add_argument("--md", help="Markdown table")
    args = p.parse_args(argv)

    from qexport._safetensors import SafetensorsFolder
    from qexport.bench import cpu_features
    from qexport.stream import write_random_llama

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qexport-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    if args.model:
        cases.append((Path(args.model).name, Path(args.model)))
    else:
        for n in (int(x) for x in args.layers.split(",")):
            folder = work / f"llama-{n}L"
            if not (folder / "model.safetensors").is_file():
                write_random_llama(folder, n, args.hidden, args.intermediate, args.vocab)
            cases.append((f"{n} layers", folder))
    rows = []
    for i, (name, folder) in enumerate(cases):
        src = SafetensorsFolder(folder)
        params = sum(math.prod(src.shape(t)) for t in src.names)
        hows = ["stream"] + (["memory"] if args.in_memory and i == 0 else [])
        for how in hows:
            r = _run(folder, args.recipe, work / f"q-{folder.name}-{how}", how)
            rows.append({"model": name, "how": how, "params": params, "fp32_bytes": 4 * params, **r,
                         "peak_vs_fp32": r["peak_rss"] / (4 * params)})
            print(json.dumps(rows[-1]), flush=True)
    cpu = cpu_features()
    lines = [f"CPU: {cpu['name']}; features: {', '.join(cpu['features']) or 'none listed'}; recipe {args.recipe}", "",
             "| model | quantized | parameters | fp32 MB | peak RSS MB | peak / fp32 | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'streamed' if r['how'] == 'stream' else 'in memory'} | "
                     f"{r['params'] / 1e9:.3f}B | {r['fp32_bytes'] / 1e6:.0f} | {r['peak_rss'] / 1e6:.0f} | "
                     f"{r['peak_vs_fp32']:.2f} | {r['seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu, "recipe": args.recipe, "rows": rows}, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
