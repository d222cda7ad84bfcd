"""The in-memory driver: GPTQ a Hugging Face decoder-only model that is loaded (in fp32) in place, block by block.

:func:`quantize_model` runs the shared block loop (:func:`gptq_plugin.driver.quantize_blocks`) with the model's own
blocks as the source and the model as the sink: each quantized block keeps its
:class:`~gptq_plugin.linear.QuantLinear` layers, which :func:`gptq_plugin.checkpoint.save_quantized` then writes.
For models larger than memory, :mod:`gptq_plugin.streaming` runs the same loop from the safetensors shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .blockquant import QuantizeReport
from .config import QuantizeConfig
from .distributed import Ranks, resolve_device
from .driver import quantize_blocks
from .errors import CheckpointError
from .plugins import find_layout
from .linear import QuantLinear
from .resume import ResumeState

log = logging.getLogger("gptq_plugin")

#: the tensors of a quantized layer that a resumed run restores (as :class:`QuantLinear` holds them)
LEAVES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _stamp(f: Path) -> tuple[int, int]:
    st = os.stat(f)
    return st.st_size, st.st_mtime_ns


class _LoadedModel:
    """A :class:`~gptq_plugin.driver.BlockSource` and :class:`~gptq_plugin.driver.BlockSink` for a model in memory:
    the blocks are there already, and the quantized blocks stay in it. The blocks that wait for their turn can
    give their memory back (``source``, ``hold_dtype``: see :func:`quantize_model`)."""

    def __init__(self, model: nn.Module, cfg: QuantizeConfig, hold_dtype: torch.dtype | None = None,
                 source: str | Path | None = None):
        self.model, self.cfg, self.hold_dtype, self.source = model, cfg, hold_dtype, source
        self.held: dict[int, torch.dtype] = {}  # id(block) -> its dtype, for blocks held in hold_dtype
        self.held_rest: dict[int, tuple[torch.Tensor, torch.dtype]] = {}  # the other tensors held so, by id
        # id(block) -> block, its name, its dropped parameters, (size, mtime) of the source files that hold them
        self.on_disk: dict[int, tuple[nn.Module, str, list[str], dict[Path, tuple[int, int]]]] = {}
        self.src = None

    def _exact(self, ts: list[torch.Tensor]) -> bool:
        return all(torch.equal(t.to(self.hold_dtype).to(t.dtype), t) for t in ts)

    def open(self) -> nn.Module:
        """The model. With ``source``, each block whose fp32 weights equal the source's tensors (same names) gives
        them up until its turn (:meth:`load` reads them again). Else, with ``hold_dtype``, each block whose
        floating weights all survive the round trip ``dtype -> hold_dtype -> dtype`` (a bf16 source loaded in fp32)
        is held in ``hold_dtype`` until its turn, and so is each such weight outside the blocks (embeddings, final
        norm, untied lm_head) except while the calibration inputs are captured (:meth:`embeddings`) and after the
        run (:meth:`close`)."""
        blocks, prefix = find_layout(self.model).blocks(self.model)
        if self.source is not None:
            from .streaming import SourceWeights
            try:
                self.src = SourceWeights(self.source)
            except CheckpointError as e:
                log.info("blocks stay in memory: %s", e)
        inside = set()
        for bi, block in enumerate(blocks):
            ts = [t for t in list(block.parameters()) + list(block.buffers()) if t.is_floating_point()]
            inside.update(id(t) for t in ts)
            if self.src is not None and self._drop(block, f"{prefix}.{bi}"):
                continue
            dtypes = {t.dtype for t in ts}
            if (self.hold_dtype is not None and len(dtypes) == 1 and self.hold_dtype not in dtypes
                    and self._exact(ts)):
                self.held[id(block)] = dtypes.pop()
                block.to(self.hold_dtype)
        if self.hold_dtype is not None:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if (id(t) not in inside and id(t) not in self.held_rest and t.is_floating_point()
                        and t.device.type != "meta" and t.dtype != self.hold_dtype and self._exact([t])):
                    self.held_rest[id(t)] = (t, t.dtype)
            self._cast_rest(True)
        return self.model

    def _drop(self, block: nn.Module, name: str) -> bool:
        """Put the parameters of ``block`` (state-dict prefix ``name``) on ``meta`` when they are all fp32 2-D or
        1-D tensors equal to the source's tensors of the same names (read one block at a time)."""
        params = dict(block.named_parameters())
        keys = {n: f"{name}.{n}" for n in params}
        if (not params or any(p.dtype != torch.float32 or p.dim() > 2 or p.device.type != "cpu"
                              for p in params.values()) or any(k not in self.src.where for k in keys.values())):
            return False  # fused 3-D experts are split after open(): their names would change
        stored = self.src.load(list(keys.values()))
        if not all(tuple(stored[keys[n]].shape) == tuple(p.shape) and torch.equal(stored[keys[n]].to(p.dtype), p)
                   for n, p in params.items()):
            return False
        del stored
        from .streaming import _to_meta
        _to_meta(block, list(params))
        files = {self.src.where[k] for k in keys.values()}
        self.on_disk[id(block)] = (block, name, list(params), {f: _stamp(f) for f in files})
        return True

    def _cast_rest(self, hold: bool) -> None:
        for t, dtype in self.held_rest.values():
            t.data = t.data.to(self.hold_dtype if hold else dtype)

    def close(self) -> None:
        """Give every block that did not have its turn (``max_blocks``, an error) and the weights outside the blocks
        their memory and dtype back."""
        for block, name, *_ in list(self.on_disk.values()):
            self.load(block, name)
        for block in find_layout(self.model).blocks(self.model)[0]:
            self.load(block, "")
        self._cast_rest(False)
        self.held_rest.clear()

    @contextlib.contextmanager
    def embeddings(self):
        self._cast_rest(False)
        try:
            yield
        finally:
            self._cast_rest(True)

    def load(self, block: nn.Module, name: str) -> None:
        dropped = self.on_disk.pop(id(block), None)
        if dropped is not None:
            from .streaming import _materialize
            changed = [f for f, stamp in dropped[3].items() if _stamp(f) != stamp]
            if changed:
                raise CheckpointError(f"{changed[0]}: the source model changed during the run (the blocks waiting "
                                      f"for their turn are read from it again): leave {self.source} unchanged "
                                      "while it is quantized, and rerun")
            _materialize(block, dropped[2], self.src, dropped[1] + ".")
        dtype = self.held.pop(id(block), None)
        if dtype is not None:
            block.to(dtype)

    def unload(self, block: nn.Module) -> None:
        pass

    def keep(self, block: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The block's quantized layers (``<layer>.<leaf>``, :data:`LEAVES`), already in place."""
        return {f"{n}.{leaf}": getattr(m, leaf) for n, m in block.named_modules() if isinstance(m, QuantLinear)
                for leaf in LEAVES if getattr(m, leaf, None) is not None}

    def restore(self, block: nn.Module, name: str, state: ResumeState, index: int) -> None:
        """Put the recorded quantized layers of block ``index`` into ``block`` (``nn.Linear`` -> QuantLinear)."""
        self.load(block, name)
        tensors = state.load_block(index)
        cfg = self.cfg
        for layer in sorted({k.rpartition(".")[0] for k in tensors}):
            lin = block.get_submodule(layer)
            q = QuantLinear.from_tensors(*(tensors[f"{layer}.{leaf}"] for leaf in LEAVES[:4]), cfg.bits,
                                         cfg.group_size, cfg.sym, tensors.get(f"{layer}.bias"), name=f"{name}.{layer}")
            if (q.in_features, q.out_features) != (lin.in_features, lin.out_features):
                raise CheckpointError(f"{state.block_file(index)}: {name}.{layer} is recorded as {q.in_features} -> "
                                      f"{q.out_features}, the model has {lin.in_features} -> {lin.out_features}: "
                                      "rerun with --restart")
            parent, _, child = layer.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, q)


