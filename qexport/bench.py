"""``qexport bench``: speed of model variants side by side, in one run, written as JSON, CSV and Markdown.

A variant is one of

    eager-fp32                 the float model, eager PyTorch
    inductor-fp32              torch.compile(backend="inductor")
    inductor-fp32-frozen       the same with inductor's freezing (weights folded in as constants, float linears
                               prepacked for oneDNN / MKL); the qexport back-end's inductor target compiles
                               without it (its quantized weights are repacked by the cpu_kernels pass)
    torchao:CONFIG[:float-head]  torchao's quantize_(model, CONFIG) on every linear, as torchao does (with
                               ``:float-head``, not on lm_head, as qexport's presets), then inductor with freezing;
                               CONFIG: int8-dynamic (Int8DynamicActivationInt8WeightConfig), int8-weight-only
                               (Int8WeightOnlyConfig), int4-weight-only (IntxWeightOnlyConfig, int4 in groups of
                               64: torchao 0.18's only int4 weight-only form on the CPU, as Int4WeightOnlyConfig's
                               formats need CUDA or mslk, and it refuses groups of 128 where K = 576)
    eager:RECIPE               qexport.quantize(model, RECIPE) (QLinear modules, reference kernels)
    eager:DIR                  a saved quantized folder (``qexport quantize``), loaded as it is
    qexport:RECIPE:TARGET      torch.compile(backend="qexport", options={"recipe": RECIPE, "target": TARGET})
    onnx:fp32 | onnx:RECIPE    qexport.export_onnx(model, DIR, RECIPE) run by ONNX Runtime (OnnxCausalLM)
    onnx:DIR                   a saved quantized folder exported as it is, run by ONNX Runtime
    onnx-dir:PATH              a folder written by ``qexport export``, run by ONNX Runtime

and is measured with the same protocol (batch 1): a prompt of ``prompt_tokens`` tokens from the bundled
evaluation text; ``first_call_s`` is the first forward pass over the prompt (compilation included for
compiled variants; for ``onnx:`` variants the export and the session's creation, also given alone as
``export_s``); ``prefill_s`` is the median of three later forward passes; ``decode_tok_s`` is
the number of decode steps divided by the time from the first to the last generated token within one greedy
generate() call (KV cache; timestamps from a logits processor, or OnnxCausalLM's ``on_token`` callback;
median of three calls, after a warm-up generate() that compiles or exports the decode graphs).
Exported variants are written to a temporary folder that is removed after their row is measured.
Every row is divided by the ``inductor-fp32`` and ``inductor-fp32-frozen`` rows (``*_vs_inductor_fp32``,
``*_vs_inductor_fp32_frozen``) and, when the run has one, by the ``onnx:fp32`` row (``*_vs_onnx_fp32``) of the
same round, so each target is compared with its own float baseline. The result names the CPU and the
features its integer kernels depend on (``cpu``: AVX2, AVX-512, VNNI, AMX), since speeds compare only within
one machine.

``rounds=N`` measures the whole list N times, round-robin; ``summary`` then gives each variant's median,
min and max decode tokens/s and the median, min and max of its per-round ratios to a baseline variant.
Round-to-round spread on a shared 2-core machine is about +-10%, so a ratio near a target needs rounds.

With ``ppl_tokens > 0`` each variant also gets its quality and size, measured on the same built model
after the speed runs: ``ppl`` (perplexity on the first ``ppl_tokens`` tokens of the bundled *Emma* slice,
windows of 512, as ``qexport eval``), ``size_bytes`` (every parameter and buffer of the quantized model)
and ``bits_per_weight`` (of the quantized linears; codes, scales and zero points); compiled variants are
sized by the same recipe applied eagerly. Recipes whose algorithm needs data (GPTQ, AWQ) are calibrated on
``calib_samples`` windows of 512 tokens of the bundled *Sense and Sensibility* slice (seed 0), as eager
variants only. Perplexity and calibration windows start with the tokenizer's BOS token when it adds one by
default, or as ``bos`` says (:mod:`qexport.eval`); the result records it (``bos``). :func:`write_results` then
also draws perplexity against size (``bench.png``).
"""

