"""Time ONNX Runtime on a tied, quantized embedding + lm_head: GatherBlockQuantized or Gather + DequantizeLinear.

    python examples/embedding_bench.py                       # SmolLM2-135M's 49152 x 576 table, 2 threads
    python examples/embedding_bench.py --model DIR --tokens 128 --threads 4

One ONNX model per form holds what a tied embedding and ``lm_head`` do in a decode step: ``input_ids [1, T]``
-> the embedding rows -> an RMSNorm (``SimplifiedLayerNormalization``, standing for the decoder between them)
-> ``lm_head`` -> logits ``[1, T, V]``. It is timed at ``T = 1`` (a decode step) and ``T = --tokens`` (a
prefill), median of ``--repeats`` runs of ``--iters`` calls. "file" is the model's size, "session" the bytes of
the initializers in ONNX Runtime's optimized graph (folded copies included; its prepacked MatMulNBits weights
are not in it). MatMulNBits runs at the accuracy level ``qexport export`` picks: 4 (int8 activations) for
8-bit weights, 0 (fp32) for 4-bit ones. Forms (``int4``: symmetric, groups of ``--group``; ``int8``:
symmetric per row):

* ``fp32``: a float table (``Gather``) and a float ``lm_head`` (``MatMul``), the float baseline;
* ``float-table``: the float table and a quantized ``lm_head`` (``DequantizeLinear -> MatMul``, which ONNX
  Runtime fuses into ``MatMulNBits``): what a recipe that quantizes ``lm_head`` but not the embedding stores;
* ``standard``: ``qexport export --embedding-form standard`` (:mod:`qexport.lowering.embedding`): the QDQ
  ``lm_head``'s ``[K, N]`` initializers, read for the rows through ``Cast`` copies (ONNX Runtime folds them),
  ``Gather`` along axis 1, ``Transpose``, the scales' ``Gather`` and a blocked ``DequantizeLinear``;
* ``standard-shared``: the same rows read from the ``lm_head``'s initializers themselves, without the copies;
* ``gbq``: ``qexport export`` by default: ``lm_head`` as ``com.microsoft.MatMulNBits`` and the rows as
  ``com.microsoft.GatherBlockQuantized`` on its ``B``.

The op types ONNX Runtime ran are read back from its optimized graph: a ``DequantizeLinear`` left before a
``MatMul`` means the ``lm_head`` was not fused (the whole table dequantized at every call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import model_config, onnxruntime_missing, output_exists

SMOLLM2 = {"hidden_size": 576, "vocab_size": 49152}  # SmolLM2-135M's config.json
FORMS = ("fp32", "float-table", "standard", "standard-shared", "gbq")
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "fma")


def cpu_description() -> str:
    """The CPU model and the SIMD flags that ONNX Runtime's kernels dispatch on (Linux: /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return f"{model}; {os.cpu_count()} cores; flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none of'}"


