"""heap.release_free_memory hands freed C-heap pages back to the kernel (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path

from rlhf_operator.heap import release_free_memory

BLOCK = 64 * 1024  # under glibc's mmap threshold (128 KiB): the blocks come from the heap, not mmap


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_freed_heap_pages_go_back_to_the_kernel() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    blocks = [libc.malloc(BLOCK) for _ in range(800)]  # 50 MiB
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # resident
    for block in blocks[:-1]:  # the last one pins the heap's top: freeing alone gives nothing back
        libc.free(block)
    held = _rss_mib()
    assert release_free_memory()
    released = held - _rss_mib()
    libc.free(blocks[-1])
    assert released > 40, f"only {released:.1f} MiB of the 50 MiB freed went back"
