#!/usr/bin/env python3
"""Perplexity of a checkpoint under vLLM's *built-in* quantization (not the plugin), inside vLLM's own venv; or
greedy tokens and prompt log-probabilities of prompts under any ``--quantization`` (``generate``).

Token windows come in as JSON; the perplexity is computed from vLLM's prompt log-probabilities (the
log-probability of every prompt token after the first). The plugin's vLLM entry point is disabled
(``VLLM_PLUGINS=""``) so that vLLM's own GPTQ code reads the checkpoint. On CPUs with AMX, vLLM's CPU build runs
4-bit layers as W4A8 (activations quantized to int8 on the fly) unless ``VLLM_CPU_INT4_W4A8=0``; that costs
~5% perplexity on the demo model, so it is off here by default (weight-only, what the checkpoint means). Prints one JSON object as the last
line of stdout.

    python vllm_worker.py ppl CKPT_DIR --ids eval.json [--dtype float32] [--quantization gptq]
    python vllm_worker.py generate CKPT_DIR --prompts prompts.json --max-tokens 16 --quantization gptq-plugin

``generate`` with ``--quantization gptq-plugin`` keeps vLLM's plugins (the plugin's entry point registers that
method; the worker itself still imports nothing from the plugin): greedy continuations (no eos stop) and
``log p(prompt[i] | prompt[:i])`` for ``i >= 1`` of each prompt (token ids, JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("ppl")
    e.add_argument("ckpt_dir")
    e.add_argument("--ids", required=True)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--quantization", default=None, help="vLLM's --quantization (default: from the checkpoint)")
    g = sub.add_parser("generate")
    g.add_argument("ckpt_dir")
    g.add_argument("--prompts", required=True)
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--quantization", default=None)
    return p.parse_args(argv)


def generate(args) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts).read_text())
    llm = LLM(model=args.ckpt_dir, quantization=args.quantization, dtype=args.dtype, enforce_eager=True,
              max_model_len=max(map(len, prompts)) + args.max_tokens + 8, max_num_seqs=4, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
                          use_tqdm=False)
    scored = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    lps = [[o.prompt_logprobs[i][p["prompt_token_ids"][i]].logprob for i in range(1, len(p["prompt_token_ids"]))]
           for p, o in zip(prompts, scored)]
    cfg = llm.llm_engine.model_config
    return {"tool": "vllm", "version": vllm.__version__, "quantization": str(cfg.quantization), "dtype": str(cfg.dtype),
            "greedy": [list(o.outputs[0].token_ids) for o in greedy], "prompt_logprobs": lps}


def main(args) -> dict:
    if args.cmd == "generate":
        return generate(args)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ids = json.loads(Path(args.ids).read_text())
    llm = LLM(model=args.ckpt_dir, quantization=args.quantization, dtype=args.dtype, enforce_eager=True,
              max_model_len=len(ids[0]) + 8, max_num_seqs=4, seed=0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in ids], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(ids, outs):
        for i in range(1, len(w)):
            nll -= o.prompt_logprobs[i][w[i]].logprob
            count += 1
    cfg = llm.llm_engine.model_config
    return {"tool": "vllm", "version": vllm.__version__, "quantization": str(cfg.quantization), "dtype": str(cfg.dtype),
            "perplexity": math.exp(nll / count), "tokens": count,
            "VLLM_CPU_INT4_W4A8": os.environ.get("VLLM_CPU_INT4_W4A8")}


if __name__ == "__main__":
    ARGS = parse_args()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if ARGS.quantization != "gptq-plugin":
        os.environ["VLLM_PLUGINS"] = ""  # vLLM's own GPTQ, not gptq-plugin's entry point
    for var, val in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("VLLM_CPU_INT4_W4A8", "0")):
        os.environ.setdefault(var, val)
    result = main(ARGS)
    print(json.dumps(result), file=out, flush=True)
    sys.exit(0)
