"""Streaming quantization: GPTQ for models larger than memory.

The in-memory driver (:func:`gptq_plugin.pipeline.quantize_model`) needs the whole model in fp32. This driver runs
the same block loop (:func:`gptq_plugin.driver.quantize_blocks`) and never materialises the model:

1. The model is built as a skeleton whose parameters live on the ``meta`` device (no memory; buffers such as
   rotary frequencies are computed on the CPU as usual).
2. Only the modules before the first decoder block (embeddings) are loaded from the source safetensors shards to
   capture the calibration inputs of block 0; they go back to ``meta`` afterwards.
3. Block by block: the block's parameters are read from the shards in fp32, the block is quantized exactly as
   the in-memory driver does it (:func:`gptq_plugin.blockquant.quantize_block`, so the tensors are identical), its
   checkpoint tensors are written at once as one shard (the block's file in the run's
   :class:`~gptq_plugin.resume.ResumeState`), and the block goes back to ``meta``.
4. The calibration activations at the current block boundary live in the state's
   :class:`~gptq_plugin.resume.ActivationBuffer`: one file per batch on disk, of which at most
   ``activation_memory`` bytes are also kept in memory.
5. At the end the non-block tensors (embeddings, final norm, ``lm_head``) are copied into the last shard (bf16
   for a bf16 source, else fp16: :func:`~gptq_plugin.checkpoint.checkpoint_dtype`), and the shards are linked
   into the output folder with ``config.json`` and the index, atomically.

Peak memory is therefore about one decoder block in fp32, its GPTQ work (the Hessians and the solver's copies of
the widest layer), one batch's activations and the resident part of the buffer, whatever the number of blocks.
Every block is recorded in the resume state, so a killed run resumes at the first unfinished block and gives the
same bytes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .blockquant import QuantizeReport, available_memory
from .checkpoint import checkpoint_dtype, checkpoint_meta_names, quantized_state_dict, write_model_files
from .config import QuantizeConfig
from .distributed import Ranks, resolve_device
from .driver import quantize_blocks
from .errors import CheckpointError
from .moe import checkpoint_names
from .plugins import find_layout, split_experts
from .resume import ResumeState
from .safetensors_io import (atomic_output_dir, atomic_save, check_output_dir, checkpoint_files, load_tensors,
                             read_headers, shard_name, write_error, write_index)


class SourceWeights:
    """The tensors of an unquantized safetensors model folder, by name, read a few at a time (the file handle is
    closed after each read, so its mapped pages do not stay resident).

    Attributes:
        folder: the model folder. where: tensor name -> the file holding it. shapes: tensor name -> ``(shape,
            dtype)`` as the header stores them (``dtype`` a string such as ``"BF16"``).

    Raises:
        CheckpointError: no safetensors weights (pickle-only folders are refused: convert them first), a hostile
            index, or a corrupt file header.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = checkpoint_files(self.folder)  # validates the index (files inside the folder, present)
        if any(f.suffix != ".safetensors" for f in files):
            raise CheckpointError(f"{self.folder} holds pickle weights: streaming reads safetensors only; convert the "
                                  "model to safetensors or quantize it with --in-memory")
        headers = read_headers(files)
        self.where: dict[str, Path] = {k: m.file for k, m in headers.items()}
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {k: (tuple(m.shape), m.dtype) for k, m in headers.items()}

    def nbytes(self, itemsize: int = 4) -> int:
        """Bytes of every tensor at ``itemsize`` bytes per element (4: the fp32 model in memory)."""
        return sum(itemsize * torch.Size(shape).numel() for shape, _ in self.shapes.values())

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (floating ones cast to ``dtype`` when given).

        Raises:
            CheckpointError: a name is missing or its file is corrupt.
        """
        missing = [n for n in names if n not in self.where]
        if missing:
            raise CheckpointError(f"{self.folder}: tensor {missing[0]} is missing from the source weights"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the weights do "
                                  "not match config.json")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            for k, t in load_tensors(f, keys).items():
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def build_skeleton(source: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``source``'s config.json with every parameter on the ``meta`` device (buffers on CPU).

    Raises:
        CheckpointError: Transformers cannot build the model from the config.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - Transformers raises many types for a bad config
        raise CheckpointError(f"{source}/config.json: Transformers cannot build the model ({type(e).__name__}: {e})"
                              ) from None
    return model.eval()


def _materialize(root: nn.Module, names: list[str], src: SourceWeights, prefix: str,
                 stored: dict[str, str] | None = None) -> None:
    """Load the parameters/buffers ``names`` of ``root`` (relative names; ``prefix + name`` in the model, stored in
    ``src`` under ``stored[prefix + name]``, default the same name) in fp32."""
    from accelerate.utils import set_module_tensor_to_device

    stored = stored or {}
    disk = {n: stored.get(prefix + n, prefix + n) for n in names}
    tensors = src.load(list(disk.values()), torch.float32)
    for n in names:
        t = tensors[disk[n]]
        mod_name, _, leaf = n.rpartition(".")
        cur = getattr(root.get_submodule(mod_name) if mod_name else root, leaf)
        if tuple(cur.shape) != tuple(t.shape):
            raise CheckpointError(f"{src.folder}: tensor {disk[n]} has shape {tuple(t.shape)}, the model's config "
                                  f"expects {tuple(cur.shape)}: the weights do not match config.json")
        set_module_tensor_to_device(root, n, "cpu", value=t)


def _to_meta(root: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for n in names:
        set_module_tensor_to_device(root, n, "meta")


class _ShardBlocks:
    """A :class:`~gptq_plugin.driver.BlockSource` and :class:`~gptq_plugin.driver.BlockSink` for a model folder: a
    skeleton whose blocks are read from the safetensors shards one at a time; each quantized block becomes its
    checkpoint shard (the block's file in the resume state)."""

    def __init__(self, source: Path, cfg: QuantizeConfig):
        self.source, self.cfg = source, cfg

    def open(self) -> nn.Module:
        """Build the skeleton; check that the source holds every tensor it needs.

        Raises:
            CheckpointError: as :class:`SourceWeights` and :func:`build_skeleton`; a tensor of the model's state
                dict is missing from the source.
        """
        source = self.source
        self.dtype = checkpoint_dtype(source)
        self.src = SourceWeights(source)
        self.model = model = build_skeleton(source)
        self.blocks, prefix = find_layout(model).blocks(model)
        split_experts(model, self.blocks)  # fused MoE experts -> per-expert layers, stored per expert
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        expected = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
        self.stored = checkpoint_names(model, expected)  # model key -> the source's (and the checkpoint's) key
        missing = [self.stored[k] for k in expected if self.stored[k] not in self.src.where]
        if missing:
            raise CheckpointError(f"{source}: tensor {missing[0]} is missing from the source weights"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the weights do "
                                  "not match config.json (or use other names; quantize such a model with --in-memory)")
        self.outer = [k for k in expected if not k.startswith(prefix + ".")]  # embeddings, final norm, lm_head
        return model

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[None]:
        """The modules before block 0 (embeddings; ``lm_head`` is never reached), loaded for the capture only."""
        model = self.model
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        skip = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
        keep = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
        pre = [k for k, p in model.named_parameters(remove_duplicate=False)
               if k in self.outer and (id(p) not in skip or id(p) in keep)]
        pre += [k for k, _ in model.named_buffers() if k in self.outer and k not in pre]
        _materialize(model, pre, self.src, "", self.stored)
        try:
            yield
        finally:
            _to_meta(model, pre)
            gc.collect()

    def load(self, block: nn.Module, name: str) -> None:
        _materialize(block, list(block.state_dict()), self.src, name + ".", self.stored)

    def unload(self, block: nn.Module) -> None:
        block.to("meta")
        gc.collect()

    def keep(self, block: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The block's checkpoint tensors (its shard): :func:`~gptq_plugin.checkpoint.quantized_state_dict`."""
        state = {f"{name}.{k}": v for k, v in quantized_state_dict(block, self.cfg, self.dtype).items()}
        names = checkpoint_names(self.model, state)
        return {names[k]: v for k, v in state.items()}

    def restore(self, block: nn.Module, name: str, state: ResumeState, index: int) -> None:
        pass  # its shard is in the state already; :meth:`write` links it into the checkpoint

    def write(self, out: Path, overwrite: bool, state: ResumeState, report: QuantizeReport,
              extra_meta: dict | None) -> None:
        """Write the checkpoint ``out`` (atomically): the blocks' shards from ``state``, a last shard with the
        non-block tensors (in the checkpoint dtype, as the in-memory writer stores them), the index, config.json
        and the tokenizer files.

        Raises:
            CheckpointError: a block's shard is missing from ``state``. OutputError: ``out`` cannot be written.
        """
        shards = [state.block_file(bi) for bi in range(len(self.blocks))]
        lost = [f for f in shards if not f.is_file()]
        if lost:
            raise CheckpointError(f"{lost[0]} is missing from the resume state {state.folder}: rerun with --restart")
        total = len(shards) + 1
        with atomic_output_dir(out, overwrite, self.source) as tmp:
            names = [shard_name(i, total) for i in range(1, total + 1)]
            for f, name in zip(shards, names):
                try:
                    os.link(f, tmp / name)  # the state keeps its copy until the checkpoint is complete
                except OSError:
                    shutil.copyfile(f, tmp / name)
            rest = self.src.load([self.stored[k] for k in self.outer], self.dtype)
            atomic_save(rest, tmp / names[-1])
            del rest
            write_index(tmp, names)
            qcfg = self.cfg.to_dict()
            qcfg["meta"].update(checkpoint_meta_names(self.model, dict(extra_meta or {}, **report.checkpoint_meta())))
            write_model_files(tmp, self.model.config.to_dict(), qcfg, None, self.source, self.dtype)


def quantize_streaming(source: str | Path, out: str | Path, calib: torch.Tensor | None, cfg: QuantizeConfig,
                       batch_size: int = 8, progress: bool = True, resume: ResumeState | None = None,
                       low_memory: bool = True, forward_dtype: torch.dtype | None = None,
                       activation_memory: int | None = None, overwrite: bool = False,
                       extra_meta: dict | None = None, compare_rtn: bool = False,
                       device: str | torch.device | None = "auto", ranks: Ranks | None = None,
                       park_dir: str | Path | bool | None = None) -> QuantizeReport:
    """GPTQ- (or RTN-) quantize the model folder ``source`` into the checkpoint ``out`` one decoder block at a
    time, never holding more than one block's weights (see the module docstring).

    The checkpoint's tensors are identical to those of :func:`~gptq_plugin.pipeline.quantize_model` +
    :func:`~gptq_plugin.checkpoint.save_quantized` on the same inputs; it is sharded one file per decoder block
    (``model-00001-of-000NN.safetensors`` ...) plus one for the embeddings, final norm and ``lm_head``. Unquantized
    tensors and config.json's ``dtype`` are bf16 for a bf16 source, else fp16
    (:func:`~gptq_plugin.checkpoint.checkpoint_dtype`); scales are fp16.

    Args:
        source: an unquantized Hugging Face model folder with safetensors weights (tensor names as the model's
            state dict, as Transformers writes them).
        out: the checkpoint folder to create (atomically; the source is never written).
        calib: int64 ``[n, seqlen]`` calibration token ids (None for ``cfg.method == "rtn"``).
        cfg: the quantization config.
        batch_size: calibration sequences per forward.
        resume: where per-block progress is recorded (shards, activations, manifest); None uses a temporary
            folder next to ``out`` that is removed at the end (no resumption).
        low_memory: True (default) runs one batch at a time through each layer group (bounded memory); False
            the one-pass driver (every batch's activations at once). Same checkpoint either way.
        forward_dtype, compare_rtn: as in :func:`~gptq_plugin.pipeline.quantize_model`.
        activation_memory: bytes of calibration activations also held in memory (the rest stays on disk only);
            None: a quarter of :func:`~gptq_plugin.blockquant.available_memory`.
        extra_meta: merged into ``quantization_config["meta"]`` (with the report's fallbacks and notes).
        device, ranks: as in :func:`~gptq_plugin.pipeline.quantize_model` (None: the CPU); with several ranks
            only rank 0 writes ``out``, and ``resume`` must be the same folder on every rank (the ranks of one
            host share it; across hosts it must be on a shared file system).
        park_dir: with ``low_memory=False``, where the waiting batches park their inputs to a one-layer group
            (:func:`gptq_plugin.passes.sequential_pass`); None: ``resume``'s folder; False: in memory.

    Returns:
        The :class:`~gptq_plugin.blockquant.QuantizeReport`.

    Raises:
        ConfigError: ``lm_head=True``, or GPTQ without calibration.
        CheckpointError: the source weights are missing, corrupt, pickled, or do not match config.json.
        NumericalError: NaN/Inf calibration inputs or block outputs (names the block).
        OutputError: ``out`` exists (without ``overwrite``), equals, lies inside or contains ``source`` (checked
            before any work); or a file cannot be written (no space left, read-only, no permission).
    """
    check_output_dir(out, overwrite, source)
    if ranks is None:
        ranks = Ranks(device=torch.device("cpu") if device is None else resolve_device(device))
    t0 = time.time()
    source, out = Path(source), Path(out)
    own_state = resume is None
    if own_state:
        def make_state() -> ResumeState:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                return ResumeState(Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stream-")), {})
            except OSError as e:
                raise write_error(e, out) from None

        resume = ranks.on_writer("creating the streaming state folder", make_state)
    if ranks.is_writer:
        for stale in resume.folder.glob("hessian-*.bin"):  # parked by the solver of a killed run
            stale.unlink()
    ranks.barrier("clearing the streaming state folder")
    if activation_memory is None:
        activation_memory = (available_memory() or 0) // 4
    blocks = _ShardBlocks(source, cfg)
    try:
        report = quantize_blocks(blocks, blocks, calib, cfg, batch_size=batch_size, progress=progress,
                                 low_memory=low_memory, forward_dtype=forward_dtype, resume=resume,
                                 activation_memory=activation_memory, offload_dir=resume.folder,
                                 compare_rtn=compare_rtn, desc=f"{cfg.method} {cfg.bits}-bit (streaming)",
                                 ranks=ranks, park_dir=park_dir)
        if ranks.is_writer:
            blocks.write(out, overwrite, resume, report, extra_meta)
        ranks.barrier(f"writing {out}")
    except BaseException:
        if own_state and ranks.is_writer:
            resume.remove()
        raise
    if ranks.is_writer:
        resume.remove()
    report.seconds = time.time() - t0
    return report