from __future__ import annotations

import copy
import csv
import gc
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from qexport.errors import InvalidConfig

DEFAULT_VARIANTS = (
    "eager-fp32",
    "inductor-fp32-frozen",
    "qexport:w8:inductor",
    "qexport:w4g128:inductor",
    "qexport:w8a8-dynamic:inductor",
    "qexport:w8:onnxruntime",
    "qexport:w4g128:onnxruntime",
)


FLOAT_VARIANTS = ("eager-fp32", "inductor-fp32", "inductor-fp32-frozen")
TORCHAO_CONFIGS = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
FEATURE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_features() -> dict[str, Any]:
    """The CPU's name, the flags of :data:`FEATURE_FLAGS` it has (from ``/proc/cpuinfo``; an empty list where
    that file does not exist) and the vector instruction set torch dispatches to."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"name": name, "features": [f for f in FEATURE_FLAGS if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def _torchao_quantize(m, config: str, float_head: bool):
    try:
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          IntxWeightOnlyConfig, quantize_)
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise InvalidConfig(f"torchao variants need torchao: pip install 'qexport[torchao]' ({e})") from None
    if config == "int4-weight-only":
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))
    else:
        cfg = Int8DynamicActivationInt8WeightConfig() if config == "int8-dynamic" else Int8WeightOnlyConfig()
    if float_head:  # the layers qexport's presets quantize: lm_head stays float
        quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
    else:
        quantize_(m, cfg)


def parse_variant(text: str) -> dict[str, str]:
    from qexport.backend import TARGETS
    from qexport.config import load_recipe

    if text in FLOAT_VARIANTS:
        return {"kind": text}
    parts = text.split(":")
    if parts[0] == "torchao" and len(parts) in (2, 3):
        if parts[1] not in TORCHAO_CONFIGS:
            raise InvalidConfig(f"variant {text!r}: torchao config must be one of {', '.join(TORCHAO_CONFIGS)}")
        if len(parts) == 3 and parts[2] != "float-head":
            raise InvalidConfig(f"variant {text!r}: the only torchao option is ':float-head'")
        return {"kind": "torchao", "config": parts[1], "float_head": str(len(parts) == 3)}
    if parts[0] == "eager" and len(parts) == 2:
        return {"kind": "eager", **_recipe_or_saved(parts[1])}
    if parts[0] == "qexport" and len(parts) == 3:
        load_recipe(parts[1])
        if parts[2] not in TARGETS:
            raise InvalidConfig(f"variant {text!r}: target must be one of {', '.join(TARGETS)}")
        return {"kind": "qexport", "recipe": parts[1], "target": parts[2]}
    if parts[0] == "onnx" and len(parts) == 2:
        if parts[1] == "fp32":
            return {"kind": "onnx"}
        return {"kind": "onnx", **_recipe_or_saved(parts[1])}
    if text.startswith("onnx-dir:") and len(text) > len("onnx-dir:"):
        from qexport.export.runtime import _folder

        return {"kind": "onnx-dir", "path": str(_folder(text[len("onnx-dir:"):]))}
    raise InvalidConfig(
        f"variant {text!r} is not valid; use eager-fp32, inductor-fp32, inductor-fp32-frozen, eager:RECIPE, "
        "qexport:RECIPE:TARGET, torchao:CONFIG, onnx:fp32, onnx:RECIPE or onnx-dir:PATH"
    )


def _recipe_or_saved(text: str) -> dict[str, str]:
    """``{"saved": DIR}`` for a saved quantized folder, else ``{"recipe": NAME}`` (checked)."""
    from qexport.checkpoint import is_quantized_folder
    from qexport.config import load_recipe

    if is_quantized_folder(text):
        return {"saved": str(Path(text).resolve())}
    load_recipe(text)
    return {"recipe": text}


def _build(model, spec: dict[str, str], calibration: torch.Tensor | None = None, workdir: Path | None = None):
    import qexport
    from qexport.prepare import quantize_model

    kind = spec["kind"]
    if kind in ("onnx", "onnx-dir"):
        from qexport.export.runtime import OnnxCausalLM

        path = spec.get("path")
        if kind == "onnx":
            path = workdir / "export"
            source = spec.get("saved") or model
            qexport.export_onnx(source, path, spec.get("recipe"), calibration=calibration, force=True)
        return OnnxCausalLM(path)
    if spec.get("saved"):
        from qexport.checkpoint import load_quantized

        return load_quantized(spec["saved"])
    m = copy.deepcopy(model)
    if kind == "torchao":
        _torchao_quantize(m, spec["config"], spec["float_head"] == "True")
    if kind in ("inductor-fp32", "inductor-fp32-frozen", "torchao"):
        m.forward = torch.compile(m.forward, backend="inductor")
    elif kind == "eager":
        quantize_model(m, spec["recipe"], calibration=calibration)
    elif kind == "qexport":
        m.forward = torch.compile(m.forward, backend="qexport",
                                  options={"recipe": spec["recipe"], "target": spec["target"]})
    return m


def _needs_data(spec: dict[str, str]) -> bool:
    """Whether building the variant needs calibration data: GPTQ / AWQ / SmoothQuant, or static activation scales."""
    from qexport.config import load_recipe

    return bool(spec.get("recipe")) and load_recipe(spec["recipe"]).needs_data


def _generate(m, prompt: torch.Tensor, new_tokens: int, on_token) -> None:
    """One greedy generate() of exactly ``new_tokens`` tokens, calling ``on_token()`` after each token's forward."""
    from qexport.export.runtime import OnnxCausalLM

    if isinstance(m, OnnxCausalLM):
        m.generate(prompt, max_new_tokens=new_tokens, on_token=lambda _token: on_token())
        return

    def stamp(input_ids, scores):  # a logits processor: called once per generated token, after its forward
        on_token()
        return scores

    m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
               logits_processor=[stamp])


