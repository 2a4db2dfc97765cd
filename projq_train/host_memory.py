"""Giving freed host memory back to the operating system.

glibc's allocator keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the
heap, so a process that parsed a large file or ran a big transient computation keeps that
memory resident long after it was freed: its resident set only grows. Blocks freed in the middle
of the heap stay resident too, and a CPU training step fragments the heap badly: the
activations it keeps are interleaved with the temporaries of every layer. On SmolLM2-135M (fp32,
4 × 256 tokens) a forward pass left 1.2 GiB of live tensors (torch profiler) and grew the
resident set by 2.3 GiB.

:func:`release_freed_memory` asks glibc to return every free page (``malloc_trim(0)``, which
also releases free pages inside the heap); it is called between the stages of a run (after a
GGUF file is parsed, after each quantized decoder layer, once the model is built).
:func:`release_during_forward` does it during training on CPU, after every few decoder layers'
forward, and the training module once more before each backward (the loss chunks'
temporaries: SmolLM2-135M at 1 x 128 tokens peaked at 1045 instead of 1092 MiB, at the same
step time). :func:`large_blocks_mapped` makes glibc give every block of 128 KiB or more its own
mapping, returned to the OS when freed, while a model is quantized. Elsewhere (macOS, musl) they
do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache

from torch import nn
from torch.utils.hooks import RemovableHandle

# SmolLM2-135M from its 3-bit artifact, fp32 on 2 CPU cores, 4 AdamW steps in a plain loop:
# returning free pages after every 4th decoder layer's forward lowered the peak from 4.26 to
# 2.34 GiB at 4 x 256 tokens and from 1.29 to 1.15 GiB at 1 x 128, for 4 % and 23 % more time
# per step; after every layer, and in the backward too, it saved no more and cost up to 40 %
RELEASE_EVERY_LAYERS = 4


# SmolLM2-135M, `projq-train quantize` (RTN + rank-32 compensation, 32 x 512 calibration tokens)
# on 2 CPU cores, two runs side by side: peak 879,484 KiB with glibc's adaptive threshold,
# 759,724 KiB with every block of 128 KiB or more mapped on its own, in the same time (24:43 and
# 24:49). A training step, whose blocks are smaller and many more, took twice as long that way.
MAPPED_BLOCK_BYTES = 128 * 1024
ADAPTIVE_CEILING_BYTES = 32 * 1024 * 1024  # the most glibc's adaptive threshold grows to (64-bit)
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


@cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextmanager
def large_blocks_mapped() -> Iterator[None]:
    """Within the block, glibc serves every allocation of :data:`MAPPED_BLOCK_BYTES` or more with
    a mapping of its own, which goes back to the OS when freed, so a quantizer's transient
    matrices never fragment the heap. On exit the threshold is fixed at the adaptive threshold's
    ceiling (glibc cannot make it adaptive again), where the adaptive one settles in training."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MAPPED_BLOCK_BYTES)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, ADAPTIVE_CEILING_BYTES)


def return_free_pages() -> None:
    """Return the allocator's free pages to the OS (glibc only); no garbage collection."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Collect Python garbage, then return the allocator's free pages to the OS (glibc only)."""
    gc.collect()
    return_free_pages()


def release_during_forward(
    layers: Sequence[nn.Module], every: int = RELEASE_EVERY_LAYERS
) -> list[RemovableHandle]:
    """Return free pages to the OS after the forward of every ``every``-th of ``layers`` (the
    decoder layers); the handles remove the hooks."""

    def hook(module: nn.Module, args: object, output: object) -> None:
        return_free_pages()

    return [layer.register_forward_hook(hook) for i, layer in enumerate(layers) if i % every == every - 1]