def build(form: str, bits: int, vocab: int, hidden: int, group: int):
    """The ONNX model of ``form`` for a random ``[vocab, hidden]`` table with ``bits``-bit symmetric codes."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from qexport.config import QuantSpec
    from qexport.formats import quantize_weight
    from qexport.lowering.embedding import gbq_lookup, matmulnbits_node, nbits_weight, standard_lookup
    from qexport.lowering.core import matmulnbits_accuracy
    from qexport.lowering.qdq import weight_initializers

    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, group_size=group) if bits == 4 else QuantSpec(bits=8)
    qw = quantize_weight(torch.randn(vocab, hidden) * 0.02, spec)
    k, g = hidden, qw.group
    nodes, inits = [], []
    if form == "gbq":
        w, inits = nbits_weight("w", qw.qdata, qw.scale, None, "int", bits, g, k, True)
        emb, more, _ = gbq_lookup("emb", "ids", "e", 2, w)
        nodes = emb + [matmulnbits_node("head", "h", "logits", w, matmulnbits_accuracy(bits, None))]
        inits += more
    elif form == "fp32":
        table = qw.dequantize()
        inits += [numpy_helper.from_array(table.numpy(), "table"),
                  numpy_helper.from_array(table.t().contiguous().numpy(), "WT")]
        nodes += [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
                  helper.make_node("MatMul", ["h", "WT"], ["logits"])]
    else:
        w, inits = weight_initializers("w", qw.codes(), qw.scale, None, bits, True, g, k)
        attrs = {"per_channel": {"axis": 1}, "blocked": {"axis": 0, "block_size": g}}[w.kind]
        nodes += [helper.make_node("DequantizeLinear", [w.codes, w.scale], ["W"], **attrs),
                  helper.make_node("MatMul", ["h", "W"], ["logits"])]
        if form == "float-table":
            inits.append(numpy_helper.from_array(qw.dequantize().numpy(), "table"))
            nodes.append(helper.make_node("Gather", ["table", "ids"], ["e"], axis=0))
        else:
            nodes += standard_lookup("emb", "ids", "e", 2, w, private=form == "standard")[0]
    # an RMSNorm between the rows and lm_head, as in a decoder (and no DequantizeLinear feeding the MatMul's input)
    inits.append(numpy_helper.from_array(np.ones(hidden, dtype=np.float32), "norm"))
    nodes.append(helper.make_node("SimplifiedLayerNormalization", ["e", "norm"], ["h"], axis=-1, epsilon=1e-5))
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def time_form(model, threads: int, level: int, tokens: list[int], vocab: int, iters: int, repeats: int, tmp: Path):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    so.optimized_model_filepath = str(tmp)
    data = model.SerializeToString()
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = {}
    for t in tokens:
        ids = rng.integers(0, vocab, (1, t))
        sess.run(None, {"ids": ids})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                sess.run(None, {"ids": ids})
            times.append((time.perf_counter() - t0) / iters)
        out[t] = float(np.median(times))
    optimized = onnx.load(str(tmp))
    ops = sorted({n.op_type for n in optimized.graph.node})
    held = sum(len(t.raw_data) or t.ByteSize() for t in optimized.graph.initializer)
    return out, ops, held, len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a checkpoint directory with config.json")
    ap.add_argument("--tokens", type=int, default=128, help="prefill length timed besides one token (default 128)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--group", type=int, default=64, help="int4 group size (default 64)")
    ap.add_argument("--bits", default="4,8", help="code widths to time, of 4 and 8 (default 4,8)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows to this JSON file (not overwritten)")
    args = ap.parse_args(argv)
    if onnxruntime_missing():
        return 2
    import onnxruntime

    config = model_config(args.model, SMOLLM2)
    if config is None or output_exists(args.json, "--json"):
        return 2
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    tokens = [1, args.tokens] if args.tokens != 1 else [1]
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} threads; CPU: {cpu_description()}")
    print(f"table {vocab} x {hidden}; ms per call (median); session: initializers of ORT's optimized graph")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in sorted({int(b) for b in args.bits.split(",")}, reverse=True):
            for form in FORMS:
                label = form if form == "fp32" else f"{form} int{bits}" + (f" g{args.group}" if bits == 4 else "")
                if form == "fp32" and bits != max(int(b) for b in args.bits.split(",")):
                    continue
                model = build(form, bits, vocab, hidden, args.group)
                level = 4 if bits == 8 else 0
                ms, ops, added, size = time_form(model, args.threads, level, tokens, vocab, args.iters, args.repeats,
                                                 Path(tmp) / "opt.onnx")
                row = {"form": label, "onnx_bytes": size, "session_bytes": added, "ops": ops,
                       **{f"ms_{t}": ms[t] * 1e3 for t in tokens}}
                rows.append(row)
                print(f"{label:28s} file {size / 1e6:6.1f} MB  session {added / 1e6:6.1f} MB  "
                      + "  ".join(f"T={t}: {ms[t] * 1e3:7.3f} ms" for t in tokens) + f"  ran: {'/'.join(ops)}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "cpu": cpu_description(),
                                               "vocab": vocab, "hidden": hidden, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
