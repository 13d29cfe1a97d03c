"""Process memory settings for CPU training.

A training step on a CPU allocates and frees the same large tensors every step (activations, the retain
rows' logits over the whole vocabulary: ~55 MB each on the default model). glibc serves blocks above its
mmap threshold (at most 32 MB) with fresh ``mmap`` calls and gives them back with ``munmap``, so every step
faults its memory in again and every ``munmap`` makes the kernel flush the other cores' TLBs; in a virtual
machine both are expensive, and OpenMP's threads wait on each other meanwhile. :func:`keep_freed_memory`
tells glibc to serve large blocks from its heap and not to give freed memory back, so a step reuses what
the step before freed. Measured on a 2-core VM, 10 demo training steps: 2.6M -> 1.2M page faults, steps
2-10 34 s instead of 38-41 s, peak RSS +0.45 GB (docs/PERFORMANCE.md). No effect measured on generation.

Only on Linux with glibc (``mallopt``); elsewhere, and with ``REPBEND_MALLOC=system``, nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """Large blocks from the heap, and freed memory kept for reuse (glibc); True when the settings took effect."""
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("REPBEND_MALLOC", "").lower() != "system":
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):   # not glibc (musl, ...): leave the allocator alone
            ok = False
    return ok
