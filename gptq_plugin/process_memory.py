"""The process's own memory: its peak resident set size, and glibc's malloc arenas (capped for the threaded
one-pass driver). Both read or set process-wide state; neither knows about models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

_M_ARENA_MAX = -8  # mallopt() parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3


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
    :func:`gptq_plugin.blockquant.release_free_memory`.)"""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, n)
        if mmap_threshold is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
    except (OSError, AttributeError):
        pass
