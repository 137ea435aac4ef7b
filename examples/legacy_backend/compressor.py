"""PostHog's django-redis compressor (posthog/caching/zstd_compressor.py): zstd above 512 bytes."""

from __future__ import annotations

import zstandard
from django_redis.compressors.base import BaseCompressor

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ZstdCompressor(BaseCompressor):
    """zstd frames (with their content size) for values longer than 512 bytes; tolerant reads."""

    min_length = 512
    level = 3  # PostHog passes preset 0 to python-zstd, which means zstd's default level, 3

    def compress(self, value: bytes) -> bytes:
        """A zstd frame when longer than min_length, else the value unchanged."""
        if len(value) > self.min_length:
            return zstandard.ZstdCompressor(level=self.level).compress(value)
        return value

    def decompress(self, value: bytes) -> bytes:
        """The value, decompressed when it is a zstd frame."""
        if not value.startswith(ZSTD_MAGIC):
            return value
        try:
            return zstandard.ZstdDecompressor().decompress(value)
        except zstandard.ZstdError:
            return value
