"""Keep freed tensor memory in the process instead of handing it back to the OS every step.

glibc's malloc serves blocks above its mmap threshold (128 KiB, adjusted up to 32 MiB) with a
fresh `mmap` and unmaps them on free, and trims the heap's free top above M_TRIM_THRESHOLD. A
training step that allocates the same large tensors every time (TFN's [32, 140481] fused tensor
and its 36 MB weight gradient on MOSI) therefore page-faults its way through fresh zeroed pages
every step: TFN's weight-gradient product took 54 ms into a fresh block against 26 ms into a
reused one, and a TFN epoch (against_mmsa.py's MOSI-sized pickle, 1 thread) 7.4-8.7 s against
5.3-6.7 s with the thresholds raised, LMF 2.16 s against 1.91 s, peak RSS within 6 MB.
PyTorch's CPU tuning guide suggests the same cure with another allocator (jemalloc or tcmalloc
through LD_PRELOAD); this one needs nothing installed.

`keep_freed_memory()` raises both thresholds with `mallopt` once per process. It does nothing on
a libc other than glibc, and nothing when the environment variable MSAKIT_MALLOC_TUNING is "0".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # bytes: blocks up to 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept before any is returned (mallopt
# takes a C int: 1 << 31 itself wrapped to -2^31, which glibc reads as 2^64 - 2^31, never trim)
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent). Returns whether the
    thresholds are now raised (False: not glibc, or MSAKIT_MALLOC_TUNING=0)."""
    global _done
    if _done is None:
        _done = False
        if os.environ.get("MSAKIT_MALLOC_TUNING", "1") != "0":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
