"""Resumable quantization: per-block progress kept next to the output folder, so that a run killed at block 70 of
80 (``kill -9``, out of memory, a lost machine) restarts at block 70 when the same command is run again.

Layout of ``<OUT parent>/.<OUT name>.partial/`` (removed once the checkpoint is complete), the same for both
drivers (:mod:`gptq_plugin.driver`):

* ``manifest.json``: ``{"fingerprint": {...}, "done": d, "reports": [...]}``: the run's identity (quantization
  config, SHA-256 of the source weights and of the calibration tokens, batch size, library versions) and the
  number ``d`` of finished decoder blocks, with their per-layer reports;
* ``block-00007.safetensors``: the tensors the driver keeps of finished block 7: the in-memory driver its
  quantized layers (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias`` per linear layer, as in memory), the
  streaming driver the block's final checkpoint tensors (one shard of the checkpoint);
* ``activations/x-00008-00003.safetensors``: batch 3 of the calibration activations entering block 8 (fp32; an
  :class:`ActivationBuffer`), i.e. the outputs of the finished block 7: resuming starts from the very same
  numbers, so the final checkpoint is byte-identical to an uninterrupted run;
* ``activations/xfp-00008-00003.safetensors``: with GPTAQ (``QuantizeConfig.gptaq``), batch 3 of the activations
  entering block 8 of the unquantized model (the second stream GPTAQ compares against), kept the same way;
* ``hessian-*.bin``: large Hessians the streaming driver's solver parks while it runs.

Every file is written to a temporary name and renamed into place, and the manifest is replaced last, so a kill at
any instant leaves either the previous state or the next one. A changed config, source model or calibration set
is refused (``--restart`` discards the old state) instead of being mixed into one checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from .config import QuantizeConfig, _version
from .errors import CheckpointError, ConfigError
from .safetensors_io import atomic_save, atomic_write_json, load_tensors, read_tensors, write_error

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# the layout of the state folder; bumped when its files or their meaning change (2: `activations/x-<block>-<batch>`,
# `block-NNNNN`; 3: Hessians summed in a fixed tree over the batches, so layout-2 blocks would not match new ones)
STATE_LAYOUT = 3


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
                forward_dtype: str = "float32", driver: str = "in-memory", device: str = "cpu") -> dict:
    """The identity of a run: what must not change between a killed run and its resumption (``driver``:
    ``"in-memory"`` or ``"streaming"``, whose block files differ; ``device``: the device type, ``"cpu"`` or
    ``"cuda"``, whose arithmetic differs). The number of ranks is not part of it: it does not change the bytes."""
    src = Path(source)
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    calib_digest = None
    if calib is not None:
        calib_digest = hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"config": cfg.to_dict(), "source_weights": file_digest(weights), "calibration": calib_digest,
            "calibration_shape": list(calib.shape) if calib is not None else None, "batch_size": batch_size,
            "forward_dtype": forward_dtype, "driver": driver, "device": device,
            "gptq_plugin": _version(), "torch": torch.__version__, "state_layout": STATE_LAYOUT}


class ActivationBuffer:
    """The calibration activations at one decoder-block boundary, one fp32 ``[b, seqlen, hidden]`` tensor per
    batch: in memory, and with a ``folder`` also on disk, where at most ``max_resident_bytes`` of them are also
    kept in memory.

    Reading item ``i`` gives the current generation (the inputs of the block being quantized); assigning item
    ``i`` stores the next generation (that block's outputs) and drops the current batch ``i`` from memory (the
    drivers read no batch's input after its output; with a folder it stays readable from its file);
    :meth:`advance` makes the next generation current and deletes the old files. Files are
    ``x-<gen>-<batch>.safetensors`` in ``folder``, each written to a temporary name and renamed, so a killed run
    leaves whole files only.

    Args:
        folder: where the files go (created), or None to keep the activations in memory only (nothing to resume
            from).
        n: the number of batches.
        max_resident_bytes: with a folder, bytes of activations also kept in memory; 0 keeps only the one batch
            being used in memory; None: no limit.
        gen: the generation to start at (the resumed block's index); files of other generations in ``folder`` (a
            killed run's) are deleted, for this buffer's batches.
        first: the global index of batch 0 (a rank's first batch, :meth:`gptq_plugin.distributed.Ranks.batches`):
            files are named by global index, so ranks share one folder and a run resumed with another number of
            ranks finds every batch.
        stream: the files' name prefix (letters only): ``"x"``, the activations of the model being quantized;
            ``"xfp"``, GPTAQ's activations of the unquantized model. Buffers of different streams share a folder.

    Raises:
        CheckpointError: (reading) a batch's file is missing or corrupt.
        IndexError: a batch index outside ``[-n, n)``, or (without a folder) a current batch already replaced.
    """

    def __init__(self, folder: Path | None, n: int, max_resident_bytes: int | None = None, gen: int = 0,
                 first: int = 0, stream: str = "x"):
        if not stream.isalpha():
            raise ValueError(f"stream {stream!r}: use letters only")
        self.folder, self.n, self.gen, self.first = None if folder is None else Path(folder), n, gen, first
        self.stream = stream
        self.max_resident_bytes = None if max_resident_bytes is None else max(0, int(max_resident_bytes))
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self.resident_bytes = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(f"{stream}-*"):  # <stream>-<gen>-<batch>.safetensors[.tmp]
                parts = stale.name.split(".")[0].split("-")
                if len(parts) != 3 or not parts[2].isdigit():
                    if first == 0:  # not an activation file: the first rank removes it
                        stale.unlink(missing_ok=True)
                    continue
                i = int(parts[2]) - first
                if 0 <= i < n and stale.name != self._path(gen, i).name:  # this buffer's batch, another generation
                    stale.unlink(missing_ok=True)

    def _path(self, gen: int, i: int) -> Path:
        return self.folder / f"{self.stream}-{gen:05d}-{self.first + i:05d}.safetensors"

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"batch {i} of {self.n}")
        return i

    def __getitem__(self, i: int) -> torch.Tensor:
        i = self._index(i)
        hit = self._cache.get((self.gen, i))
        if hit is not None:
            return hit
        if self.folder is None:
            raise IndexError(f"batch {i} of generation {self.gen} was replaced by its output")
        path = self._path(self.gen, i)
        if not path.is_file():
            raise CheckpointError(f"{path}: calibration activations of batch {i} are missing from the resume state; "
                                  "rerun with --restart")
        return load_tensors(path, ["x"])["x"]

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def _drop(self, gen: int, i: int) -> None:
        x = self._cache.pop((gen, i), None)
        if x is not None:
            self.resident_bytes -= x.numel() * x.element_size()

    def _store(self, gen: int, i: int, x: torch.Tensor) -> None:
        x = x.detach().contiguous()
        nbytes = x.numel() * x.element_size()
        if self.folder is not None:
            atomic_save({"x": x}, self._path(gen, i))
        limit = self.max_resident_bytes
        if self.folder is None or limit is None or self.resident_bytes + nbytes <= limit:
            self._cache[(gen, i)] = x
            self.resident_bytes += nbytes

    def put(self, i: int, x: torch.Tensor) -> None:
        """Store batch ``i`` of the current generation (the calibration capture)."""
        self._store(self.gen, self._index(i), x)

    def __setitem__(self, i: int, x: torch.Tensor) -> None:
        i = self._index(i)
        self._drop(self.gen, i)
        self._store(self.gen + 1, i, x)

    def advance(self) -> None:
        """Make the stored outputs the current inputs; delete the previous generation's files."""
        for i in range(self.n):
            self._drop(self.gen, i)
            if self.folder is not None:
                self._path(self.gen, i).unlink(missing_ok=True)
        self.gen += 1


class ResumeState:
    """The per-block progress of one quantization run (see the module docstring for the files).

    Use :meth:`open`; then the driver takes its activations from :meth:`activations`, gives finished blocks to
    :meth:`save_block` and reads the recorded ones back with :meth:`load_block` (or :meth:`block_file`).

    Attributes:
        folder: the state folder. done: number of finished blocks. reports: per block, the list of layer report
            dicts (:class:`gptq_plugin.blockquant.LayerReport` fields). created: whether this run created
            :attr:`folder` (False when it resumes an earlier run's state).
    """

    def __init__(self, folder: Path, fp: dict, done: int = 0, reports: list | None = None, created: bool = True):
        self.folder, self.fingerprint, self.done, self.reports = folder, fp, done, reports or []
        self.created = created

    @classmethod
    def open(cls, out: str | Path, fp: dict, restart: bool = False) -> "ResumeState":
        """Resume the state for ``out`` when it was made by the same run, else start a new one.

        Raises:
            ConfigError: a state exists for a different config, source or calibration set, or was written by an
                older version in another state layout, and ``restart`` is False (the message names what differs
                and the ``--restart`` fix).
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
            if old.get("state_layout", 1) != fp.get("state_layout", 1):  # refused before any block is redone
                raise ConfigError(f"{folder} holds a partial run written by another gptq-plugin version (resume state "
                                  f"layout {old.get('state_layout', 1)}; this version reads {fp.get('state_layout', 1)}):"
                                  " pass --restart to discard it and start over")
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ConfigError(f"{folder} holds a partial run with a different {', '.join(diff)}: rerun the same "
                                  "command to resume it, or pass --restart to discard it and start over")
            if done:
                log.warning("resuming from %s: %d blocks already quantized", folder, done)
            for stale in [*folder.glob("paused-activation-*.bin"), *folder.glob("hessian-*.bin")]:
                stale.unlink(missing_ok=True)  # parked by a run that was killed (solver_memory.offloaded)
            return cls(folder, fp, done, reports, created=False)
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
        atomic_write_json(self.folder / MANIFEST, {"fingerprint": self.fingerprint, "done": self.done,
                                                   "reports": self.reports})

    def activations(self, n: int, max_resident_bytes: int | None = None, first: int = 0,
                    stream: str = "x") -> ActivationBuffer:
        """The :class:`ActivationBuffer` of ``n`` batches (global indices from ``first``) of ``stream`` in
        ``activations/``, at generation :attr:`done` (the activations entering the first unfinished block, when an
        earlier run recorded them)."""
        return ActivationBuffer(self.folder / "activations", n, max_resident_bytes, gen=self.done, first=first,
                                stream=stream)

    def block_file(self, index: int) -> Path:
        """The file holding the recorded tensors of block ``index``."""
        return self.folder / f"block-{index:05d}.safetensors"

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], reports: list[dict]) -> None:
        """Record block ``index`` as finished: its ``tensors`` (what the driver needs of it later), then its layer
        reports with the manifest. The activations entering block ``index + 1`` must be stored already."""
        atomic_save(tensors, self.block_file(index))
        self.done = index + 1
        self.reports.append(reports)
        self._write_manifest()

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors recorded for block ``index`` by :meth:`save_block`.

        Raises:
            CheckpointError: the file is missing or corrupt (rerun with ``--restart``).
        """
        path = self.block_file(index)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the resume state {self.folder}: rerun with --restart")
        return read_tensors([path])

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
