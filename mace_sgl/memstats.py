"""Where a process's memory goes: RSS set against glibc's heap and Python's own objects.

RSS alone cannot tell a leak from a cache or from allocator fragmentation. glibc's
`mallinfo2` can: memory the program holds (`heap_in_use_mb`: live malloc chunks plus
mmapped ones) grows with a leak or a cache, memory the allocator holds but nobody uses
(`heap_free_mb`) grows with fragmentation, and `malloc_trim(0)` gives the latter back.
Python's allocated blocks and the garbage collector's object count tell whether the
live memory is Python objects or native buffers (tensors).

Each scheduler reports `snapshot()` under `memory` in /mace/status; benchmarks.memory
reads it over a run with training paused and then resumed (the training-off control).
`Trimmer` returns free heap to the OS at most every `every_s` seconds
(`--mace-malloc-trim-s`; 0 = never).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time
from typing import Any

import psutil

MB = 2**20


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33, struct mallinfo2 (malloc.h): ten size_t fields in this order.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS) or glibc < 2.33
        return None


_LIBC = _libc()


def heap() -> dict[str, float] | None:
    """glibc's view of the heap in MB (all arenas), or None without glibc >= 2.33.

    in_use: allocated chunks (uordblks) plus mmapped chunks (hblkhd); free: free chunks
    the allocator keeps (fordblks); arena: non-mmapped bytes it got from the OS."""
    if _LIBC is None:
        return None
    m = _LIBC.mallinfo2()
    return {
        "heap_in_use_mb": (m.uordblks + m.hblkhd) / MB,
        "heap_free_mb": m.fordblks / MB,
        "heap_arena_mb": m.arena / MB,
        "heap_mmap_mb": m.hblkhd / MB,
    }


def snapshot(process: psutil.Process | None = None) -> dict[str, Any]:
    """This process's memory: RSS, glibc heap, Python blocks and GC-tracked objects."""
    proc = process or psutil.Process()
    snap: dict[str, Any] = {
        "rss_mb": proc.memory_info().rss / MB,
        "python_blocks": sys.getallocatedblocks(),
        # objects the collector tracks; those frozen by gc.freeze() (SGLang freezes
        # after start-up) are counted apart and are not in gc_objects
        "gc_objects": len(gc.get_objects()),
        "gc_frozen": gc.get_freeze_count(),
    }
    snap.update(heap() or {})
    return snap


def trim() -> float | None:
    """malloc_trim(0): give free heap pages back to the OS; returns the RSS it freed in
    MB (None without glibc)."""
    if _LIBC is None:
        return None
    proc = psutil.Process()
    before = proc.memory_info().rss
    _LIBC.malloc_trim(0)
    return (before - proc.memory_info().rss) / MB


class Trimmer:
    """Calls trim() at most every `every_s` seconds (never when 0) and keeps what it
    freed, for the status."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = time.monotonic()
        self.trims = 0
        self.freed_mb = 0.0
        self.seconds = 0.0

    def maybe_trim(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.every_s <= 0 or now - self.last < self.every_s:
            return False
        self.last = now
        start = time.perf_counter()
        freed = trim()
        self.seconds += time.perf_counter() - start
        if freed is None:
            self.every_s = 0.0  # no glibc: stop trying
            return False
        self.trims += 1
        self.freed_mb += max(0.0, freed)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "every_s": self.every_s,
            "trims": self.trims,
            "freed_mb": self.freed_mb,
            "seconds": self.seconds,
        }
