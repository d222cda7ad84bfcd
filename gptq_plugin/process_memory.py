"""The process's own memory: its peak resident set size, glibc's malloc arenas (capped for the threaded
one-pass driver) and transparent huge pages for torch's CPU buffers. All read or set process-wide state; none knows
about models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys

_M_ARENA_MAX = -8  # mallopt() parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
#: torch's CPU allocator advises its buffers of 2 MB or more as transparent huge pages (``madvise(MADV_HUGEPAGE)``)
#: when this environment variable is 1; it reads it once, at its first CPU allocation
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``getrusage``'s ``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def limit_malloc_arenas(n: int = 2, mmap_threshold: int | None = 8 << 20) -> None:
    """Cap glibc's malloc arenas at ``n`` (``mallopt(M_ARENA_MAX, n)``, as the environment variable
    ``MALLOC_ARENA_MAX`` would) and fix its mmap threshold at ``mmap_threshold`` bytes (``M_MMAP_THRESHOLD``; None
    keeps glibc's dynamic one). A no-op off glibc.

    The one-pass driver runs each calibration batch in its own thread; with glibc's default of 8 arenas per core
    every thread keeps its own heap and freed activations are not reused across threads: measured on the demo
    model (128x512 tokens, act-order), peak RSS 5.3 GB by default, 2.8 GB with one arena. glibc also raises its
    mmap threshold to the largest block freed so far (up to 32 MB), after which the MB-sized activations of the
    paused batches come from the heaps, which fragment and keep their high-water mark: with the threshold fixed
    at 8 MB they are mapped and unmapped instead: on the first 4 blocks of the demo model 2.42 GB peak against
    3.83 GB, about 5% slower (docs/reliability.md). (The drivers also return the heap's free pages after each block:
    :func:`gptq_plugin.solver_memory.release_free_memory`.)"""
    lib = libc()
    try:
        lib.mallopt(_M_ARENA_MAX, n)
        if mmap_threshold is not None:
            lib.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
    except AttributeError:  # no C library loaded, or not glibc
        pass


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once (``find_library`` runs ``ldconfig``: ~1 ms a call); None where it cannot be
    loaded. glibc's ``mallopt`` and ``malloc_trim`` are looked up on it."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def use_huge_pages() -> bool:
    """Have torch back its CPU buffers of 2 MB or more with transparent huge pages (2 MB pages instead of 4 KB, where
    the kernel's ``transparent_hugepage/enabled`` is ``madvise`` or ``always``): torch is imported with
    :data:`THP_ENV` set to 1, makes its first allocation (where it reads the variable), and the variable is removed
    again, so child processes (vLLM under ``gptq-plugin serve``) keep their own default. The result is the same
    bits; only the page faults change.

    Why: with glibc's mmap threshold fixed (:func:`limit_malloc_arenas`) each MB-sized activation of a calibration
    forward is a fresh mapping, and every 4 KB page of it faults once. On the first 4 blocks of the demo model's
    one pass (1 thread) that was 5.4 million faults and 13 s of system time in a 66 s run; with huge pages 1.1-1.2
    million faults, 9 s, and 58 or 56 s at the same peak (docs/reliability.md).

    Must run before torch is imported (``gptq_plugin`` itself does not import it); does nothing, and returns False,
    when torch is already imported or :data:`THP_ENV` is already set (``THP_MEM_ALLOC_ENABLE=0`` turns it off).
    Returns True when it took effect.
    """
    if "torch" in sys.modules or THP_ENV in os.environ:
        return False
    os.environ[THP_ENV] = "1"
    try:
        import torch

        torch.empty(1)
    finally:
        del os.environ[THP_ENV]
    return True
