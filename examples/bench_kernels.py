"""Benchmark qexport's Triton kernels on a GPU: time, achieved memory bandwidth, % of the device's peak.

    python examples/bench_kernels.py --out bench-kernels            # LLaMA-7B-like layers, M = 1, 16, 128
    python examples/bench_kernels.py --model DIR --tokens 512       # the linear shapes of a checkpoint, M up to 512
    python examples/bench_kernels.py --peak-gbps 3350 --formats int4g128,nf4g64

For every layer shape (in x out: 4096x4096, 4096x11008, 11008x4096 by default), every M (tokens in the
batch) and every weight format (int8 per-channel, int4 g128 asymmetric, int2 g64 asymmetric, NF4 g64, and
int8 weights with int8 dynamic per-token activations), it times with ``triton.testing.do_bench`` (median,
L2 cache flushed before every run):

* ``triton``: the qexport Triton kernel on the stored weights (fp16 activations);
* ``triton-packed`` (int4 / int2, M <= 16): the GEMV over the weight repacked once for coalesced loads
  (:mod:`qexport.kernels.triton.packed`), with its heuristic blocks, or with ``--tune`` the best of a timed
  sweep per shape (the table is written to ``--out``/``tuned.json``);
* ``torch-int4pack`` (int4 g128): torch's own CUDA int4 kernel, ``aten._weight_int4pack_mm`` on
  ``_convert_weight_to_int4pack``'s tiles (bf16 activations; zero point folded into its float zero);
* ``fp16``: ``torch.nn.functional.linear`` with an fp16 weight (cuBLAS), the speed to beat;
* ``dequant+mm``: the reference path, ``dequantize_stored`` then ``F.linear`` (what runs without Triton).

A variant that fails on the device is kept as a row with its error instead of stopping the run.

Bandwidth = the bytes a variant must move at least (stored weight: codes + scales + zero points, or the
fp16 weight; activations in; output out) / its time; % of peak uses a table of device names (or
``--peak-gbps``). At M = 1 every variant is bound by memory, so % of peak is the figure of merit; at
M = 128 int8 / fp16 matmuls start to be bound by compute. Each Triton result is checked against the
reference (max abs error in the output). Writes ``results.json`` and ``results.md`` to ``--out``.
Takes about 2-4 minutes on one H100 (quantizing the weights on the CPU is a good part of it).

Needs a CUDA GPU and ``triton`` (``pip install 'qexport[triton]'``); without CUDA it prints one line and
exits with status 2.
"""

from __future__ import annotations