@torch.no_grad()
def measure(model, prompt: torch.Tensor, spec: dict[str, str], new_tokens: int,
            calibration: torch.Tensor | None = None, quality=None, clock: Callable[[], float] = time.perf_counter
            ) -> dict[str, Any]:
    """Speed of one variant (the protocol of the module docstring); ``quality(built_model, spec) -> dict`` adds
    its columns after the speed runs. ``clock``: the seconds every time is read from (a monotonic clock)."""
    import torch._inductor.config

    torch._dynamo.reset()
    frozen = spec["kind"] in ("inductor-fp32-frozen", "torchao")  # read whenever inductor compiles a graph
    with tempfile.TemporaryDirectory(prefix="qexport-bench-") as workdir, \
            torch._inductor.config.patch(freezing=frozen or torch._inductor.config.freezing):
        t0 = clock()
        m = _build(model, spec, calibration, Path(workdir))
        built = clock() - t0
        m(prompt, use_cache=False)
        first = clock() - t0
        times = []
        for _ in range(3):
            t0 = clock()
            m(prompt, use_cache=False)
            times.append(clock() - t0)
        prefill = statistics.median(times)
        row: dict[str, Any] = {"first_call_s": first, "prefill_s": prefill,
                               "prefill_tok_s": prompt.shape[1] / prefill, "decode_tok_s": None}
        if spec["kind"] == "onnx":
            row["export_s"] = built

        stamps: list[float] = []
        _generate(m, prompt, new_tokens, lambda: None)  # warm-up: compiles the decode graphs
        # Decode time: from the first generated token to the last, within one generate() call, so prefill and
        # generate()'s set-up are not counted; the median of three calls, to resist interference.
        rates, totals = [], []
        for _ in range(3):
            stamps.clear()
            t0 = clock()
            _generate(m, prompt, new_tokens, lambda: stamps.append(clock()))
            totals.append(clock() - t0)
            if len(stamps) > 1 and stamps[-1] > stamps[0]:
                rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        row["generate_s"] = statistics.median(totals)
        row["decode_tok_s"] = statistics.median(rates) if rates else None
        if quality is not None:
            row.update(quality(m, spec))
        del m  # the ONNX Runtime session holds the folder's files open
    _free_compiled()
    return row


