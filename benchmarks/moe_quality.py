"""GPTQ vs RTN on a mixture-of-experts model with trained weights, and the experts' calibration ("all" vs "routed").

No small trained MoE can be had offline (no Hub; the package index has none we found), so this trains one: a
Mixtral-style model (Transformers' ``MixtralConfig``, fused experts: 4 layers, hidden 128, 8 experts top-2, expert
intermediate 256, router load-balancing loss on) for ``--epochs`` passes over WikiText-2 valid plus the first half
of WikiText-2 test (the copies shipped with gptq-plugin), with a word-level tokenizer built from the valid text (the
4,096 most frequent words; others ``<unk>``). Few epochs on purpose: a model trained to memorise its small training
text gets *better* on held-out text when quantization noise perturbs it, which says nothing about quantization.
Then each configuration quantizes a fresh copy of the trained model with
:func:`gptq_plugin.pipeline.quantize_model` (calibration: 128 windows of 128 tokens of WikiText-2 valid, part of the
training text as pretraining data is) and scores perplexity on the held-out second half of WikiText-2 test
(word-level, the first ``--eval-windows`` windows of 128 tokens, fp32).

    python benchmarks/moe_quality.py [--epochs 2] [--threads 2] [--out benchmarks/results/moe_quality.jsonl]

Prints a markdown table (perplexity, its increase over the float model, quantize seconds, experts that fell back to
RTN) and appends one JSON line per configuration to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptq_plugin.calibration_data import _data_file, read_text  # noqa: E402
from gptq_plugin.config import QuantizeConfig  # noqa: E402
from gptq_plugin.evaluate import perplexity  # noqa: E402
from gptq_plugin.pipeline import quantize_model  # noqa: E402

SEQ = 128
VOCAB = 4096
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.replace("<unk>", " "))


def encode(text: str, vocab: dict[str, int]) -> torch.Tensor:
    return torch.tensor([vocab.get(w, 0) for w in words(text)], dtype=torch.long)


def build_model(vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=SEQ, tie_word_embeddings=True, output_router_logits=True,
                        router_aux_loss_coef=0.02)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def train(model, ids: torch.Tensor, epochs: float, batch: int = 16, lr: float = 3e-3) -> dict:
    n = (ids.numel() - 1) // SEQ
    x = ids[: n * SEQ].view(n, SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    t0, step, losses = time.time(), 0, []
    steps = max(1, int(epochs * n / batch))
    g = torch.Generator().manual_seed(0)
    while step < steps:
        frac = step / steps
        for group in opt.param_groups:  # linear warm-up over 3%, then cosine to 10%
            group["lr"] = lr * min(1.0, frac / 0.03) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        rows = torch.randint(0, n, (batch,), generator=g)
        out = model(input_ids=x[rows], labels=x[rows])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        step += 1
    model.eval()
    model.config.output_router_logits = False
    return {"steps": step, "tokens": step * batch * SEQ, "final_train_loss": sum(losses[-50:]) / min(50, len(losses)),
            "seconds": time.time() - t0}


# the recipe docs/moe.md's table was measured with (the CLI default until session 9's model panel)
RECIPE = dict(desc_act=True, static_groups=True, mse=2.4)
# gptq_plugin.config.RECOMMENDED without GPTAQ: the CLI's default until 7 Dec 2026 (now `--gptaq 0`); with
# gptaq=0.25 below, today's default
DEFAULT = dict(act_group_aware=True, mse=2.4, refit_scales=True)
CONFIGS = {  # name -> QuantizeConfig kwargs
    "rtn 4-bit g128": dict(bits=4, group_size=128, method="rtn"),
    "gptq 4-bit g128 all-tokens": dict(bits=4, group_size=128, **RECIPE, moe_calibration="all"),
    "gptq 4-bit g128 routed": dict(bits=4, group_size=128, **RECIPE, moe_calibration="routed"),
    "rtn 3-bit g128": dict(bits=3, group_size=128, method="rtn"),
    "gptq 3-bit g128 all-tokens": dict(bits=3, group_size=128, **RECIPE, moe_calibration="all"),
    "gptq 3-bit g128 routed": dict(bits=3, group_size=128, **RECIPE, moe_calibration="routed"),
    # the CLI's recipe since the model panel (group-aware order, MSE clipping, scale refit), without and with GPTAQ
    # (with: the default since 7 Dec 2026)
    "gptq 4-bit g128 default": dict(bits=4, group_size=128, **DEFAULT),
    "gptq 4-bit g128 default + gptaq 0.25": dict(bits=4, group_size=128, **DEFAULT, gptaq=0.25),
    "gptq 3-bit g128 default": dict(bits=3, group_size=128, **DEFAULT),
    "gptq 3-bit g128 default + gptaq 0.25": dict(bits=3, group_size=128, **DEFAULT, gptaq=0.25),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_quality.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train_text = read_text(_data_file("valid.tokens.txt"))
    test_text = read_text(_data_file("wiki.test.raw"))
    counts = collections.Counter(words(train_text))
    vocab = {"<unk>": 0}
    for w, _ in counts.most_common(VOCAB - 1):
        vocab[w] = len(vocab)
    lines = test_text.splitlines(keepends=True)
    seen, held_out = "".join(lines[: len(lines) // 2]), "".join(lines[len(lines) // 2:])
    train_ids, test_ids = encode(train_text, vocab), encode(held_out, vocab)
    model = build_model(len(vocab))
    info = train(model, torch.cat([train_ids, encode(seen, vocab)]), args.epochs)
    calib = train_ids[: 128 * SEQ].view(128, SEQ)
    n_eval = min(args.eval_windows, test_ids.numel() // SEQ)
    evals = test_ids[: n_eval * SEQ].view(n_eval, SEQ)
    base = perplexity(model, evals, batch_size=8, progress=False)
    print(f"trained {info['steps']} steps ({info['tokens'] / 1e6:.1f}M tokens) in {info['seconds']:.0f} s, final train "
          f"loss {info['final_train_loss']:.3f}; float perplexity {base:.2f} on held-out WikiText-2 test ({n_eval} x "
          f"{SEQ} word-level tokens)", flush=True)
    rows = [("float (fp32)", base, None, None, None)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        m = copy.deepcopy(model)
        cfg = QuantizeConfig(**CONFIGS[name])
        t0 = time.time()
        rep = quantize_model(m, None if cfg.method == "rtn" else calib, cfg, batch_size=16, progress=False)
        secs = time.time() - t0
        ppl = perplexity(m, evals, batch_size=8, progress=False)
        fell = sum(e["path"].startswith("rtn:") for e in rep.experts().values())
        rows.append((name, ppl, ppl - base, secs, fell))
        print(f"{name}: perplexity {ppl:.2f} ({ppl - base:+.2f}), {secs:.1f} s, {fell} experts fell back to RTN",
              flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({"config": name, "perplexity": ppl, "float_perplexity": base, "quantize_s": secs,
                                "experts_rtn_fallback": fell, "experts": len(rep.experts()), "train": info,
                                "eval_windows": n_eval, "seqlen": SEQ, "threads": args.threads}) + "\n")
    print("\n| configuration | held-out ppl | increase | quantize s | experts on RTN fallback |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ppl, inc, secs, fell in rows:
        print(f"| {name} | {ppl:.2f} | {'' if inc is None else f'{inc:+.2f}'} | "
              f"{'' if secs is None else f'{secs:.1f}'} | {'' if fell is None else fell} |")


if __name__ == "__main__":
    main()
