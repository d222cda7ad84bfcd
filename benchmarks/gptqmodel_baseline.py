#!/usr/bin/env python3
"""GPTQModel baseline: quantize a Hugging Face causal LM with GPTQModel and measure it by our protocol.

Runs inside the separate virtual environment made by ``benchmarks/setup_gptqmodel_venv.sh``
(``.venv-gptqmodel``: GPTQModel 7.7.0, CPU torch 2.13.0, transformers>=5.20.2), never in the
project's own ``.venv``. It imports nothing from ``gptq_plugin``.

What it does (protocol of ``../shared/data/README.md``):

* calibration: read the calibration file in Python text mode, tokenize the whole text once with the
  model's tokenizer (no special tokens), take consecutive non-overlapping windows of ``--seqlen``
  tokens from the start, the first ``--nsamples`` of them;
* quantize with GPTQModel (``GPTQConfig``: sym=True, damp_percent, group_size, desc_act), save the
  checkpoint into OUT_DIR, measure the wall time, CPU time and peak RSS (``getrusage`` ru_maxrss of
  the process and of its children, reported apart; ``peak_rss_mb`` is the larger, see the comment at
  the record);
* perplexity: read ``wiki.test.raw`` in text mode, tokenize once (no special tokens),
  non-overlapping windows of ``--eval-seqlen`` tokens, the first ``--eval-windows`` of them, mean NLL
  over all predicted tokens, ppl = exp(mean), fp32 compute. The checkpoint is loaded back with
  GPTQModel (``BACKEND.TORCH``: dequantize + torch.matmul, activations in fp32); with
  ``--dequant-check`` it is also dequantized in plain torch from the saved safetensors (no GPTQModel
  code) into the fp32 original model as an independent cross-check;
* prints one JSON line (and appends it to ``--results`` if given).

Example::

    .venv-gptqmodel/bin/python benchmarks/gptqmodel_baseline.py /tmp/smollm2-hf \\
        ../shared/data/wikitext-2/valid.tokens.txt /tmp/gptqmodel-out/w4g64 \\
        --bits 4 --group-size 64 --no-act-order --threads 1 \\
        --results benchmarks/results/gptqmodel.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

RUN_RECORD = "gptqmodel_baseline_run.json"
DATA_DIR_DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("calib_file", help="calibration text, e.g. ../shared/data/wikitext-2/valid.tokens.txt")
    p.add_argument("out_dir", help="where the GPTQModel checkpoint is written (must not exist or be empty)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", dest="act_order", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ desc_act (activation order)")
    p.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQModel's GAR (group-aware reordering). GPTQModel turns it on by default when "
                        "desc_act is off; this script turns it off by default so that --no-act-order is plain "
                        "GPTQ. Incompatible with --act-order.")
    p.add_argument("--damp-percent", type=float, default=0.01)
    p.add_argument("--gptaq", type=float, default=None, metavar="ALPHA",
                   help="GPTQModel's GPTAQ (asymmetric calibration, arXiv:2504.02692; GPTAQConfig(alpha=ALPHA), its "
                        "default alpha is 0.25). Off by default, as in GPTQModel. GPTQModel 7.7's GPTAQ quantizer "
                        "applies desc_act but not act_group_aware, so with --act-group-aware it is refused here")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward (GPTQModel's default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch intra-op threads (torch.set_num_threads, OMP/MKL_NUM_THREADS)")
    p.add_argument("--cpu-workers", type=int, default=None,
                   help="GPTQMODEL_CPU_WORKERS (GPTQModel's CPU worker-thread pool). Default: max(2, --threads); "
                        "GPTQModel 7.7.0 refuses 1 (its 'model_loader:cpu' sub-pool needs 2)")
    p.add_argument("--eval-threads", type=int, default=None,
                   help="torch threads for the perplexity evaluation (default: --threads)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="dtype GPTQModel loads the model in for quantization (auto = GPTQModel's choice: "
                        "bfloat16 on CPU)")
    p.add_argument("--eval-file", default=str(DATA_DIR_DEFAULT / "wikitext-2" / "wiki.test.raw"))
    p.add_argument("--eval-windows", type=int, default=40, help="first N windows; 0 = all")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--no-eval", action="store_true", help="quantize and save only")
    p.add_argument("--dequant-check", action="store_true",
                   help="also evaluate by dequantizing the saved tensors in plain torch")
    p.add_argument("--eval-unquantized", action="store_true",
                   help="only evaluate the unquantized model (fp32) by the same protocol; out_dir unused")
    p.add_argument("--eval-only", action="store_true",
                   help="do not quantize: evaluate the GPTQModel checkpoint already in out_dir")
    p.add_argument("--results", help="append the JSON line to this .jsonl file")
    p.add_argument("--label", default=None, help="free-form note stored in the JSON line")
    args = p.parse_args(argv)
    if args.gptaq is not None and args.act_group_aware:
        p.error("--gptaq with --act-group-aware: GPTQModel 7.7's GPTAQ quantizer ignores act_group_aware; pass "
                "--no-act-group-aware (or --act-order)")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
JSON_OUT = sys.stdout

if ARGS is not None:
    # GPTQModel writes its progress bars and logs to stdout: send everything to stderr and keep the
    # real stdout for the single JSON result line.
    sys.stdout.flush()
    JSON_OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Must be set before torch / gptqmodel are imported.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
    if ARGS.cpu_workers is None:
        ARGS.cpu_workers = max(2, ARGS.threads)
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(ARGS.cpu_workers)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def log(msg: str) -> None:
    print(f"[baseline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_s() -> float:
    """User + system CPU seconds of this process (all threads) and its waited-for children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def rss_mb() -> dict:
    """Peak resident set size so far (Linux ru_maxrss is in KiB)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"self": self_kb / 1024.0, "children": child_kb / 1024.0}


# ----------------------------------------------------------------------------- data protocol

def tokenize_file(tokenizer, path: str) -> torch.Tensor:
    with open(path, "r", encoding="utf-8") as f:  # text mode: CRLF -> LF
        text = f.read()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seqlen: int, n: int) -> list[torch.Tensor]:
    total = ids.numel() // seqlen
    if n > 0:
        if n > total:
            raise SystemExit(f"asked for {n} windows of {seqlen} tokens, the text has only {total}")
        total = n
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(total)]


@torch.inference_mode()
def perplexity(model, wins: list[torch.Tensor]) -> tuple[float, float, int]:
    """Mean NLL over all predicted tokens of the windows (fp32 logits); returns (ppl, mean_nll, n_tokens)."""
    nll_sum = 0.0
    n_tok = 0
    for i, w in enumerate(wins):
        ids = w.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll_sum += float(nll)
        n_tok += ids.shape[1] - 1
        if (i + 1) % 10 == 0:
            log(f"  eval window {i + 1}/{len(wins)}: running ppl {math.exp(nll_sum / n_tok):.4f}")
    mean = nll_sum / n_tok
    return math.exp(mean), mean, n_tok


# ----------------------------------------------------------------------------- plain-torch dequant

def _unpack_codes(words: torch.Tensor, bits: int, n_codes: int, dim: int) -> torch.Tensor:
    """Unpack `bits`-bit codes packed low-bits-first into int32 words along `dim` (0 or 1).

    Treats the words as one little-endian bit stream along `dim`, so 3-bit codes that straddle
    words (32 codes in 3 words) are handled like 2/4/8-bit ones.
    """
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        w = w.t()
    shifts = torch.arange(32, dtype=torch.int64)
    bitstream = ((w.unsqueeze(1) >> shifts.view(1, 32, 1)) & 1).reshape(w.shape[0] * 32, w.shape[1])
    bitstream = bitstream[: n_codes * bits].reshape(n_codes, bits, w.shape[1])
    weights = (1 << torch.arange(bits, dtype=torch.int64)).view(1, bits, 1)
    codes = (bitstream * weights).sum(dim=1)
    return codes if dim == 0 else codes.t()


def dequantize_checkpoint_into(model, ckpt_dir: str, qcfg: dict) -> int:
    """Replace every quantized Linear's weight of `model` by its dequantized checkpoint weight (fp32).

    Also copies every other tensor of the checkpoint. Returns the number of dequantized layers.
    """
    from safetensors.torch import load_file

    bits = int(qcfg["bits"])
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    tensors = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    n = 0
    for pre in prefixes:
        qweight = tensors[f"{pre}.qweight"]
        qzeros = tensors[f"{pre}.qzeros"]
        scales = tensors[f"{pre}.scales"].float()
        g_idx = tensors[f"{pre}.g_idx"].long()
        in_features = g_idx.numel()
        out_features = scales.shape[1]
        q = _unpack_codes(qweight, bits, in_features, dim=0)          # [in, out]
        z = _unpack_codes(qzeros, bits, out_features, dim=1)          # [groups, out]
        if fmt == "gptq":  # v1 stores zero - 1
            z = z + 1
        w = (q - z[g_idx]).float() * scales[g_idx]                   # [in, out]
        target = params[f"{pre}.weight"]
        assert target.shape == (out_features, in_features), (pre, target.shape, w.shape)
        with torch.no_grad():
            target.copy_(w.t().to(target.dtype))
            if f"{pre}.bias" in tensors:
                params[f"{pre}.bias"].copy_(tensors[f"{pre}.bias"].to(target.dtype))
        n += 1
    quant_keys = {f"{p}.{s}" for p in prefixes for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    for k, t in tensors.items():
        if k in quant_keys:
            continue
        dst = params.get(k, buffers.get(k))
        if dst is None:
            raise KeyError(f"checkpoint tensor {k} has no place in the model")
        with torch.no_grad():
            dst.copy_(t.to(dst.dtype))
    return n


def read_saved_quant_config(out_dir: Path) -> dict:
    if (out_dir / "quantize_config.json").exists():
        return json.loads((out_dir / "quantize_config.json").read_text())
    return json.loads((out_dir / "config.json").read_text())["quantization_config"]


def restore_fp32_from_checkpoint(model, ckpt_dir: str) -> int:
    """After `model.to(float32)`: copy every floating tensor of the checkpoint into the model exactly.

    Quantized layers' `scales`/`bias` and all unquantized weights (embeddings, norms) are set from the
    saved fp16/bf16 values (exact in fp32), undoing any rounding from loading in a 16-bit dtype.
    """
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    n_scales = 0
    for k, t in tensors.items():
        if not t.is_floating_point():
            continue
        dst = state.get(k)
        if dst is None:
            raise KeyError(f"checkpoint tensor {k} not found in the GPTQModel-loaded model")
        if dst.shape != t.shape:
            raise ValueError(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(dst.shape)}")
        with torch.no_grad():
            dst.data = t.to(torch.float32).contiguous()
        n_scales += k.endswith(".scales")
    for name, m in model.named_modules():
        if hasattr(m, "qweight") and hasattr(m, "clear_weight_cache"):
            m.clear_weight_cache()
    return n_scales


# ----------------------------------------------------------------------------- main

def main(args) -> dict:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    eval_wins = None
    if not args.no_eval:
        t = time.perf_counter()
        eval_ids = tokenize_file(tokenizer, args.eval_file)
        eval_wins = windows(eval_ids, args.eval_seqlen, args.eval_windows)
        log(f"eval text: {eval_ids.numel()} tokens, {len(eval_wins)} windows of {args.eval_seqlen} "
            f"({time.perf_counter() - t:.1f}s)")

    base = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": os.path.abspath(args.model_dir),
        "eval_windows": len(eval_wins) if eval_wins else 0,
        "eval_seqlen": args.eval_seqlen,
        "threads": args.threads,
        "label": args.label,
    }

    if args.eval_unquantized:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        model.eval()
        t = time.perf_counter()
        ppl, nll, ntok = perplexity(model, eval_wins)
        rec = {"tool": "unquantized", "version": None, "bits": None, "perplexity": round(ppl, 4),
               "mean_nll": nll, "eval_tokens": ntok, "eval_wall_s": round(time.perf_counter() - t, 1),
               "eval_backend": "transformers fp32", **base}
        return rec

    import gptqmodel
    from gptqmodel import BACKEND, GPTQConfig, GPTQModel

    import gc
    out_dir = Path(args.out_dir)
    if args.eval_only and (out_dir / RUN_RECORD).exists():
        # the quantization run wrote its figures next to the checkpoint: complete that record
        rec = json.loads((out_dir / RUN_RECORD).read_text())
        rec["eval_separate_process"] = True
        rec["eval_windows"] = base["eval_windows"]
        rec["eval_seqlen"] = base["eval_seqlen"]
        rec["eval_load_avg_1m_start"] = round(os.getloadavg()[0], 2)
    elif args.eval_only:
        saved_cfg = read_saved_quant_config(out_dir)
        rec = {
            "tool": "gptqmodel",
            "version": gptqmodel.__version__,
            "bits": saved_cfg.get("bits"),
            "group_size": saved_cfg.get("group_size"),
            "desc_act": saved_cfg.get("desc_act"),
            "act_group_aware": (saved_cfg.get("meta") or {}).get("act_group_aware"),
            "sym": saved_cfg.get("sym"),
            "damp_percent": (saved_cfg.get("meta") or {}).get("damp_percent"),
            "perplexity": None,
            "ckpt_dir": str(out_dir.resolve()),
            "checkpoint_format": saved_cfg.get("checkpoint_format", saved_cfg.get("format")),
            "eval_only": True,
            **base,
        }
    else:
        # --- calibration
        t = time.perf_counter()
        calib_ids = tokenize_file(tokenizer, args.calib_file)
        calib_wins = windows(calib_ids, args.seqlen, args.nsamples)
        calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib_wins]
        log(f"calibration: {calib_ids.numel()} tokens -> {len(calibration)} windows of {args.seqlen} "
            f"({time.perf_counter() - t:.1f}s)")

        # --- quantize
        if out_dir.exists() and any(out_dir.iterdir()):
            raise SystemExit(f"{out_dir} exists and is not empty")
        gptaq_kw = {}
        if args.gptaq is not None:
            from gptqmodel.quantization.config import GPTAQConfig

            gptaq_kw["gptaq"] = GPTAQConfig(alpha=args.gptaq)
        qcfg = GPTQConfig(
            bits=args.bits,
            group_size=args.group_size,
            desc_act=args.act_order,
            act_group_aware=args.act_group_aware,
            sym=True,
            damp_percent=args.damp_percent,
            **gptaq_kw,
        )
        load_kwargs = {}
        if args.dtype != "auto":
            load_kwargs["dtype"] = getattr(torch, args.dtype)
        rss_before = rss_mb()
        load_avg_start = os.getloadavg()
        t0 = time.perf_counter()
        model = GPTQModel.load(args.model_dir, qcfg, device="cpu", **load_kwargs)
        t1 = time.perf_counter()
        load_dtype = str(next(model.model.parameters()).dtype).replace("torch.", "")
        log(f"GPTQModel.load: {t1 - t0:.1f}s, dtype {load_dtype}; quantizing with {qcfg.bits} bits, "
            f"group {qcfg.group_size}, desc_act {qcfg.desc_act}, act_group_aware {qcfg.act_group_aware}, "
            f"damp {qcfg.damp_percent}")
        c1 = cpu_s()
        model.quantize(calibration, batch_size=args.batch_size)
        t2 = time.perf_counter()
        c2 = cpu_s()
        load_avg_end = os.getloadavg()
        model.save(str(out_dir))
        t3 = time.perf_counter()
        rss = rss_mb()
        log(f"quantize {t2 - t1:.1f}s, save {t3 - t2:.1f}s, peak RSS self {rss['self']:.0f} MB "
            f"children {rss['children']:.0f} MB")
        del model
        gc.collect()

        saved_cfg = read_saved_quant_config(out_dir)

        rec = {
            "tool": "gptqmodel",
            "version": gptqmodel.__version__,
            "bits": args.bits,
            "group_size": args.group_size,
            "desc_act": bool(args.act_order),
            "act_group_aware": bool(qcfg.act_group_aware),
            "sym": True,
            "damp_percent": qcfg.damp_percent,
            "gptaq_alpha": args.gptaq,
            "nsamples": len(calibration),
            "seqlen": args.seqlen,
            "threads": args.threads,
            "cpu_workers": args.cpu_workers,
            "quant_dtype": load_dtype,
            "quant_wall_s": round(t2 - t1, 1),
            "quant_cpu_s": round(c2 - c1, 1),
            "load_wall_s": round(t1 - t0, 1),
            "save_wall_s": round(t3 - t2, 1),
            # ru_maxrss of children is not additive: a child forked (subprocess) from this process
            # inherits this process's RSS at fork time as its own high-water mark, so the sum would
            # count the same pages twice. The peak is the larger of the two.
            "peak_rss_mb": round(max(rss["self"], rss["children"]), 0),
            "peak_rss_self_mb": round(rss["self"], 0),
            "peak_rss_children_mb": round(rss["children"], 0),
            "rss_before_load_mb": round(rss_before["self"], 0),
            # machine load (1-min average) when quantization started / ended: other processes on a
            # shared 2-core machine inflate wall times
            "load_avg_1m_start": round(load_avg_start[0], 2),
            "load_avg_1m_end": round(load_avg_end[0], 2),
            "perplexity": None,
            "ckpt_dir": str(out_dir.resolve()),
            "checkpoint_format": saved_cfg.get("checkpoint_format", saved_cfg.get("format")),
            **base,
        }
        # kept next to the checkpoint so that a later `--eval-only` run can complete this record
        (out_dir / RUN_RECORD).write_text(json.dumps(rec, indent=1) + "\n")

    if eval_wins:
        torch.set_num_threads(args.eval_threads or args.threads)
        rec["eval_threads"] = args.eval_threads or args.threads
        # --- perplexity with GPTQModel's own loader and its portable torch kernel (TorchLinear:
        # dequantize + torch.matmul). TorchLinear refuses dtype=float32 at load time, so the checkpoint
        # is loaded in bfloat16 (the model's own dtype), the model is cast to float32 and every
        # quantized layer's scales (fp16 in the checkpoint; bf16 would round them) are put back from
        # the checkpoint exactly, so weights and activations are fp32.
        t = time.perf_counter()
        qmodel = GPTQModel.load(str(out_dir), device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
        hf = qmodel.model
        hf.to(torch.float32)
        n_fixed = restore_fp32_from_checkpoint(hf, str(out_dir))
        hf.eval()
        kernels = sorted({type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")})
        log(f"loaded checkpoint with GPTQModel ({kernels}, {n_fixed} layers' scales restored) "
            f"in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        ppl, nll, ntok = perplexity(hf, eval_wins)
        rec.update({
            "perplexity": round(ppl, 4), "mean_nll": nll, "eval_tokens": ntok,
            "eval_wall_s": round(time.perf_counter() - t, 1),
            "eval_backend": "GPTQModel.load(backend=BACKEND.TORCH, dtype=bfloat16) -> float32, scales "
                            f"restored from checkpoint: {','.join(kernels)}",
        })
        log(f"perplexity (GPTQModel loader) {ppl:.4f}")
        del qmodel, hf
        gc.collect()

        if args.dequant_check:
            t = time.perf_counter()
            ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
            ref.eval()
            n = dequantize_checkpoint_into(ref, str(out_dir), saved_cfg)
            ppl2, nll2, _ = perplexity(ref, eval_wins)
            rec.update({"perplexity_dequant": round(ppl2, 4), "dequant_layers": n,
                        "dequant_eval_wall_s": round(time.perf_counter() - t, 1)})
            log(f"perplexity (plain-torch dequant of {n} layers) {ppl2:.4f}")
    return rec


if __name__ == "__main__":
    record = main(ARGS)
    line = json.dumps(record)
    print(line, file=JSON_OUT, flush=True)
    if ARGS.results:
        Path(ARGS.results).parent.mkdir(parents=True, exist_ok=True)
        with open(ARGS.results, "a") as f:
            f.write(line + "\n")