def _free_compiled() -> None:
    """Drop what compiling a variant keeps alive, as far as torch lets go of it: dynamo's caches and inductor's
    loaded modules (which hold a frozen graph's constants), then trim the heap. This stopped the torchao rows'
    growth on SmolLM2; a frozen inductor build still keeps about 3.6 GB, which only a fresh process per row
    (``isolate``) gives back."""
    from torch._inductor.codecache import PyCodeCache

    from qexport.checkpoint import _release_freed_memory

    torch._dynamo.reset()
    PyCodeCache.cache_clear()
    gc.collect()
    _release_freed_memory()


def _measure_isolated(model_name: str, prompt: torch.Tensor, spec: dict[str, str], new_tokens: int,
                      calibration: torch.Tensor | None, quality: tuple[int, bool] | None) -> dict[str, Any]:
    """:func:`measure` in a fresh spawned process, with this process's thread count."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_child, model_name, prompt, spec, new_tokens, calibration, quality,
                           torch.get_num_threads()).result()


def _measure_child(model_name, prompt, spec, new_tokens, calibration, quality, threads) -> dict[str, Any]:
    from qexport.models import bundled_text, load_model, read_text

    torch.set_num_threads(threads)
    model, tok = load_model(model_name)
    fn = None
    if quality is not None:
        fn = _quality(model, tok, read_text(bundled_text("emma")), *quality)
    return measure(model, prompt, spec, new_tokens, calibration, fn)


def _quality(model, tok, text: str, tokens: int, bos: bool = False):
    """The ``quality`` callback of :func:`measure`: perplexity of the built model, size of the recipe."""
    import qexport
    from qexport.eval import perplexity

    def quality(built, spec: dict[str, str]) -> dict[str, Any]:
        size_bytes = bits = None
        if spec["kind"] == "eager":
            size = qexport.model_size(built)
        elif spec.get("saved"):
            from qexport.checkpoint import load_quantized

            size = qexport.model_size(load_quantized(spec["saved"]))
        elif spec.get("recipe"):  # what the recipe stores, whatever runs it (any algorithm stores the same format)
            size = qexport.model_size(qexport.quantize(copy.deepcopy(model),
                                                       qexport.load_recipe(spec["recipe"]).weights_only()))
        elif spec["kind"] == "onnx-dir":
            size = None
        else:
            size = qexport.model_size(model)
        if size is not None:
            size_bytes, bits = size.total_bytes, size.bits_per_weight
        if spec["kind"] in ("onnx", "onnx-dir"):  # the files on disk: what the export really stores
            size_bytes = built.report.get("onnx_bytes", size_bytes)
        ppl = perplexity(built, tok, text, tokens=tokens, bos=bos).ppl
        return {"ppl": ppl, "size_bytes": size_bytes, "bits_per_weight": bits}

    return quality


def _default_baseline(names: list[str]) -> str:
    return next((b for b in ("onnx:fp32", "inductor-fp32-frozen", "inductor-fp32") if b in names), names[0])


def summarize(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per variant (in order of first appearance), over its rounds: decode tokens/s median / min / max, and
    its speed relative to ``baseline`` as the median / min / max of per-round ratios (each round's variant
    against the same round's baseline, so a machine that slows down for a round slows both).

    The k-th row of a variant is its round k (``run_bench(rounds=N)`` writes rows round by round; a variant
    list given N times in a row does the same).
    """
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    base = [r.get("decode_tok_s") for r in by_variant.get(baseline, [])]
    out = []
    for name, runs in by_variant.items():
        speeds = [r["decode_tok_s"] for r in runs if r.get("decode_tok_s")]
        ratios = [r["decode_tok_s"] / b for r, b in zip(runs, base) if r.get("decode_tok_s") and b]
        item = {"variant": name, "rounds": len(runs), "baseline": baseline}
        if speeds:
            item.update(decode_tok_s_median=statistics.median(speeds), decode_tok_s_min=min(speeds),
                        decode_tok_s_max=max(speeds))
        if ratios:
            item.update(vs_baseline_median=statistics.median(ratios), vs_baseline_min=min(ratios),
                        vs_baseline_max=max(ratios))
        out.append(item)
    return out


