"""Time ONNX Runtime's CPU matmuls on a model's linear shapes, in the QDQ forms that `qexport export` writes.

    python examples/ort_matmul_bench.py                          # SmolLM2-135M's shapes, 1 token, 2 threads
    python examples/ort_matmul_bench.py --model DIR --threads 4  # the shapes of a checkpoint's config.json
    python examples/ort_matmul_bench.py --tokens 16 --out DIR    # 16 tokens per call; results.json / .md

How fast can a quantized decode step be on this CPU? For each linear shape of one decoder block
(q / k / v / o, gate / up / down) and for ``lm_head``, and for each weight form, it builds a one-op-type
ONNX model holding as many copies of that matmul as the model has (``num_hidden_layers`` for the block's
linears, one ``lm_head``), each with its own weight, all reading one input, and times ``session.run``
(median of ``--repeats`` runs of ``--iters`` calls):

* ``fp32``: ``MatMul`` with a float weight (the fp32 export);
* ``int8``: ``DequantizeLinear`` (int8, per-channel, ``axis=1``) -> ``MatMul`` (``w8``);
* ``int4g128``: blocked ``DequantizeLinear`` (uint4 + zero point, ``block_size=128``, opset 21) -> ``MatMul``
  (``w4g128``);
* ``int2g64``: the same with uint2 codes, ``block_size=64`` (opset 25; ``w2g64``).

ONNX Runtime fuses the two QDQ forms into ``com.microsoft.MatMulNBits`` (the optimized graph is read back to
report the op it ran). ``--accuracy-level`` sets ``session.qdq_matmulnbits_accuracy_level`` (4: int8
activations, the level `qexport export` writes for these recipes). The table gives milliseconds per call
of all copies of each shape, the body (the block's linears) and body + ``lm_head`` totals, and each
total's speed-up over fp32. Weights are random codes: the timing does not depend on their values.

These are the matmuls alone. A decode step also runs attention, norms, rotary embeddings and the
session's per-node overhead (a few milliseconds on SmolLM2 at 2 threads), the same for every weight form,
so the step's speed-up is below the matmuls'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import model_config, onnxruntime_missing, output_exists

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "vocab_size": 49152, "num_hidden_layers": 30}  # SmolLM2-135M's config.json
FORMS = ("fp32", "int8", "int4g128", "int2g64")
BLOCKED = {"int4g128": (4, 128), "int2g64": (2, 64)}  # bits, block size


def shapes(config: dict) -> list[tuple[str, int, int, int]]:
    """``(name, K, N, copies)`` of every linear of a Llama-style model."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    q = config["num_attention_heads"] * head_dim
    return [("q_proj", h, q, layers), ("k_proj", h, kv, layers), ("v_proj", h, kv, layers),
            ("o_proj", q, h, layers), ("gate_proj", h, inter, layers), ("up_proj", h, inter, layers),
            ("down_proj", inter, h, layers), ("lm_head", h, config["vocab_size"], 1)]


def packed(name: str, codes: np.ndarray, bits: int):
    """A UINT4 / UINT2 initializer, packed as ONNX packs sub-byte types (:func:`qexport.formats.pack`)."""
    import torch
    from onnx import TensorProto

    from qexport.formats import pack

    t = TensorProto(name=name, dims=codes.shape, data_type=TensorProto.UINT4 if bits == 4 else TensorProto.UINT2)
    t.raw_data = pack(torch.from_numpy(codes.reshape(1, -1)), bits).numpy().tobytes()
    return t


