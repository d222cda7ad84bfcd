"""Perplexity of a GGUF file through llama.cpp itself (llama-cpp-python), on token windows given as JSON.

Runs in llama-cpp-python's own environment (numpy only, no torch):

    python benchmarks/llama_cpp_ppl.py MODEL.gguf IDS.json [--threads N]

IDS.json is ``[[token, ...], ...]``: the windows of the plugin's perplexity protocol (``gptq_plugin.evaluate``),
tokenized by the Hugging Face tokenizer, so both sides score the same tokens. Prints one JSON line
``{"perplexity": ..., "windows": ..., "tokens": ...}``: exp of the mean negative log-likelihood of every predicted
token (each window predicts its tokens 1..n-1 from the ones before, with no BOS added), as the plugin computes it.
"""

import argparse
import json
import math

import numpy as np
from llama_cpp import Llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("ids")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    windows = json.load(open(args.ids))
    n_ctx = len(windows[0])
    llm = Llama(model_path=args.gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                n_threads=args.threads, n_threads_batch=args.threads)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # [T-1, vocab]: predictions of w[1:]
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    print(json.dumps({"perplexity": math.exp(nll / count), "windows": len(windows), "tokens": count}))


if __name__ == "__main__":
    main()
