"""The block loop both drivers share: GPTQ- (or RTN-) quantize a Hugging Face decoder-only model one decoder block
after another.

1. Check the recipe (``lm_head``, calibration data), then open the model from its :class:`BlockSource`.
2. Capture the inputs (and keyword arguments: masks, rotary embeddings) of the first decoder block on the
   calibration batches, into an :class:`~gptq_plugin.resume.ActivationBuffer` (on disk in the run's
   :class:`~gptq_plugin.resume.ResumeState` when there is one).
3. For each block: load it, quantize it (:func:`~gptq_plugin.blockquant.quantize_block`: its linear layers in
   forward order; the calibration activations become the block's quantized outputs, the next block's inputs), give
   it to the :class:`BlockSink`, record it in the resume state, release it. A rerun after a kill restores the
   finished blocks from the state and goes on at the first unfinished one, from the recorded activations.

With GPTAQ (``cfg.gptaq``; Li et al., ICML 2025, arXiv 2504.02692) a second stream of the same calibration batches
goes through the unquantized blocks (``xfp`` beside ``x`` in the resume state): each block is copied before its
layers are quantized, and :func:`~gptq_plugin.passes.groupwise_pass` compares each layer group's inputs in both.

Only the calibration activations of one block boundary are kept; embeddings, norms and ``lm_head`` stay
unquantized. Where the blocks come from and where the quantized blocks go are the only differences between the
two drivers:

* in memory (:mod:`gptq_plugin.pipeline`): the blocks of the loaded fp32 model; the quantized blocks stay in it
  (``nn.Linear`` -> :class:`~gptq_plugin.linear.QuantLinear`);
* streaming (:mod:`gptq_plugin.streaming`): a skeleton on ``meta`` whose blocks are read from the source's
  safetensors shards one at a time; each quantized block becomes one checkpoint shard.

Devices and ranks (:class:`~gptq_plugin.distributed.Ranks`): the block being quantized goes to ``ranks.device``
(e.g. a GPU) with the batch it runs and its Hessians, and comes back; under torchrun each rank runs a contiguous
share of the calibration batches, the Hessians are summed in one fixed tree across ranks, each layer is solved on
one rank and shared, so the checkpoint does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import ContextManager, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .blockquant import LayerReport, QuantizeReport, quantize_block, release_free_memory
from .config import QuantizeConfig, check_damp_auto
from .errors import ConfigError, NumericalError
from .distributed import SINGLE, Ranks
from .moe import checkpoint_names, unquantized_weights
from .passes import capture_block_inputs
from .plugins import find_layout, split_experts
from .resume import ActivationBuffer, ResumeState

log = logging.getLogger(__name__)


class BlockSource(Protocol):
    """Where the decoder blocks come from. The driver calls :meth:`open` once, after its checks; the capture of
    the first block's inputs runs inside :meth:`embeddings`; each block it quantizes goes through :meth:`load`,
    then (after the :class:`BlockSink`) :meth:`unload`."""

    def open(self) -> nn.Module:
        """The causal LM to quantize (its parameters may stay on ``meta`` until loaded).

        Raises:
            CheckpointError: the model cannot be built, or its weights do not match it.
        """

    def embeddings(self) -> ContextManager:
        """A context in which the modules before the first decoder block can run (the calibration capture)."""

    def load(self, block: nn.Module, name: str) -> None:
        """Give ``block`` (state-dict prefix ``name``, e.g. ``"model.layers.3"``) its float weights on the CPU."""

    def unload(self, block: nn.Module) -> None:
        """Release ``block`` once it is quantized and kept."""


class BlockSink(Protocol):
    """Where the quantized blocks go."""

    def keep(self, block: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Take the quantized ``block`` (its linear layers are :class:`~gptq_plugin.linear.QuantLinear` now);
        return what a resumed run needs of it, which the driver records as the block's file
        (:meth:`~gptq_plugin.resume.ResumeState.save_block`)."""

    def restore(self, block: nn.Module, name: str, state: ResumeState, index: int) -> None:
        """Take block ``index``, finished by an earlier run and recorded in ``state``, instead of quantizing it.

        Raises:
            CheckpointError: the recorded tensors are missing or do not fit the block.
        """