def build(form: str, k: int, n: int, copies: int, rng: np.random.Generator):
    """One ONNX model: ``copies`` matmuls ``x [M, K] @ W_i [K, N]`` in ``form``, each with its own output."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    for i in range(copies):
        w, y = f"w{i}", f"y{i}"
        if form == "fp32":
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, w))
        elif form == "int8":
            inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), f"q{i}"),
                      numpy_helper.from_array(rng.uniform(1e-3, 2e-3, n).astype(np.float32), f"s{i}")]
            nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [w], axis=1))
        else:
            bits, block = BLOCKED[form]
            blocks = -(-k // block)
            inits += [packed(f"q{i}", rng.integers(0, 1 << bits, (k, n), dtype=np.uint8), bits),
                      numpy_helper.from_array(rng.uniform(1e-2, 2e-2, (blocks, n)).astype(np.float32), f"s{i}"),
                      packed(f"z{i}", np.full((blocks, n), 1 << (bits - 1), np.uint8), bits)]
            nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [w], axis=0,
                                          block_size=block))
        nodes.append(helper.make_node("MatMul", ["x", w], [y]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25 if form == "int2g64" else 21)])


def time_model(model, x: np.ndarray, threads: int, level: int, iters: int, repeats: int, tmp: Path):
    """Median seconds per call, and the op types ONNX Runtime ran (from its optimized graph)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    so.optimized_model_filepath = str(tmp)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = sorted({n.op_type for n in onnx.load(str(tmp), load_external_data=False).graph.node})
    sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            sess.run(None, {"x": x})
        times.append((time.perf_counter() - t) / iters)
    return float(np.median(times)), ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a checkpoint directory with config.json")
    ap.add_argument("--tokens", type=int, default=1, help="rows of the input (M): 1 for a decode step")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="folder for results.json and results.md (not overwritten)")
    args = ap.parse_args(argv)
    if onnxruntime_missing():
        return 2
    config = model_config(args.model, SMOLLM2)
    out = Path(args.out) if args.out else None
    if config is None or output_exists(out / "results.json" if out else None, "--out"):
        return 2
    rng = np.random.default_rng(0)
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, k, n, copies in shapes(config):
            x = rng.standard_normal((args.tokens, k), dtype=np.float32)
            row = {"linear": name, "K": k, "N": n, "copies": copies}
            for form in FORMS:
                seconds, ops = time_model(build(form, k, n, copies, rng), x, args.threads, args.accuracy_level,
                                          args.iters, args.repeats, Path(tmp) / f"{form}.onnx")
                row[form + "_ms"], row[form + "_ops"] = seconds * 1e3, [o for o in ops if o != "DequantizeLinear"]
            rows.append(row)
            print(f"{name:10s} {k:6d} x {n:6d} x{copies:3d}: "
                  + "  ".join(f"{f} {row[f + '_ms']:7.3f} ms ({'/'.join(row[f + '_ops'])})" for f in FORMS),
                  flush=True)
    body = {f: sum(r[f + "_ms"] for r in rows if r["linear"] != "lm_head") for f in FORMS}
    head = {f: next(r[f + "_ms"] for r in rows if r["linear"] == "lm_head") for f in FORMS}
    lines = [f"{args.model}, M={args.tokens}, {args.threads} threads, accuracy level {args.accuracy_level}", "",
             "| linear | K x N | copies | " + " | ".join(f"{f} ms" for f in FORMS) + " |",
             "|---|---|---|" + "---|" * len(FORMS)]
    lines += [f"| {r['linear']} | {r['K']} x {r['N']} | {r['copies']} | "
              + " | ".join(f"{r[f + '_ms']:.3f}" for f in FORMS) + " |" for r in rows]
    for label, total in (("body", body), ("body + lm_head", {f: body[f] + head[f] for f in FORMS})):
        lines.append(f"| **{label}** | | | " + " | ".join(
            f"{total[f]:.3f} ({total['fp32'] / total[f]:.2f}x)" for f in FORMS) + " |")
    # every quantized body with the fp32 lm_head the w8 / w4g128 presets keep
    lines.append("| **body + fp32 lm_head** | | | " + " | ".join(
        f"{body[f] + head['fp32']:.3f} ({(body['fp32'] + head['fp32']) / (body[f] + head['fp32']):.2f}x)"
        for f in FORMS) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result = {"model": args.model, "tokens": args.tokens, "threads": args.threads,
                  "accuracy_level": args.accuracy_level, "rows": rows}
        for name, text in (("results.json", json.dumps(result, indent=1)), ("results.md", table + "\n")):
            part = out / (name + ".part")
            part.write_text(text)
            part.replace(out / name)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
