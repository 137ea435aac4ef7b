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

# Bytes read or let go (payloads) after which freed heap pages go back to the OS, at most once
# per TRIM_INTERVAL_SECONDS (a trim walks the heap: about a millisecond per 100 MiB).
TRIM_AFTER_BYTES = 4 * 2**20
TRIM_INTERVAL_SECONDS = 5.0
# Also once the process has grown this much past its size right after the last trim: a spike of requests in
# flight (large heads or bodies, a burst of connections) left its freed pages in the heap, and each spike
# raised the floor under a container's memory limit (a reviewer's: 241 MiB 15 s after a flood, 70 after a
# trim). Steady growth (more payloads, more clients) costs one trim per this much.
TRIM_AFTER_GROWTH_BYTES = 32 * 2**20


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


class HeapTrimmer:
    """Hands freed heap pages back to the OS, rate-limited: after enough churn, or once the process has
    grown TRIM_AFTER_GROWTH_BYTES since the last trim. Its owner adds to `churn` and calls `maybe_trim`."""

    def __init__(self) -> None:
        self.churn = 0  # bytes built or dropped since the last trim
        self._trimmed_at = 0.0
        self._resident_after_trim = 0  # the process's RSS right after the last trim

    def maybe_trim(self, now: float) -> None:
        """Trim if one is due (`now`: monotonic seconds)."""
        if now - self._trimmed_at < TRIM_INTERVAL_SECONDS:
            return
        if self.churn < TRIM_AFTER_BYTES:
            resident = resident_bytes()
            if resident is None or resident < self._resident_after_trim + TRIM_AFTER_GROWTH_BYTES:
                return
        self.churn = 0
        self._trimmed_at = now
        if release_free_memory():
            self._resident_after_trim = resident_bytes() or 0
