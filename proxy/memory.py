"""Handing freed heap memory back to the OS, where the C library allows it (glibc's malloc_trim).

Payloads are large, short-lived buffers while they are read from Redis (the compressed reply, the pickle, the
text, the bytes kept), interleaved with small long-lived objects. glibc keeps the pages those buffers freed
inside its heap, so RSS stays at the high-water mark of every load since start. malloc_trim(0) returns the
free pages, wherever they are in the heap. Elsewhere (musl, macOS) there is nothing to call: a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int | None:
    """This process's resident memory (RSS), from /proc/self/statm; None where there is none to read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS; False where the C library cannot (nothing done)."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
