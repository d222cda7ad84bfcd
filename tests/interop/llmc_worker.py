#!/usr/bin/env python3
"""Run llm-compressor / compressed-tensors for the cross-tool tests, inside their own virtual environment.

Imports nothing from gptq_plugin. Token windows come in as JSON (``[[id, ...], ...]``). Prints one JSON object
as the last line of stdout.

    python llmc_worker.py quantize MODEL_DIR OUT_DIR --calib calib.json --bits 4 --group-size 64 [--no-sym]
    python llmc_worker.py ppl CKPT_DIR --ids eval.json     # Transformers + compressed-tensors, fp32
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
    q = sub.add_parser("quantize", help="GPTQ with llm-compressor's GPTQModifier, saved as pack-quantized")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--calib", required=True)
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--actorder", default=None, help="null, weight or group")
    e = sub.add_parser("ppl", help="perplexity of a compressed-tensors checkpoint loaded by Transformers")
    e.add_argument("ckpt_dir")
    e.add_argument("--ids", required=True)
    return p.parse_args(argv)


def main(args) -> dict:
    import compressed_tensors
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.cmd == "quantize":
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier

        wins = json.loads(Path(args.calib).read_text())
        ds = Dataset.from_dict({"input_ids": wins, "attention_mask": [[1] * len(w) for w in wins]})
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        weights = {"num_bits": args.bits, "type": "int", "symmetric": args.sym, "strategy": "group",
                   "group_size": args.group_size, "actorder": None if args.actorder in (None, "null") else args.actorder}
        recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                              ignore=["lm_head"])
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(wins),
                max_seq_length=len(wins[0]))
        model.save_pretrained(args.out_dir, save_compressed=True)
        AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(args.out_dir)
        return {"tool": "llm-compressor", "version": llmcompressor.__version__,
                "compressed_tensors": compressed_tensors.__version__, "out_dir": args.out_dir}

    ids = torch.tensor(json.loads(Path(args.ids).read_text()), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt_dir, dtype=torch.float32)
    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in ids:
            logits = model(input_ids=w.unsqueeze(0), use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
            count += w.numel() - 1
    kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "quantization_scheme")})
    return {"tool": "transformers+compressed-tensors", "compressed_tensors": compressed_tensors.__version__,
            "perplexity": math.exp(nll / count), "tokens": count, "modules": kinds}


if __name__ == "__main__":
    ARGS = parse_args()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for var, val in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("CUDA_VISIBLE_DEVICES", ""), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, val)
    result = main(ARGS)
    print(json.dumps(result), file=out, flush=True)
    sys.exit(0)
