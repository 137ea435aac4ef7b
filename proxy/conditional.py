"""Request headers the definitions path parses: If-None-Match and Authorization."""

from __future__ import annotations


def none_match(header: str, etag: str) -> bool:
    """Whether If-None-Match `header` matches `etag` (weak comparison, RFC 9110 §13.1.2).

    Each member is trimmed, loses a leading `W/` and its quotes, as the reference does for a single value
    (contract §3.6); a list is split on commas and `*` matches any current representation.
    """
    for member in header.split(","):
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
    # str.split() (C, no generator) trims and splits on any whitespace: exactly two parts or it is malformed.
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    credential = parts[1]
    if not credential.isascii():  # O(1): the usual credential skips the check below
        try:
            # aiohttp decodes header bytes that are not UTF-8 as lone surrogates, which the HMAC and the
            # secret comparison cannot encode: such a credential is malformed.
            credential.encode()
        except UnicodeEncodeError:
            return None
    return credential
