"""Telemetry on the request path: one wrapper per route handler, plain counters, providers in a cleanup_ctx.

A handler wrapper rather than a middleware (measured: an empty middleware costs ~0.14 µs per request in
aiohttp 3.14, a wrapper ~0.07 µs; the route group is then a constant, not a lookup). Per request, with
metrics on: two perf_counter() calls, an in-memory histogram observation and a few int increments. The
OpenTelemetry SDK only runs when a reader collects (metrics.py), never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from time import monotonic, perf_counter
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler
from opentelemetry import context, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy import __version__, access_log, keys, metrics, tracing
from proxy.errors import internal_error, only
from proxy.histogram import InMemoryHistogram
from proxy.redis_observer import RedisObserver
from proxy.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

# The last exports at shutdown (metrics and spans, side by side) must fit the chart's 5 s margin after the
# drain and the final billing flush, whatever the collector does.
FINAL_EXPORT_SECONDS = metrics.EXPORT_TIMEOUT_SECONDS + 0.5


def _finish(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _run(close: Callable[[], object], loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
    try:
        close()
    finally:
        with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits any more
            loop.call_soon_threadsafe(_finish, done)


# Route groups: the label values of `route` (never a path: paths are client-chosen).
DEFINITIONS = "definitions"
FORWARD = "forward"
HEALTH = "health"  # probes and /metrics
LOCAL = "local"
UPSTREAM = "upstream"
# Client-chosen too: any other method is counted as _OTHER (the OTel HTTP semantic conventions' value).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Status codes kept as labels: every one the proxy answers itself, and the usual ones a backend does. Any
# other (an upstream may answer 200-999) is its class, "2xx" to "9xx": a label set an upstream cannot grow
# past the series cap (past it every new series shares one, and scrapes grow by megabytes).
# Strings, as the classes are: one attribute type per label in OTLP (an int 500 beside a string "5xx" do not
# match in a backend that keeps types).
_STATUSES = {
    status: str(status)
    for status in (
        {200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308}
        | {400, 401, 402, 403, 404, 405, 408, 409, 410, 413, 415, 417, 422, 429, 431, 499}
        | {500, 501, 502, 503, 504}
    )
}
# The handler was cancelled (the client left, or shutdown's deadline passed): nginx's code for it.
CLIENT_CLOSED = 499


class Telemetry:
    """Per-app state: counters the request path increments, providers opened by `telemetry_ctx`."""

    def __init__(self, settings: Settings) -> None:
        config = settings.telemetry
        self.settings = config
        self.metrics_enabled = config.metrics_enabled
        self.access_log = settings.logging.access_log
        # Everything off: the wrapper only reads this flag.
        self.enabled = self.metrics_enabled or self.access_log or config.trace_sampling_ratio > 0
        self.requests = InMemoryHistogram(
            "edge_proxy.request.duration",
            "Request handling time by route group, method, status code and who answered",
            "s",
            ("route", "method", "status_code", "answered_by"),
            config.max_series_per_metric,
        )
        self.in_flight = 0
        self.etag = dict.fromkeys(("hit", "miss", "none"), 0)
        self.auth_denied = dict.fromkeys(("missing", "secret_api_token", "personal_api_key"), 0)
        self.redis = RedisObserver(config.max_series_per_metric)
        self.tracer: trace.Tracer | None = None
        self.registry: CollectorRegistry | None = None
        self._meter_provider: MeterProvider | None = None
        self.tracer_provider: TracerProvider | None = None

    def finish(
        self, request: web.Request, route: str, status: int, seconds: float, span: trace.Span | None
    ) -> None:
        """Count, time and log one answered request (the ETag and auth counters are the handler's)."""
        self.in_flight -= 1
        if route == FORWARD:
            # Set by the forwarder once it sends the request; the forward route answers some requests itself
            # (413, 501, a 400), most not: no len() first (see below), one call less per forward.
            answered_by = UPSTREAM if keys.FORWARDED in request else LOCAL
        elif route == DEFINITIONS:
            # The definitions path forwards what it cannot answer from memory. len() first: `in` raises and
            # catches a KeyError when the key is absent (~0.2 µs, measured), and a request's state is empty
            # unless the forwarder marked it.
            answered_by = UPSTREAM if len(request) and keys.FORWARDED in request else LOCAL
        else:
            answered_by = LOCAL
        method = request.method
        if self.metrics_enabled:
            self.requests.observe(
                (
                    route,
                    method if method in _METHODS else "_OTHER",
                    _STATUSES.get(status) or f"{status // 100}xx",
                    answered_by,
                ),
                seconds,
            )
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR)
        if self.access_log:
            access_log.write(request, route, status, answered_by, seconds, tracing.trace_id(span, request))

    def redis_observer(self) -> RedisObserver | None:
        """The observer for the app's Redis client: none when neither metrics nor traces want it."""
        return self.redis if self.metrics_enabled or self.tracer is not None else None

    def start(self, app: web.Application) -> None:
        """Create the providers the settings ask for."""
        config = self.settings
        # One instance id per process: with --workers N each worker exports its own cumulative series, which
        # a collector would otherwise take for one process's and mix up.
        # The version too, so a fleet halfway through a rollout shows which replica runs which release.
        resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": __version__,
                "service.instance.id": str(uuid.uuid4()),
            }
        )
        if self.metrics_enabled:
            self._meter_provider, self.registry = metrics.meter_provider(app, self, config, resource)
        if config.trace_sampling_ratio > 0:
            from proxy import tracing_sdk  # the trace SDK only when tracing is on (tracing.py)

            self.tracer_provider = tracing_sdk.tracer_provider(config, resource)
            self.tracer = self.tracer_provider.get_tracer("proxy")
            self.redis.tracer = self.tracer

    async def shutdown(self) -> None:
        """Flush and close the providers (a final OTLP export when one is configured), side by side, for at
        most FINAL_EXPORT_SECONDS: each runs in a daemon thread, which exit does not wait for. Without a
        deadline of our own, a collector that never answers held the exit ~15 s (the SDK waits up to 30 s
        for span batches, one export timeout each), past the pod's grace period."""
        closers: list[Callable[[], object]] = []
        if self._meter_provider is not None:
            timeout_millis = metrics.EXPORT_TIMEOUT_SECONDS * 1000
            closers.append(functools.partial(self._meter_provider.shutdown, timeout_millis=timeout_millis))
        if self.tracer_provider is not None:
            closers.append(self.tracer_provider.shutdown)
        if not closers:
            return
        loop = asyncio.get_running_loop()
        finished = [loop.create_future() for _ in closers]
        for close, done in zip(closers, finished, strict=True):
            threading.Thread(
                target=_run, args=(close, loop, done), name="telemetry-shutdown", daemon=True
            ).start()
        _, unfinished = await asyncio.wait(finished, timeout=FINAL_EXPORT_SECONDS)
        if unfinished:
            log.warning(
                "telemetry: the last export took over %.1f s; exiting without it",
                FINAL_EXPORT_SECONDS,
            )


