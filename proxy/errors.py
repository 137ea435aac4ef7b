"""The small error vocabulary and the JSON bodies the proxy answers with (contract style)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.access_log import safe_path
from proxy.logs import stack

log = logging.getLogger(__name__)


def error_body(type_: str, code: str, detail: str) -> bytes:
    """A body shaped like the backend's DRF errors: type, code, detail, attr."""
    return json.dumps(
        {"type": type_, "code": code, "detail": detail, "attr": None}, separators=(",", ":")
    ).encode()


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response with exactly the given bytes."""
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def method_not_allowed_body(method: str) -> bytes:
    """DRF's wording for 405, with the method quoted as DRF does."""
    return error_body("invalid_request", "method_not_allowed", f'Method "{method}" not allowed.')


def only(allow: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler answering 405 with `Allow: <allow>`: for the proxy's own paths, which are never forwarded
    whatever the method (POST /metrics or DELETE /_readiness went to the upstream)."""

    async def method_not_allowed(request: web.Request) -> web.Response:
        return json_response(405, method_not_allowed_body(request.method), headers={"Allow": allow})

    return method_not_allowed


BAD_GATEWAY = error_body("server_error", "bad_gateway", "The upstream server could not be reached.")
GATEWAY_TIMEOUT = error_body("server_error", "gateway_timeout", "The upstream server did not answer in time.")
UPSTREAM_BUSY = error_body(
    "server_error", "upstream_busy", "Too many requests are waiting for the upstream server: retry later."
)
INTERNAL_ERROR = error_body("server_error", "internal_error", "The proxy failed to handle this request.")


def internal_error(request: web.Request) -> web.Response:
    """The one place where an unexpected exception becomes a 500, logged without request secrets (called
    in the `except` block: the exception is the one being handled).

    Called from the route wrapper (telemetry.observed) rather than a middleware: any middleware makes
    aiohttp wrap every request in extra bookkeeping, which the profile showed on the hot path.
    """
    exc = sys.exception()
    # The stack (files, lines, code), not the exception's message or repr: either can hold a token.
    log.error(
        "unhandled error on %s %s: %s\n%s",
        request.method,
        safe_path(request),
        type(exc).__name__,
        stack(exc),
    )
    return json_response(500, INTERNAL_ERROR)
