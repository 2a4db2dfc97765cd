"""Giving freed host memory back to the operating system.

glibc's allocator keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the
heap, so a process that parsed a large file or ran a big transient computation keeps that
memory resident long after it was freed: its resident set only grows. :func:`release_freed_memory`
asks glibc to return every free page (``malloc_trim(0)``); it is called between the stages of a
run (after the tokenizer is read, after each quantized decoder layer, once the model is built)
so one stage's garbage does not add to the next stage's peak. Elsewhere (macOS, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect Python garbage, then return the allocator's free pages to the OS (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