def observed(app: web.Application, route: str, handler: Handler) -> Handler:
    """`handler` as a route handler of group `route`: guarded (a bug is a 500), counted, timed, logged.

    One coroutine around the handler and nothing looked up per request: the app's telemetry and health
    are bound here, at registration. `handler` may be a plain function returning an awaitable, which
    saves the request one more coroutine.
    """
    telemetry = app[keys.TELEMETRY]
    health = app[keys.HEALTH]
    last_request = app[keys.SETTINGS].client_limits.max_requests_per_connection or sys.maxsize

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            if telemetry.enabled:
                tracer = telemetry.tracer
                span = None if tracer is None else tracing.server_span(tracer, request, route)
                # Current for the handler's awaits, so Redis and upstream spans become its children.
                context_token = None if span is None else context.attach(trace.set_span_in_context(span))
                telemetry.in_flight += 1
                status = 500
                start = perf_counter()
                try:
                    response = await handler(request)
                    status = response.status
                except web.HTTPException as exc:
                    status = exc.status
                    raise
                except asyncio.CancelledError:
                    status = CLIENT_CLOSED
                    raise
                finally:
                    telemetry.finish(request, route, status, perf_counter() - start, span)
                    if span is not None:
                        context.detach(context_token)  # type: ignore[arg-type]  # set with the span
                        span.end()
            else:
                response = await handler(request)
        except web.HTTPException:
            raise
        except Exception:  # one wrapper, not two: each coroutine layer costs every request
            response = internal_error(request)
        protocol = request._protocol
        if (
            health.draining
            or request._message.upgrade
            or protocol._request_count - len(protocol._messages) >= last_request
        ) and not response.prepared:
            # An Upgrade other than websocket: aiohttp's C parser drops whatever the client pipelined
            # behind it, which would then wait out the keep-alive timeout for answers that never come;
            # closing says so. The connection's last request (client_limits.max_requests_per_connection):
            # its place on the connection, aiohttp's count of the requests it parsed less those queued
            # behind it (pipelined ones are parsed before their turn).
            # aiohttp closes each connection after its answer once shutdown begins, but would still
            # say keep-alive; a client pooling it could send its next request into a closing socket.
            # Here rather than an on_response_prepare signal, which costs every response ~1 µs
            # (profiled). Answers the handler prepared itself (streams) are marked where they start.
            response.force_close()
        return response

    return wrapper