def quantize_model(model: nn.Module, calib: torch.Tensor | None, cfg: QuantizeConfig, batch_size: int = 8,
                   progress: bool = True, max_blocks: int | None = None, low_memory: bool | None = None,
                   resume: ResumeState | None = None, forward_dtype: torch.dtype | None = None,
                   compare_rtn: bool = False, device: str | torch.device | None = "auto",
                   ranks: Ranks | None = None, hold_dtype: torch.dtype | None = None,
                   source: str | Path | None = None, park_dir: str | Path | bool | None = None
                   ) -> QuantizeReport:
    """GPTQ- (or RTN-) quantize every linear layer inside the decoder blocks of ``model``, in place.

    Args:
        model: a Hugging Face causal LM on CPU (float32 recommended; weights are read in fp32).
        calib: int64 ``[n, seqlen]`` calibration token ids (ignored, may be None, for ``cfg.method == "rtn"``).
        cfg: the quantization config.
        batch_size: calibration sequences per forward.
        max_blocks: quantize only the first ``max_blocks`` decoder blocks (quick experiments and tests); the
            other blocks keep their ``nn.Linear`` layers.
        low_memory: how ``true_sequential`` runs the calibration batches through a block. False: one forward in
            which every batch pauses at each layer group (fastest; holds every batch's activations at once,
            e.g. ~1.5 GB for 128x512 tokens of a 576-wide model). True: the block is re-run up to each group, one
            batch at a time (about 1.6x slower on the demo model; one batch's activations). None (default): one
            pass when its estimated activations take under half the available memory, else low memory. The
            checkpoints are identical either way.
        forward_dtype: run the calibration forwards of the decoder blocks under autocast to this dtype (e.g.
            ``torch.bfloat16``: ~2x faster on CPUs with AMX/AVX512-BF16, as GPTQModel does); None computes in the
            model's dtype. Hessians always accumulate in fp32 and the weights GPTQ reads stay the model's.
        resume: a :class:`~gptq_plugin.resume.ResumeState`: blocks it records as finished are restored instead of
            quantized again (starting from the recorded activations), and every block finished now is recorded.
        compare_rtn: also compute each layer's relative output error under RTN on the same grid
            (``LayerReport.rtn_rel_err``, e.g. for ``quantize --report``'s plot): one more quantization of every
            layer. Without it ``rtn_rel_err`` is None.
        device: where each block is quantized: ``"auto"`` (CUDA when torch sees a GPU, else the CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``. Only the block being quantized, the calibration batch it runs and its Hessians
            go there; the model stays where it is (its blocks come back after quantization). None: where the model
            is. The same bytes on the CPU whatever this says.
        ranks: several processes sharing the run (torch.distributed, e.g. under torchrun:
            :func:`gptq_plugin.distributed.init_ranks`; its device wins over ``device``); the result is the same on
            every rank and does not depend on their number.
        hold_dtype: hold the decoder blocks that wait for their turn in this dtype (e.g. ``torch.bfloat16`` for a
            bf16 model loaded in fp32: half its memory), each cast back when it is quantized. Only blocks whose
            weights survive the round trip exactly are held so: the result is the same bytes. None: as loaded.
        source: the safetensors folder ``model`` was loaded from (in fp32). Each block whose weights equal its
            tensors of the same names (checked when the run starts) gives up its memory until its turn and is read
            from there again (before ``hold_dtype`` is tried); blocks that differ stay in memory. Every block has its
            weights back when this returns or raises. None: the blocks stay in memory. A source file whose size or
            modification time changed meanwhile raises :class:`~gptq_plugin.errors.CheckpointError`.
        park_dir: a folder where the one-pass driver's waiting batches park their inputs to a one-layer group
            (:func:`gptq_plugin.passes.sequential_pass`: less memory, the same bytes); None: ``resume``'s folder when
            given, else they stay in memory; False: they stay in memory.

    Returns:
        A :class:`~gptq_plugin.blockquant.QuantizeReport` (per-layer relative output error, dampening, fallbacks).
        The model's block linears are replaced by :class:`QuantLinear` (fp16 scales).

    Raises:
        ConfigError: ``lm_head=True`` (not supported yet), or GPTQ without calibration data.
        NumericalError: NaN/Inf activations (names the block).
        CheckpointError: a resume state whose recorded blocks are missing or do not fit the model; a ``source``
            file that changed during the run.
        ConfigError: a CUDA ``device`` that torch does not see.
        DistributedError: (with ``ranks``) another rank failed.
    """
    if ranks is None:
        home = next((p.device for p in model.parameters()), torch.device("cpu"))
        ranks = Ranks(device=home if device is None else resolve_device(device))
    loaded = _LoadedModel(model, cfg, hold_dtype, source)
    try:
        return quantize_blocks(loaded, loaded, calib, cfg, batch_size=batch_size, progress=progress,
                               max_blocks=max_blocks, low_memory=low_memory, forward_dtype=forward_dtype,
                               resume=resume, compare_rtn=compare_rtn, ranks=ranks, park_dir=park_dir)
    finally:
        loaded.close()
