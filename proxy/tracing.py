"""Traces: a server span per sampled request, child spans for Redis and the upstream, W3C propagation.

Off (sampling ratio 0, the default) no tracer exists and the request path only tests `tracer is None`; the
client's own `traceparent` still reaches the upstream untouched, as every end-to-end header does. The
tracer provider and its sampler are in proxy/tracing_sdk.py, imported only when tracing is on: the
OpenTelemetry trace SDK is 0.4 MiB of every process otherwise (bench/README.md "Where a process's memory
goes").
"""

from __future__ import annotations

import re

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.access_log import safe_path

# An instance, not the global propagator: nothing here touches OpenTelemetry's process-wide state.
PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def server_span(tracer: trace.Tracer, request: web.Request, route: str) -> trace.Span:
    """The request's span, child of the client's `traceparent` when it sent one."""
    return tracer.start_span(
        f"{request.method} {route}",
        context=PROPAGATOR.extract(request.headers),
        kind=SpanKind.SERVER,
        # Without the query string (request.raw_path has it): query parameters carry project tokens; and
        # key-shaped path segments masked, as in the access log.
        attributes={
            "http.request.method": request.method,
            "http.route": route,
            "url.path": safe_path(request),
        },
    )


def trace_id(span: trace.Span | None, request: web.Request) -> str | None:
    """The trace id for the access log: the span's, else the one in the client's `traceparent`."""
    if span is not None:
        context = span.get_span_context()
        return trace.format_trace_id(context.trace_id) if context.is_valid else None
    traceparent = request.headers.get("traceparent")
    if traceparent is None:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    return match.group(1) if match is not None else None


def child_span(tracer: trace.Tracer | None, name: str, attributes: dict[str, str]) -> trace.Span | None:
    """A client span under the current request's span, only when that span is being recorded."""
    if tracer is None or not trace.get_current_span().is_recording():
        return None
    return tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)


def upstream_span(tracer: trace.Tracer, method: str, host: str, headers: list[tuple[str, str]]) -> trace.Span:
    """A client span for one upstream request, its `traceparent` (and `tracestate`) replacing the client's
    in `headers`: the upstream's parent is this span, in the same trace. Unsampled requests get a span id
    too, flagged not sampled."""
    span = tracer.start_span(
        f"{method} upstream",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "server.address": host},
    )
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    headers[:] = [(k, v) for k, v in headers if k.lower() not in PROPAGATOR.fields]
    headers.extend(carrier.items())
    return span


def end_upstream_span(span: trace.Span | None, status: int | None, error: BaseException | None) -> None:
    """End the upstream span with the answer's status, or the failure's type (never its message: it could
    carry the upstream URL, query tokens included)."""
    if span is None:
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    elif status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
    span.end()
