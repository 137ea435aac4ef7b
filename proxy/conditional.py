"""Request headers the definitions path parses: If-None-Match, Authorization and Connection."""

from __future__ import annotations

from multidict import CIMultiDictProxy

# SDKs send one ETag (16 hex digits, quoted); an RFC 9110 list of ~200 of them fits.
MAX_LIST_CHARS = 4096


def none_match(header: str, etag: str) -> bool:
    """Whether If-None-Match `header` matches `etag` (weak comparison, RFC 9110 §13.1.2).

    Each member is trimmed, loses a leading `W/` and its quotes, as the reference does for a single value
    (contract §3.6); a list (up to MAX_LIST_CHARS) is split on commas and `*` matches any current
    representation.
    """
    if not header.isascii():
        # Read the bytes as the backend's server does (latin-1, PEP 3333), not as aiohttp does (UTF-8 with
        # surrogate escapes): its str.strip() trims a trailing 0xA0 or 0x85 byte, which is a 304 there, and
        # keeps the 0xC2 of a UTF-8 no-break space, which is a 200 there (found by a reviewer).
        header = header.encode("utf-8", "surrogateescape").decode("latin-1")
    # Split only while short: 2 MB of commas (127 header lines within aiohttp's limits, joined) was two
    # million members, ~180 ms of the event loop per request, and one credential's conditional budget sends
    # 100 a second (a reviewer's). Longer, it is read as the reference reads any If-None-Match: one value.
    for member in header.split(",") if len(header) <= MAX_LIST_CHARS else (header,):
        candidate = member.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate.strip('"') == etag:
            return True
    return False


def bearer(header: str) -> str | None:
    """The credential of `Bearer <credential>` (scheme case-insensitive, whitespace trimmed), else None.

    None means malformed: the caller forwards, so the backend's answer decides, never a guess of ours.
    """
    # Anything but ASCII is malformed (O(1) for the usual header). The backend's server reads header bytes as
    # latin-1 and aiohttp as UTF-8, so the two split such a header differently: `Bearer<U+00A0><key>` is a
    # Bearer credential to str.split() here and no Bearer at all to the backend (found by a reviewer).
    if not header.isascii():
        return None
    # str.split() (C, no generator) trims and splits on any whitespace: exactly two parts or it is malformed.
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def connection_options(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """The field names a Connection header lists, lowercased: hop-by-hop, never forwarded."""
    return frozenset(
        name.strip().lower() for value in headers.getall("Connection", ()) for name in value.split(",")
    )
