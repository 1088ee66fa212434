"""Giving freed heap memory back to the system before a memory-hungry step.

numpy's smaller temporaries come from glibc's heap, which keeps freed pages mapped; after a
preprocessing stage they add ~100 MB to a worker's RSS on top of which a single-block network then
allocates ~2 GB. ``malloc_trim(0)`` returns those pages. A no-op where the C library has no
``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Return free heap pages to the operating system (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
