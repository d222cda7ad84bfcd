"""Safetensors I/O: the one reader of safetensors headers and weight files, atomic writes, the shard writer, and
the output checks that go with writing.

A safetensors file is ``<n: u64 little-endian><n bytes of JSON header><data>``; the header maps every tensor name
to ``{"dtype": "I32", "shape": [4, 8], "data_offsets": [begin, end]}`` (byte range in the data section, the
tensors back to back from 0) and may hold ``"__metadata__"`` (string -> string); format spec:
https://github.com/huggingface/safetensors#format. :func:`read_header` reads and checks a header without reading
any tensor (what vLLM's front end, Transformers before loading and ``inspect`` need); :class:`LazyFolder` then
reads one tensor at a time.

Outputs are written under a temporary name and renamed into place only when complete (:func:`atomic_output_dir`
for a folder, :func:`atomic_write` for one file); the inputs of a run are never written to
(:func:`check_not_input`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import safetensors.torch as st  # called as st.save_file: fault-injection tests patch safetensors.torch.save_file
import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, OutputError

#: safetensors header dtype strings -> torch dtypes (the ones this project's checkpoints use)
ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
             "BOOL": torch.bool}
#: bits per element of every dtype the safetensors format defines
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
         "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
         "F6_E2M3": 6, "F6_E3M2": 6}
#: the largest header the safetensors library accepts
MAX_HEADER_BYTES = 100_000_000
MAX_SHARD_BYTES = 2 * 1024**3


@dataclass
class TensorMeta:
    """A tensor known from a file header only.

    Attributes:
        shape: list (from a header) or tuple. dtype: safetensors string such as ``"I32"`` (from a header) or torch
            dtype. value: the values of a small tensor read anyway (compressed-tensors ``weight_shape``), else None.
        file: the file holding it. offsets: ``(begin, end)`` byte range in that file's data section.
    """

    shape: Any
    dtype: Any
    value: list | None = None
    file: Path | None = None
    offsets: tuple[int, int] | None = None


# --- reading -------------------------------------------------------------------------------------------------
def _corrupt(path: Path, reason: Any) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated safetensors file ({reason}); re-download or re-create "
                           "the checkpoint")


def _parse_header(header: Any, data_bytes: int, path: Path) -> dict[str, TensorMeta]:
    """The tensors of a decoded header, checked as the safetensors library checks them: known dtypes, sizes that
    match the shapes, byte ranges back to back from 0 that fill the ``data_bytes`` after the header."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    out: dict[str, TensorMeta] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(e, dict) and e.get("dtype") in _BITS and isinstance(e.get("shape"), list)
              and all(isinstance(s, int) and s >= 0 for s in e["shape"]) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"]))
        if not ok:
            raise ValueError(f"tensor {name!r} has an invalid header entry {e!r}")
        out[name] = TensorMeta(list(e["shape"]), e["dtype"], file=path, offsets=tuple(e["data_offsets"]))
    end = 0
    for name, m in sorted(out.items(), key=lambda kv: kv[1].offsets):
        begin, stop = m.offsets
        numel = 1
        for s in m.shape:
            numel *= s
        if begin != end or stop < begin or numel * _BITS[m.dtype] != (stop - begin) * 8:
            raise ValueError(f"tensor {name!r} has data offsets {list(m.offsets)}, which do not fit its shape "
                             f"{m.shape} and dtype {m.dtype} after {end} bytes")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the header describes {end} bytes of data but the file holds {data_bytes}")
    return dict(sorted(out.items()))


def read_header(path: str | Path) -> dict[str, TensorMeta]:
    """The tensors of a safetensors file from its header alone (no tensor data is read).

    Returns:
        tensor name -> :class:`TensorMeta` with ``shape`` (list of ints), ``dtype`` (header string, e.g. ``"I32"``),
        ``file`` (``path``) and ``offsets``, sorted by name (as ``safe_open(...).keys()``).

    Raises:
        CheckpointError: the file cannot be read, or its header is truncated or corrupt (naming the file and the fix).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError(f"{size} bytes: no header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"a header of {n} bytes does not fit a file of {size} bytes")
            raw = fh.read(n)
        if not raw.startswith(b"{"):
            raise ValueError("the header does not start with '{'")
        return _parse_header(json.loads(raw.decode("utf-8")), size - 8 - n, path)
    except (OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def read_headers(files: Iterable[str | Path]) -> dict[str, TensorMeta]:
    """:func:`read_header` over several files (the shards of one checkpoint): tensor name -> :class:`TensorMeta`,
    whose ``file`` says which shard holds it. Raises :class:`CheckpointError` as :func:`read_header`."""
    out: dict[str, TensorMeta] = {}
    for f in files:
        out.update(read_header(f))
    return out


def load_tensors(path: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of one safetensors file (only those are read).

    Raises:
        CheckpointError: the file or a tensor cannot be read (naming the file, the tensor and the fix).
    """
    out: dict[str, torch.Tensor] = {}
    key = None
    try:
        with safe_open(str(path), "pt") as h:
            for key in names:
                out[key] = h.get_tensor(key)
    except Exception as e:  # SafetensorError, OSError, a missing name: one error naming the file
        what = f"tensor {key}" if key is not None else "it"
        raise CheckpointError(f"{path}: {what} cannot be read ({e}); re-download or re-create the checkpoint") from None
    return out