def quantize_blocks(source: BlockSource, sink: BlockSink, calib: torch.Tensor | None, cfg: QuantizeConfig, *,
                    batch_size: int = 8, progress: bool = True, max_blocks: int | None = None,
                    low_memory: bool | None = None, forward_dtype: torch.dtype | None = None,
                    resume: ResumeState | None = None, activation_memory: int | None = None, offload_dir=None,
                    compare_rtn: bool = False, desc: str | None = None, ranks: Ranks | None = None,
                    park_dir=None) -> QuantizeReport:
    """GPTQ- (or RTN-) quantize the decoder blocks of ``source``'s model one at a time into ``sink`` (see the module
    docstring).

    Args:
        source, sink: where the blocks come from and where the quantized blocks go.
        calib: int64 ``[n, seqlen]`` calibration token ids (None for ``cfg.method == "rtn"``).
        cfg: the quantization config.
        batch_size: calibration sequences per forward.
        max_blocks: quantize only the first ``max_blocks`` decoder blocks.
        low_memory, forward_dtype: as in :func:`gptq_plugin.pipeline.quantize_model`.
        resume: where each finished block, its layer reports and the next block's activations are recorded, and
            from which the blocks an earlier run finished are restored; None records nothing.
        activation_memory: with ``resume``, bytes of calibration activations also held in memory (the rest is
            read from the state's files; with ``cfg.gptaq``, half for each of its two streams); None: all of them.
        offload_dir: where the solver parks large Hessians (:func:`gptq_plugin.solver.gptq_quantize`).
        park_dir: where the one-pass driver's waiting batches park their inputs to a one-layer group (on the CPU;
            :func:`gptq_plugin.passes.sequential_pass`); None: ``resume``'s folder when given, else in memory;
            False: in memory.
        compare_rtn: also compute each layer's RTN error for the report (``LayerReport.rtn_rel_err``; one more
            quantization of every layer).
        desc: the progress bar's label (default ``"<method> <bits>-bit"``).
        ranks: the processes sharing the run and the device this one computes on (:mod:`gptq_plugin.distributed`):
            each rank runs its contiguous share of the calibration batches, the Hessians are completed across
            ranks in a fixed order (the checkpoint's bytes do not depend on the number of ranks), each layer is
            solved on one rank and shared; only rank 0 writes the resume state's manifest and block files. Each
            block being quantized, its Hessians and the calibration batches it runs on are on ``ranks.device``;
            the rest of the model and the stored activations stay on the CPU. Default: one process on the CPU.

    Returns:
        The :class:`~gptq_plugin.blockquant.QuantizeReport` (per-layer relative output error, dampening,
        fallbacks, notes), the restored blocks' rows included.

    Raises:
        ConfigError: a field of ``cfg`` changed to an invalid value since it was built, ``lm_head=True`` (not
            supported yet), GPTQ without calibration data, ``damp_auto`` with a single calibration batch, or
            ``gptaq`` with ``low_memory=False`` or an MoE model with ``moe_calibration="routed"``.
        NumericalError: NaN/Inf in the first block's calibration inputs or in a block's outputs (names the block).
        CheckpointError: from ``source`` or ``sink`` (unreadable or mismatched weights, a lost resume file).
        DistributedError: another rank failed or did not answer within the timeout.
    """
    ranks = ranks or SINGLE
    device = ranks.device
    cfg.validate()  # fields may have been changed since the config was built
    if cfg.lm_head:
        raise ConfigError("lm_head=True is not supported yet: keep lm_head unquantized (the default)")
    if cfg.method == "gptq" and (calib is None or calib.numel() == 0):
        raise ConfigError("GPTQ needs calibration data: pass calibration token windows (or use method='rtn')")
    if cfg.method == "gptq":
        check_damp_auto(cfg, calib.shape[0], batch_size)
    gptaq = cfg.gptaq is not None and cfg.method == "gptq"
    if gptaq and low_memory is False:
        raise ConfigError("gptaq runs the low-memory driver (group by group, with the unquantized block beside the "
                          "quantized one): drop --one-pass")
    t0 = time.time()
    if park_dir is None and resume is not None:
        park_dir = resume.folder
    park_dir = park_dir or None  # False: in memory, even with resume
    model = source.open()
    release_free_memory()  # e.g. the fp32 copies of the blocks the source holds in bf16
    blocks, prefix = find_layout(model).blocks(model)
    n_blocks = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    report = QuantizeReport(compare_rtn=compare_rtn, moe_calibration=cfg.moe_calibration)
    routers, kept = check_weights(model, blocks, prefix)
    names = checkpoint_module_names(model, blocks, prefix)
    report.unquantized = [names.get(n, n) for n in routers + kept]
    report.routers = len(routers)
    if gptaq and routers and cfg.moe_calibration != "all":
        raise ConfigError(f"gptaq with moe_calibration={cfg.moe_calibration!r} is not supported ({routers[0]} is a "
                          "router: the quantized and the unquantized stream route different tokens to each expert): "
                          "use --moe-calibration all (every token through every expert in both streams) or drop "
                          "--gptaq")
    first = 0 if resume is None else min(resume.done, n_blocks)
    for bi in range(first):
        sink.restore(blocks[bi], f"{prefix}.{bi}", resume, bi)
        report.layers.extend(LayerReport(**r) for r in resume.reports[bi])
    missing = sum(1 for l in report.layers if l.rel_err is not None and l.rtn_rel_err is None)
    if compare_rtn and missing:
        log.warning("%d layers of the %d blocks restored from %s were quantized without the RTN comparison (the "
                    "interrupted run had no --report): their rtn_rel_err is null in the report and the plot leaves "
                    "them out; rerun with --restart for a complete comparison", missing, first, resume.folder)

    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    try:
        inputs = kwargs_list = fp_inputs = None
        mine = range(0)
        if cfg.method == "gptq" and first < n_blocks:
            mine = ranks.batches((calib.shape[0] + batch_size - 1) // batch_size)  # this rank's batches
            held = activation_memory if activation_memory is None or not gptaq else activation_memory // 2
            inputs = (ActivationBuffer(None, len(mine)) if resume is None
                      else resume.activations(len(mine), held, first=mine.start))
            if gptaq:  # GPTAQ's second stream: the same batches through the unquantized blocks
                fp_inputs = (ActivationBuffer(None, len(mine)) if resume is None
                             else resume.activations(len(mine), held, first=mine.start, stream="xfp"))
            with source.embeddings():
                kwargs_list = _capture(model, blocks, prefix, calib[mine.start * batch_size:mine.stop * batch_size],
                                       batch_size, progress, inputs, store=first == 0, fp_inputs=fp_inputs)
            release_free_memory()
        for bi in tqdm(range(first, n_blocks), desc=desc or f"{cfg.method} {cfg.bits}-bit", disable=not progress,
                       initial=first, total=n_blocks):
            block, name = blocks[bi], f"{prefix}.{bi}"
            source.load(block, name)
            n_reported = len(report.layers)
            with _on_device(block, inputs, kwargs_list, device, fp_inputs) as (placed, placed_kwargs, placed_fp):
                # GPTAQ: the block as loaded, before any layer of it is quantized
                reference = (copy.deepcopy(block), placed_fp) if fp_inputs is not None else None
                quantize_block(block, name, placed, placed_kwargs, cfg, report, low_memory, forward_dtype,
                               offload_dir, ranks=ranks, first_batch=mine.start, names=names, park_dir=park_dir,
                               reference=reference)
                del reference
            kept = sink.keep(block, name)
            if resume is not None:
                ranks.barrier(f"storing the activations after {name}")  # every rank's, before the manifest says so
                rows = [vars(l) for l in report.layers[n_reported:]]
                if ranks.is_writer:
                    resume.save_block(bi, kept, rows)
                else:
                    resume.done, resume.reports = bi + 1, resume.reports + [rows]
                ranks.barrier(f"recording {name}")  # the old activations are deleted only once it is recorded
            del kept
            source.unload(block)
            if inputs is not None:
                inputs.advance()
            if fp_inputs is not None:
                fp_inputs.advance()
            release_free_memory()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    report.seconds = time.time() - t0
    return report


def check_weights(model: nn.Module, blocks: nn.ModuleList, prefix: str) -> tuple[list[str], list[str]]:
    """Split the fused experts of ``blocks`` into per-expert linear layers (the layout's ``split_experts``) and
    check that every other weight matrix of every block will be quantized or is kept in float on purpose; returns
    the weights kept in float, by full name: ``(MoE routers, others)`` (convolution kernels and the like, warned
    about).

    Raises:
        ConfigError: a block holds stacked expert weights the driver cannot quantize (fused experts of an
            architecture this version cannot split), naming them: nothing is left unquantized silently.
    """
    split_experts(model, blocks)
    routers, kept, unhandled = [], [], []
    for i, block in enumerate(blocks):
        r, k, u = unquantized_weights(block)
        routers += [f"{prefix}.{i}.{n}" for n in r]
        kept += [f"{prefix}.{i}.{n}" for n in k]
        unhandled += [f"{prefix}.{i}.{n}" for n in u]

    def kinds(names: list[str]) -> str:
        return ", ".join(sorted({type(model.get_submodule(n.rpartition(".")[0])).__name__ for n in names}))

    if unhandled:
        raise ConfigError(f"{unhandled[0]} ({len(unhandled)} weight tensors in all, in {kinds(unhandled)}) would be "
                          "left unquantized: gptq-plugin quantizes nn.Linear layers and the fused experts of "
                          "Transformers' standard MoE blocks only; this architecture's layout is not supported yet "
                          "(register a model layout through the gptq_plugin_model_layouts hook that splits it)")
    if routers:
        log.info("%d MoE router weights stay unquantized (as vLLM and llm-compressor keep them), e.g. %s",
                 len(routers), routers[0])
    if kept:
        log.warning("%d weight tensors of the decoder blocks are not linear layers and stay unquantized (%s), e.g. "
                    "%s", len(kept), kinds(kept), kept[0])
    return routers, kept


def checkpoint_module_names(model: nn.Module, blocks: nn.ModuleList, prefix: str) -> dict[str, str]:
    """Full module (and parameter) name -> the name the checkpoint stores it under, for the modules of ``blocks``
    whose names differ (e.g. Mixtral's ``mlp`` -> ``block_sparse_moe``): reports, logs and errors use the
    checkpoint's names."""
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in b.named_modules() if n]
    names += [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in b.named_parameters()]
    stored = checkpoint_names(model, [n + ".x" for n in names])
    return {k[:-2]: v[:-2] for k, v in stored.items() if k != v}


