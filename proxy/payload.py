"""One team's definitions payload and ETag as held in memory, and what a payload must be to be served."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.contract import DecodeError

# Contract §3.9: the weak ETag and this Cache-Control go together; with no stored ETag, neither is sent.
CACHE_CONTROL = "private, must-revalidate"


@dataclass(slots=True)
class Definitions:
    """One team's payload and ETag, read together; the response headers are computed once, here."""

    team_id: int
    etag: str | None
    body: bytes | None  # None: only the ETag was read (a 304 never needs the payload), or held packed only
    billable: bool
    checked_at: float  # monotonic time Redis last confirmed this entry
    packed: bytes | None = None  # the payload zstd-compressed, when the cache keeps compressed copies
    touched_at: float = 0.0  # monotonic time `get` last moved it up the LRU order
    raw_etag: bytes | None = None  # the ETag as Redis last returned it: unchanged bytes need no decoding
    # Without an ETag, the payload itself is re-read each cycle: its hash as read tells an unchanged one.
    raw_hash: int | None = None
    # Read-only multidicts: aiohttp copies them into each response faster than plain dicts (~0.1 µs).
    headers_200: CIMultiDictProxy[str] = field(init=False)
    headers_304: CIMultiDictProxy[str] = field(init=False)
    etag_header: str | None = field(init=False)  # the ETag header as sent, which SDKs send back as is

    def __post_init__(self) -> None:
        self.etag_header = None if self.etag is None else f'W/"{self.etag}"'
        conditional = {}
        if self.etag_header is not None:
            conditional = {"ETag": self.etag_header, "Cache-Control": CACHE_CONTROL}
        self.headers_304 = CIMultiDictProxy(CIMultiDict(conditional))
        self.headers_200 = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", **conditional}))

    @property
    def size(self) -> int:
        """Bytes this entry holds against the budget."""
        return (len(self.body) if self.body is not None else 0) + (
            len(self.packed) if self.packed is not None else 0
        )


def contents(entry: Definitions) -> tuple[object, ...]:
    """What tells two reads' findings apart: the ETag, or without one the payload's hash."""
    return (entry.etag, entry.raw_hash)


def etag_safe(etag: str) -> bool:
    """RFC 9110 §8.8.3's etagc (visible ASCII but the quote), and not empty."""
    return bool(etag) and all("!" <= c <= "~" and c != '"' for c in etag)


def is_billable(body: bytes, unbilled_prefixes: tuple[str, ...]) -> bool:
    """Contract §3.8: billed unless every flag key has an unbilled prefix. DecodeError if the payload is no
    JSON object whose flags are a list of objects: the backend parses it to bill and fails where this would
    (found by a reviewer: served and billed here, a 500 there), so such a payload is forwarded."""
    if body.startswith(codecs.BOM_UTF8):  # json.loads takes it from bytes, the backend's (from text) does not
        raise DecodeError("not a flags payload (a byte-order mark)")
    try:
        flags = json.loads(body).get("flags", [])
        keys = [flag.get("key", "") for flag in flags] if isinstance(flags, list) else None
    except (ValueError, AttributeError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise DecodeError(f"not a flags payload ({type(exc).__name__})") from None
    if keys is None:
        raise DecodeError("not a flags payload (flags is no list)")
    return not all(isinstance(key, str) and key.startswith(unbilled_prefixes) for key in keys)