def run_bench(model_name: str = "smollm2", variants=DEFAULT_VARIANTS, prompt_tokens: int = 128,
              new_tokens: int = 64, progress: bool = True, ppl_tokens: int = 0,
              calib_samples: int = 16, rounds: int = 1, baseline: str | None = None, bos: bool | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None, isolate: bool = False) -> dict[str, Any]:
    """Measure every variant ``rounds`` times, round-robin (each round builds and times every variant
    again, so slow phases of a shared machine hit all variants alike); ``summary`` gives per-variant medians
    and per-round ratios against ``baseline`` (default: ``onnx:fp32``, else ``inductor-fp32``, else the first
    variant). ``bos``: perplexity and calibration windows start with BOS (True), not (False), or as the
    tokenizer does by default (None). ``on_row(row)`` is called with each variant's row as soon as it is
    measured (the CLI appends it to ``bench.rows.jsonl``, so a run that is stopped keeps what it measured).
    ``isolate``: measure each row in a fresh process (spawned; it loads the model again), so that no variant
    inherits another's compiled state or memory: a compiled, frozen variant keeps gigabytes alive that torch's
    resets do not all release, and a long in-process run was stopped by the kernel for lack of memory."""
    from qexport.config import load_recipe
    from qexport.eval import resolve_bos, tokenize
    from qexport.models import bundled_text, load_model, read_text

    variants = list(variants)
    if not variants:
        raise InvalidConfig("no variants to measure")
    if rounds < 1:
        raise InvalidConfig(f"rounds must be >= 1, got {rounds}")
    baseline = baseline or _default_baseline(variants)
    if baseline not in variants:
        raise InvalidConfig(f"baseline {baseline!r} is not one of the variants ({', '.join(dict.fromkeys(variants))})")
    specs = [(v, parse_variant(v)) for v in variants] * rounds
    if prompt_tokens < 1 or new_tokens < 1 or ppl_tokens < 0 or calib_samples < 1:
        raise InvalidConfig("prompt, new-token and calibration-sample counts must be positive, ppl tokens >= 0")
    for name, spec in specs:
        if spec["kind"] == "qexport" and load_recipe(spec["recipe"]).algorithm_needs_data:
            raise InvalidConfig(f"variant {name!r}: a calibrated recipe runs as eager:{spec['recipe']} in the bench "
                                "(the compile back-end takes round-to-nearest recipes)")
    model, tok = load_model(model_name)
    bos = resolve_bos(tok, bos)
    text = read_text(bundled_text("emma"))
    prompt = tokenize(tok, text)[:prompt_tokens][None]
    calibration = None
    if any(_needs_data(s) for _, s in specs):
        from qexport.prepare import CalibrationSet

        calibration = CalibrationSet(samples=calib_samples, bos=bos).tokens(tok)
    quality = _quality(model, tok, text, ppl_tokens, bos) if ppl_tokens else None
    rows = []
    seen: dict[str, int] = {}
    for name, spec in specs:
        if progress:
            print(f"bench: {name}", flush=True)
        seen[name] = seen.get(name, 0) + 1
        with_quality = bool(ppl_tokens) and seen[name] == 1  # quality (perplexity, size) once, in round 1
        if isolate:
            measured = _measure_isolated(model_name, prompt, spec, new_tokens, calibration,
                                         (ppl_tokens, bos) if with_quality else None)
        else:
            measured = measure(model, prompt, spec, new_tokens, calibration, quality if with_quality else None)
        row = {"variant": name, "round": seen[name], **measured}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    for base_name in ("inductor-fp32", "inductor-fp32-frozen", "onnx:fp32"):
        suffix = base_name.replace("-", "_").replace(":", "_")
        base_of_round = {b["round"]: b for b in rows if b["variant"] == base_name}
        for r in rows:  # against the baseline of the same round
            base = base_of_round.get(r["round"])
            if base is None:
                continue
            if base["decode_tok_s"] and r["decode_tok_s"]:
                r[f"decode_vs_{suffix}"] = r["decode_tok_s"] / base["decode_tok_s"]
            r[f"prefill_vs_{suffix}"] = base["prefill_s"] / r["prefill_s"]
    return {"model": model_name, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_features(),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "ppl_tokens": ppl_tokens, "bos": bos,
            "calib_samples": calib_samples if calibration is not None else None,  # None: no variant calibrated
            "rounds": max(seen.values()),  # a variant list given N times counts N rounds too
            "baseline": baseline, "results": rows, "summary": summarize(rows, baseline)}


