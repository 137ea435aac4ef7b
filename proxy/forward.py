"""The forwarder: misses and unknown routes go to the configured upstream, streamed both ways."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import unquote

from aiohttp import HttpVersion11, hdrs, web
from opentelemetry import trace
from yarl import URL

from proxy import aiohttp_internals, keys, tracing
from proxy.access_log import safe_path
from proxy.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, UPSTREAM_BUSY, error_body, json_response
from proxy.forward_headers import HeaderPolicy, end_to_end
from proxy.logs import Throttled
from proxy.request_body import ClientBodyError, RequestBody, codings
from proxy.settings import ClientLimitsSettings, UpstreamSettings
from proxy.telemetry import CLIENT_CLOSED, FORWARD, expect_continue, observed
from proxy.upstream import Limits, Pool, Response, UpstreamError

log = logging.getLogger(__name__)

# Told the upstream's status and headers, and its body when that was small enough to be buffered (else None).
Observer = Callable[[int, Mapping[str, str], bytes | None], None]
# Told the upstream's status as soon as its head is in, before any of a streamed body is relayed.
StatusObserver = Callable[[int], None]

# What edge_proxy_upstream_errors_total{kind} counts: no connection (refused), silence past the read or
# connect timeout (timeout), every pooled connection busy past the read timeout (pool_timeout), too many
# requests waiting for one already (pool_full), a connection cut mid-answer (disconnected), an answer that is
# not HTTP (malformed), and answers with a 5xx status.
FAILURE_KINDS = ("refused", "timeout", "pool_timeout", "pool_full", "disconnected", "malformed", "5xx")

# Responses that declare a length up to this are read whole before the headers go out: most API answers
# then fail as a clean 502/504 instead of a cut connection. Everything else is streamed chunk by chunk.
BUFFERED_RESPONSE_BYTES = 64 * 1024
# Header limits, the same for clients' requests (app.py's handler_args) and the upstream's answers, so a
# header that came in can also come back.
MAX_HEADER_BYTES = 16384
MAX_HEADERS = 128
# Requests that carry no body by nature; others without one say Content-Length: 0.
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

DOT_SEGMENT = error_body("invalid_request", "invalid_path", "The request path may not hold dot segments.")
# "." and "..", and their percent-encoded spellings (RFC 3986 §2.3: %2E is ".").
_DOT_SEGMENTS = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})


class Forwarder:
    """Sends a request to the upstream as it came and streams the answer back."""

    def __init__(
        self,
        pool: Pool,
        settings: UpstreamSettings,
        limits: ClientLimitsSettings = ClientLimitsSettings(),  # noqa: B008 - frozen, never mutated
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.pool = pool
        # Upstream failures by kind, for metrics (every kind from the start, at 0, so an alert on its
        # increase sees the first one); the log gets at most one line per kind of failure per interval (a
        # dead upstream fails every request).
        self.failures: Counter[str] = Counter(dict.fromkeys(FAILURE_KINDS, 0))
        self._warn = Throttled(log)
        self._bodies = RequestBody(limits, settings.buffer_request_body_bytes)
        base = URL(settings.base, encoded=True)
        # A base path ("http://backend/prefix") is a prefix; request paths are appended byte for byte.
        self._base_path = base.raw_path.rstrip("/")
        self._server_address = base.raw_host or ""
        self._headers = HeaderPolicy(settings)
        self._tracer = tracer

    async def forward(
        self,
        request: web.Request,
        observe: Observer | None = None,
        capture_bytes: int = 0,
        on_status: StatusObserver | None = None,
    ) -> web.StreamResponse:
        """Forward `request` (origin-form path and query only) and stream the upstream's answer.

        `observe` sees the answer once it is relayed (with its body within `capture_bytes`); `on_status`
        sees its status as soon as the upstream's head is in.
        """
        if self._base_path and _has_dot_segment(request.raw_path):
            # Under a base path, a backend that resolves dot segments would take "/prefix/../admin" outside
            # the prefix the proxy was given: refused rather than forwarded byte for byte.
            return json_response(400, DOT_SEGMENT)
        method = request.method
        incoming = request.headers
        if hdrs.TRANSFER_ENCODING not in incoming and not request.body_exists:
            body = None  # what RequestBody.read says, without its coroutine (the usual GET)
        else:
            try:
                body = await self._bodies.read(request)
            except ClientBodyError as exc:
                return exc.response()
        headers = self._headers.request(request)
        # Framing from the body sent: a body read whole says its length; a streamed one the length the
        # client declared (aiohttp's parser holds the client to it), else it is chunked again upstream.
        chunked = False
        if body is None:
            if method not in BODILESS_METHODS or hdrs.CONTENT_LENGTH in incoming:
                headers.append(("Content-Length", "0"))  # as aiohttp's client did: some servers want it
        elif isinstance(body, bytes):
            headers.append(("Content-Length", str(len(body))))
        elif (length := request.content_length) is not None:
            headers.append(("Content-Length", str(length)))
        else:
            chunked = True
            headers.append(("Transfer-Encoding", codings(request)))
        span = None
        if self._tracer is not None:
            span = tracing.upstream_span(self._tracer, method, self._server_address, headers)
        raw_path = request.raw_path  # origin form, the usual target, without _target's call
        target = self._base_path + raw_path if raw_path.startswith("/") else self._target(request)
        # Each "name: value" joined in C (no Python per header), the lines ended by CRLF, then the blank line.
        head = "\r\n".join([f"{method} {target} HTTP/1.1", *map(": ".join, headers), "", ""]).encode(
            "utf-8", "surrogateescape"
        )  # header bytes leave as they came in
        # From here the answer is the upstream's, or says why it could not be had (telemetry's answered_by);
        # the 400, 408, 413 and 501 above (request_body), and a streamed body's below, are this proxy's own.
        request[keys.FORWARDED] = True
        try:
            upstream = await self.pool.send(
                head,
                body,
                head_only=method == "HEAD",
                chunked=chunked,
                wanted=_client_still_there(request),
                client=request.protocol,
            )
        except ClientBodyError as exc:
            tracing.end_upstream_span(span, None, exc)
            # A streamed body refused on its way: the proxy's answer, not the upstream's.
            request.pop(keys.FORWARDED, None)
            return exc.response()
        except UpstreamError as exc:
            tracing.end_upstream_span(span, None, exc)
            return self._failed(request, None, exc)
        if span is not None:
            tracing.end_upstream_span(span, upstream.status, None)
        if on_status is not None:
            on_status(upstream.status)
        if upstream.status >= 500:
            self.failures["5xx"] += 1
        try:
            length = upstream.content_length
            if length is not None and length <= BUFFERED_RESPONSE_BYTES and method != "HEAD":
                # Small answers: read whole, then headers and body leave in one write (measured: the
                # prepare-then-write_eof pair cost a second syscall, ~20 % of forwarding CPU). Usually the
                # body came with the head: taken without a coroutine.
                body = upstream.body_if_complete()
                if body is None:
                    try:
                        body = await upstream.read()
                    except UpstreamError as exc:
                        return self._failed(request, None, exc)
                whole = aiohttp_internals.ExactHeadResponse if upstream.non_utf8 else web.Response
                # end_to_end's answer when nothing is hop by hop (the usual), without its call.
                headers = end_to_end(upstream) if upstream.hop_by_hop else upstream.headers
                answer = whole(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
                if observe is not None:  # not prepared yet: the upstream's headers only
                    observe(upstream.status, answer.headers, body)
                return answer
            return await self._stream(request, upstream, observe, capture_bytes)
        finally:
            upstream.release()

    async def _stream(
        self, request: web.Request, upstream: Response, observe: Observer | None, capture_bytes: int
    ) -> web.StreamResponse:
        """Relay an answer too large to read whole, or of unknown length, as it arrives."""
        length = upstream.content_length
        headers = end_to_end(upstream)
        streamed = aiohttp_internals.ExactHeadStreamResponse if upstream.non_utf8 else web.StreamResponse
        response = streamed(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is None and request.version < HttpVersion11:
            # No length and no chunked coding in HTTP/1.0: only the close can end the body. aiohttp does not
            # close a kept-alive 1.0 connection then, and the client waited out the keep-alive timeout.
            response.force_close()
        try:
            await _relay(request, upstream, response, observe, capture_bytes, self.pool.limits.read_timeout)
        except UpstreamError as exc:
            return self._failed(request, response, exc)
        except ConnectionError:
            # The client left mid-answer (aiohttp's ClientConnectionResetError is one): not the upstream's
            # failure; the upstream connection is dropped, unread, on release.
            log.debug("client left during %s %s", request.method, safe_path(request))
            request.protocol.force_close()
        return response

    def _failed(
        self, request: web.Request, response: web.StreamResponse | None, exc: UpstreamError
    ) -> web.StreamResponse:
        # The one place an upstream failure becomes an answer. Only the failure's kind is logged, never a URL:
        # the path still percent-encoded (an encoded newline cannot forge a log line), key-shaped segments
        # masked (some backend routes carry the project token in the path), the query left out.
        if exc.kind == "abandoned":
            # Nobody to answer (aiohttp does not cancel a handler whose client left): nginx's 499.
            request.protocol.force_close()
            return (
                response if response is not None and response.prepared else web.Response(status=CLIENT_CLOSED)
            )
        self.failures[exc.kind] += 1
        method, path = request.method, safe_path(request)
        if response is not None and response.prepared:
            # The status line is out, so a clean end would pass a truncated body off as complete. Closing the
            # connection leaves the client with an unterminated chunked body or a short Content-Length.
            self._warn.warning("upstream failed mid-response (%s) on %s %s", exc, method, path)
            request.protocol.force_close()
            return response
        if exc.kind == "timeout":
            self._warn.warning("upstream timed out (%s) on %s %s", exc, method, path)
            return json_response(504, GATEWAY_TIMEOUT)
        if exc.kind == "pool_timeout":
            # Not the backend's silence: every pooled connection stayed busy for the read timeout.
            self._warn.warning(
                "no upstream connection came free in time (all upstream.max_connections busy) on %s %s",
                method,
                path,
            )
            return json_response(504, GATEWAY_TIMEOUT)
        if exc.kind == "pool_full":
            self._warn.warning(
                "too many requests waiting for an upstream connection (max_pending_requests) on %s %s",
                method,
                path,
            )
            return json_response(503, UPSTREAM_BUSY)
        self._warn.warning("upstream unreachable or broken (%s) on %s %s", exc, method, path)
        return json_response(502, BAD_GATEWAY)

    def _target(self, request: web.Request) -> str:
        # The request-target as the client sent it, when in origin form: percent-escapes, repeated keys and
        # an empty query ("?") byte for byte. An absolute-form target's authority ("GET http://x/ ...") is
        # dropped: only its path and query go on.
        raw = request.raw_path
        if not raw.startswith("/"):
            target = request.rel_url
            raw = target.raw_path + (f"?{target.raw_query_string}" if target.raw_query_string else "")
        return self._base_path + raw


async def _relay(
    request: web.Request,
    upstream: Response,
    response: web.StreamResponse,
    observe: Observer | None,
    capture_bytes: int,
    write_timeout: float,
) -> None:
    """Stream the answer through; an observer sees it at the end, with the body if within `capture_bytes`.

    A client that takes no more of it for `write_timeout` (the upstream's read timeout: the same silence,
    the other way) is cut off: it would hold an upstream connection, and what was read for it, for ever.
    A write waits only once 64 KiB are unsent (aiohttp's drain), which a trickle (a server-sent-events
    heartbeat) takes hours to queue: so before each write the bytes still unsent are also compared with what
    the last write left, and fewer (or none) is progress; none for `write_timeout` cuts the client off too.
    """
    captured: list[bytes] | None = [] if observe is not None and capture_bytes > 0 else None
    size = 0
    transport = request.transport
    loop = asyncio.get_running_loop()
    progress_at, left = loop.time(), 0
    last_request = request.app[keys.SETTINGS].client_limits.max_requests_per_connection or sys.maxsize
    if (
        request.app[keys.HEALTH].draining
        or request._message.upgrade
        or request._protocol._request_count - len(request._protocol._messages) >= last_request
    ):
        # Connection: close on a stream started during the drain, answering an upgrade request, or on the
        # connection's last request (see telemetry.observed).
        response.force_close()
    # Bounded here, write by write: the connections' sweep leaves it alone meanwhile (its buffer refills).
    connections = request.app.get(keys.CONNECTIONS)  # absent in an app of the forwarder alone
    relaying = connections.relaying if connections is not None else set()
    relaying.add(request.protocol)
    try:
        await response.prepare(request)
        # Whatever arrived is passed on, so server-sent events and chunked answers are not held back.
        async for chunk in upstream.chunks():
            unsent = transport.get_write_buffer_size() if transport is not None else 0
            now = loop.time()
            if unsent == 0 or unsent < left:
                progress_at = now
            elif now - progress_at >= write_timeout:
                raise ConnectionResetError("the client stopped reading")
            try:
                async with asyncio.timeout(write_timeout):
                    await response.write(chunk)
            except TimeoutError:
                raise ConnectionResetError("the client stopped reading") from None
            left = transport.get_write_buffer_size() if transport is not None else 0
            if captured is not None:
                size += len(chunk)
                if size <= capture_bytes:
                    captured.append(chunk)
                else:
                    captured = None
        try:
            async with asyncio.timeout(write_timeout):
                await response.write_eof()
        except TimeoutError:
            raise ConnectionResetError("the client stopped reading") from None
    finally:
        relaying.discard(request.protocol)
    if observe is not None:
        observe(upstream.status, response.headers, b"".join(captured) if captured is not None else None)


def _client_still_there(request: web.Request) -> Callable[[], bool]:
    def wanted() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return wanted


def _has_dot_segment(target: str) -> bool:
    """Whether any reading a backend may make of the path has a dot segment: as sent, percent-decoded once
    (%2e%2e, ..%2f), with backslashes as slashes (..%5c) and path parameters dropped (..;/)."""
    path = target.partition("?")[0]
    if "." not in path and "%" not in path:  # the usual path, at the cost of two scans
        return False
    for reading in (path, unquote(path).replace("\\", "/")):
        for segment in reading.split("/"):
            if segment.lower() in _DOT_SEGMENTS or segment.partition(";")[0] in (".", ".."):
                return True
    return False


# The forwarding route's path: any path. Any character: aiohttp's `.*` (no re.DOTALL) stopped at a line
# feed, and a path with %0A was a local 404, never forwarded.
CATCH_ALL = r"/{tail:[\s\S]*}"


def add_routes(app: web.Application) -> None:
    """Everything the proxy does not answer itself goes upstream unchanged: the catch-all route, last."""

    def forward(request: web.Request) -> Awaitable[web.StreamResponse]:
        # Not a coroutine itself: the forwarder's is awaited by the route wrapper, one frame less per request.
        return app[keys.FORWARDER].forward(request)

    route = app.router.add_route(
        "*", CATCH_ALL, observed(app, FORWARD, forward), expect_handler=expect_continue
    )
    aiohttp_internals.resolve_catch_all_directly(app.router, route)


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One connection pool to the upstream, with keep-alive and explicit timeouts."""
    settings = app[keys.SETTINGS].upstream
    base = URL(settings.base)
    pool = Pool(
        base.raw_host or "",
        base.port or 80,
        tls=base.scheme == "https",
        limits=Limits(
            max_connections=settings.max_connections,
            keepalive_timeout=settings.keepalive_timeout_seconds,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            max_pending=settings.max_pending_requests,
            max_field_bytes=MAX_HEADER_BYTES,
            max_headers=MAX_HEADERS,
        ),
    )
    telemetry = app.get(keys.TELEMETRY)
    tracer = telemetry.tracer if telemetry is not None else None
    app[keys.FORWARDER] = Forwarder(pool, settings, app[keys.SETTINGS].client_limits, tracer)
    clients = app.get(keys.CONNECTIONS)  # absent in an app of the forwarder alone
    if clients is not None:
        clients.on_leave = pool.client_left  # a request's exchange ends when its client leaves
    yield
    if clients is not None:
        clients.on_leave = None
    pool.close()