def checkpoint_files(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, checked to lie inside it.

    Raises:
        CheckpointError: no weights; an index naming a file outside the folder or a missing file; only
            pickle files (``.bin``/``.pt``) and ``allow_pickle`` is False.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    root = path.resolve()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-create the checkpoint") from None
        files = []
        for fname in sorted(set(weight_map.values())):
            f = (path / fname).resolve()
            if root not in f.parents:
                raise CheckpointError(f"{index} names {fname!r}, which lies outside the checkpoint folder: refusing "
                                      "to read it (a hostile or broken index)")
            if not f.is_file():
                raise CheckpointError(f"{index} names {fname!r}, which is missing: re-download the checkpoint")
            files.append(f)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(f"{path} holds only pickle weights ({pickles[0].name}), which can run arbitrary code "
                                  "when loaded: convert them to safetensors, or pass allow_pickle=True / "
                                  "--allow-pickle if you trust the source")
        return pickles
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the given files (safetensors, or weights-only ``.bin``/``.pt`` pickles).

    Raises:
        CheckpointError: naming a corrupt file.
    """
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix in (".bin", ".pt"):
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from None
        else:
            try:
                part = st.load_file(str(f))
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise _corrupt(f, e) from None
        state.update(part)
    return state


class LazyFolder:
    """The tensors of checkpoint files, read one layer at a time (safetensors) or all at once (pickle).

    Attributes:
        headers: tensor name -> :class:`TensorMeta` from the safetensors headers (``file`` names its shard).
        loaded: every tensor, for pickle files (``headers`` is then empty).

    Raises:
        CheckpointError: a corrupt or truncated safetensors header, naming the file.
    """

    def __init__(self, files: list[Path]):
        self.headers: dict[str, TensorMeta] = {}
        self.loaded: dict[str, torch.Tensor] = {}
        if any(Path(f).suffix != ".safetensors" for f in files):
            self.loaded = read_tensors(files)
        else:
            self.headers = read_headers(files)

    def keys(self) -> list[str]:
        return list(self.loaded) or list(self.headers)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its file. Raises :class:`CheckpointError` naming the file and the tensor."""
        if self.loaded:
            return self.loaded[key]
        return load_tensors(self.headers[key].file, [key])[key]

    def layer(self, handler, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one quantized layer, by leaf name (``handler``: its checkpoint format)."""
        return {k.rpartition(".")[2]: self.tensor(k) for k in handler.layer_keys(prefix, self.keys())}


# --- output checks -------------------------------------------------------------------------------------------
def check_not_input(output: str | Path, inputs) -> Path:
    """Refuse an output path that equals, lies inside or contains one of ``inputs`` (symlinks resolved): writing
    it, or replacing it with ``--overwrite``, would modify or delete that input.

    Args:
        output: the folder or file to be written.
        inputs: a path, or an iterable of paths (None entries and paths that do not exist are skipped): the
            source model folder, the calibration file, a tokenizer folder ...

    Returns:
        ``output`` resolved.

    Raises:
        OutputError: ``output`` is an input, lies inside one, or contains one.
    """
    out = Path(output).resolve()
    if inputs is None or isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for source in inputs:
        if source is None or not Path(source).exists():
            continue
        src = Path(source).resolve()
        kind = "the source model folder" if src.is_dir() else "the input file"
        if out == src or src in out.parents:
            raise OutputError(f"output {out} is inside {kind} {src}: choose a folder outside it "
                              "(the inputs are never modified)")
        if out in src.parents:
            raise OutputError(f"output {out} contains {kind} {src}: writing (or --overwrite replacing) it would "
                              f"delete that input; choose an output folder that is not {src} or one of its parents")
    return out


def check_output_dir(out_dir: str | Path, overwrite: bool, source=None) -> Path:
    """Validate an output folder before any work starts.

    Args:
        out_dir: the folder to be created.
        overwrite: whether an existing ``out_dir`` may be replaced.
        source: the run's input (the source model or checkpoint folder), or an iterable of inputs (with e.g. the
            calibration file); see :func:`check_not_input`.

    Returns:
        ``out_dir`` resolved.

    Raises:
        OutputError: the output equals, lies inside or contains an input (symlinks resolved); it exists and
            ``overwrite`` is False; it exists and is not a folder.
    """
    out = check_not_input(out_dir, source)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists: pass --overwrite to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder: remove it or choose another path")
    return out


_WRITE_FIXES = {
    errno.ENOSPC: "free space on that disk, or write the output to another disk",
    errno.EDQUOT: "free space within your disk quota, or write the output to another disk",
    errno.EROFS: "it is on a read-only file system: choose an output folder on a writable disk",
    errno.EACCES: "choose an output folder you can write to",
    errno.EPERM: "choose an output folder you can write to",
    errno.ENOENT: "its folder cannot be created there (e.g. under /proc or /sys): choose an output folder on a "
                  "normal disk",
}


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is an operating-system failure to write (an ``OSError``, or a safetensors error carrying one)."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, SafetensorError) and ("os error" in str(e).lower() or "i/o error" in str(e).lower())


def write_error(e: BaseException, where: str | Path) -> OutputError:
    """The one-line error for a failed write of ``where`` (the path, the system's reason, the fix).

    Args:
        e: the ``OSError`` (or safetensors error carrying one, see :func:`is_write_failure`).
        where: the file or folder being written (named when ``e`` names no file).
    """
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    path = getattr(e, "filename", None) or where
    reason = os.strerror(code) if code else str(e)
    fix = _WRITE_FIXES.get(code, "choose another output folder")
    target = Path(where).absolute().parent
    if path != where and target not in Path(path).absolute().parents:  # an input failed to be read
        return OutputError(f"cannot read {path}: {reason}")
    return OutputError(f"cannot write {path}: {reason}: {fix}")


# --- atomic writes -------------------------------------------------------------------------------------------
def _make_parents(folder: Path) -> Path | None:
    """``mkdir -p folder``; return the topmost folder it created (None when ``folder`` existed)."""
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing = p
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success rename it to ``out_dir`` (replacing an
    existing one only when ``overwrite``); on any error remove it (and the parent folders it created), leaving
    no partial output and any replaced output in place.

    Raises:
        OutputError: as :func:`check_output_dir`; or the folder cannot be written (no space left, read-only file
            system, no permission, a path under ``/proc``): an ``OSError`` raised while writing, here or in the
            ``with`` body, becomes this one-line error naming the path and the fix.
    """
    out = check_output_dir(out_dir, overwrite, source)
    created = None
    try:
        created = _make_parents(out.parent)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise write_error(e, out) from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is a normal folder
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)  # put the replaced output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if is_write_failure(e):
            raise write_error(e, out) from None
        raise


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; a failed write removes ``tmp`` and raises
    :class:`~gptq_plugin.errors.OutputError` (no space left, read-only, ...) naming ``path`` and the fix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e):
            raise write_error(e, path) from None
        raise


