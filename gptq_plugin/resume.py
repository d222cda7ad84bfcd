"""Resumable quantization: per-block progress kept next to the output folder, so that a run killed at block 70 of
80 (``kill -9``, out of memory, a lost machine) restarts at block 70 when the same command is run again.

Layout of ``<OUT parent>/.<OUT name>.partial/`` (removed once the checkpoint is complete):

* ``manifest.json``: ``{"fingerprint": {...}, "done": d, "reports": [...]}``: the run's identity (quantization
  config, SHA-256 of the source weights and of the calibration tokens, batch size, library versions) and the
  number ``d`` of finished decoder blocks, with their per-layer reports;
* ``block-00007.safetensors``: the quantized tensors of block 7 (``qweight``, ``qzeros``, ``scales``, ``g_idx``,
  ``bias`` per linear layer, as in memory);
* ``inputs-00008.safetensors``: the calibration activations entering block 8 (fp32, one tensor per batch), i.e.
  the outputs of the finished block 7: resuming starts from the very same numbers, so the final checkpoint is
  byte-identical to an uninterrupted run.

The streaming driver (:mod:`gptq_plugin.streaming`) keeps ``shard-00007.safetensors`` (block 7's final
checkpoint tensors) and ``activations/x-<block>-<batch>.safetensors`` (the calibration activations entering the
first unfinished block, one file per batch) instead of the block and inputs files.

Every file is written to a temporary name and renamed into place, and the manifest is replaced last, so a kill at
any instant leaves either the previous state or the next one. A changed config, source model or calibration set
is refused (``--restart`` discards the old state) instead of being mixed into one checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .config import QuantizeConfig
from .errors import ConfigError
from .linear import QuantLinear

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LEAVES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def state_dir(out: str | Path) -> Path:
    """Where the resume state of a run writing ``out`` lives: ``<parent>/.<name>.partial``."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: QuantizeConfig, source: str | Path, calib: torch.Tensor | None, batch_size: int,
                forward_dtype: str = "float32", driver: str = "in-memory") -> dict:
    """The identity of a run: what must not change between a killed run and its resumption (``driver``:
    ``"in-memory"`` or ``"streaming"``, whose state files differ)."""
    from .config import _version

    src = Path(source)
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    calib_digest = None
    if calib is not None:
        calib_digest = hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"config": cfg.to_dict(), "source_weights": file_digest(weights), "calibration": calib_digest,
            "calibration_shape": list(calib.shape) if calib is not None else None, "batch_size": batch_size,
            "forward_dtype": forward_dtype, "driver": driver,
            "gptq_plugin": _version(), "torch": torch.__version__}


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; a failed write removes ``tmp`` and raises
    :class:`~gptq_plugin.errors.OutputError` (no space left, read-only, ...) naming ``path`` and the fix."""
    from .checkpoint import is_write_failure, write_error

    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e):
            raise write_error(e, path) from None
        raise


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                              metadata={"format": "pt"}))


class ResumeState:
    """The per-block progress of one quantization run (see the module docstring for the files).

    Use :meth:`open`; then the driver calls :meth:`restore_block` for finished blocks, :meth:`load_inputs` once,
    and :meth:`save_block` after each block it quantizes.

    Attributes:
        folder: the state folder. done: number of finished blocks. reports: per block, the list of layer report
            dicts (:class:`gptq_plugin.pipeline.LayerReport` fields). created: whether this run created
            :attr:`folder` (False when it resumes an earlier run's state).
    """

    def __init__(self, folder: Path, fp: dict, done: int = 0, reports: list | None = None, created: bool = True):
        self.folder, self.fingerprint, self.done, self.reports = folder, fp, done, reports or []
        self.created = created

    @classmethod
    def open(cls, out: str | Path, fp: dict, restart: bool = False) -> "ResumeState":
        """Resume the state for ``out`` when it was made by the same run, else start a new one.

        Raises:
            ConfigError: a state exists for a different config, source or calibration set and ``restart`` is
                False (the message names what differs and the ``--restart`` fix).
            OutputError: the state folder cannot be created or written (no space left, read-only file system,
                no permission, a path under ``/proc``); nothing is left behind.
        """
        folder = state_dir(out)
        manifest = folder / MANIFEST
        if folder.exists() and restart:
            log.warning("discarding the resume state in %s (--restart)", folder)
            shutil.rmtree(folder)
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text())
                old, done, reports = m["fingerprint"], int(m["done"]), list(m["reports"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{manifest} is unreadable ({e}): rerun with --restart to discard {folder}") from None
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ConfigError(f"{folder} holds a partial run with a different {', '.join(diff)}: rerun the same "
                                  "command to resume it, or pass --restart to discard it and start over")
            if done:
                log.warning("resuming from %s: %d blocks already quantized", folder, done)
            return cls(folder, fp, done, reports, created=False)
        from .checkpoint import write_error

        existed = folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, folder) from None
        state = cls(folder, fp, created=not existed)
        try:
            state._write_manifest()
        except BaseException:
            state.discard_if_unused()
            raise
        return state

    def _write_manifest(self) -> None:
        _atomic_write_json(self.folder / MANIFEST, {"fingerprint": self.fingerprint, "done": self.done,
                                                    "reports": self.reports})

    def save_block(self, index: int, block: nn.Module, next_inputs: list[torch.Tensor] | None,
                   reports: list[dict]) -> None:
        """Record block ``index`` as finished: its quantized layers, the activations entering block ``index + 1``
        (None for RTN, which needs none) and its layer reports; the manifest last."""
        tensors = {f"{name}.{leaf}": getattr(m, leaf) for name, m in block.named_modules()
                   if isinstance(m, QuantLinear) for leaf in LEAVES if getattr(m, leaf, None) is not None}
        _atomic_save(tensors, self.folder / f"block-{index:05d}.safetensors")
        if next_inputs is not None:
            _atomic_save({f"x.{i}": x for i, x in enumerate(next_inputs)},
                         self.folder / f"inputs-{index + 1:05d}.safetensors")
        self.done = index + 1
        self.reports.append(reports)
        self._write_manifest()
        old = self.folder / f"inputs-{index:05d}.safetensors"
        if old.exists():
            old.unlink()

    def mark_done(self, index: int, reports: list[dict]) -> None:
        """Record block ``index`` as finished (the streaming driver, which keeps its own files in :attr:`folder`,
        writes them first): its layer reports, then the manifest."""
        self.done = index + 1
        self.reports.append(reports)
        self._write_manifest()

    def restore_block(self, index: int, block: nn.Module, cfg: QuantizeConfig) -> None:
        """Put the recorded quantized layers of block ``index`` into ``block`` (``nn.Linear`` -> :class:`QuantLinear`).

        Raises:
            CheckpointError: a recorded tensor does not fit the layer (see :meth:`QuantLinear.validate`).
        """
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / f"block-{index:05d}.safetensors"))
        names = sorted({k.rpartition(".")[0] for k in tensors})
        for name in names:
            lin = block.get_submodule(name)
            q = QuantLinear(lin.in_features, lin.out_features, cfg.bits, cfg.group_size,
                            f"{name}.bias" in tensors, cfg.sym, dtype=tensors[f"{name}.scales"].dtype)
            for leaf in LEAVES:
                if f"{name}.{leaf}" in tensors:
                    setattr(q, leaf, tensors[f"{name}.{leaf}"])
            q.validate(name)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, q)

    def load_inputs(self) -> list[torch.Tensor]:
        """The recorded activations entering block :attr:`done`."""
        from safetensors.torch import load_file

        t = load_file(str(self.folder / f"inputs-{self.done:05d}.safetensors"))
        return [t[f"x.{i}"] for i in range(len(t))]

    def remove(self) -> None:
        """Delete the state (after the checkpoint is complete)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard_if_unused(self) -> bool:
        """Delete the state folder when this run created it and finished no block (a run that failed or was
        interrupted before its first block leaves nothing behind); a state an earlier run left is kept, whatever
        it holds. Returns whether it was deleted."""
        if self.created and self.done == 0:
            self.remove()
            return True
        return False