def _capture(model: nn.Module, blocks: nn.ModuleList, prefix: str, calib: torch.Tensor, batch_size: int,
             progress: bool, inputs: ActivationBuffer, store: bool,
             fp_inputs: ActivationBuffer | None = None) -> list[dict]:
    """The first block's calibration inputs, each checked for NaN/Inf and (with ``store``; a resumed run has them
    recorded already) put into ``inputs`` (and ``fp_inputs``, GPTAQ's stream, when given: the first block's inputs
    are the same in both); returns the block's keyword arguments per batch."""
    seen = [0]

    def check_and_store(x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise NumericalError(f"{prefix}.0: its calibration inputs contain NaN or Inf; check the source model")
        if store:
            inputs.put(seen[0], x)
            if fp_inputs is not None:
                fp_inputs.put(seen[0], x)
        seen[0] += 1

    with torch.no_grad():
        return capture_block_inputs(model, blocks, calib, batch_size, progress, store=check_and_store)[1]


class _Placed:
    """The calibration batches of a block, read onto ``device`` and stored back on ``home`` (the sequence
    :func:`~gptq_plugin.blockquant.quantize_block` reads its inputs from and writes its outputs to)."""

    def __init__(self, inputs, device: torch.device, home: torch.device):
        self.inputs, self.device, self.home = inputs, device, home

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.inputs[i].to(self.device, non_blocking=True)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __setitem__(self, i: int, y: torch.Tensor) -> None:
        self.inputs[i] = y.to(self.home)


def _to(value, device: torch.device):
    """``value`` (a tensor, or a tuple/list/dict of them, e.g. rotary embeddings) with its tensors on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _on_device(block: nn.Module, inputs, kwargs_list: list[dict] | None, device: torch.device,
               fp_inputs=None) -> Iterator[tuple]:
    """Run the body with ``block`` (and the batches it reads, one at a time, and their keyword arguments) on
    ``device``; the block goes back to the device it came from afterwards, its quantized layers with it, and its
    outputs are stored there. When the block is on ``device`` already, nothing moves (the same objects are given).
    Yields ``(inputs, kwargs_list, fp_inputs)`` as placed (``fp_inputs``: GPTAQ's second stream, or None)."""
    home = next((p.device for p in block.parameters()), device)
    if home == device:
        yield inputs, kwargs_list, fp_inputs
        return
    block.to(device)
    try:
        yield (None if inputs is None else _Placed(inputs, device, home),
               None if kwargs_list is None else [_to(kw, device) for kw in kwargs_list],
               None if fp_inputs is None else _Placed(fp_inputs, device, home))
    finally:
        block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
