"""One access-log line per request: readable message, structured fields (JSON via proxy.logs), no secrets.

Replaces aiohttp's access log, whose default format prints the request line with its query string, and so
the project token. Only the path is logged, percent-encoded as received (an encoded newline cannot forge a
line), with anything shaped like a PostHog key masked: some backend routes carry the project token in the
path. Headers are never logged.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

log = logging.getLogger("proxy.access")

# phc_ (project token), phs_ (secret token), phx_ (personal API key), and any other ph?_ key shape.
_KEY_SHAPED = re.compile(r"ph[a-z]_[A-Za-z0-9_-]+")


def safe_path(request: web.Request) -> str:
    """The request path without its query string, key-shaped segments masked."""
    return _KEY_SHAPED.sub("ph*_***", request.rel_url.raw_path)


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
        "%s %s %d %s %.3fms",
        method,
        path,
        status,
        answered_by,
        duration_ms,
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
