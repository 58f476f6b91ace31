"""Decode speed of an export folder in qexport's ONNX Runtime loop (OnnxCausalLM) and in onnxruntime-genai.

    python examples/genai_bench.py /tmp/genai/w4g128 --out genai.json          # an export folder
    python examples/genai_bench.py /tmp/genai/w4g128 --builder /tmp/genai/builder-int4 --accuracy-level 4
    python examples/genai_bench.py --model smollm2 --recipes fp32,w4g128       # export first (temp folders)

Each folder written by ``qexport export`` (which carries ``genai_config.json``, :mod:`qexport.export.genai`)
is run twice on the same graph with the same session settings: by :meth:`OnnxCausalLM.generate` (a Python
greedy loop around ``InferenceSession.run`` that concatenates the KV cache in the graph) and by
onnxruntime-genai (``og.Model(DIR)``, ``og.Generator``, greedy). Same prompt (the first ``--prompt-tokens``
tokens of the bundled *Emma* text), same ``--tokens`` new tokens (genai's ``min_length`` keeps it from
stopping at EOS), ``--threads`` intra-op threads, one warm-up run, then the median of ``--repeats`` runs,
interleaved (each repeat runs every runtime once, so that a change in the machine's load hits all alike).

Decode tokens/s = (new tokens - 1) / (time of the last token - time of the first): the decode steps only,
the prefill excluded (it is reported apart, as time to first token). ``ids`` says whether both runtimes
chose the same tokens.

``--builder DIR`` also times a folder made by onnxruntime-genai's own model builder, in genai only (with
``--perplexity`` its perplexity is measured too, by :class:`BuilderLM`; its interface is the GroupQueryAttention
form's)::

    python -m onnxruntime_genai.models.builder -i <fp32 HF checkpoint folder> -o DIR -p int4 -e cpu

The builder bakes its MatMulNBits accuracy level into the graph (4 for ``-p int4 -e cpu``: int8
activations); ``--accuracy-level`` sets the level of qexport's folders (default: each folder's own,
``ort_session_config`` in its report), so that both can be compared at the same level.
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
from types import SimpleNamespace

import numpy as np
import torch

from qexport.export import OnnxCausalLM, export_onnx
from qexport.export.genai import GENAI_CONFIG_FILE
from qexport.export.runtime import load_export_report
from qexport.models import bundled_text, read_text

ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def cpu_line() -> tuple[str, list[str]]:
    """The CPU model name and which of the SIMD flags that matter to the int4 / int8 kernels it has."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the name platform gives, no flags
        pass
    return name, [f for f in CPU_FLAGS if f in flags]


def prompt_ids(folder: Path, n: int) -> list[int]:
    """The first ``n`` token ids of the bundled Emma text in the folder's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok(read_text(bundled_text("emma"))[: 40 * n])["input_ids"][:n]
    if len(ids) < n:
        sys.exit(f"genai_bench: the Emma text gives only {len(ids)} tokens in {folder}'s tokenizer, need {n}")
    return ids


def summary(results: list) -> dict:
    """Medians over runs; each run is (token ids, start time, time of each new token)."""
    decode = [(len(t) - 1) / (t[-1] - t[0]) for _, _, t in results]
    first = [t[0] - start for _, start, t in results]
    return {"decode_tok_s": statistics.median(decode), "first_token_ms": 1000 * statistics.median(first),
            "decode_runs_tok_s": decode, "ids": results[-1][0]}


def qexport_runner(folder: Path, ids: list[int], args, session_config: dict):
    """One greedy generation by OnnxCausalLM per call."""
    lm = OnnxCausalLM(folder, threads=args.threads, session_config=session_config)
    prompt = torch.tensor([ids])

    def run():
        times = []
        start = time.perf_counter()
        out = lm.generate(prompt, max_new_tokens=args.tokens, on_token=lambda _: times.append(time.perf_counter()))
        return out.tolist(), start, times

    return run


def genai_runner(folder: Path, ids: list[int], args, session_config: dict):
    """One greedy generation by onnxruntime-genai per call; ``session_config`` and the thread count are laid
    over the folder's genai_config.json."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1, **session_config}}}}))
    model = og.Model(config)

    def run():
        params = og.GeneratorParams(model)
        # min_length: exactly --tokens new tokens, as OnnxCausalLM (genai would stop at EOS)
        length = len(ids) + args.tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array(ids, np.int32))
        out, times = [], []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
            out.append(int(generator.get_next_tokens()[0]))
        return out, start, times

    return run


class BuilderLM:
    """A model-builder folder's graph as a causal LM for :func:`qexport.eval.perplexity`: each window runs once
    with an empty past (its interface is the GroupQueryAttention form's: no ``position_ids``)."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort

        config = json.loads((folder / GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        self.session = ort.InferenceSession(str(folder / config["filename"]), so, providers=["CPUExecutionProvider"])
        self.past = {i.name: (config["num_key_value_heads"], config["head_size"])
                     for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, **_):
        ids = input_ids.numpy()
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 **{n: np.zeros((ids.shape[0], kv, 0, d), np.float32) for n, (kv, d) in self.past.items()}}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feeds)[0]))

    def parameters(self):
        return iter([torch.empty(0)])


def folder_perplexity(lm, tokenizer_folder: Path, text: Path) -> float:
    """qexport's perplexity protocol (:func:`qexport.eval.perplexity`: 512-token windows, 8192 tokens)."""
    from transformers import AutoTokenizer

    from qexport.eval import perplexity

    tok = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    return perplexity(lm, tok, read_text(text)).ppl


