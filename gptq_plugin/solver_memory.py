"""Memory and thread plumbing of the GPTQ solver (:mod:`gptq_plugin.solver`), kept out of the algorithm.

For a 14336-wide layer one fp32 Hessian is 0.8 GB, so the solver never copies it when it need not:

- :func:`borrow` / :func:`permuted`: the solver works on the caller's Hessian in place (act-order permutation
  with :func:`permute_`, dampened diagonal) and gives it back bit for bit;
- :func:`offloaded`: during the column loop, which needs only the inverse Cholesky factor, the Hessian's bytes
  are parked in a file and its storage freed (through ``ctypes``, without a second copy);
- :func:`all_finite`: the NaN/Inf check a block of rows at a time (at once, its temporaries are ~1.7x the tensor);
- :func:`one_thread`: the column loop's thousands of tiny ops run on one thread (no fork/join overhead).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from typing import Iterator

import torch

from .process_memory import libc

log = logging.getLogger(__name__)


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``, 1024 rows (first dimension) at a time."""
    return all(bool(torch.isfinite(rows).all()) for rows in t.split(1024))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one torch CPU thread; the previous count comes back on exit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def borrow(H: torch.Tensor) -> torch.Tensor:
    """The ``[K, K]`` Hessian the solver may change in place: ``H`` itself (detached) when it is fp32, contiguous and
    not an inference tensor (those are read-only), else an fp32 contiguous copy."""
    H = H.detach()
    if H.dtype != torch.float32 or not H.is_contiguous() or H.is_inference():
        H = H.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return H


def permute_(H: torch.Tensor, perm: torch.Tensor, chunk_bytes: int = 1 << 24) -> None:
    """``H ← H[perm][:, perm]`` in place for a square ``H``, with one row and ~``chunk_bytes`` of rows as scratch (a
    gathered copy of a 14336-wide Hessian would be another 0.8 GB). Rows follow the permutation's cycles; columns are
    gathered a block of rows at a time."""
    n = H.shape[0]
    p = perm.tolist()
    seen = bytearray(n)
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = 1
        if p[start] == start:
            continue
        first = H[start].clone()
        i = start
        while p[i] != start:  # new row i is old row p[i]
            H[i].copy_(H[p[i]])
            i = p[i]
            seen[i] = 1
        H[i].copy_(first)
    step = max(1, chunk_bytes // max(1, n * H.element_size()))
    for r in range(0, n, step):
        H[r:r + step] = H[r:r + step, perm]


@contextlib.contextmanager
def permuted(H: torch.Tensor, perm: torch.Tensor | None) -> Iterator[None]:
    """Lend the square ``H`` as ``H[perm][:, perm]`` (``perm`` None: as it is), permuted in place; the body may
    overwrite its diagonal. On exit, also on errors, ``H`` is permuted back and its diagonal restored: bit for bit
    what it was."""
    diag0 = H.diagonal().clone()
    done = False
    try:
        if perm is not None:
            permute_(H, perm)
            done = True
        yield
    finally:
        if done:
            permute_(H, torch.argsort(perm))
        H.diagonal().copy_(diag0)


def _raw(t: torch.Tensor):
    """The bytes of contiguous CPU ``t`` as a writable buffer (not through ``t.numpy()``, which would make the
    storage non-resizable)."""
    return (ctypes.c_char * t.untyped_storage().nbytes()).from_address(t.untyped_storage().data_ptr())


_WARNED: set[tuple[str, str]] = set()


@contextlib.contextmanager
def offloaded(t: torch.Tensor, folder: str | os.PathLike | None, min_bytes: int, what: str = "Hessian"
              ) -> Iterator[None]:
    """Free the memory of contiguous CPU ``t`` while the body runs: its bytes go to a temporary file
    ``<what>-*.bin`` in ``folder`` (``what``, e.g. ``"Hessian"``, also names ``t`` in messages) and its storage is
    resized to 0, then restored bit for bit on exit (also on errors; the file is removed). A no-op when ``folder``
    is None, or ``t`` is under ``min_bytes``, not on the CPU, does not own its whole storage or its storage is not
    resizable; when the file cannot be written, ``t`` stays in memory (logged once per ``what`` and ``folder``).

    Raises:
        OSError: the parked file came back shorter than ``t`` (truncated by someone else meanwhile).
    """
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if (folder is None or nbytes < min_bytes or t.device.type != "cpu" or t.storage_offset() != 0
            or nbytes != t.numel() * t.element_size() or not storage.resizable()):
        yield
        return
    try:
        fd, path = tempfile.mkstemp(prefix=f"{what.lower().replace(' ', '-')}-", suffix=".bin", dir=folder)
    except OSError as e:
        fd = path = None
        error = e
    try:
        if fd is not None:
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_raw(t))
                error = None
            except OSError as e:
                error = e
        if error is not None:
            if (what, str(folder)) not in _WARNED:  # once per kind and folder: a full disk fails every batch
                _WARNED.add((what, str(folder)))
                log.warning("could not offload a %.2f GB %s to %s (%s): keeping it in memory", nbytes / 1e9, what,
                            folder, error)
            del error
            yield
            return
        storage.resize_(0)
        try:
            yield
        finally:
            storage.resize_(nbytes)
            with open(path, "rb") as f:
                if f.readinto(_raw(t)) != nbytes:
                    raise OSError(f"{path}: the offloaded {what} was truncated")
    finally:
        if path is not None:
            os.unlink(path)


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere). Called after each
    block, and after each layer in the low-memory passes: glibc serves the MB-sized temporaries of the solver and
    the forwards from its heap once its mmap threshold has risen, the heap fragments, and its free pages are not
    returned. Measured on a 12-block synthetic model (hidden 1024, streaming GPTQ): peak RSS grew ~80 MB per
    block (0.92 -> 1.78 GB) without it and stayed at ~0.9 GB with it; a fixed 1 MB ``M_MMAP_THRESHOLD`` gave
    0.82 GB but ran 25% slower."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
