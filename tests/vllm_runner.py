"""Run by tests/test_vllm.py in an environment with vLLM (``QEXPORT_VLLM_PYTHON``): the prompt logprobs and the
greedy tokens of a saved folder in vLLM, as JSON on the stdout line that starts with QEXPORT_VLLM_RESULT.

    python tests/vllm_runner.py DIR '{"prompts": [[1, 2, 3], ...], "new_tokens": 8}'
"""

import json
import os
import sys


def main() -> None:
    folder, request = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # bfloat16: vLLM's CPU int4 kernel takes no float32
    llm = LLM(model=folder, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=256, enforce_eager=True,
              max_num_seqs=2)
    params = SamplingParams(max_tokens=request["new_tokens"], temperature=0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params)
    result = [{"prompt_logprobs": [None if lp is None else next(iter(lp.values())).logprob for lp in o.prompt_logprobs],
               "tokens": list(o.outputs[0].token_ids)} for o in outs]
    print("QEXPORT_VLLM_RESULT", json.dumps(result), flush=True)  # vLLM prints its own lines too


if __name__ == "__main__":  # vLLM's engine starts worker processes by spawning
    main()
