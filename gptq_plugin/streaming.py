"""Streaming quantization: GPTQ for models larger than memory.

The in-memory driver (:func:`gptq_plugin.pipeline.quantize_model`) needs the whole model in fp32. This driver
never materialises it:

1. The model is built as a skeleton whose parameters live on the ``meta`` device (no memory; buffers such as
   rotary frequencies are computed on the CPU as usual).
2. Only the modules before the first decoder block (embeddings) are loaded from the source safetensors shards to
   capture the calibration inputs of block 0; they go back to ``meta`` afterwards.
3. Block by block: the block's parameters are read from the shards in fp32, the block is quantized exactly as
   the in-memory driver does it (:func:`gptq_plugin.pipeline.quantize_block`, so the tensors are identical), its
   checkpoint tensors are written at once as one shard, and the block goes back to ``meta``.
4. The calibration activations at the current block boundary live in an :class:`ActivationBuffer`: one file per
   batch on disk, of which at most ``activation_memory`` bytes are also kept in memory.
5. At the end the non-block tensors (embeddings, final norm, ``lm_head``) are copied into the last shard (bf16
   for a bf16 source, else fp16: :func:`~gptq_plugin.checkpoint.checkpoint_dtype`), and the shards are linked
   into the output folder with ``config.json`` and the index, atomically.

Peak memory is therefore about one decoder block in fp32, its GPTQ work (the Hessians and the solver's copies of
the widest layer), one batch's activations and the resident part of the buffer, whatever the number of blocks.
Every block's files are recorded in the run's :class:`~gptq_plugin.resume.ResumeState` folder, so a killed run
resumes at the first unfinished block and gives the same bytes.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (atomic_output_dir, check_output_dir, checkpoint_dtype, checkpoint_files, quantized_state_dict,
                         write_error, write_model_files)
from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError, NumericalError
from .layouts import find_layout
from .pipeline import (LayerReport, QuantizeReport, available_memory, capture_block_inputs, quantize_block,
                       release_free_memory)
from .resume import ResumeState, _atomic_save

log = logging.getLogger(__name__)


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ActivationBuffer:
    """The calibration activations at one decoder-block boundary, one fp32 ``[b, seqlen, hidden]`` tensor per
    batch, kept on disk with at most ``max_resident_bytes`` of them also held in memory.

    Reading item ``i`` gives the current generation (the inputs of the block being quantized); assigning item
    ``i`` stores the next generation (that block's outputs) without overwriting the current one; :meth:`advance`
    makes the next generation current and deletes the old files. Files are ``x-<gen>-<batch>.safetensors`` in
    ``folder``, each written to a temporary name and renamed, so a killed run leaves whole files only.

    Args:
        folder: where the files go (created).
        n: the number of batches.
        max_resident_bytes: bytes of activations (both generations together) also kept in memory; 0 keeps only
            the one batch being used in memory.
        gen: the generation to start at (the resumed block's index).
    """

    def __init__(self, folder: Path, n: int, max_resident_bytes: int, gen: int = 0):
        self.folder, self.n, self.max_resident_bytes, self.gen = Path(folder), n, max(0, int(max_resident_bytes)), gen
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self.resident_bytes = 0

    def _path(self, gen: int, i: int) -> Path:
        return self.folder / f"x-{gen:05d}-{i:05d}.safetensors"

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"batch {i} of {self.n}")
        return i

    def __getitem__(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        i = self._index(i)
        hit = self._cache.get((self.gen, i))
        if hit is not None:
            return hit
        path = self._path(self.gen, i)
        if not path.is_file():
            raise CheckpointError(f"{path}: calibration activations of batch {i} are missing from the resume state; "
                                  "rerun with --restart")
        return load_file(str(path))["x"]

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def _store(self, gen: int, i: int, x: torch.Tensor) -> None:
        x = x.detach().contiguous()
        _atomic_save({"x": x}, self._path(gen, i))
        nbytes = x.numel() * x.element_size()
        if self.resident_bytes + nbytes <= self.max_resident_bytes:
            self._cache[(gen, i)] = x
            self.resident_bytes += nbytes

    def put(self, i: int, x: torch.Tensor) -> None:
        """Store batch ``i`` of the current generation (the calibration capture)."""
        self._store(self.gen, self._index(i), x)

    def __setitem__(self, i: int, x: torch.Tensor) -> None:
        self._store(self.gen + 1, self._index(i), x)

    def advance(self) -> None:
        """Make the stored outputs the current inputs; delete the previous generation's files."""
        for i in range(self.n):
            x = self._cache.pop((self.gen, i), None)
            if x is not None:
                self.resident_bytes -= x.numel() * x.element_size()
            self._path(self.gen, i).unlink(missing_ok=True)
        self.gen += 1


class SourceWeights:
    """The tensors of an unquantized safetensors model folder, by name, read a few at a time (the file handle is
    closed after each read, so its mapped pages do not stay resident).

    Raises:
        CheckpointError: no safetensors weights (pickle-only folders are refused: convert them first), a hostile
            index, or a corrupt file header.
    """

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        files = checkpoint_files(self.folder)  # validates the index (files inside the folder, present)
        if any(f.suffix != ".safetensors" for f in files):
            raise CheckpointError(f"{self.folder} holds pickle weights: streaming reads safetensors only; convert the "
                                  "model to safetensors or quantize it with --in-memory")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        self.where[k] = f
                        self.shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); re-download the model") from None

    def nbytes(self, itemsize: int | None = 4) -> int:
        """Bytes of every tensor at ``itemsize`` bytes per element (4: the fp32 model in memory; None: as
        stored)."""
        total = 0
        for shape, dtype in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n * (itemsize or _ITEMSIZE.get(dtype, 4))
        return total

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (floating ones cast to ``dtype`` when given).

        Raises:
            CheckpointError: a name is missing or its file is corrupt.
        """
        from safetensors import SafetensorError, safe_open

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
            try:
                with safe_open(str(f), "pt") as h:
                    for k in keys:
                        t = h.get_tensor(k)
                        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); re-download the model") from None
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


def _materialize(root: nn.Module, names: list[str], src: SourceWeights, prefix: str) -> None:
    """Load the parameters/buffers ``names`` of ``root`` (relative names; ``prefix + name`` in ``src``) in fp32."""
    from accelerate.utils import set_module_tensor_to_device

    tensors = src.load([prefix + n for n in names], torch.float32)
    for n in names:
        t = tensors[prefix + n]
        mod_name, _, leaf = n.rpartition(".")
        cur = getattr(root.get_submodule(mod_name) if mod_name else root, leaf)
        if tuple(cur.shape) != tuple(t.shape):
            raise CheckpointError(f"{src.folder}: tensor {prefix + n} has shape {tuple(t.shape)}, the model's config "
                                  f"expects {tuple(cur.shape)}: the weights do not match config.json")
        set_module_tensor_to_device(root, n, "cpu", value=t)


def _to_meta(root: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for n in names:
        set_module_tensor_to_device(root, n, "meta")


def quantize_streaming(source: str | Path, out: str | Path, calib: torch.Tensor | None, cfg: QuantizeConfig,
                       batch_size: int = 8, progress: bool = True, resume: ResumeState | None = None,
                       low_memory: bool = True, forward_dtype: torch.dtype | None = None,
                       activation_memory: int | None = None, overwrite: bool = False,
                       extra_meta: dict | None = None) -> QuantizeReport:
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
        forward_dtype: as in :func:`~gptq_plugin.pipeline.quantize_model`.
        activation_memory: bytes of calibration activations also held in memory (the rest stays on disk only);
            None: a quarter of :func:`~gptq_plugin.pipeline.available_memory`.
        extra_meta: merged into ``quantization_config["meta"]`` (with the report's fallbacks and notes).

    Returns:
        The :class:`~gptq_plugin.pipeline.QuantizeReport`.

    Raises:
        ConfigError: ``lm_head=True``, or GPTQ without calibration.
        CheckpointError: the source weights are missing, corrupt, pickled, or do not match config.json.
        NumericalError: NaN/Inf calibration inputs or block outputs (names the block).
        OutputError: ``out`` exists (without ``overwrite``), equals, lies inside or contains ``source`` (checked
            before any work); or a file cannot be written (no space left, read-only, no permission).
    """
    check_output_dir(out, overwrite, source)
    if cfg.lm_head:
        raise ConfigError("lm_head=True is not supported yet: keep lm_head unquantized (the default)")
    if cfg.method == "gptq" and (calib is None or calib.numel() == 0):
        raise ConfigError("GPTQ needs calibration data: pass calibration token windows (or use method='rtn')")
    t0 = time.time()
    source, out = Path(source), Path(out)
    dtype = checkpoint_dtype(source)
    src = SourceWeights(source)
    model = build_skeleton(source)
    blocks, prefix = find_layout(model).blocks(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
    missing = [k for k in expected if k not in src.where]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]} is missing from the source weights"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the weights do not "
                              "match config.json (or use other names; quantize such a model with --in-memory)")
    outer = [k for k in expected if not k.startswith(prefix + ".")]
    n_blocks = len(blocks)

    own_state = resume is None
    if own_state:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            resume = ResumeState(Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stream-")), {})
        except OSError as e:
            raise write_error(e, out) from None
    work = resume.folder
    for stale in work.glob("hessian-*.bin"):  # parked by the solver of a killed run
        stale.unlink()
    report = QuantizeReport()
    first = min(resume.done, n_blocks)
    for bi in range(first):
        report.layers.extend(LayerReport(**r) for r in resume.reports[bi])
    try:
        buf = kwargs_list = None
        if cfg.method == "gptq" and first < n_blocks:
            n_batches = (calib.shape[0] + batch_size - 1) // batch_size
            if activation_memory is None:
                activation_memory = (available_memory() or 0) // 4
            buf = ActivationBuffer(work / "activations", n_batches, activation_memory, gen=first)
            # the modules before block 0 (embeddings; lm_head is never reached): loaded for the capture only
            out_emb = model.get_output_embeddings()
            skip = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
            in_emb = model.get_input_embeddings()
            keep = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
            pre = [k for k, p in model.named_parameters(remove_duplicate=False)
                   if k in outer and (id(p) not in skip or id(p) in keep)]
            pre += [k for k, _ in model.named_buffers() if k in outer and k not in pre]
            _materialize(model, pre, src, "")
            seen = [0]

            def store(x: torch.Tensor) -> None:
                if not torch.isfinite(x).all():
                    raise NumericalError(f"{prefix}.0: its calibration inputs contain NaN or Inf; check the source model")
                if first == 0:  # a resumed run has the activations of block `first` on disk already
                    buf.put(seen[0], x)
                seen[0] += 1

            use_cache = getattr(model.config, "use_cache", None)
            if use_cache is not None:
                model.config.use_cache = False
            with torch.no_grad():
                _, kwargs_list = capture_block_inputs(model, blocks, calib, batch_size, progress, store=store)
            if use_cache is not None:
                model.config.use_cache = use_cache
            _to_meta(model, pre)
            gc.collect()
        for bi in tqdm(range(first, n_blocks), desc=f"{cfg.method} {cfg.bits}-bit (streaming)",
                       disable=not progress, initial=first, total=n_blocks):
            block, block_name = blocks[bi], f"{prefix}.{bi}"
            names = [k for k, _ in block.state_dict().items()]
            _materialize(block, names, src, block_name + ".")
            n_reported = len(report.layers)
            quantize_block(block, block_name, buf, kwargs_list, cfg, report, low_memory, forward_dtype, offload_dir=work)
            state = {f"{block_name}.{k}": v for k, v in quantized_state_dict(block, cfg, dtype).items()}
            _atomic_save(state, work / f"shard-{bi:05d}.safetensors")
            del state
            block.to("meta")
            resume.mark_done(bi, [vars(l) for l in report.layers[n_reported:]])
            if buf is not None:
                buf.advance()
            gc.collect()
            release_free_memory()

        # the last shard: embeddings, final norm, lm_head (in `dtype`, as the in-memory writer stores them)
        shard_files = [work / f"shard-{bi:05d}.safetensors" for bi in range(n_blocks)]
        lost = [f for f in shard_files if not f.is_file()]
        if lost:
            raise CheckpointError(f"{lost[0]} is missing from the resume state {work}: rerun with --restart")
        total = n_blocks + 1
        with atomic_output_dir(out, overwrite, source) as tmp:
            names = []
            for bi, f in enumerate(shard_files):
                name = f"model-{bi + 1:05d}-of-{total:05d}.safetensors"
                try:
                    os.link(f, tmp / name)  # the state keeps its copy until the checkpoint is complete
                except OSError:
                    shutil.copyfile(f, tmp / name)
                names.append(name)
            last = f"model-{total:05d}-of-{total:05d}.safetensors"
            rest = src.load(outer, dtype)
            _atomic_save(rest, tmp / last)
            del rest
            names.append(last)
            written = SourceWeights(tmp)  # the shard headers
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": written.nbytes(None)},
                 "weight_map": {k: f.name for k, f in written.where.items()}}, indent=2, sort_keys=True))
            qcfg = cfg.to_dict()
            qcfg["meta"].update(extra_meta or {}, **report.checkpoint_meta())
            write_model_files(tmp, model.config.to_dict(), qcfg, None, source, dtype)
    except BaseException:
        if own_state:
            resume.remove()
        raise
    resume.remove()
    report.seconds = time.time() - t0
    return report
