"""The command line: end to end on a tiny local checkpoint, and one-line errors with exit code 2."""

import importlib.util
import json
import tempfile
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from qexport.cli import main

from tiny import EMMA, save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def run_cli(*args):
    """The real console entry point in a subprocess: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "qexport", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_eval_end_to_end_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_dir), "--recipe", "w4g128", "--text", str(EMMA), "--tokens", "1024",
            "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fp32" in printed and "w4g128" in printed
    data = json.loads(out.read_text())
    for key in ("ppl", "fp_ppl", "size_bytes", "fp_size_bytes", "fp16_size_bytes", "recipe", "tokens"):
        assert key in data
    assert data["tokens"] == 1024 and data["recipe"]["name"] == "w4g128"
    assert data["size_bytes"] < data["fp_size_bytes"]
    assert 0.25 < data["quantized_linear_bytes"] / data["fp16_size_bytes"] < 0.30
    assert data["ppl"] != data["fp_ppl"]

    # an existing output is not overwritten without --force, and the refusal comes before the work
    before = out.read_text()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(argv + ["--force"]) == 0


def test_recipes_list_and_show(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for name in ("w8", "w4g128", "w4g128-sym", "nf4-dq", "w2g64"):
        assert name in listed
    assert main(["recipes", "--show", "nf4-dq"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rules"][0]["weight"]["format"] == "nf4"


def _bad_recipe(tmp_path, **weight):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "rules": [{"pattern": "*", "weight": weight}]}))
    return str(path)


@pytest.mark.parametrize(
    "case,expect",
    [
        ("unknown_preset", "unknown recipe preset 'w5'"),
        ("group_size_0", "group_size must be a positive integer, got 0"),
        ("group_size_negative", "group_size must be a positive integer, got -64"),
        ("nf4_bits3", "bits=3 is not valid for format 'nf4'"),
        ("missing_model", "not found"),
        ("model_is_file", "is a file, not a checkpoint directory"),
        ("short_text", "fewer than one window of 512"),
        ("missing_text", "does not exist"),
        ("tokens_0", "--tokens must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_exit_2(case, expect, tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Emma Woodhouse, handsome, clever, and rich.")
    args = {"--model": str(tiny_dir), "--recipe": "w8", "--text": str(EMMA)}
    if case == "unknown_preset":
        args["--recipe"] = "w5"
    elif case == "group_size_0":
        args["--recipe"] = _bad_recipe(tmp_path, bits=4, group_size=0)
    elif case == "group_size_negative":
        args["--recipe"] = _bad_recipe(tmp_path, bits=4, group_size=-64)
    elif case == "nf4_bits3":
        args["--recipe"] = _bad_recipe(tmp_path, bits=3, format="nf4", group_size=64)
    elif case == "missing_model":
        args["--model"] = str(tmp_path / "no-such-model")
    elif case == "model_is_file":
        args["--model"] = str(short)
    elif case == "short_text":
        args["--text"] = str(short)
    elif case == "missing_text":
        args["--text"] = str(tmp_path / "nope.txt")
    elif case == "tokens_0":
        args["--tokens"] = "0"
    argv = ["eval"] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qexport: error: ")
    assert expect in err


def test_console_script_error_has_no_traceback(tmp_path):
    code, out, err = run_cli("eval", "--model", str(tmp_path / "missing"), "--recipe", "w4g128", "--text", str(EMMA))
    assert code == 2
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert "not found" in err
    code, _, err = run_cli("eval", "--recipe", "w8")  # argparse errors are one line too
    assert code == 2 and err.strip().count("\n") == 0 and "--text" in err


def test_bench_isolate_measures_in_fresh_processes(tiny_dir, tmp_path, monkeypatch):
    """With --isolate no row is measured in this process: measure() here fails, the spawned children's does not."""
    import qexport.bench

    def not_here(*args, **kwargs):
        raise AssertionError("measured in the parent process")

    monkeypatch.setattr(qexport.bench, "measure", not_here)
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_dir), "--variants", "eager-fp32", "--prompt-tokens", "8",
                 "--new-tokens", "3", "--isolate", "--out", str(out)]) == 0
    row = json.loads((out / "bench.json").read_text())["results"][0]
    assert row["variant"] == "eager-fp32" and row["decode_tok_s"] > 0


