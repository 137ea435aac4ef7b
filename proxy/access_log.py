"""One access-log line per request: readable message, structured fields (JSON via proxy.logs), no secrets.

Replaces aiohttp's access log, whose default format prints the request line with its query string, and so
the project token. Only the path is logged, percent-encoded as received (an encoded newline cannot forge a
line), with anything shaped like a PostHog key masked (some backend routes carry the project token in the
path) and every segment shaped like another secret: share, embed, invite and password-reset links carry
their token as a path segment. Headers are never logged. The same masked path goes into warnings and traces.
"""

from __future__ import annotations

import functools
import logging
import re
from urllib.parse import unquote

from aiohttp import web

log = logging.getLogger("proxy.access")

# phc_ (project token), phs_ (secret token), phx_ (personal API key), and any other ph?_ key shape.
_KEY_SHAPED = re.compile(r"ph[a-z]_[A-Za-z0-9_-]+")
# Any other token: 16 or more URL-safe characters (urlsafe base64, hex, a UUID), unless lower-case words
# (a slug such as local_evaluation), wherever it stands in a segment. Numbers are shorter.
_TOKEN_SHAPED = re.compile(r"[A-Za-z0-9_-]{16,}")
_WORDS = re.compile(r"[a-z_-]+")


def safe_path(request: web.Request) -> str:
    """The request path without its query string, secret-shaped segments masked."""
    raw = request.rel_url.raw_path
    # Remembered for the paths clients send again and again; only short ones, so the memory stays bounded.
    return _masked_memo(raw) if len(raw) <= 256 else masked(raw)


def masked(raw_path: str) -> str:
    """`raw_path` with PostHog keys (`ph*_***`) and other token-shaped segments (`***`) masked, encoded
    forms included (`ph%63_...`): what may be logged."""
    segments = raw_path.split("/")
    for index, segment in enumerate(segments):
        plain = unquote(segment) if "%" in segment else segment
        if plain is not segment:
            # Encoded: what is masked cannot be placed in the encoded form; the whole segment goes.
            if _KEY_SHAPED.search(plain) or _has_token(plain):
                segments[index] = "***"
        elif _KEY_SHAPED.search(segment):
            segments[index] = _TOKEN_SHAPED.sub(_token_masked, _KEY_SHAPED.sub("ph*_***", segment))
        elif _has_token(segment):
            # Every token-shaped run, not only a whole segment: `<token>.png`, a JWT's three parts, a signed
            # value's `a:b:c` (found by a reviewer).
            segments[index] = _TOKEN_SHAPED.sub(_token_masked, segment)
    return "/".join(segments)


def _has_token(text: str) -> bool:
    return any(not _WORDS.fullmatch(run) for run in _TOKEN_SHAPED.findall(text))


def _token_masked(match: re.Match[str]) -> str:
    run = match.group(0)
    return run if _WORDS.fullmatch(run) else "***"


_masked_memo = functools.lru_cache(maxsize=4096)(masked)


def write(
    request: web.Request,
    route: str,
    status: int,
    answered_by: str,
    seconds: float,
    trace_id: str | None,
) -> None:
    """Log the request at INFO on `proxy.access`."""
    method = request.method
    path = safe_path(request)
    duration_ms = round(seconds * 1000, 3)
    log.info(
        "%s %s %d %s %.3fms route=%s trace_id=%s",  # all of it: the text format shows the message only
        method,
        path,
        status,
        answered_by,
        duration_ms,
        route,
        trace_id or "-",
        extra={
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "answered_by": answered_by,
            "duration_ms": duration_ms,
            "trace_id": trace_id,
        },
    )