def folder_runners(folder: Path, ids: list[int], args, level: int | None) -> list[tuple[dict, object]]:
    """(row, runner) for a qexport folder: OnnxCausalLM, and genai when the folder has genai_config.json."""
    report = load_export_report(folder)
    session_config = dict(report.get("ort_session_config") or {})
    if level is not None:
        session_config[ACCURACY_KEY] = str(level)
    row = {"folder": str(folder), "model": report.get("recipe") or "fp32",
           "attention_form": (report.get("attention_form") or {}).get("form", "standard"),
           "accuracy_level": session_config.get(ACCURACY_KEY, "-")}
    if args.perplexity:
        lm = OnnxCausalLM(folder, threads=args.threads, session_config=session_config)
        row["perplexity"] = folder_perplexity(lm, folder, args.perplexity)
    runners = [({**row, "runtime": "OnnxCausalLM"}, qexport_runner(folder, ids, args, session_config))]
    if (folder / GENAI_CONFIG_FILE).is_file():
        runners.append(({**row, "runtime": "onnxruntime-genai"}, genai_runner(folder, ids, args, session_config)))
    else:
        reason = (report.get("genai") or {}).get("reason", f"no {GENAI_CONFIG_FILE}")
        print(f"{folder}: not run in onnxruntime-genai: {reason}")
    return runners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, help="export folders written by `qexport export`")
    ap.add_argument("--model", help="export this model (name or checkpoint folder) with --recipes first")
    ap.add_argument("--recipes", default="fp32,w4g128", help="with --model: 'fp32' and/or presets (default "
                                                             "fp32,w4g128)")
    ap.add_argument("--builder", type=Path, help="also time this onnxruntime-genai model-builder folder")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run (default 64)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    ap.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), action="append",
                    help="MatMulNBits accuracy level for qexport's folders (default: the folder's own); repeat it "
                         "to run each folder at several levels")
    ap.add_argument("--perplexity", type=Path, help="also the perplexity of every model on this text (qexport's "
                                                    "protocol), e.g. qexport/data/austen/emma.txt")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tokens < 2:
        sys.exit("genai_bench: --tokens must be >= 2 (decode speed needs two token times)")
    if args.builder is not None and not (args.builder / GENAI_CONFIG_FILE).is_file():
        sys.exit(f"genai_bench: {args.builder} has no {GENAI_CONFIG_FILE}; make it with: python -m "
                 "onnxruntime_genai.models.builder -i <fp32 HF checkpoint> -o DIR -p int4 -e cpu")
    torch.set_num_threads(args.threads)
    folders = list(args.folders)
    tmp = tempfile.TemporaryDirectory(prefix="genai_bench.")
    if args.model:
        for name in args.recipes.split(","):
            out = Path(tmp.name) / name
            export_onnx(args.model, out, None if name == "fp32" else name)
            folders.append(out)
    if not folders:
        ap.error("give export folders, or --model to export one")
    cpu, flags = cpu_line()
    print(f"CPU: {cpu} | flags: {' '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)} | threads {args.threads}")
    ids = prompt_ids(folders[0], args.prompt_tokens)
    runners = [r for folder in folders for level in (args.accuracy_level or [None])
               for r in folder_runners(folder, ids, args, level)]
    if args.builder is not None:
        row = {"folder": str(args.builder), "model": "builder int4", "attention_form": "gqa",
               "accuracy_level": "graph", "runtime": "onnxruntime-genai"}
        if args.perplexity:
            row["perplexity"] = folder_perplexity(BuilderLM(args.builder, args.threads), folders[0], args.perplexity)
        runners.append((row, genai_runner(args.builder, ids, args, {})))
    for _, run in runners:  # warm-up
        run()
    # interleaved: every repeat runs each runner once, so that a change in machine load hits them alike
    results = [[] for _ in runners]
    for _ in range(args.repeats):
        for out, (_, run) in zip(results, runners):
            out.append(run())
    rows = [{**row, **summary(out)} for (row, _), out in zip(runners, results)]
    by_folder = {(r["folder"], r["accuracy_level"]): r["ids"] for r in rows if r["runtime"] == "OnnxCausalLM"}
    for r in rows:
        key = (r["folder"], r["accuracy_level"])
        if r["runtime"] == "onnxruntime-genai" and key in by_folder:
            r["same_ids_as_onnxcausallm"] = r["ids"] == by_folder[key]
    print(f"\n{args.prompt_tokens}-token prompt, {args.tokens} new tokens, greedy; median of {args.repeats}\n")
    print("| model | attention | runtime | acc. level | decode tok/s | first token ms | same ids | perplexity |")
    print("|---|---|---|---|---:|---:|---|---:|")
    for r in rows:
        same = {True: "yes", False: "no"}.get(r.get("same_ids_as_onnxcausallm"), "-")
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        print(f"| {r['model']} | {r['attention_form']} | {r['runtime']} | {r['accuracy_level']} | "
              f"{r['decode_tok_s']:.1f} | {r['first_token_ms']:.1f} | {same} | {ppl} |")
    if args.out:
        result = {"cpu": cpu, "cpu_flags": flags, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.tokens, "repeats": args.repeats, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
