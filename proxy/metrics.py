"""The OpenTelemetry metrics pipeline: Prometheus (and OTLP) readers; instruments read at collection time.

Nothing here runs per request. Counts live in plain ints where they happen (the request wrapper, the
forwarder, the cache, billing, rate limits, shadow) and observable instruments read them when a reader
collects: a per-request SDK `counter.add` costs ~5 µs (measured), an int increment ~0.03 µs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from proxy import keys, tasks
from proxy.histogram import InMemoryHistogram, PrometheusReader, WithHistograms
from proxy.settings import TelemetrySettings

# Per OTLP export, retries included. The last exports at shutdown (metrics and spans, side by side) must fit
# the chart's 5 s margin after the drain and the final billing flush, with a collector that never answers.
EXPORT_TIMEOUT_SECONDS = 2.0

if TYPE_CHECKING:
    from proxy.billing import BillingTally
    from proxy.definitions import DefinitionsService
    from proxy.payload_cache import DefinitionsCache
    from proxy.ratelimit import RateLimiter
    from proxy.telemetry import Telemetry
    from proxy.upstream import Pool


# Definitions answers by (method, status) when answered locally; anything forwarded is "forwarded".
_OUTCOMES: dict[tuple[str | int, str | int], str] = {
    ("GET", "200"): "served",
    ("GET", "304"): "not_modified",
    ("GET", "400"): "bad_request",
    ("GET", "401"): "auth_denied",
    ("GET", "403"): "auth_denied",
    ("GET", "402"): "quota_limited",
    ("GET", "429"): "rate_limited",
    ("GET", "500"): "error",
}


def meter_provider(
    app: web.Application, telemetry: Telemetry, settings: TelemetrySettings, resource: Resource
) -> tuple[MeterProvider, CollectorRegistry]:
    """A provider with a Prometheus reader on its own registry (and OTLP when configured), instruments set."""
    histograms = (telemetry.requests, telemetry.redis.latency)
    registry = CollectorRegistry(auto_describe=False)
    readers: list[MetricReader] = [PrometheusReader(histograms, resource, registry)]
    if settings.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = f"{str(settings.otlp_endpoint).rstrip('/')}/v1/metrics"
        otlp = OTLPMetricExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_SECONDS)
        exporter = WithHistograms(otlp, histograms, resource)
        interval_ms = settings.otlp_export_interval_seconds * 1000
        readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms))
    provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
    _instruments(provider, app, telemetry)
    return provider, registry


Points = list[tuple[float, Mapping[str, Any]]]
Read = Callable[[], Points]
T = TypeVar("T")


def _callback(read: Read) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(attributes)) for value, attributes in read()]

    return callback


def _value(get: Callable[[], T | None], value: Callable[[T], float]) -> Read:
    """One unlabelled point read from a component; none while that component has not started."""

    def read() -> Points:
        component = get()
        return [] if component is None else [(value(component), {})]

    return read


def _labelled(get: Callable[[], T | None], label: str, counts: Callable[[T], Mapping[str, int]]) -> Read:
    """A point per key of a component's counts."""

    def read() -> Points:
        component = get()
        # list() first: an OTLP export thread may read while the event loop adds a key.
        return [] if component is None else [(n, {label: k}) for k, n in list(counts(component).items())]

    return read


