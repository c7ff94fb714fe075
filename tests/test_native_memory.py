"""Large blocks stay mapped (returned to the system when freed) after scrub sets glibc's threshold (issue 10)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

# In a fresh process: free a 16 MiB block (by default glibc then raises its mmap threshold to 16 MiB),
# allocate 8 MiB, and say whether that block is a mapping of its own (mallinfo2's hblkhd). "steps" asks it
# inside heap_for_repeated_steps first (after an inner block has ended), then again after it.
PROBE = """
import ctypes, ctypes.util, sys
from backdoor_scrub.native_memory import heap_for_repeated_steps, keep_large_buffers_mapped
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes, libc.mallinfo2.restype = ctypes.c_void_p, [ctypes.c_void_p], Mallinfo2
def mapped_after_a_larger_free():
    libc.free(libc.malloc(16 << 20))
    block = libc.malloc(8 << 20)
    mapped = libc.mallinfo2().hblkhd >= 8 << 20
    libc.free(block)
    return mapped
set_by_scrub = keep_large_buffers_mapped() if sys.argv[1] != "default" else None
if sys.argv[1] == "steps":
    with heap_for_repeated_steps():
        with heap_for_repeated_steps():
            pass
        print(mapped_after_a_larger_free(), end=" ")
print(set_by_scrub, mapped_after_a_larger_free())
"""


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    except OSError:
        return False


def probe(mode: str, **environment: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | environment
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc >= 2.33 only")
def test_a_large_block_freed_early_no_longer_pulls_later_ones_into_the_heap():
    assert probe("default") == "None False"  # glibc's own behaviour: the 8 MiB block comes from the heap
    assert probe("scrub") == "True True"


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc >= 2.33 only")
def test_the_users_own_threshold_is_left_alone():
    assert probe("scrub", MALLOC_MMAP_THRESHOLD_="67108864") == "False False"


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc >= 2.33 only")
def test_an_optimisation_loop_reuses_heap_blocks_and_the_threshold_comes_back_after_it():
    assert probe("steps") == "False True True"
