"""Quantize once, save, load anywhere: each recipe saved with ``qexport quantize``'s code path, then

- perplexity of the folder loaded by qexport (``load_quantized``), which must equal that of the model before
  saving (the same logits, bit for bit);
- perplexity of the same folder loaded by transformers with compressed-tensors, where the folder has that form;
- the extra peak memory (RSS) of loading the folder in a fresh process that has imported qexport and
  transformers, against the folder's tensor bytes: right after ``load_quantized``, and after every tensor of
  the model has been read once (the files are memory-mapped, so pages become resident as they are read).

    python examples/checkpoint_interop.py --recipes w4g128,w4g64-sym,w8 --out results/interop.json

Perplexity follows ``qexport eval``'s protocol (``qexport.eval.perplexity``: the first ``--tokens`` tokens of
*Emma*, windows of 512). Prints the CPU's model name and flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qexport
from qexport.checkpoint import load_quantized, read_manifest, save_quantized
from qexport.eval import perplexity
from qexport.models import bundled_text, load_model, read_text
from qexport.prepare import CalibrationSet, quantize_model

# Peak RSS (kB) after the imports, after load_quantized, and after every tensor of the model has been read once
# (safetensors maps the files: a loaded tensor's pages are resident only once something reads them).
RSS_PROBE = """
import json, resource, sys
import torch
import qexport, transformers, qexport.checkpoint, compressed_tensors, safetensors.torch
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = peak()
model = qexport.checkpoint.load_quantized(sys.argv[1])
loaded = peak()
for t in [*model.parameters(), *model.buffers()]:
    t.float().sum()
print(json.dumps({"base": base, "loaded": loaded, "touched": peak()}))
"""


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"CPU: {name} | flags: {' '.join(shown) or 'none of avx2/avx512'} | threads {torch.get_num_threads()}"


def transformers_ppl(folder: Path, tok, text: str, tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")  # float32, as config.json says
    model.eval()
    return perplexity(model, tok, text, tokens=tokens).ppl


def load_rss_kb(folder: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--recipes", default="w4g128,w4g64-sym,w8")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--workdir", help="where the folders are saved (default: a temporary folder)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    print(cpu_line())
    text = read_text(bundled_text("emma"))
    model, tok = load_model(args.model)
    rows = [{"recipe": "fp32", "qexport_ppl": perplexity(model, tok, text, tokens=args.tokens).ppl}]
    with tempfile.TemporaryDirectory(prefix="qexport-interop-") as tmp:
        work = Path(args.workdir or tmp)
        for name in [r for r in args.recipes.split(",") if r]:
            qmodel = quantize_model(load_model(args.model)[0], name, tok, CalibrationSet())
            before = perplexity(qmodel, tok, text, tokens=args.tokens).ppl
            t0 = time.perf_counter()
            saved = save_quantized(qmodel, work / name, tok, force=True, provenance={"source_model": args.model})
            save_s = time.perf_counter() - t0
            del qmodel
            t0 = time.perf_counter()
            loaded = load_quantized(saved.path)
            load_s = time.perf_counter() - t0
            row = {"recipe": name, "layout": saved.layout, "ppl_before_save": before,
                   "qexport_ppl": perplexity(loaded, tok, text, tokens=args.tokens).ppl, "save_s": round(save_s, 2),
                   "load_s": round(load_s, 2), "folder_bytes": saved.bytes,
                   "tensor_bytes": sum(n for f, n in saved.files.items() if f.endswith(".safetensors")),
                   "engines": read_manifest(saved.path)["engines"]}
            del loaded
            if row["engines"]["transformers"].startswith("loads"):
                row["transformers_ppl"] = transformers_ppl(saved.path, tok, text, args.tokens)
                row["transformers_vs_qexport"] = row["transformers_ppl"] / row["qexport_ppl"] - 1
            rss = load_rss_kb(saved.path)
            row["load_extra_peak_rss_bytes"] = (rss["loaded"] - rss["base"]) * 1024
            row["touched_extra_peak_rss_bytes"] = (rss["touched"] - rss["base"]) * 1024
            row["load_rss_vs_tensor_bytes"] = row["touched_extra_peak_rss_bytes"] / row["tensor_bytes"]
            rows.append(row)
    print(f"{'recipe':<12} {'layout':<18} {'ppl (saved)':>12} {'ppl (loaded)':>12} {'transformers':>12} "
          f"{'tensors MB':>10} {'RSS x':>6}")
    for r in rows:
        hf = f"{r['transformers_ppl']:.4f}" if "transformers_ppl" in r else "-"
        print(f"{r['recipe']:<12} {r.get('layout', '-'):<18} {r.get('ppl_before_save', r['qexport_ppl']):>12.4f} "
              f"{r['qexport_ppl']:>12.4f} {hf:>12} "
              f"{(r['tensor_bytes'] / 1e6 if 'tensor_bytes' in r else 0):>10.1f} "
              f"{r.get('load_rss_vs_tensor_bytes', 0):>6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu_line(), "model": args.model, "tokens": args.tokens,
                                              "qexport": qexport.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
