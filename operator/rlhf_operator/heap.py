"""Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``), after the work that freed them.

Why: the operator's resident memory is what its container limit counts. A pass decodes a run and
its children, builds a Job, and frees all of it; glibc keeps freed memory in its heaps for reuse
and only gives back the top of a heap, so after the adoption of 1,000 runs, or a burst of
transitions, the process keeps its high-water mark for ever. ``malloc_trim(0)`` releases the free
pages inside every heap as well (glibc 2.8 and later). Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # no libc found, or one without malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_free_memory() -> bool:
    """Whether memory was handed back (False also where malloc_trim does not exist)."""
    return bool(_TRIM(0)) if _TRIM is not None else False
