"""Keep freed host memory in the process (glibc's malloc).

The inner loops allocate and free megabyte-sized temporaries every step (GGN rows, line-search
candidates, activations). Under glibc's defaults a freed block of that size goes back to the kernel
(it was either mmap-ed, or it sits at the top of the heap above the trim threshold), so the next
step takes a page fault for every 4 KiB it touches again: on the sinusoid MLP a [25, 20, 1761]
product took 1.3 ms instead of 0.13 ms. Keeping freed memory for reuse made GEM-BML+ (von) 1.3×
faster per meta-iteration there (benchmarks/RESULTS.md). The price: the process's resident memory
stays at its peak instead of shrinking after it.

`gemext train` applies this at start; library users call `keep_freed_memory()` themselves, or set
glibc's MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ / MALLOC_TOP_PAD_ before Python starts.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")
MB = 1 << 20


def keep_freed_memory(trim_threshold: int = 1024 * MB, top_pad: int = 64 * MB,
                      mmap_threshold: int = 32 * MB) -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: blocks below `mmap_threshold` come from
    the heap (32 MiB is glibc's maximum), the heap grows by `top_pad` extra and gives memory back
    only when more than `trim_threshold` is free at its top. Returns True when applied; False when
    the C library is not glibc, or when any of glibc's MALLOC_*_ variables above is set (the user's
    own settings win), or when GEMEXT_KEEP_FREED_MEMORY=0."""
    if os.environ.get("GEMEXT_KEEP_FREED_MEMORY", "1") == "0" or any(v in os.environ for v in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TOP_PAD, top_pad), (_M_TRIM_THRESHOLD, trim_threshold)))