def _instruments(provider: MeterProvider, app: web.Application, telemetry: Telemetry) -> None:
    meter = provider.get_meter("proxy")

    def counter(name: str, description: str, read: Read, unit: str = "") -> None:
        meter.create_observable_counter(name, [_callback(read)], unit, description)

    def gauge(name: str, description: str, read: Read, unit: str = "") -> None:
        meter.create_observable_gauge(name, [_callback(read)], unit, description)

    # Components appear as their cleanup contexts start; a scrape during startup reports what exists.
    def cache() -> DefinitionsCache | None:
        definitions = app.get(keys.DEFINITIONS)
        return None if definitions is None else definitions.cache

    def definitions() -> DefinitionsService | None:
        return app.get(keys.DEFINITIONS)

    def billing() -> BillingTally | None:
        return app.get(keys.BILLING)

    def limiter() -> RateLimiter | None:
        return app.get(keys.RATE_LIMITS)

    def itself() -> Telemetry:
        return telemetry

    def pool() -> Pool | None:
        forwarder = app.get(keys.FORWARDER)
        return None if forwarder is None else forwarder.pool

    gauge("edge_proxy.requests.in_flight", "Requests being handled", _value(itself, lambda t: t.in_flight))
    clients = app[keys.CONNECTIONS]
    gauge("edge_proxy.client.connections", "Client connections open", lambda: [(clients.open, {})])
    gauge(
        "edge_proxy.client.connections_limit",
        "Client connections admitted at once (client_limits.max_connections, or derived from RLIMIT_NOFILE)",
        lambda: [(clients.limit, {})],
    )
    counter(
        "edge_proxy.client.connections_closed_idle",
        "Idle client connections closed to make room for a new one at the limit",
        lambda: [(clients.closed_idle, {})],
    )
    counter(
        "edge_proxy.client.connections_refused",
        "Client connections closed on arrival: at the limit, and no idle one to make room",
        lambda: [(clients.refused, {})],
    )
    counter(
        "edge_proxy.client.requests_malformed",
        "Requests answered 400 by the HTTP server before any handler: a head it could not parse",
        lambda: [(clients.malformed, {})],
    )
    counter(
        "edge_proxy.client.requests_head_too_large",
        "Requests answered 431 and their connection closed, unparsed: a head over 64 KiB in all",
        lambda: [(clients.heads.too_large, {})],
    )
    counter(
        "edge_proxy.client.connections_send_timeouts",
        "Client connections aborted: their client took none of an answer for send_timeout_seconds",
        lambda: [(clients.send_timeouts, {})],
    )
    counter(
        "edge_proxy.definitions.requests",
        "Definitions requests by outcome (forwarded: answered by the upstream)",
        _labelled(itself, "outcome", lambda t: _definitions_outcomes(t.requests)),
    )
    counter(
        "edge_proxy.definitions.etag",
        "Local definitions answers by ETag result: hit (304), miss (stale If-None-Match), none (no header)",
        _labelled(itself, "result", lambda t: t.etag),
    )
    counter(
        "edge_proxy.definitions.auth_denied",
        "Definitions requests refused locally (401/403) by credential kind",
        _labelled(itself, "kind", lambda t: t.auth_denied),
    )
    counter(
        "edge_proxy.definitions.cache.lookups",
        "Payload cache lookups in memory by result; a miss reads Redis",
        _labelled(cache, "result", lambda c: {"hit": c.hits, "miss": c.misses}),
    )
    gauge(
        "edge_proxy.definitions.cache.size", "Payload bytes held", _value(cache, lambda c: c.bytes_held), "By"
    )
    gauge("edge_proxy.definitions.cache.entries", "Teams held", _value(cache, len))
    gauge(
        "edge_proxy.definitions.cache.decoded_size",
        "Payload bytes held decoded, ready to send (the rest of cache.size is compressed copies)",
        _value(cache, lambda c: c.decoded_size),
        "By",
    )
    counter(
        "edge_proxy.definitions.cache.decompressions",
        "200s answered by decompressing a payload held compressed only (cache_decoded_budget_bytes)",
        _value(cache, lambda c: c.decompressions),
    )
    gauge(
        "edge_proxy.definitions.cache.staleness",
        "Age of the oldest ETag check among held teams (grows while Redis cannot be read)",
        _value(cache, lambda c: c.oldest_check_age()),
        "s",
    )
    counter(
        "edge_proxy.definitions.refresh.failures",
        "Cache refresh cycles that failed on Redis",
        _value(cache, lambda c: c.refresh_failures),
    )
    gauge(
        "edge_proxy.offload.weight_percent",
        "Share of clients answered locally, percent (0 while the kill switch is on)",
        _value(definitions, lambda d: 0.0 if d.offload.state.kill else d.offload.state.weight_percent),
    )
    counter(
        "edge_proxy.offload.control_restored",
        "Times the offload control hash vanished (Redis restarted empty, flushed) and was written back",
        _value(definitions, lambda d: d.offload.restored),
    )
    counter(
        "edge_proxy.shadow.comparisons",
        "Shadow comparisons by kind: match, match_json, or the kind of each mismatch",
        _labelled(definitions, "kind", lambda d: d.shadow.outcomes),
    )
    counter(
        "edge_proxy.upstream.errors",
        "Upstream failures by kind: refused, timeout, pool_timeout, pool_full, disconnected, malformed, 5xx",
        _labelled(lambda: app.get(keys.FORWARDER), "kind", lambda f: f.failures),
    )
    gauge(
        "edge_proxy.upstream.connections",
        "Open connections to the upstream by state: idle (pooled) or busy",
        _labelled(pool, "state", lambda p: p.connections()),
    )
    gauge(
        "edge_proxy.upstream.waiting",
        "Requests waiting for an upstream connection (the pool is at upstream.max_connections)",
        _value(pool, lambda p: p.waiting),
    )
    counter(
        "edge_proxy.upstream.connects", "Connections opened to the upstream", _value(pool, lambda p: p.opened)
    )
    counter(
        "edge_proxy.upstream.retries",
        "Requests sent again on a new connection after a reused one turned out closed",
        _value(pool, lambda p: p.retried),
    )
    counter(
        "edge_proxy.redis.command.errors",
        "Redis errors by command and error type",
        lambda: [(n, {"command": c, "error": e}) for (c, e), n in list(telemetry.redis.errors.items())],
    )
    gauge(
        "edge_proxy.redis.up",
        "1 while Redis answers the health PING",
        _value(itself, lambda _: int(app[keys.HEALTH].redis_ok)),
    )
    gauge(
        "edge_proxy.clock.offset",
        "This host's wall clock less Redis's, as last measured (quota expiry and billing buckets follow it)",
        lambda: [] if (o := app[keys.HEALTH].clock_offset_seconds) is None else [(-o, {})],
        "s",
    )
    counter("edge_proxy.billing.flushes", "Billing flushes written", _value(billing, lambda b: b.flushes))
    counter(
        "edge_proxy.billing.flushed_requests",
        "Billed requests written to Redis",
        _value(billing, lambda b: b.flushed_requests),
    )
    counter(
        "edge_proxy.billing.flush_failures",
        "Billing flushes that failed",
        _value(billing, lambda b: b.failed_flushes),
    )
    counter(
        "edge_proxy.billing.dropped_requests",
        "Billed requests dropped (too many batches pending)",
        _value(billing, lambda b: b.dropped_counts),
    )
    gauge(
        "edge_proxy.billing.unflushed_requests",
        "Billed requests not yet confirmed written (the next flush's size)",
        _value(billing, lambda b: b.unflushed_requests),
    )
    counter(
        "edge_proxy.ratelimit.fail_open",
        "Requests admitted unchecked while Redis was unreachable",
        _value(limiter, lambda r: r.fail_open),
    )
    counter("edge_proxy.ratelimit.limited", "Requests answered 429", _value(limiter, lambda r: r.limited))
    counter(
        "edge_proxy.background.errors",
        "Errors other than Redis's in background loops, by task (a loop that stops is started again)",
        _labelled(lambda: tasks, "task", lambda t: t.errors),
    )
    gauge(
        "edge_proxy.quota.limited_projects",
        "Projects in the quota-limited snapshot",
        _value(lambda: app.get(keys.QUOTA), len),
    )


def _definitions_outcomes(requests: InMemoryHistogram) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for key, n in requests.counts().items():
        if len(key) != 4 or key[0] != "definitions":
            continue  # another route, or the overflow series
        _route, method, status, answered_by = key
        outcome = "forwarded" if answered_by == "upstream" else _OUTCOMES.get((method, status), "other")
        outcomes[outcome] += n
    return outcomes