NEEDS_CUDA = True  # tests/test_examples.py: on a CPU-only machine, expect the one-line refusal

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qexport import ops
from qexport.config import QuantSpec
from qexport.formats import quantize_weight
from qexport.kernels import reference

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096"  # in_features x out_features (LLaMA-7B attention, up, down)
FORMATS = {
    "int8": QuantSpec(bits=8),
    "int4g128": QuantSpec(bits=4, group_size=128, symmetric=False),
    "int2g64": QuantSpec(bits=2, group_size=64, symmetric=False),
    "nf4g64": QuantSpec(bits=4, format="nf4", group_size=64),
    "w8a8": QuantSpec(bits=8),  # int8 weights, int8 dynamic per-token activations (fused kernel)
}
# Peak DRAM bandwidth in GB/s, matched in order against torch.cuda.get_device_name() (first match wins).
PEAK_GBPS = (
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 / HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 2039.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


def peak_gbps(device_name: str) -> float | None:
    """Peak memory bandwidth of a device from the table above, ``None`` when it is not listed."""
    for key, gbps in PEAK_GBPS:
        if key.lower() in device_name.lower():
            return gbps
    return None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x11008,..."`` (in x out) -> ``[(4096, 11008), ...]``."""
    shapes = []
    for part in text.split(","):
        try:
            k, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bench_kernels: bad shape {part!r}; write in_features x out_features, e.g. 4096x11008")
        shapes.append((k, n))
    return shapes


def model_shapes(model: str) -> list[tuple[int, int]]:
    """The distinct (in, out) shapes of the attention and MLP projections of a Llama-style checkpoint."""
    if model == "smollm2":
        from qexport.models import smollm2_checkpoint

        path = smollm2_checkpoint()
    else:
        path = Path(model)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"bench_kernels: {model!r} is not a checkpoint directory with a config.json")
    cfg = json.loads(cfg_path.read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    shapes = [(h, heads * hd), (h, kv * hd), (heads * hd, h), (h, inter), (inter, h)]
    return list(dict.fromkeys(shapes))


def _stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def torch_int4pack(qw, k: int, n: int, inner_k_tiles: int = 8):
    """torch's CUDA int4 weight-only linear for an int4 weight: ``f(x) -> x @ W^T`` (bf16), or None when the
    weight does not fit it (group sizes 32 .. 256, K a multiple of ``inner_k_tiles * 16``).

    Its packed input is ``[N, K / 2]`` uint8 with element ``2i`` in the *high* nibble (qexport's stored order
    is the low nibble first) of unsigned codes ``q``; it computes ``(q - 8) * scale + zero``, so qexport's
    ``(q - zp) * scale`` has ``zero = (8 - zp) * scale`` (and symmetric codes ``q + 8`` with zero 0)."""
    from qexport.formats import _load

    group = qw.group
    if qw.spec.bits != 4 or qw.spec.format.value != "int" or group not in (32, 64, 128, 256) \
            or k % (inner_k_tiles * 16):
        return None
    t = qw.tensors()
    codes = _load(t["qdata"], 4, k, qw.spec.symmetric).to(torch.int32)
    scale = qw.scales().float().expand(n, -1)
    if qw.spec.symmetric:
        codes, zero = codes + 8, torch.zeros_like(scale)
    else:
        zero = (8 - _load(t["zero_point"], 4, -(-k // group), False).float().expand(n, -1)) * scale
    packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).cuda()
    w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(device="cuda", dtype=torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, w, group, scales_and_zeros)


def bench_one(qt, do_bench, fmt: str, spec: QuantSpec, k: int, n: int, ms: list[int], peak: float | None,
              tune: bool = False) -> list[dict]:
    """Every variant at every M for one layer shape and format."""
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(n, k) * 0.02, spec)  # on the CPU: the reference quantizer
    stored = {name: t.cuda() for name, t in qw.tensors().items()}
    scale = qw.scales().cuda()
    w16 = qw.dequantize().to(device="cuda", dtype=torch.float16)
    meta = (qw.spec.format.value, qw.spec.bits, qw.group, k, qw.spec.symmetric)
    weight_bytes = _stored_bytes(stored)
    packed = None
    if fmt != "w8a8" and qw.spec.format.value == "int" and qw.spec.bits in (2, 4) and qw.group % 16 == 0:
        packed = qt.repack(stored["qdata"], scale, stored.get("zero_point"), qw.spec.bits, qw.group, k,
                           qw.spec.symmetric)
    int4pack, int4pack_error = None, None
    try:
        int4pack = torch_int4pack(qw, k, n) if fmt != "w8a8" else None
    except Exception as e:  # recorded in every row of this shape instead of stopping the run
        int4pack_error = str(e).splitlines()[0]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        io16 = m * k * 2 + m * n * 2  # fp16 activations in, fp16 output out
        if fmt == "w8a8":
            qdata, w_scale = stored["qdata"], stored["scale"]
            kernel = lambda: qt.qlinear_a8_dynamic(x, qdata, w_scale, None)  # noqa: E731
            ref = lambda: reference.qlinear_a8(*ops.quantize_per_token(x), 0, qdata, w_scale, None)  # noqa: E731
            kernel_bytes = weight_bytes + m * k * 2 + m * n * 4  # float32 output
        else:
            args = (stored["qdata"], scale, stored.get("zero_point"))
            kernel = lambda: qt.qlinear(x, *args, None, *meta)  # noqa: E731
            ref = lambda: reference.qlinear(x, *args, None, *meta)  # noqa: E731
            kernel_bytes = weight_bytes + io16
        err = (kernel().float() - ref().float()).abs().max().item()
        variants = [
            ("triton", kernel, kernel_bytes, err),
            ("fp16", lambda: F.linear(x, w16), n * k * 2 + io16, None),
            ("dequant+mm", ref, kernel_bytes, None),
        ]
        extra = []
        if packed is not None and m <= 16:
            extra.append(("triton-packed", packed.nbytes + io16, lambda: _packed_variant(qt, x, packed, tune)))
        if int4pack is not None:
            xb = x.to(torch.bfloat16)
            extra.append(("torch-int4pack", weight_bytes + io16, lambda: (lambda: int4pack(xb))))
        elif int4pack_error:
            rows.append(dict(shape=f"{k}x{n}", m=m, format=fmt, variant="torch-int4pack", error=int4pack_error))
        for name, nbytes, make in extra:
            try:
                fn = make()
                variants.append((name, fn, nbytes, (fn().float() - ref().float()).abs().max().item()))
            except Exception as e:  # a variant the device or this torch cannot run: recorded, not fatal
                rows.append(dict(shape=f"{k}x{n}", m=m, format=fmt, variant=name, error=str(e).splitlines()[0]))
        group = []
        for name, fn, nbytes, error in variants:
            t_ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
            gbps = nbytes / (t_ms * 1e-3) / 1e9
            group.append(dict(shape=f"{k}x{n}", m=m, format=fmt, variant=name, time_us=t_ms * 1e3, bytes=nbytes,
                              gbps=gbps, pct_peak=None if peak is None else 100.0 * gbps / peak,
                              max_abs_err_vs_reference=error))
        fp16_row, dequant_row = group[1], group[2]
        for row in group[:1] + group[3:]:
            row["speedup_vs_fp16"] = fp16_row["time_us"] / row["time_us"]
            row["speedup_vs_dequant_mm"] = dequant_row["time_us"] / row["time_us"]
        rows += group
    return rows


def _packed_variant(qt, x, packed, tune: bool):
    """The packed GEMV as a timed function; with ``tune`` its blocks are the best of a timed sweep first."""
    from qexport.kernels.triton import packed as packed_mod

    blocks = packed_mod.tune(x, packed)[0] if tune else None
    return lambda: qt.qlinear_packed(x, packed, blocks=blocks)


def to_markdown(rows: list[dict], device: str, peak: float | None) -> str:
    lines = [f"# qexport Triton kernels on {device}", "",
             f"peak memory bandwidth used for %: {peak if peak is not None else 'unknown (pass --peak-gbps)'} GB/s; "
             "times are medians of triton.testing.do_bench (L2 flushed); shape is in x out; activations fp16, "
             "outputs fp16 (fp32 for w8a8, as qexport::qlinear_a8 returns them).", "",
             "| shape | M | format | variant | time us | GB/s | % peak | vs fp16 | vs dequant+mm | max err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['m']} | {r['format']} | {r['variant']} | failed: {r['error']} |"
                         " | | | | |")
            continue
        pct = "-" if r["pct_peak"] is None else f"{r['pct_peak']:.0f}"
        vs16 = f"{r['speedup_vs_fp16']:.2f}x" if "speedup_vs_fp16" in r else ""
        vsdq = f"{r['speedup_vs_dequant_mm']:.2f}x" if "speedup_vs_dequant_mm" in r else ""
        err = "" if r["max_abs_err_vs_reference"] is None else f"{r['max_abs_err_vs_reference']:.1e}"
        lines.append(f"| {r['shape']} | {r['m']} | {r['format']} | {r['variant']} | {r['time_us']:.1f} | "
                     f"{r['gbps']:.0f} | {pct} | {vs16} | {vsdq} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-kernels", help="folder for results.json and results.md")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="in x out, comma-separated (default: %(default)s)")
    ap.add_argument("--model", default=None, help="smollm2 or a checkpoint directory: bench its projection shapes")
    ap.add_argument("--m", default="1,16,128", help="batch rows (tokens) to time, comma-separated")
    ap.add_argument("--tokens", type=int, default=None, help="also time a prefill of this many tokens (M)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="subset of: " + ", ".join(FORMATS))
    ap.add_argument("--peak-gbps", type=float, default=None, help="the device's peak memory bandwidth in GB/s")
    ap.add_argument("--tune", action="store_true", help="sweep the packed GEMV's blocks per shape first "
                                                        "(writes tuned.json to --out)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device found, nothing measured; this benchmark needs a GPU", file=sys.stderr)
        return 2
    try:
        import qexport.kernels.triton as qt
        from triton.testing import do_bench
    except ImportError as e:
        print(f"bench_kernels: the Triton kernels cannot be imported ({e}); pip install 'qexport[triton]'")
        return 1

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"bench_kernels: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    shapes = model_shapes(args.model) if args.model else parse_shapes(args.shapes)
    ms = sorted({int(v) for v in args.m.split(",")} | ({args.tokens} if args.tokens else set()))
    device = torch.cuda.get_device_name()
    peak = args.peak_gbps or peak_gbps(device)

    t0 = time.time()
    rows = []
    for k, n in shapes:
        for fmt in formats:
            rows += bench_one(qt, do_bench, fmt, FORMATS[fmt], k, n, ms, peak, args.tune)
            print(f"  {k}x{n} {fmt}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, peak_gbps=peak, torch=torch.__version__, triton=__import__("triton").__version__,
                seconds=time.time() - t0)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if args.tune:
        from qexport.kernels.triton import packed as packed_mod

        packed_mod.save_table(out / "tuned.json", device, overwrite=True)
    md = to_markdown(rows, device, peak)
    (out / "results.md").write_text(md)
    print(md)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