def test_bench_on_tiny_checkpoint_writes_results(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_dir), "--variants", "eager-fp32,eager:w4g128,qexport:w8:eager",
            "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "2", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    names = ["eager-fp32", "eager:w4g128", "qexport:w8:eager"]
    assert [(r["variant"], r["round"]) for r in data["results"]] == [(n, k) for k in (1, 2) for n in names]
    for r in data["results"]:
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0
    assert data["baseline"] == "eager-fp32" and [i["rounds"] for i in data["summary"]] == [2, 2, 2]
    assert data["summary"][0]["vs_baseline_median"] == 1.0
    md = (out / "bench.md").read_text()
    assert "| variant |" in md and "Over rounds" in md and "vs eager-fp32 (median)" in md
    from qexport.bench import cpu_features

    assert data["cpu"] == cpu_features() and f"torch kernels: {data['cpu']['torch_capability']}" in md
    assert (out / "bench.csv").read_text().startswith("variant,")
    # each row was also appended as it was measured, so a stopped run keeps them
    streamed = [json.loads(line) for line in (out / "bench.rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["round"], r["decode_tok_s"]) for r in streamed] == [
        (r["variant"], r["round"], r["decode_tok_s"]) for r in data["results"]]
    assert main(argv) == 2  # results exist: not overwritten without --force
    assert main(["bench", "--variants", "qexport:w8:gpu"]) == 2
    assert "target must be one of" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--variants", "eager-fp32", "--baseline", "onnx:fp32"]) == 2
    assert "baseline 'onnx:fp32' is not one of the variants" in capsys.readouterr().err


def test_bench_frozen_inductor_baseline_and_torchao_variants(tiny_dir, tmp_path, capsys):
    from qexport.bench import parse_variant

    assert parse_variant("torchao:int8-dynamic") == {"kind": "torchao", "config": "int8-dynamic", "float_head": "False"}
    assert parse_variant("torchao:int8-dynamic:float-head")["float_head"] == "True"
    assert main(["bench", "--variants", "torchao:int3"]) == 2
    assert "torchao config must be one of" in capsys.readouterr().err
    out = tmp_path / "bench"
    variants = "inductor-fp32-frozen,qexport:w4g64:inductor"
    if importlib.util.find_spec("torchao") is not None:
        variants += ",torchao:int8-dynamic"
    assert main(["bench", "--model", str(tiny_dir), "--variants", variants, "--prompt-tokens", "8",
                 "--new-tokens", "3", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["baseline"] == "inductor-fp32-frozen"
    for r in data["results"]:
        assert r["decode_tok_s"] > 0 and r["decode_vs_inductor_fp32_frozen"] > 0
    assert "decode_vs_inductor_fp32_frozen" in (out / "bench.md").read_text()


def test_bench_summary_takes_the_median_of_per_round_ratios():
    from qexport.bench import summarize, to_markdown

    speeds = [("a", 40.0), ("b", 80.0), ("a", 20.0), ("b", 50.0), ("a", 40.0), ("b", 60.0)]  # 3 rounds
    rows = [{"variant": v, "decode_tok_s": t} for v, t in speeds]
    s = {i["variant"]: i for i in summarize(rows, "a")}
    assert s["b"]["rounds"] == 3 and s["b"]["decode_tok_s_median"] == 60.0
    # rounds 2.0x, 2.5x, 1.5x: median 2.0, where the ratio of the medians (60 / 40) would say 1.5
    assert (s["b"]["vs_baseline_median"], s["b"]["vs_baseline_min"], s["b"]["vs_baseline_max"]) == (2.0, 1.5, 2.5)
    assert s["a"]["vs_baseline_median"] == 1.0
    md = to_markdown({"model": "m", "threads": 2, "torch": "t", "prompt_tokens": 1, "new_tokens": 1,
                      "results": rows, "summary": summarize(rows, "a")})
    assert "| b | 3 | 60 | 50 - 80 | 2 | 1.5 - 2.5 |" in md


def test_bench_onnx_variants_compare_with_the_fp32_export(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    folder = tmp_path / "w8"
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # only this test's temporary folders
    leftovers = set(Path(tempfile.gettempdir()).glob("qexport-bench-*"))
    assert main(["export", "--model", str(tiny_dir), "--recipe", "w8", "--out", str(folder)]) == 0
    assert main(["bench", "--model", str(tiny_dir), "--variants", f"onnx:fp32,onnx:w4g128,onnx-dir:{folder}",
                 "--prompt-tokens", "8", "--new-tokens", "3", "--ppl-tokens", "256", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    fp, w4, w8 = rows["onnx:fp32"], rows["onnx:w4g128"], rows[f"onnx-dir:{folder}"]
    assert fp["decode_vs_onnx_fp32"] == 1.0 and w4["decode_vs_onnx_fp32"] > 0 and w4["export_s"] > 0
    assert "export_s" not in w8  # an existing folder is not exported again
    assert folder.is_dir()  # ... nor removed; exported variants leave nothing behind
    assert set(Path(tempfile.gettempdir()).glob("qexport-bench-*")) == leftovers
    # size is the files on disk, and perplexity runs in ONNX Runtime: the int4 export differs from fp32
    assert w4["size_bytes"] < w8["size_bytes"] < fp["size_bytes"]
    assert 4.0 < w4["bits_per_weight"] < 5.0 and fp["bits_per_weight"] is None
    assert w4["ppl"] != fp["ppl"] and abs(w8["ppl"] / fp["ppl"] - 1) < 0.05
    assert "decode_vs_onnx_fp32" in (out / "bench.md").read_text()
    assert main(["bench", "--variants", f"onnx-dir:{tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_calibrated_recipe_uses_calibration_windows(tiny_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["eval", "--model", str(tiny_dir), "--recipe", "w4g128-gptq", "--text", str(EMMA), "--tokens", "512",
                 "--calib-samples", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["recipe"]["algorithm"] == "gptq" and data["recipe"]["options"]["act_order"] is True
    assert data["layers_quantized"] == 14 and data["ppl"] != data["fp_ppl"]
    assert main(["eval", "--model", str(tiny_dir), "--recipe", "w4g128-gptq", "--text", str(EMMA), "--tokens", "512",
                 "--calib-samples", "2", "--calib-text", str(EMMA), "--json", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["ppl"] != data["ppl"]  # other calibration windows (default: Sense)
    assert main(["eval", "--model", str(tiny_dir), "--recipe", "w4g128-gptq", "--text", str(EMMA),
                 "--calib-samples", "0"]) == 2
    assert "--calib-samples" in capsys.readouterr().err


def test_bench_quality_columns_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_dir), "--variants", "eager-fp32,eager:w4g128,eager:w4g128-gptq",
                 "--prompt-tokens", "8", "--new-tokens", "2", "--ppl-tokens", "512", "--calib-samples", "2",
                 "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    assert rows["eager-fp32"]["bits_per_weight"] is None
    for name in ("eager:w4g128", "eager:w4g128-gptq"):
        assert 4.0 < rows[name]["bits_per_weight"] < 5.0
        assert rows[name]["size_bytes"] < rows["eager-fp32"]["size_bytes"]
        assert rows[name]["ppl"] > 0 and rows[name]["ppl"] != rows["eager-fp32"]["ppl"]
    assert rows["eager:w4g128"]["ppl"] != rows["eager:w4g128-gptq"]["ppl"]
    assert "| ppl | size_mb | bits_per_weight |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--model", str(tiny_dir), "--variants", "qexport:w4g128-gptq:eager"]) == 2
    assert "eager:w4g128-gptq" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Every command and flag: each test below checks that a flag's value reaches the result
# ----------------------------------------------------------------------------------------------------
SENSE = EMMA.parent / "sensesensibility.txt"


def _table_rows(printed: str) -> list[str]:
    """The variant names of the comparison table in ``printed`` (the lines after its dashed rule)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-------"))
    names = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        names.append(line.split()[0])
    return names


def test_demo_on_a_tiny_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo.json"
    argv = ["demo", "--model", str(tiny_dir), "--tokens", "512", "--recipes", "w8,w2g64", "--prompt", "Emma",
            "--max-new-tokens", "2", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"{tiny_dir}: perplexity on emma.txt, first 512 tokens; sizes in MB" in printed  # the default text
    assert printed.splitlines()[2].split() == ["variant", "ppl", "x", "fp32", "model", "MB", "linears", "MB", "vs",
                                               "fp16", "bits/w"]
    assert _table_rows(printed) == ["fp32", "w8", "w2g64"]
    assert "greedy generation, prompt: 'Emma'" in printed and "total time" in printed
    assert "qexport demo:" in captured.err and "w2g64: int2 weights" in captured.err
    data = json.loads(out.read_text())
    assert [v["variant"] for v in data["variants"]] == ["fp32", "w8", "w2g64"]
    assert data["tokens"] == 512 and all(v["tokens"] == 512 for v in data["variants"])
    assert all(len(v["generation"]) > 0 for v in data["variants"]) and data["bos"] is False
    assert data["variants"][2]["bits_per_weight"] < data["variants"][1]["bits_per_weight"] < 9
    # another text, BOS windows, no generation; the JSON file is replaced only with --force
    argv2 = ["demo", "--model", str(tiny_dir), "--text", str(SENSE), "--tokens", "600", "--recipes", "w8",
             "--max-new-tokens", "0", "--bos", "--json", str(out)]
    assert main(argv2) == 2 and "already exists" in capsys.readouterr().err
    assert main(argv2 + ["--force"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity on sensesensibility.txt" in printed and "greedy generation" not in printed
    again = json.loads(out.read_text())
    assert again["bos"] is True and again["tokens"] == 600 and "generation" not in again["variants"][0]
    assert again["fp_ppl"] != data["fp_ppl"]
    for bad, expect in ((["--recipes", "w5"], "unknown recipe preset 'w5'"), (["--tokens", "0"], "--tokens"),
                        (["--max-new-tokens", "-1"], "--max-new-tokens")):
        assert main(["demo", "--model", str(tiny_dir), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err


def test_demo_library_call_matches_the_command(tiny_dir):
    from qexport.demo import format_demo, run_demo

    lines = []
    result = run_demo(str(tiny_dir), ["w8"], EMMA, tokens=512, max_new_tokens=0, log=lines.append)
    assert [v["variant"] for v in result["variants"]] == ["fp32", "w8"] and lines[0].startswith("qexport demo:")
    text = format_demo(result)
    assert _table_rows(text) == ["fp32", "w8"] and f"{result['fp_ppl']:.3f}" in text


def test_eval_window_and_compile_backend(tiny_dir, tmp_path, capsys):
    eager, compiled = tmp_path / "eager.json", tmp_path / "compile.json"
    common = ["eval", "--model", str(tiny_dir), "--recipe", "w8", "--text", str(EMMA), "--tokens", "256",
              "--window", "128"]
    assert main([*common, "--json", str(eager)]) == 0
    assert main([*common, "--backend", "compile", "--target", "eager", "--json", str(compiled)]) == 0
    assert "128 windows" not in capsys.readouterr().out
    e, c = (json.loads(p.read_text()) for p in (eager, compiled))
    assert (e["backend"], c["backend"]) == ("eager", "compile/eager")
    assert e["window"] == c["window"] == 128 and e["windows"] == c["windows"] == 2
    assert c["ppl"] == pytest.approx(e["ppl"], rel=1e-3) and c["size_bytes"] == e["size_bytes"]
    for bad, expect in ((["--target", "eager"], "add --backend compile"),
                        (["--backend", "compile", "--kv-cache", "int8"], "compile back-end keeps a float cache"),
                        (["--reference"], "--backend onnxruntime"),
                        (["--no-float-reference"], "quantized folder")):
        assert main([*common, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err


def test_eval_kv_cache_with_float_weights(tiny_dir, tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert main(["eval", "--model", str(tiny_dir), "--recipe", "fp32", "--kv-cache", "int8", "--text", str(EMMA),
                 "--tokens", "256", "--window", "128", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["recipe"]["name"].startswith("fp32") and data["layers_quantized"] == 0
    assert data["kv_cache"]["bits"] == 8 and data["recipe"]["kv_cache"]["bits"] == 8
    assert data["size_bytes"] == data["fp_size_bytes"] and data["ppl"] != data["fp_ppl"]
    assert data["ppl"] == pytest.approx(data["fp_ppl"], rel=0.05)
    assert main(["eval", "--model", str(tiny_dir), "--recipe", "fp32", "--text", str(EMMA)]) == 2
    assert "--recipe fp32 only makes sense with --kv-cache" in capsys.readouterr().err


@pytest.fixture(scope="module")
def static_export(tiny_dir, tmp_path_factory):
    """A calibrated export: static activation scales from 2 windows of Emma, each behind BOS."""
    out = tmp_path_factory.mktemp("static") / "w8a8"
    assert main(["export", "--model", str(tiny_dir), "--recipe", "w8a8-static", "--calib-text", str(EMMA),
                 "--calib-samples", "2", "--bos", "--out", str(out)]) == 0
    return out


def test_calibrated_export_then_verify(static_export, tmp_path, capsys):
    report = json.loads((static_export / "export_report.json").read_text())
    assert report["recipe"] == "w8a8-static" and report["target"] == "ort"
    assert report["calibration"]["samples"] == 2 and report["calibration"]["text"] == str(EMMA)
    assert report["calibration"]["bos"] is True
    v = tmp_path / "v.json"
    assert main(["verify", str(static_export), "--decode-steps", "2", "--json", str(v)]) == 0
    assert "top-1 agreement 1.0000" in capsys.readouterr().out
    same = json.loads(v.read_text())
    assert same["decode_steps"] == 2 and same["top1_agreement"] == 1.0 and same["max_abs"] < 1e-4
    # the reference calibrated on other windows (--calib-text / --calib-samples / --no-bos) differs from the export
    for other in (["--calib-samples", "3"], ["--calib-text", str(SENSE), "--calib-samples", "2"],
                  ["--calib-text", str(EMMA), "--calib-samples", "2", "--no-bos"]):
        assert main(["verify", str(static_export), "--decode-steps", "1", *other, "--json", str(v), "--force"]) == 0
        assert json.loads(v.read_text())["max_abs"] > 1e-3, other
    capsys.readouterr()
    assert main(["verify", str(static_export), "--atol", "0.1"]) == 2
    assert "add --polygraphy" in capsys.readouterr().err
    assert main(["verify", str(static_export), "--max-new-tokens", "3"]) == 2
    assert "add --prompt" in capsys.readouterr().err
    assert main(["verify", str(static_export), "--decode-steps", "0"]) == 2
    assert "--decode-steps must be a positive integer" in capsys.readouterr().err


def test_export_kv_cache_embedding_form_and_verify_accuracy_level(tiny_dir, tmp_path, capsys):
    out, v = tmp_path / "w4kv", tmp_path / "v.json"
    assert main(["export", "--model", str(tiny_dir), "--recipe", "w4g64-sym-emb8", "--kv-cache", "int8",
                 "--embedding-form", "standard", "--out", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["kv_cache"]["quantized"]["bits"] == 8
    # by default (auto) ONNX Runtime's GatherBlockQuantized would take this int8 per-row table
    assert [layer["onnx"] for layer in report["layers"] if layer["name"] == "model.embed_tokens"] == [
        "Gather + DequantizeLinear int8 per-row"]
    assert report["ort_session_config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}
    assert main(["verify", str(out), "--decode-steps", "1", "--ort-accuracy-level", "4", "--json", str(v)]) == 0
    res = json.loads(v.read_text())
    assert res["ort_session_config"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
    assert res["kv_cache"]["bits"] == 8 and res["max_abs"] > 0
    # an export folder is evaluated as exported: --model / --recipe / --kv-cache do not apply
    capsys.readouterr()
    assert main(["eval", "--backend", "onnxruntime", str(out), "--text", str(EMMA), "--recipe", "w8"]) == 2
    assert "as it was exported" in capsys.readouterr().err


def test_export_for_tensorrt_then_build_engine(tiny_dir, tmp_path, monkeypatch, capsys):
    import fake_tensorrt

    out = tmp_path / "trt"
    assert main(["export", "--model", str(tiny_dir), "--recipe", "w8-trt", "--target", "tensorrt", "--out",
                 str(out)]) == 0
    assert json.loads((out / "export_report.json").read_text())["target"] == "tensorrt"
    assert main(["lint-trt", str(out)]) == 0
    assert "follows TensorRT's QDQ rules" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    plan, cache = tmp_path / "model.plan", tmp_path / "t.cache"
    argv = ["build-engine", str(out), "--out", str(plan), "--int8", "--max-batch", "2", "--max-seq", "16",
            "--max-past", "32", "--timing-cache", str(cache)]
    assert main(argv) == 0
    assert plan.read_bytes() == fake_tensorrt.ENGINE and cache.read_bytes() == b"timing-cache:"
    (profile,) = fake_tensorrt.calls[-1].config.profiles
    assert profile.shapes["input_ids"][2] == (2, 16) and profile.shapes["attention_mask"][2] == (2, 16 + 32)
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    assert main(["build-engine", str(out), "--out", str(tmp_path / "x.plan"), "--int4"]) == 2
    assert "int4" in capsys.readouterr().err.lower()
    assert main(["build-engine", str(out), "--out", str(tmp_path / "x.plan"), "--max-seq", "0"]) == 2
    assert "--max-seq must be a positive integer" in capsys.readouterr().err


def test_quantize_layout_kv_cache_and_calibration_then_eval(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "w8a8-static", "--kv-cache", "int8",
                 "--calib-text", str(SENSE), "--calib-samples", "2", "--layout", "qexport", "--out",
                 str(folder)]) == 0
    assert "layout qexport" in capsys.readouterr().out
    saved = json.loads((folder / "recipe.json").read_text())
    assert saved["recipe"]["name"] == "w8a8-static-kv8" and saved["recipe"]["kv_cache"]["bits"] == 8
    calibration = saved["provenance"]["calibration"]
    assert calibration["text"] == str(SENSE) and calibration["samples"] == 2
    # a quantized KV cache has no compressed-tensors form: asking for that layout is refused
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "w8", "--kv-cache", "int8", "--layout",
                 "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    assert "compressed-tensors" in capsys.readouterr().err
    # a saved folder: with the float source model's row, or without it (--no-float-reference)
    common = ["eval", "--model", str(folder), "--text", str(EMMA), "--tokens", "256", "--window", "128"]
    assert main(common) == 0
    assert _table_rows(capsys.readouterr().out) == ["fp32", "w8a8-static-kv8"]
    assert main([*common, "--no-float-reference", "--json", str(tmp_path / "e.json")]) == 0
    assert _table_rows(capsys.readouterr().out) == ["w8a8-static-kv8"]
    data = json.loads((tmp_path / "e.json").read_text())
    assert "fp_ppl" not in data and data["source_model"]
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "w8", "--out", str(folder)]) == 2
    assert "--force" in capsys.readouterr().err


def test_allocate_flags_reach_the_plan(tiny_dir, tmp_path, capsys):
    cache, recipe, plan = tmp_path / "sens.json", tmp_path / "mixed.json", tmp_path / "plan.json"
    common = ["allocate", "--model", str(tiny_dir), "--calib-text", str(SENSE), "--calib-samples", "2",
              "--seq-len", "32", "--seed", "1", "--sensitivities", str(cache)]
    assert main([*common, "--target-bits", "6", "--candidates", "w8,w4g128", "--method", "loss",
                 "--algorithm", "gptq", "--name", "mixed", "--out", str(recipe), "--json", str(plan)]) == 0
    assert f"wrote {cache}" in capsys.readouterr().err
    r = json.loads(recipe.read_text())
    assert r["name"] == "mixed" and r["algorithm"] == "gptq"
    assert {(rule["weight"]["bits"], rule["weight"].get("group_size")) for rule in r["rules"]} <= {(8, None),
                                                                                                   (4, 128)}
    p = json.loads(plan.read_text())
    assert p["method"] == "loss" and p["bos"] is False
    cached = json.loads(cache.read_text())
    assert cached["method"] == "loss" and cached["tokens"] == 2 * 31  # 2 windows of 32 tokens, 31 predicted each
    key = cached["key"]
    assert (key["calib_text"], key["samples"], key["seq_len"], key["seed"]) == (str(SENSE), 2, 32, 1)
    # other windows (--seed, --bos) do not match the cache
    for other in (["--seed", "2"], ["--bos"]):
        argv = [*common, *other, "--target-bits", "6", "--out", str(tmp_path / "other.json")]
        assert main(argv) == 2, other
        assert "another calibration set" in capsys.readouterr().err
    # the same windows measured by another method do not match either
    assert main([*common, "--target-bits", "6", "--method", "fisher", "--out", str(tmp_path / "other.json")]) == 2
    assert "holds loss sensitivities, not fisher" in capsys.readouterr().err
    # an existing recipe file is replaced only with --force
    again = [*common, "--target-bits", "6", "--candidates", "w8,w4g128", "--method", "loss", "--name", "again",
             "--out", str(recipe)]
    assert main(again) == 2 and "--force" in capsys.readouterr().err
    assert main([*again, "--force"]) == 0 and json.loads(recipe.read_text())["name"] == "again"


def test_bench_flags_reach_the_result(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_dir), "--variants", "eager-fp32,eager:w8", "--prompt-tokens", "8",
                 "--new-tokens", "3", "--baseline", "eager:w8", "--bos", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert (data["prompt_tokens"], data["new_tokens"], data["bos"], data["calib_samples"]) == (8, 3, True, None)
    assert data["baseline"] == "eager:w8"
    assert {i["variant"]: i["vs_baseline_median"] for i in data["summary"]}["eager:w8"] == 1.0
    assert "Over rounds" not in capsys.readouterr().out  # one round: no summary table
    assert main(["bench", "--model", str(tiny_dir), "--variants", "eager:w4g128-gptq", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--calib-samples", "3", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "bench.json").read_text())["calib_samples"] == 3
    assert main(["bench", "--variants", "eager-fp32", "--ppl-tokens", "-1"]) == 2
    assert "--ppl-tokens" in capsys.readouterr().err


class FakeClock:
    """Seconds that move only when told: every duration the bench reads is exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedModel:
    """A stand-in model whose calls take known times on ``clock``: the first forward 2 s (compilation), later
    forwards 0.25 s, a generate() 0.5 s of set-up then 0.125 s per token."""

    clock = FakeClock()  # a class attribute: the bench's deepcopy of the model keeps the same clock

    def __init__(self):
        self.calls = 0

    def __call__(self, ids, use_cache=False):
        self.calls += 1
        self.clock.now += 2.0 if self.calls == 1 else 0.25

    def generate(self, ids, max_new_tokens, logits_processor, **kwargs):
        self.clock.now += 0.5
        for _ in range(max_new_tokens):
            self.clock.now += 0.125
            logits_processor[0](ids, None)


def test_bench_timing_with_a_known_answer():
    from qexport.bench import measure

    prompt = torch.zeros(1, 16, dtype=torch.long)
    row = measure(TimedModel(), prompt, {"kind": "eager-fp32"}, new_tokens=9, clock=TimedModel.clock)
    assert row["first_call_s"] == 2.0 and row["prefill_s"] == 0.25 and row["prefill_tok_s"] == 64.0
    # 9 tokens: 8 intervals of 0.125 s between the first and the last -> 8 tokens/s; generate() 0.5 + 9 * 0.125
    assert row["decode_tok_s"] == 8.0 and row["generate_s"] == 1.625


def test_recipes_marks_the_presets_that_need_data(capsys):
    from qexport.presets import PRESETS

    assert main(["recipes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name, recipe in PRESETS.items():
        assert lines[name][len(name):].lstrip().startswith("[data]") == recipe.needs_data, name
    assert "[data]" in lines["w4g128-gptq"] and "[data]" in lines["w8a8-static"] and "[data]" not in lines["w8"]
    assert main(["recipes", "--show", "w5"]) == 2
    assert "unknown recipe preset" in capsys.readouterr().err


# Where each flag of each command is tested: "file::test" (a test that fails when the flag is ignored).
FLAG_TESTS = {
    "eval": {
        "--model": "test_cli.py::test_eval_end_to_end_writes_json",
        "folder": "test_export.py::test_cli_export_verify_eval",
        "--recipe": "test_cli.py::test_eval_end_to_end_writes_json",
        "--text": "test_cli.py::test_bad_input_is_one_line_exit_2",
        "--tokens": "test_cli.py::test_eval_end_to_end_writes_json",
        "--window": "test_cli.py::test_eval_window_and_compile_backend",
        "--backend": "test_cli.py::test_eval_window_and_compile_backend",
        "--reference": "test_export.py::test_cli_export_verify_eval",
        "--target": "test_cli.py::test_eval_window_and_compile_backend",
        "--calib-text": "test_cli.py::test_eval_calibrated_recipe_uses_calibration_windows",
        "--calib-samples": "test_cli.py::test_eval_calibrated_recipe_uses_calibration_windows",
        "--kv-cache": "test_cli.py::test_eval_kv_cache_with_float_weights",
        "--no-float-reference": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--bos": "test_bos.py::test_cli_eval_records_bos",
        "--json": "test_cli.py::test_eval_end_to_end_writes_json",
        "--force": "test_cli.py::test_eval_end_to_end_writes_json",
    },
    "quantize": {
        "--model": "test_checkpoint.py::test_eval_of_a_folder_equals_eval_of_its_recipe",
        "--recipe": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--out": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--calib-text": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--calib-samples": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--kv-cache": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--layout": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
        "--stream": "test_stream.py::test_cli_quantize_stream",
        "--max-activation-gb": "test_stream.py::test_cli_quantize_stream",
        "--bos": "test_bos.py::test_cli_quantize_records_bos_in_recipe_provenance",
        "--force": "test_cli.py::test_quantize_layout_kv_cache_and_calibration_then_eval",
    },
    "demo": {flag: "test_cli.py::test_demo_on_a_tiny_checkpoint" for flag in (
        "--model", "--text", "--tokens", "--recipes", "--prompt", "--max-new-tokens", "--bos", "--json", "--force")},
    "bench": {
        "--model": "test_cli.py::test_bench_on_tiny_checkpoint_writes_results",
        "--variants": "test_cli.py::test_bench_on_tiny_checkpoint_writes_results",
        "--prompt-tokens": "test_cli.py::test_bench_flags_reach_the_result",
        "--new-tokens": "test_cli.py::test_bench_flags_reach_the_result",
        "--ppl-tokens": "test_cli.py::test_bench_quality_columns_and_plot",
        "--calib-samples": "test_cli.py::test_bench_flags_reach_the_result",
        "--rounds": "test_cli.py::test_bench_on_tiny_checkpoint_writes_results",
        "--isolate": "test_cli.py::test_bench_isolate_measures_in_fresh_processes",
        "--baseline": "test_cli.py::test_bench_flags_reach_the_result",
        "--bos": "test_cli.py::test_bench_flags_reach_the_result",
        "--out": "test_cli.py::test_bench_on_tiny_checkpoint_writes_results",
        "--force": "test_cli.py::test_bench_flags_reach_the_result",
    },
    "export": {
        "--model": "test_cli.py::test_calibrated_export_then_verify",
        "--recipe": "test_cli.py::test_calibrated_export_then_verify",
        "--out": "test_cli.py::test_calibrated_export_then_verify",
        "--target": "test_cli.py::test_export_for_tensorrt_then_build_engine",
        "--calib-text": "test_cli.py::test_calibrated_export_then_verify",
        "--calib-samples": "test_cli.py::test_calibrated_export_then_verify",
        "--kv-cache": "test_cli.py::test_export_kv_cache_embedding_form_and_verify_accuracy_level",
        "--ort-accuracy-level": "test_export.py::test_cli_export_verify_eval",
        "--embedding-form": "test_cli.py::test_export_kv_cache_embedding_form_and_verify_accuracy_level",
        "--attention-form": "test_gqa_form.py::test_cli_attention_form",
        "--format": "test_gguf.py::test_cli_writes_a_gguf_file_and_refuses_onnx_options",
        "--float-type": "test_gguf.py::test_cli_writes_a_gguf_file_and_refuses_onnx_options",
        "--layout": "test_triton_repo.py::test_the_repository_layout_and_its_config_match_the_graph",
        "--triton-name": "test_triton_repo.py::test_the_repository_layout_and_its_config_match_the_graph",
        "--no-fuse": "test_export.py::test_cli_export_verify_eval",
        "--bos": "test_cli.py::test_calibrated_export_then_verify",
        "--force": "test_export.py::test_cli_export_verify_eval",
    },
    "verify": {
        "folder": "test_cli.py::test_calibrated_export_then_verify",
        "--decode-steps": "test_cli.py::test_calibrated_export_then_verify",
        "--prompt": "test_export.py::test_cli_export_verify_eval",
        "--max-new-tokens": "test_export.py::test_cli_export_verify_eval",
        "--calib-text": "test_cli.py::test_calibrated_export_then_verify",
        "--calib-samples": "test_cli.py::test_calibrated_export_then_verify",
        "--bos": "test_cli.py::test_calibrated_export_then_verify",
        "--ort-accuracy-level": "test_cli.py::test_export_kv_cache_embedding_form_and_verify_accuracy_level",
        "--polygraphy": "test_export.py::test_cli_export_verify_eval",
        "--engine": "test_export.py::test_cli_export_verify_eval",
        "--atol": "test_export.py::test_cli_export_verify_eval",
        "--rtol": "test_export.py::test_cli_export_verify_eval",
        "--json": "test_cli.py::test_calibrated_export_then_verify",
        "--force": "test_cli.py::test_calibrated_export_then_verify",
    },
    "lint-trt": {"model": "test_cli.py::test_export_for_tensorrt_then_build_engine"},
    "build-engine": {flag: "test_cli.py::test_export_for_tensorrt_then_build_engine" for flag in (
        "model", "--out", "--int8", "--int4", "--max-batch", "--max-seq", "--max-past", "--timing-cache", "--force")},
    "allocate": {
        **{flag: "test_cli.py::test_allocate_flags_reach_the_plan" for flag in (
            "--model", "--target-bits", "--out", "--candidates", "--method", "--algorithm", "--name", "--calib-text",
            "--calib-samples", "--seq-len", "--seed", "--sensitivities", "--bos", "--json", "--force")},
        "--target-size": "test_allocate.py::test_cli_allocate_then_eval",
    },
    "recipes": {"--show": "test_cli.py::test_recipes_list_and_show"},
    "models": {"--markdown": "test_families.py::test_readme_table_is_the_command_output",
               "--json": "test_families.py::test_models_command_lists_every_family_with_its_layout"},
}


def test_every_command_and_flag_has_a_test():
    import argparse
    import re

    from qexport.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    tests_dir = Path(__file__).resolve().parent
    for command, parser in sub.choices.items():
        flags = {max(a.option_strings, key=len) if a.option_strings else a.dest for a in parser._actions
                 if not isinstance(a, argparse._HelpAction)}
        flags = {"--bos" if f == "--no-bos" else f for f in flags}
        assert flags == set(FLAG_TESTS.get(command, {})), f"{command}: flags without a test listed here"
        for flag, where in FLAG_TESTS[command].items():
            file, name = where.split("::")
            source = (tests_dir / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{command} {flag}: {where} does not exist"
            def body_of(fn: str) -> str:
                m = re.search(rf"^def {fn}\(.*?(?=^(?:def |class |@)|\Z)", source, re.M | re.S)
                return m.group(0) if m else ""

            body = body_of(name)  # with the fixtures it takes from this file (which may run the command)
            params = re.match(rf"def {name}\(([^)]*)\)", body).group(1)
            body += "".join(body_of(p.strip()) for p in params.split(",") if p.strip())
            if flag.startswith("--"):  # the test passes the flag itself (its effect is what the test checks)
                spelled = (flag, "--no-bos") if flag == "--bos" else (flag,)
                assert any(f'"{f}"' in body for f in spelled), f"{command} {flag}: {where} never passes {flag}"