def atomic_write_json(path: Path, obj) -> None:
    """``obj`` as indented, key-sorted JSON at ``path``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as one safetensors file at ``path`` (metadata ``{"format": "pt"}``), atomically (see
    :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata={"format": "pt"}))


# --- shards --------------------------------------------------------------------------------------------------
def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    return shards


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``state`` as ``model.safetensors``, or as numbered shards of at most ``max_bytes`` plus
    ``model.safetensors.index.json``; return the weight file names."""
    shards = _shard(state, max_bytes)
    if len(shards) == 1:
        st.save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = []
    for i, shard in enumerate(shards, 1):
        names.append(shard_name(i, len(shards)))
        st.save_file(shard, str(folder / names[-1]), metadata={"format": "pt"})
    write_index(folder, names)
    return names


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` (counted from 1) of ``n``: ``model-0000i-of-0000n.safetensors``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(folder: Path, files: list[str]) -> None:
    """Write ``model.safetensors.index.json`` in ``folder`` for its shards ``files`` (names): every tensor's
    file and the total bytes of tensor data, from the shards' headers (the streaming driver writes its shards one
    by one, the in-memory writer all at once; both index them here).

    Raises:
        CheckpointError: a shard's header cannot be read (as :func:`read_header`).
    """
    headers = read_headers(folder / f for f in files)
    total = sum(m.offsets[1] - m.offsets[0] for m in headers.values())
    weight_map = {k: m.file.name for k, m in headers.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
