#!/usr/bin/env python3
"""Run GPTQModel for the cross-tool tests, inside GPTQModel's own virtual environment.

Imports nothing from gptq_plugin. Token windows come in as JSON (``[[id, ...], ...]``, made by the test with
the model's tokenizer), so both tools see the same tokens. Prints one JSON object as the last line of stdout;
GPTQModel's own output goes to stderr.

    python gptqmodel_worker.py quantize MODEL_DIR OUT_DIR --calib calib.json --bits 4 --group-size 64 --format gptq_v2
    python gptqmodel_worker.py ppl CKPT_DIR --ids eval.json
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
    q = sub.add_parser("quantize", help="quantize MODEL_DIR with GPTQModel and save it to OUT_DIR")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--calib", required=True, help="JSON list of calibration token windows")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False)
    q.add_argument("--format", choices=["gptq", "gptq_v2"], default="gptq")
    e = sub.add_parser("ppl", help="perplexity of a GPTQ checkpoint loaded with GPTQModel (fp32 compute)")
    e.add_argument("ckpt_dir")
    e.add_argument("--ids", required=True, help="JSON list of evaluation token windows")
    return p.parse_args(argv)


def main(args) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    if args.cmd == "quantize":
        from gptqmodel import GPTQConfig

        wins = json.loads(Path(args.calib).read_text())
        calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in wins]
        qcfg = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.act_order,
                           act_group_aware=False, format=args.format)
        model = GPTQModel.load(args.model_dir, qcfg, device="cpu")
        model.quantize(calibration, batch_size=1)
        model.save(args.out_dir)
        return {"tool": "gptqmodel", "version": gptqmodel.__version__, "out_dir": args.out_dir, "format": args.format}

    # ppl: GPTQModel's loader and its portable torch kernel. TorchLinear refuses float32 at load time, so the
    # model is loaded in bfloat16, cast to float32, and every floating tensor (scales, norms, embeddings) is put
    # back from the checkpoint exactly, so weights and activations are fp32 as on the plugin side.
    from safetensors.torch import load_file

    ids = torch.tensor(json.loads(Path(args.ids).read_text()), dtype=torch.long)
    qmodel = GPTQModel.load(args.ckpt_dir, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
    hf = qmodel.model
    hf.to(torch.float32)
    saved = {}
    for f in sorted(Path(args.ckpt_dir).glob("*.safetensors")):
        saved.update(load_file(str(f)))
    params = dict(hf.named_parameters())
    params.update(dict(hf.named_buffers()))
    for k, t in saved.items():
        if t.is_floating_point() and k in params and params[k].shape == t.shape:
            params[k].data = t.to(torch.float32).contiguous()
    for m in hf.modules():
        if hasattr(m, "qweight") and hasattr(m, "clear_weight_cache"):
            m.clear_weight_cache()
    hf.eval()
    kernels = sorted({type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")})
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in ids:
            logits = hf(input_ids=w.unsqueeze(0), use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
            count += w.numel() - 1
    return {"tool": "gptqmodel", "version": gptqmodel.__version__, "perplexity": math.exp(nll / count),
            "tokens": count, "kernels": kernels}


if __name__ == "__main__":
    ARGS = parse_args()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # GPTQModel prints progress to stdout: keep the real stdout for the JSON line
    for var, val in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("GPTQMODEL_OFFLINE", "1"),
                     ("CUDA_VISIBLE_DEVICES", ""), ("TOKENIZERS_PARALLELISM", "false"), ("GPTQMODEL_CPU_WORKERS", "2")):
        os.environ.setdefault(var, val)
    result = main(ARGS)
    print(json.dumps(result), file=out, flush=True)
    sys.exit(0)
