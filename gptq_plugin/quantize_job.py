"""The ``quantize`` command's work on one rank: the checks, the calibration data, the resume state, the in-memory
or streaming driver, the checkpoint and the summary line (:mod:`gptq_plugin.cli` parses the options and handles
interrupts). Under ``torchrun`` every rank runs it; rank 0 alone writes and prints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import typer

from .calibration import load_calibration
from .checkpoint import save_quantized
from .config import RECOMMENDED, QuantizeConfig, check_damp_auto
from .distributed import Ranks
from .errors import CalibrationError, ConfigError, GPTQPluginError
from .moe import expert_of
from .models import check_model_folder, is_quantized, load_model, load_tokenizer, needs_streaming, stored_float_dtype
from .pipeline import quantize_model
from .plugins import calibration_sources
from .process_memory import peak_rss_mb
from .report_plot import png_path, write_report_plot
from .resume import ResumeState, fingerprint
from .safetensors_io import check_not_input, check_output_dir
from .streaming import quantize_streaming

log = logging.getLogger("gptq_plugin")


def resolve_recipe(method: str, act_order: bool | None, act_group_aware: bool | None, static_groups: bool | None,
                   mse: float | None, refit_scales: bool | None, group_size: int = 128
                   ) -> tuple[bool, bool, bool, float, bool]:
    """The CLI's options left unset (None) filled in from :data:`~gptq_plugin.config.RECOMMENDED`:
    ``(desc_act, act_group_aware, static_groups, mse, refit_scales)``. An explicit ``--act-order`` turns the
    recipe's group-aware order off and static groups on (act-order with ``g_idx`` in input order) unless given;
    with ``group_size`` -1 (one group per row) the recipe's group-aware order becomes act-order, the same order
    for one group, unless ``--no-act-order`` was given. RTN (``method`` "rtn") has no Hessian: input order,
    min-max range unless ``mse`` is given."""
    if method != "gptq":
        return False, False, False, 0.0 if mse is None else mse, False
    act_order_given = act_order is not None
    if act_order is None:
        act_order = RECOMMENDED.get("desc_act", False) and not act_group_aware
    if act_group_aware is None:
        act_group_aware = RECOMMENDED.get("act_group_aware", False) and not act_order
        if act_group_aware and group_size == -1:  # GAR needs groups; for one group its order is act-order's
            act_group_aware, act_order = False, not act_order_given
    if static_groups is None:
        static_groups = True if act_order else RECOMMENDED.get("static_groups", False)
    if mse is None:
        mse = RECOMMENDED["mse"]
    if refit_scales is None:
        refit_scales = RECOMMENDED.get("refit_scales", False)
    return act_order, act_group_aware, static_groups, mse, refit_scales


#: config.json keys whose positive value marks a mixture-of-experts model (Qwen-MoE, Mixtral/GPT-OSS, DeepSeek)
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def has_experts(model: Path) -> bool:
    """Whether the model folder's config.json (or its ``text_config``) declares routed experts; False when it cannot
    be read (the folder's own checks name that)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and any(isinstance(c.get(k), int) and c[k] > 0 for k in _EXPERT_KEYS):
            return True
    return False


def resolve_gptaq(method: str, gptaq: float | None, true_sequential: bool, low_memory: bool | None,
                  routed_moe: bool) -> tuple[float | None, str | None]:
    """GPTAQ's alpha for a run: ``(alpha or None for plain GPTQ, why the default's GPTAQ is off or None)``.

    ``gptaq``: the ``--gptaq`` option: None (unset) takes :data:`~gptq_plugin.config.RECOMMENDED`'s alpha, 0 turns
    GPTAQ off, any other value is kept (and checked by :meth:`QuantizeConfig.validate`; an explicit alpha with
    ``--one-pass``, ``--no-true-sequential`` or routed MoE calibration is refused there). The default falls back to
    plain GPTQ, with the reason returned for the run to report, where GPTAQ cannot run: ``--no-true-sequential``
    (GPTAQ quantizes each layer against the unquantized model's inputs, group by group), ``--one-pass``
    (``low_memory`` False: GPTAQ runs the low-memory driver) and routed MoE calibration of a model with experts
    (``routed_moe``: the two streams would route different tokens to each expert). RTN (``method`` "rtn") has no
    calibration: None, nothing to report."""
    if method != "gptq" or gptaq is not None:
        return gptaq or None, None  # 0: off; an explicit alpha with RTN is refused by the config
    alpha = RECOMMENDED.get("gptaq")
    if alpha is None:
        return None, None
    why = ("--no-true-sequential" if not true_sequential else "--one-pass" if low_memory is False
           else "--moe-calibration routed" if routed_moe else None)
    return (None, why) if why else (alpha, None)


def run_quantize(ranks: Ranks, model: Path, out: Path, bits: int, group_size: int, act_order: bool | None, sym: bool,
                 static_groups: bool | None, true_sequential: bool, damp_percent: float, mse: float | None,
                 dataset: str | None, nsamples: int, seqlen: int, batch_size: int, method: str,
                 checkpoint_format: str, overwrite: bool, low_memory: bool | None, report: Path | None,
                 forward_dtype: str, restart: bool, streaming: bool | None, activation_memory: float | None,
                 end_run: Callable[[BaseException, ResumeState], None], moe_calibration: str = "all",
                 moe_min_tokens: int = 128, act_group_aware: bool | None = None, refit_scales: bool | None = None,
                 park_activations: bool = True, damp_auto: bool = False, gptaq: float | None = None) -> None:
    """``gptq-plugin quantize`` on one rank (the only one, or one of torchrun's; only rank 0 writes and prints):
    check the inputs, load the calibration data, open (or resume) the run's state, quantize in memory or streaming,
    write OUT (and the report), print the summary. Arguments as the command's options (``method``: ``"gptq"`` or
    ``"rtn"``); ``end_run(e, state)`` is called with an error or interrupt before it propagates.

    Raises:
        GPTQPluginError: bad input (missing folder, impossible config, corrupt checkpoint), named with the fix;
            DistributedError when another rank fails.
    """
    act_order, act_group_aware, static_groups, mse, refit_scales = resolve_recipe(
        method, act_order, act_group_aware, static_groups, mse, refit_scales, group_size)
    if method == "rtn" and (moe_calibration != "all" or moe_min_tokens != 128):
        log.warning("--moe-calibration and --moe-min-tokens are not used: --method rtn reads no calibration data")
    elif moe_calibration == "all" and moe_min_tokens != 128:
        log.warning("--moe-min-tokens is not used with --moe-calibration all (every expert's Hessians come from every "
                    "calibration token); it applies to --moe-calibration routed")
    gptaq, gptaq_off = resolve_gptaq(method, gptaq, true_sequential, low_memory,
                                     moe_calibration == "routed" and has_experts(model))
    if gptaq_off and ranks.is_writer:
        log.warning("GPTAQ (part of the default recipe) is off for this run: %s needs plain GPTQ; pass --gptaq 0 "
                    "to silence this", gptaq_off)
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, static_groups=static_groups,
                         true_sequential=true_sequential, damp_percent=damp_percent, mse=mse, method=method,
                         checkpoint_format=checkpoint_format, moe_calibration=moe_calibration,
                         moe_min_tokens=moe_min_tokens, act_group_aware=act_group_aware,
                         refit_scales=refit_scales, damp_auto=damp_auto, gptaq=gptaq)
    if cfg.gptaq is not None and low_memory is False:  # before anything is loaded
        raise ConfigError("--gptaq runs the low-memory driver (group by group, with the unquantized block beside the "
                          "quantized one): drop --one-pass")
    check_model_folder(model)
    inputs = [model]
    if dataset is not None and Path(dataset).exists():
        inputs.append(dataset)  # writing OUT must not delete the calibration file either
    check_output_dir(out, overwrite, inputs)
    if report is not None:
        check_not_input(report, inputs)
        check_not_input(png_path(report), inputs)
    if dataset is not None and cfg.method != "gptq":
        check_unused_dataset(dataset, cfg.method)
    if is_quantized(model):
        raise GPTQPluginError(f"{model} is already quantized: quantize the original model")
    if nsamples < 1 or seqlen < 2:
        raise GPTQPluginError(f"--nsamples {nsamples} / --seqlen {seqlen}: use nsamples >= 1 and seqlen >= 2")
    if batch_size < 1:
        raise GPTQPluginError(f"--batch-size {batch_size}: use a positive integer")
    tok = load_tokenizer(model)
    calib = None
    if cfg.method == "gptq":
        calib = load_calibration(dataset, tok, nsamples, seqlen)
        if calib.shape[0] < nsamples:
            log.warning("calibration text holds only %d windows of %d tokens (asked for %d)", calib.shape[0], seqlen, nsamples)
        check_damp_auto(cfg, calib.shape[0], batch_size)
    elif cfg.damp_auto:
        log.warning("--damp-percent auto is not used: --method rtn has no Hessian")
        cfg.damp_auto = False  # nor recorded in the checkpoint
    if forward_dtype == "auto":
        forward_dtype = "bfloat16" if ranks.device.type == "cuda" else "float32"
    if forward_dtype not in ("float32", "bfloat16", "float16"):
        raise GPTQPluginError(f"--forward-dtype {forward_dtype}: use auto, float32, bfloat16 or float16")
    fdtype = getattr(torch, forward_dtype)
    if activation_memory is not None and activation_memory < 0:
        raise GPTQPluginError(f"--activation-memory {activation_memory}: use a size in MB >= 0")
    if streaming is None:
        streaming = needs_streaming(model)
    meta = {"calibration": {"dataset": str(dataset) if dataset else "wikitext2-valid (shared)",
                            "nsamples": int(calib.shape[0]) if calib is not None else 0, "seqlen": seqlen}}
    if forward_dtype != "float32":  # recorded only when it is not the exact default
        meta["calibration"]["forward_dtype"] = forward_dtype
    driver = "streaming" if streaming else "in-memory"
    fp = fingerprint(cfg, model, calib, batch_size, forward_dtype, driver, ranks.device.type)
    ranks.agree(fp, "configuration")  # under torchrun: every rank runs the same job
    state = ranks.on_writer("opening the resume state", lambda: ResumeState.open(out, fp, restart))
    if not ranks.is_writer:
        state.created = False  # rank 0 owns the folder: another rank never deletes it
    t0 = time.time()
    progress = ranks.is_writer
    try:
        if streaming:
            rep = quantize_streaming(model, out, calib, cfg, batch_size=batch_size, resume=state,
                                     low_memory=low_memory is not False,
                                     forward_dtype=None if fdtype == torch.float32 else fdtype,
                                     activation_memory=None if activation_memory is None else int(activation_memory * 2**20),
                                     overwrite=overwrite, extra_meta=meta, compare_rtn=report is not None,
                                     ranks=ranks, progress=progress,
                                     park_dir=None if park_activations else False)
        else:
            m = load_model(model)
            stored = stored_float_dtype(model)  # blocks waiting for their turn are held as stored (e.g. bf16)
            rep = quantize_model(m, calib, cfg, batch_size=batch_size, low_memory=low_memory, resume=state,
                                 forward_dtype=None if fdtype == torch.float32 else fdtype,
                                 compare_rtn=report is not None, ranks=ranks, progress=progress,
                                 hold_dtype=stored if stored in (torch.bfloat16, torch.float16) else None,
                                 source=model, park_dir=None if park_activations else False)
            if ranks.is_writer:
                save_quantized(m, cfg, out, source_dir=model, overwrite=overwrite,
                               extra_meta=dict(meta, **rep.checkpoint_meta()))
            ranks.barrier(f"writing {out}")
    except BaseException as e:
        end_run(e, state)
        raise
    wall = time.time() - t0
    peaks = ranks.gather(round(peak_rss_mb()), "peak RSS")
    if not ranks.is_writer:
        return
    state.remove()
    plot_line = None
    if report:
        report.write_text(json.dumps(rep.to_dict(), indent=2))
        plot_line = write_report_plot(rep.to_dict(), report, f"{Path(model).name}: {cfg.method.upper()} {bits}-bit "
                                      f"g{group_size}, per-layer relative output error vs RTN")[1]
    errs = [l for l in rep.layers if l.rel_err is not None]
    gpu = (f", peak GPU memory {torch.cuda.max_memory_allocated(ranks.device) / 2**20:.0f} MB"
           if ranks.device.type == "cuda" else "")
    where = f"{driver}, {ranks.device}" + (f", {ranks.world} ranks" if ranks.world > 1 else "")
    method_name = (f"{cfg.method} + GPTAQ alpha {cfg.gptaq:g}" if cfg.gptaq is not None
                   else f"{cfg.method}, GPTAQ off: {gptaq_off}" if gptaq_off else cfg.method)
    msg = (f"quantized {len(rep.layers)} layers ({method_name}, {bits}-bit, group {group_size}, {where}) in "
           f"{wall:.1f} s, peak RSS {' / '.join(map(str, peaks))} MB{' (per rank)' if ranks.world > 1 else ''}"
           f"{gpu} -> {out}")
    if errs:
        msg += f"\nmean relative output error: GPTQ {sum(l.rel_err for l in errs) / len(errs):.4g}"
        if cfg.gptaq is not None:  # each layer's error on its own inputs; GPTAQ targets the original's outputs
            msg += " (on each layer's quantized inputs, which GPTAQ does not minimise)"
        if all(l.rtn_rel_err is not None for l in errs):  # RTN's error is computed for --report only
            msg += f" vs RTN {sum(l.rtn_rel_err for l in errs) / len(errs):.4g}"
    experts = rep.experts()
    if experts:
        toks = sorted(e["tokens"] for e in experts.values() if e["tokens"] is not None)
        rtn = sum(e["path"].startswith("rtn:") for e in experts.values())
        msg += (f"\nexperts: {len(experts)} experts quantized ({sum(1 for l in rep.layers if expert_of(l.name))} "
                f"layers), " + (f"Hessians from {cfg.moe_calibration} tokens" if cfg.method == "gptq" else "RTN")
                + (f"; routed calibration tokens per expert min {toks[0]}, median {toks[len(toks) // 2]}, max {toks[-1]}"
                   if toks else "")
                + (f"; {rtn} experts quantized with RTN for want of routed calibration tokens (see the report's "
                   "experts)" if rtn else ""))
    if rep.routers:
        msg += (f"\nkept in float: {rep.routers} MoE router weights (e.g. {rep.unquantized[0]}), as vLLM serves "
                "them")
    others = rep.unquantized[rep.routers:]
    if others:
        msg += f"\nkept in float: {len(others)} other weight tensors of the blocks that are not linear layers (e.g. {others[0]})"
    if report:
        msg += f"\nreport: {report}"
    typer.echo(msg)
    if plot_line:
        typer.echo(plot_line, err=plot_line.startswith("warning"))


def check_unused_dataset(dataset: str, method: str) -> None:
    """RTN reads no calibration data: refuse a --dataset that names nothing, warn that an existing one is unused.

    Raises:
        CalibrationError: ``dataset`` is neither an existing path nor a known calibration source.
    """
    if not Path(dataset).exists() and dataset not in calibration_sources():
        raise CalibrationError(f"--dataset {dataset}: no such file or calibration source ({', '.join(calibration_sources())}); "
                               f"--method {method} uses no calibration data anyway: drop --dataset")
    typer.echo(f"warning: --dataset {dataset} is not used: --method {method} (round-to-nearest) needs no calibration "
               "data", err=True)
