"""Every script in examples/ runs (on a tiny local checkpoint, to stay fast); _common.py is their shared helpers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import save_tiny_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")))
def test_example_runs(script, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    p = subprocess.run([sys.executable, str(EXAMPLES / script), "--model", str(ckpt), "--tokens", "512"],
                       capture_output=True, text=True, timeout=600)
    if "\nNEEDS_LLAMA_CPP = True" in (EXAMPLES / script).read_text():
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is not None:
            pytest.skip("the llama.cpp comparison runs on SmolLM2 for minutes: docs/gguf.md has its command")
        # without llama-cpp-python (an opt-in build): one line that says how to get it, status 2
        assert p.returncode == 2, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1 and "llama-cpp-python" in p.stderr
        return
    if "\nNEEDS_CUDA = True" in (EXAMPLES / script).read_text() and not torch.cuda.is_available():
        # GPU-only scripts refuse in one line, with status 2, on a CPU-only machine
        assert p.returncode == 2, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1 and "CUDA" in p.stderr
        return
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fp32" in p.stdout