def metrics_handler(min_interval: float = 0.0) -> Handler:
    """Prometheus text exposition (collecting runs every observable instrument's callback), rendered at most
    once per `min_interval`, later scrapes within it answered the same bytes. A render holds the event loop
    for milliseconds, and bind's port is the clients' (in sidecar mode, whatever the ingress sends): eight
    connections asking for it in a loop cut definitions answers 27x. Prometheus scrapes seconds apart, so it
    always gets a fresh one. The per-worker ports render every scrape (0)."""
    rendered: tuple[float, bytes] | None = None

    async def handler(request: web.Request) -> web.Response:
        nonlocal rendered
        registry = request.app[keys.TELEMETRY].registry
        if registry is None:
            raise web.HTTPNotFound
        now = monotonic()
        if rendered is None or now - rendered[0] >= min_interval:
            rendered = (now, generate_latest(registry))
        return web.Response(body=rendered[1], headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    return handler


async def expect_continue(request: web.Request) -> None:
    """aiohttp's expect handler without its 417 for an expectation other than 100-continue, which gunicorn
    ignores (and answers the request): so does the proxy, on every route (Expect is never forwarded). A body
    declared over client_limits.max_body_bytes is not invited: its 413 comes without the upload."""
    if request.version == HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        length = request.content_length
        if length is not None and length > request.app[keys.SETTINGS].client_limits.max_body_bytes:
            return
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body has not begun


def add_routes(app: web.Application) -> None:
    """The metrics path, in every service mode and never forwarded, when metrics are enabled."""
    config = app[keys.SETTINGS].telemetry
    if config.metrics_enabled:
        route = observed(app, HEALTH, metrics_handler(config.metrics_min_interval_seconds))
        app.router.add_get(config.metrics_path, route, allow_head=False, expect_handler=expect_continue)
        refuse = observed(app, HEALTH, only("GET"))
        app.router.add_route("*", config.metrics_path, refuse, expect_handler=expect_continue)


async def telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    """Providers for the app's lifetime; first in, last out, so the final billing flush is still exported."""
    telemetry = app[keys.TELEMETRY]
    telemetry.start(app)
    yield
    await telemetry.shutdown()
