"""The command line: end to end on a tiny local checkpoint, and one-line errors with exit code 2."""

import json
import tempfile
from pathlib import Path
import subprocess
import sys

import pytest

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
    assert (out / "bench.csv").read_text().startswith("variant,")
    assert main(argv) == 2  # results exist: not overwritten without --force
    assert main(["bench", "--variants", "qexport:w8:gpu"]) == 2
    assert "target must be one of" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--variants", "eager-fp32", "--baseline", "onnx:fp32"]) == 2
    assert "baseline 'onnx:fp32' is not one of the variants" in capsys.readouterr().err


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


def test_bench_onnx_variants_compare_with_the_fp32_export(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    folder = tmp_path / "w8"
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
