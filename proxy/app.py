"""The application factory: the table of contents of edge-proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy import client_cap, connections, definitions, forward, health, keys, telemetry
from proxy.billing import billing_ctx
from proxy.quota import quota_ctx
from proxy.ratelimit import ratelimit_ctx
from proxy.redis_client import redis_ctx
from proxy.settings import Settings


async def _started_ctx(app: web.Application) -> AsyncIterator[None]:
    # Last in the list: startup (and readiness) turn green only when every resource above is open.
    app[keys.HEALTH].started = True
    yield
    app[keys.HEALTH].started = False


def create_app(settings: Settings) -> web.Application:
    """Build the app for `settings`; every resource opens and closes in a cleanup context listed here."""
    app = web.Application(
        # No middleware: each one costs every request; route handlers are wrapped by telemetry.observed.
        # Forwarded bodies are streamed and never read through this limit; it only bounds local reads.
        client_max_size=1024**2,
        handler_args={
            # Stated rather than left to aiohttp, whose defaults moved between releases (8190 bytes a field;
            # 32,768 headers before 3.13.4): the forwarder holds answers to the same limits, so a header that
            # came in can also come back.
            "max_field_size": forward.MAX_HEADER_BYTES,
            "max_line_size": forward.MAX_HEADER_BYTES,
            "max_headers": forward.MAX_HEADERS,
            # aiohttp's default (3630 s) would let a silent or slowloris connection hold a socket for an hour.
            "keepalive_timeout": settings.client_limits.keepalive_timeout_seconds,
            # Request bodies as sent: a forwarded gzip batch (posthog-node's every capture) went on decoded
            # under its Content-Encoding and Content-Length, lost at the backend or, past its length, read
            # there as a next request (tests/test_forward.py). No local route reads a body.
            "auto_decompress": False,
        },
    )
    app[keys.SETTINGS] = settings
    app[keys.HEALTH] = health.Health()
    # Plain counters only; the OpenTelemetry providers open in telemetry_ctx.
    app[keys.TELEMETRY] = telemetry.Telemetry(settings)
    # Admits clients on the serving socket (server.serve); the cap leaves descriptors for the pools below.
    app[keys.CONNECTIONS] = connections.ClientConnections(
        client_cap.client_cap(settings), settings.client_limits.send_timeout_seconds
    )

    app.cleanup_ctx.extend(
        [
            # First in, last out: spans and metrics exist for everything below, and the final export
            # (OTLP) happens after billing's final flush.
            telemetry.telemetry_ctx,
            redis_ctx,  # Redis pool (lazy connections)
            health.redis_monitor_ctx,  # readiness follows Redis
            forward.upstream_ctx,  # one connection pool to the upstream (proxy/upstream.py)
            quota_ctx,  # quota-limited tokens, polled into a memory snapshot
            ratelimit_ctx,  # per-team rate limits; fast mode reconciles with Redis in the background
            billing_ctx,  # billing tally; its cleanup flushes after the last in-flight request
            definitions.definitions_ctx,  # team store, payload cache and its refresher
            _started_ctx,
        ]
    )

    if not settings.health_port_only:  # else on health_port alone (server.py), forwarded here
        health.add_routes(app)
        telemetry.add_routes(app)  # /metrics: answered in every mode, never forwarded
    definitions.add_routes(app)
    forward.add_routes(app)  # last: the catch-all
    return app
