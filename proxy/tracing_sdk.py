"""The OpenTelemetry trace SDK's side of tracing: the tracer provider and its sampler.

Imported by telemetry.py only when `trace_sampling_ratio` > 0 (the SDK is 0.4 MiB of every process that
imports it); the request path's spans and propagation are in proxy/tracing.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes

from proxy.metrics import EXPORT_TIMEOUT_SECONDS
from proxy.settings import TelemetrySettings


class DrawnRatio(TraceIdRatioBased):
    """The sampling ratio for a request that came with its client's `traceparent`, drawn here.

    OpenTelemetry's default follows a client's sampled flag, and its ratio sampler decides on the trace id:
    either way the client chose (flag 01, or a trace id below the ratio's bound), so any client could have
    every request it sends traced, each at about twice its cost and one more span to export. The trace is
    still the client's (the proxy's span is its child and the upstream's parent); only whether it is
    sampled here is this process's draw.
    """

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        drawn = random.getrandbits(64)
        return super().should_sample(parent_context, drawn, name, kind, attributes, links, trace_state)


def tracer_provider(settings: TelemetrySettings, resource: Resource) -> TracerProvider:
    """A provider sampling `trace_sampling_ratio` of requests; a client's `traceparent` cannot force it."""
    ratio = settings.trace_sampling_ratio
    drawn = DrawnRatio(ratio)
    provider = TracerProvider(
        resource=resource,
        sampler=ParentBased(
            TraceIdRatioBased(ratio), remote_parent_sampled=drawn, remote_parent_not_sampled=drawn
        ),
        shutdown_on_exit=False,
    )
    if settings.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = f"{str(settings.otlp_endpoint).rstrip('/')}/v1/traces"
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_SECONDS)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
