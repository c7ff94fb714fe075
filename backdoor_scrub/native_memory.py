"""Where glibc puts large native buffers: mappings of their own, so that a long streamed run does not grow,
and its heap inside optimisation loops, which allocate the same buffers every step."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's default
STEP_MMAP_THRESHOLD_BYTES = 32 << 20  # the most glibc's own adjustment would raise it to (64-bit)
_fixed: tuple[ctypes.CDLL, int] | None = None  # glibc and the threshold keep_large_buffers_mapped fixed
_in_loop = False  # a heap_for_repeated_steps block has set the loop's thresholds (an inner one changes nothing)


def keep_large_buffers_mapped(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc give every block over `threshold` bytes its own mapping, returned to the system when freed.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), after
    which batches and activations are carved from the heap, whose holes it keeps: a streamed ResNet-18
    evaluate at 224 px grew to 1,640 MiB over 12,010 images, 1,112 MiB with this. A fixed threshold
    turns that adjustment off. The user's own MALLOC_MMAP_THRESHOLD_ wins; elsewhere than glibc
    (macOS, musl) nothing is changed. True when the threshold was set.
    """
    global _fixed
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError, TypeError):
        return False
    _fixed = (libc, threshold) if fixed else None
    return fixed


@contextmanager
def heap_for_repeated_steps() -> Iterator[None]:
    """Inside, blocks up to 32 MiB come from glibc's heap and stay there when freed, as glibc's own
    adjustment would have it; the fixed threshold is back on leaving.

    An optimisation loop (activation matching, the scan) allocates the same activations and gradients
    every step. With each of them its own mapping, every step maps, faults in (zeroes) and unmaps them
    again: a ResNet-18 `layer4` step took 93 ms instead of 67 ms. Its heap does not grow step after step the
    way a stream of ever new batches makes it grow: the same sizes come back. Nothing is changed where
    keep_large_buffers_mapped did not fix the threshold, nor the trim threshold where the user set
    MALLOC_TRIM_THRESHOLD_; a block inside another one changes nothing.
    """
    global _in_loop
    if _fixed is None or _in_loop:
        yield
        return
    libc, threshold = _fixed
    trim = "MALLOC_TRIM_THRESHOLD_" not in os.environ  # the user's own trim threshold stays
    if trim:
        libc.mallopt(M_TRIM_THRESHOLD, 2 * STEP_MMAP_THRESHOLD_BYTES)
    libc.mallopt(M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD_BYTES)
    _in_loop = True
    try:
        yield
    finally:
        _in_loop = False
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        if trim:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