def to_markdown(result: dict[str, Any]) -> str:
    cols = ["variant", "first_call_s", "prefill_s", "prefill_tok_s", "decode_tok_s"]
    cols += [c for c in ("decode_vs_inductor_fp32", "decode_vs_inductor_fp32_frozen", "decode_vs_onnx_fp32")
             if any(c in r for r in result["results"])]
    if result.get("ppl_tokens"):
        cols += ["ppl", "size_mb", "bits_per_weight"]
    rows = [{**r, "size_mb": r["size_bytes"] / 1e6 if r.get("size_bytes") else None} for r in result["results"]]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"{result['model']}, {result['threads']} threads, torch {result['torch']}, prompt "
             f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, batch 1", "", *_cpu_line(result),
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    summary = result.get("summary") or summarize(result["results"], _default_baseline(
        [r["variant"] for r in result["results"]]))
    if any(item["rounds"] > 1 for item in summary):
        base = summary[0]["baseline"]
        lines += ["", f"Over rounds: decode tokens/s, and against `{base}` per round (each round's ratio, then "
                      "their median)", "",
                  f"| variant | rounds | decode tok/s median | min - max | vs {base} (median) | min - max |",
                  "|---|---|---|---|---|---|"]
        for item in summary:
            lines.append(f"| {item['variant']} | {item['rounds']} | {fmt(item.get('decode_tok_s_median'))} | "
                         f"{fmt(item.get('decode_tok_s_min'))} - {fmt(item.get('decode_tok_s_max'))} | "
                         f"{fmt(item.get('vs_baseline_median'))} | {fmt(item.get('vs_baseline_min'))} - "
                         f"{fmt(item.get('vs_baseline_max'))} |")
    return "\n".join(lines) + "\n"


def _cpu_line(result: dict[str, Any]) -> list[str]:
    cpu = result.get("cpu")
    if not cpu:
        return []
    features = ", ".join(cpu["features"]) or "none of " + ", ".join(FEATURE_FLAGS)
    return [f"CPU: {cpu['name'] or 'unknown'}; features: {features}; torch kernels: {cpu['torch_capability']}", ""]


def plot_png(result: dict[str, Any]) -> bytes | None:
    """Perplexity against model size, one labelled point per variant (PNG bytes); None without the data
    or without matplotlib (the ``plot`` extra)."""
    rows = [r for r in result["results"] if r.get("ppl") and r.get("size_bytes") and r.get("round", 1) == 1]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        ax.scatter(r["size_bytes"] / 1e6, r["ppl"])
        ax.annotate(r["variant"], (r["size_bytes"] / 1e6, r["ppl"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"perplexity ({result['ppl_tokens']} tokens)")
    if max(r["ppl"] for r in rows) > 10 * min(r["ppl"] for r in rows):
        ax.set_yscale("log")
    ax.set_title(f"{result['model']}: perplexity vs size")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def to_csv(result: dict[str, Any]) -> str:
    keys = sorted({k for r in result["results"] for k in r}, key=lambda k: (k != "variant", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in result["results"]:
        w.writerow(r)
    return buf.getvalue()


ROWS_FILE = "bench.rows.jsonl"  # one JSON row per measured variant, written as the run goes (the CLI's --out)


def write_results(result: dict[str, Any], out_dir: str | Path, force: bool = False) -> list[Path]:
    from qexport._io import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    files = {"bench.json": json.dumps(result, indent=2) + "\n", "bench.csv": to_csv(result),
             "bench.md": to_markdown(result)}
    written = [atomic_write_text(out / name, text, overwrite=force) for name, text in files.items()]
    png = plot_png(result)
    if png is not None:
        written.append(atomic_write_bytes(out / "bench.png", png, overwrite=force))
    return written
