"""Telemetry against the real app: exact counts on /metrics, traceparent upstream, a safe access log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy import __version__, keys, tasks
from proxy.app import create_app
from proxy.logs import JsonFormatter
from proxy.payload_cache import DefinitionsCache
from tests.backend_writer import BackendWriter
from tests.conftest import MakeProxy, settings_for
from tests.rig import Upstream, free_port
from tests.test_server import _env, proxy_process, wait_ready

Client = TestClient[Any, Any]
Rig = tuple[Upstream, TestServer]

TOKEN = "phc_telemetry_token"
SECRET = "phs_telemetry_secret"
QUOTA_TOKEN = "phc_telemetry_quota"
LIMITED_TOKEN = "phc_telemetry_limited"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
# Credentials carrying this marker must never appear in any output.
MARKER = "SeCrEtMaRkEr"


def definitions(token: str) -> str:
    return f"/flags/definitions?token={token}"


def auth(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def backend(redis_url: str) -> BackendWriter:
    """Three teams: a normal one, one quota-limited, one allowed one request per minute."""
    writer = BackendWriter(redis_url)
    for team_id, token in ((1, TOKEN), (2, QUOTA_TOKEN), (3, LIMITED_TOKEN)):
        writer.set_team(token, {"id": team_id, "api_token": token, "secret_api_token": SECRET})
        writer.set_definitions(team_id, [{"id": 1, "key": "flag", "active": True}])
    redis.Redis.from_url(redis_url).zadd(
        "@posthog/quota-limits/feature_flag_requests", {QUOTA_TOKEN: time.time() + 3600}
    )
    return writer


async def proxy(make_proxy: MakeProxy, **overrides: Any) -> Client:
    overrides.setdefault("billing", {"flush_interval_seconds": 0.05})
    overrides.setdefault("quota", {"poll_interval_seconds": 0.05})
    overrides.setdefault("rate_limits", {"team_overrides": {"3": "1/minute"}})
    return await make_proxy(**overrides)


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def scrape(client: Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on /metrics, by name and label set."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_known_mix_gives_exact_counts_by_label(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: Rig
) -> None:
    client = await proxy(make_proxy)
    await until(lambda: client.app[keys.QUOTA].is_limited(QUOTA_TOKEN), "the quota snapshot")
    etag = (await client.get(definitions(TOKEN), headers=auth())).headers["ETag"]  # 200, cache miss
    for _ in range(2):
        assert (await client.get(definitions(TOKEN), headers=auth())).status == 200
    stale = await client.get(definitions(TOKEN), headers={**auth(), "If-None-Match": 'W/"old"'})
    assert stale.status == 200
    for _ in range(2):
        assert (await client.get(definitions(TOKEN), headers={**auth(), "If-None-Match": etag})).status == 304
    assert (await client.get(definitions(TOKEN))).status == 401
    assert (await client.get(definitions(QUOTA_TOKEN), headers=auth())).status == 402
    assert (await client.get(definitions(LIMITED_TOKEN), headers=auth())).status == 200  # cache miss
    assert (await client.get(definitions(LIMITED_TOKEN), headers=auth())).status == 429
    assert (await client.get(definitions("phc_unknown"), headers=auth())).status == 200  # forwarded
    assert (await client.get("/api/unknown?token=x")).status == 200  # forwarded
    assert len(upstream[0].seen) == 2
    await until(lambda: client.app[keys.BILLING].flushed_requests == 5, "the billing flush")

    samples = await scrape(client)

    outcomes = {"served": 5, "not_modified": 2, "auth_denied": 1, "quota_limited": 1, "rate_limited": 1}
    for outcome, n in {**outcomes, "forwarded": 1}.items():
        assert value(samples, "edge_proxy_definitions_requests_total", outcome=outcome) == n, outcome
    assert sum(v for (name, _), v in samples.items() if name == "edge_proxy_definitions_requests_total") == 11
    assert value(samples, "edge_proxy_definitions_etag_total", result="hit") == 2
    assert value(samples, "edge_proxy_definitions_etag_total", result="miss") == 1
    assert value(samples, "edge_proxy_definitions_etag_total", result="none") == 4
    assert value(samples, "edge_proxy_definitions_auth_denied_total", kind="missing") == 1
    assert value(samples, "edge_proxy_definitions_auth_denied_total", kind="personal_api_key") == 0
    assert value(samples, "edge_proxy_definitions_cache_lookups_total", result="hit") == 5
    assert value(samples, "edge_proxy_definitions_cache_lookups_total", result="miss") == 2
    assert value(samples, "edge_proxy_definitions_cache_entries") == 2
    assert (
        value(samples, "edge_proxy_definitions_cache_size_bytes")
        == client.app[keys.DEFINITIONS].cache.bytes_held
    )
    assert 0 <= value(samples, "edge_proxy_definitions_cache_staleness_seconds") < 5
    assert value(samples, "edge_proxy_ratelimit_limited_total") == 1
    assert value(samples, "edge_proxy_billing_flushed_requests_total") == 5
    assert value(samples, "edge_proxy_requests_in_flight") == 1  # this scrape
    # Every kind from the start, at 0 (an alert on increase() sees the first failure of each).
    kinds = {"refused", "timeout", "pool_timeout", "pool_full", "disconnected", "malformed", "5xx"}
    for kind in kinds:
        assert value(samples, "edge_proxy_upstream_errors_total", kind=kind) == 0
    errors = {key for key in samples if key[0] == "edge_proxy_upstream_errors_total"}
    assert len(errors) == len(kinds)
    assert value(samples, "edge_proxy_background_errors_total", task="billing-flusher") == 0

    def count(route: str, status: str, answered_by: str) -> float:
        labels = {"route": route, "method": "GET", "status_code": status, "answered_by": answered_by}
        return value(samples, "edge_proxy_request_duration_seconds_count", **labels)

    assert count("definitions", "200", "local") == 5
    assert count("definitions", "304", "local") == 2
    assert count("definitions", "401", "local") == 1
    assert count("definitions", "402", "local") == 1
    assert count("definitions", "429", "local") == 1
    assert count("definitions", "200", "upstream") == 1
    assert count("forward", "200", "upstream") == 1
    bucket = {"route": "definitions", "method": "GET", "status_code": "304", "answered_by": "local"}
    assert value(samples, "edge_proxy_request_duration_seconds_bucket", **bucket, le="+Inf") == 2
    assert value(samples, "edge_proxy_request_duration_seconds_bucket", **bucket, le="60.0") == 2  # past 30 s
    assert value(samples, "edge_proxy_redis_command_duration_seconds_count", command="GET") >= 4
    # No label holds a token, a team id or a path.
    assert not [key for key in samples if any(TOKEN in v or "/flags" in v or v == "1" for _, v in key[1])]

    # The scrape itself is counted afterwards, in the health group, and /metrics never went upstream.
    again = await scrape(client)
    assert value(again, "edge_proxy_request_duration_seconds_count", route="health", method="GET",
                 status_code="200", answered_by="local") == 1  # fmt: skip
    assert len(upstream[0].seen) == 2


README = Path(__file__).resolve().parent.parent / "README.md"


async def test_the_readme_lists_every_metric_exported(make_proxy: MakeProxy, upstream: Rig) -> None:
    """The README's metric table against a live scrape: nothing exported goes undocumented (a reviewer found
    ten), nothing documented is missing. Three appear with their first event: a definitions request (sent),
    a Redis error and a shadow comparison (not provoked here)."""
    readme = README.read_text()
    table = readme[readme.index("- **Every metric**") : readme.index("- **Traces**")]
    documented = set(re.findall(r"`((?:edge_proxy|target)_[a-z_]+)`", table))
    client = await make_proxy()
    async with client.get("/flags/definitions?token=phc_unknown") as response:
        await response.read()
    body = await (await client.get("/metrics")).text()
    exported = {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}
    exported = {re.sub(r"_(bucket|count|sum|created)$", "", name) for name in exported}
    assert exported <= documented, exported - documented
    lazy = {"edge_proxy_redis_command_errors_total", "edge_proxy_shadow_comparisons_total"}
    assert documented - exported == lazy


async def test_a_scripts_first_call_is_not_a_redis_error(
    make_proxy: MakeProxy, backend: BackendWriter, redis_url: str
) -> None:
    """redis-py answers NOSCRIPT by loading the script and calling again, as designed: counted as an error,
    it made an alert on the counter fire at every deploy and every Redis restart."""
    with redis.Redis.from_url(redis_url) as raw:
        raw.script_flush()
    client = await proxy(make_proxy)
    assert (await client.get(definitions(TOKEN), headers=auth())).status == 200
    await until(lambda: client.app[keys.BILLING].flushed_requests == 1, "the billing flush")
    samples = await scrape(client)
    assert value(samples, "edge_proxy_redis_command_duration_seconds_count", command="EVALSHA") >= 1
    assert [key for key in samples if key[0] == "edge_proxy_redis_command_errors_total"] == []


async def test_upstream_errors_by_kind(make_proxy: MakeProxy, upstream: Rig) -> None:
    async def failing(request: aiohttp.web.Request, body: bytes) -> aiohttp.web.StreamResponse:
        return aiohttp.web.Response(status=503)

    upstream[0].routes["/down"] = failing
    client = await make_proxy()
    assert (await client.get("/down")).status == 503
    refused = await make_proxy(upstream={"url": f"http://127.0.0.1:{free_port()}"})
    assert (await refused.get("/anything?token=x")).status == 502

    assert value(await scrape(client), "edge_proxy_upstream_errors_total", kind="5xx") == 1
    samples = await scrape(refused)
    assert value(samples, "edge_proxy_upstream_errors_total", kind="refused") == 1
    labels = {"route": "forward", "method": "GET", "status_code": "502", "answered_by": "upstream"}
    assert value(samples, "edge_proxy_request_duration_seconds_count", **labels) == 1


async def test_an_upstream_cannot_grow_the_status_labels(make_proxy: MakeProxy, upstream: Rig) -> None:
    """An upstream answering every code from 200 to 999 made a series each (times each method) up to the
    cap, past which every new series shared one and scrapes held the event loop a third of a second."""

    async def any_status(request: aiohttp.web.Request, body: bytes) -> aiohttp.web.StreamResponse:
        return aiohttp.web.Response(status=int(request.query["s"]))

    upstream[0].routes["/status"] = any_status
    client = await make_proxy()
    for status in (*range(200, 600, 7), 404, 299):  # 600 and above are malformed (502): RFC 9110 §15
        assert (await client.get(f"/status?s={status}")).status == status
    samples = await scrape(client)
    codes = {
        dict(labels)["status_code"]
        for name, labels in samples
        if name == "edge_proxy_request_duration_seconds_count" and dict(labels)["route"] == "forward"
    }
    # The codes of its own (200, 403, 404, 410, 417, 431, 501 among those sent) and the rest by class.
    assert codes == {"200", "403", "404", "410", "417", "431", "501"} | {f"{c}xx" for c in range(2, 6)}
    forward = {"route": "forward", "method": "GET", "answered_by": "upstream"}
    assert value(samples, "edge_proxy_request_duration_seconds_count", status_code="2xx", **forward) == 15


async def test_scrapes_on_the_clients_port_render_at_most_once_an_interval(
    make_proxy: MakeProxy, upstream: Rig
) -> None:
    """A render holds the event loop; on the clients' port anyone may ask in a loop (the reviewer's eight
    connections doing so cut definitions answers 27x). Within the interval the same text comes back."""
    client = await make_proxy(telemetry={"metrics_min_interval_seconds": 30})
    first = await scrape(client)
    assert (await client.get("/anything")).status == 200  # forwarded: counted...
    labels = {"route": "forward", "method": "GET", "status_code": "200", "answered_by": "upstream"}
    assert await scrape(client) == first  # ...but not shown before the interval is out
    assert value(first, "edge_proxy_request_duration_seconds_count", **labels) == 0
    fresh = await make_proxy(telemetry={"metrics_min_interval_seconds": 0})
    assert (await fresh.get("/anything")).status == 200
    assert value(await scrape(fresh), "edge_proxy_request_duration_seconds_count", **labels) == 1


async def test_metrics_path_is_answered_in_every_mode_and_never_forwarded(
    make_proxy: MakeProxy, upstream: Rig
) -> None:
    for mode in ("all", "definitions", "flags"):
        client = await make_proxy(service_mode=mode)
        assert (await client.get("/metrics")).status == 200
    # Whatever the method, the health paths too (found by a reviewer: they went to the upstream).
    for method, path, allow in (
        ("POST", "/metrics", "GET"),
        ("HEAD", "/metrics", "GET"),
        ("DELETE", "/_readiness", "GET, HEAD"),
        ("POST", "/_liveness", "GET, HEAD"),
        ("PUT", "/_startup", "GET, HEAD"),
    ):
        async with client.request(method, path) as response:
            assert (response.status, response.headers["Allow"]) == (405, allow), (method, path)
            if method != "HEAD":
                assert (await response.json())["code"] == "method_not_allowed"
    assert upstream[0].seen == []
    disabled = await make_proxy(telemetry={"metrics_enabled": False})
    assert (await disabled.get("/metrics")).status == 200  # not reserved: the upstream's answer
    assert [seen.path_qs for seen in upstream[0].seen] == ["/metrics"]


async def test_traceparent_reaches_the_upstream_with_the_proxys_span_as_parent(
    make_proxy: MakeProxy, upstream: Rig
) -> None:
    client = await make_proxy(telemetry={"trace_sampling_ratio": 1.0})
    exporter = InMemorySpanExporter()
    provider = client.app[keys.TELEMETRY].tracer_provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    assert (await client.get("/api/projects?token=x", headers={"traceparent": TRACEPARENT})).status == 200

    version, trace_id, parent_id, flags = upstream[0].seen[0].headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    spans: dict[SpanKind, ReadableSpan] = {span.kind: span for span in exporter.get_finished_spans()}
    server, outgoing = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.parent is not None
    assert format_span_id(server.parent.span_id) == CLIENT_SPAN_ID
    assert outgoing.parent is not None
    assert outgoing.parent.span_id == server.context.span_id
    assert parent_id == format_span_id(outgoing.context.span_id)
    assert format_trace_id(server.context.trace_id) == TRACE_ID
    assert dict(server.attributes or {})["url.path"] == "/api/projects"


@pytest.mark.parametrize("flag", ["01", "00"], ids=["client-sampled", "client-unsampled"])
@pytest.mark.parametrize("ratio", [1e-9, 1.0])
async def test_a_clients_traceparent_cannot_choose_whether_its_request_is_sampled(
    make_proxy: MakeProxy, upstream: Rig, ratio: float, flag: str
) -> None:
    """The client's sampled flag was followed, and the ratio read the client's trace id: any client could
    have every request traced (about twice the cost of each, one more span exported), here with flag 01 and a
    trace id under any ratio's bound; and flag 00 kept every request untraced. Whether it is sampled is drawn
    here; the trace stays the client's."""
    client = await make_proxy(telemetry={"trace_sampling_ratio": ratio})
    exporter = InMemorySpanExporter()
    provider = client.app[keys.TELEMETRY].tracer_provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    forcing = f"00-{1:032x}-{CLIENT_SPAN_ID}-{flag}"
    for _ in range(20):
        assert (await client.get("/api/projects", headers={"traceparent": forcing})).status == 200

    sampled = ratio == 1.0
    servers = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert len(servers) == (20 if sampled else 0)
    for seen in upstream[0].seen:
        version, trace_id, parent_id, flags = seen.headers["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", f"{1:032x}", "01" if sampled else "00")
        assert parent_id != CLIENT_SPAN_ID  # the proxy's span in between, sampled or not
    assert len(upstream[0].seen) == 20


async def test_a_token_in_the_path_is_masked_in_the_span(make_proxy: MakeProxy, upstream: Rig) -> None:
    client = await make_proxy(telemetry={"trace_sampling_ratio": 1.0})
    exporter = InMemorySpanExporter()
    provider = client.app[keys.TELEMETRY].tracer_provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    assert (await client.get("/api/projects/phc_token_in_the_path/x")).status == 200

    assert upstream[0].seen[0].path_qs == "/api/projects/phc_token_in_the_path/x"  # forwarded as sent
    (server,) = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert dict(server.attributes or {})["url.path"] == "/api/projects/ph*_***/x"


async def test_without_tracing_the_clients_traceparent_passes_unchanged(
    make_proxy: MakeProxy, upstream: Rig
) -> None:
    client = await make_proxy()
    assert client.app[keys.TELEMETRY].tracer is None
    await client.get("/api/projects", headers={"traceparent": TRACEPARENT, "tracestate": "a=1"})
    seen = upstream[0].seen[0].headers
    assert (seen["traceparent"], seen["tracestate"]) == (TRACEPARENT, "a=1")


async def test_redis_calls_of_a_traced_request_are_child_spans(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    client = await proxy(make_proxy, telemetry={"trace_sampling_ratio": 1.0})
    exporter = InMemorySpanExporter()
    provider = client.app[keys.TELEMETRY].tracer_provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert (await client.get(definitions(TOKEN), headers=auth())).status == 200
    spans = exporter.get_finished_spans()
    server = next(span for span in spans if span.kind == SpanKind.SERVER)
    redis_spans = [span for span in spans if span.name.startswith("redis ")]
    assert redis_spans  # the team record and the payload were read from Redis
    assert all(
        span.parent is not None and span.parent.span_id == server.context.span_id for span in redis_spans
    )


async def test_access_log_lines_are_json_with_the_fields_and_no_secret(
    aiohttp_client: AiohttpClient,
    upstream: Rig,
    redis_url: str,
    backend: BackendWriter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(
        str(upstream[1].make_url("/")),
        redis_url,
        logging={"access_log": True},
        telemetry={"metrics_enabled": False},
    )
    # The runner as server.serve builds it: aiohttp's own access log (query strings and all) is off.
    client = await aiohttp_client(create_app(settings), server_kwargs={"access_log": None})
    caplog.set_level(logging.DEBUG)
    token = f"phc_{MARKER}"
    await client.get(definitions(TOKEN), headers={**auth(f"phx_{MARKER}"), "traceparent": TRACEPARENT})
    await client.get(definitions(token), headers=auth(f"phs_{MARKER}"))
    await client.get(f"/array/{token}/config?api_key={MARKER}", headers={"Cookie": MARKER})
    await client.get(f"/shared/{MARKER}0a1B2c3D4e")  # a share link: its token (22 characters) is the path

    records = [r for r in caplog.records if r.name == "proxy.access"]
    assert len(records) == 4
    lines = [json.loads(JsonFormatter().format(record)) for record in records]
    assert (lines[0]["route"], lines[0]["path"]) == ("definitions", "/flags/definitions")
    assert lines[0]["trace_id"] == TRACE_ID
    assert [line["answered_by"] for line in lines] == ["upstream"] * 4
    assert (lines[2]["route"], lines[2]["path"]) == ("forward", "/array/ph*_***/config")
    assert (lines[3]["route"], lines[3]["path"]) == ("forward", "/shared/***")
    for line in lines:
        assert {"method", "path", "route", "status", "answered_by", "duration_ms", "trace_id", "msg"} <= set(
            line
        )
        assert (line["method"], line["status"]) == ("GET", 200)
        assert line["duration_ms"] > 0
    # aiohttp.access records are the stand-in upstream's own log (its runner keeps aiohttp's default).
    ours = [r for r in caplog.records if r.name != "aiohttp.access"]
    assert not [r.getMessage() for r in ours if MARKER in r.getMessage() or MARKER in str(r.__dict__)]


async def test_the_served_process_never_logs_a_credential(
    tmp_path: Path, upstream: Rig, redis_url: str, backend: BackendWriter
) -> None:
    port = free_port()
    env = _env(port, upstream[1], redis_url, LOG_FORMAT="json", EDGE_PROXY__LOGGING__ACCESS_LOG="true")
    with proxy_process(tmp_path, {**env, "LOG_LEVEL": "DEBUG"}) as (process, log_path):
        await wait_ready(port, process, log_path)
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            for url, secret in (
                (definitions(TOKEN), f"phx_{MARKER}"),
                (definitions(f"phc_{MARKER}"), SECRET),
            ):
                async with session.get(base + url, headers=auth(secret)) as response:
                    await response.read()
        await until(lambda: log_path.read_text().count('"logger": "proxy.access"') >= 2, "the access log")
    output = log_path.read_text()
    assert MARKER not in output
    access = [json.loads(line) for line in output.splitlines() if '"proxy.access"' in line]
    assert {line["route"] for line in access} >= {"definitions", "health"}


async def test_otlp_export_carries_the_request_histogram(
    make_proxy: MakeProxy, aiohttp_server: AiohttpServer
) -> None:
    exports: list[ExportMetricsServiceRequest] = []

    async def collect(request: aiohttp.web.Request) -> aiohttp.web.Response:
        exports.append(ExportMetricsServiceRequest.FromString(await request.read()))
        return aiohttp.web.Response()

    collector = aiohttp.web.Application()
    collector.router.add_post("/v1/metrics", collect)
    server = await aiohttp_server(collector)
    client = await make_proxy(
        telemetry={"otlp_endpoint": str(server.make_url("/")), "otlp_export_interval_seconds": 0.05}
    )
    assert (await client.get("/_liveness")).status == 200

    def points() -> dict[str, int]:
        found = {}
        for export in exports:
            for scope in export.resource_metrics[0].scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "edge_proxy.request.duration":
                        points = metric.histogram.data_points
                        found = {p.attributes[0].value.string_value: p.count for p in points}
        return found

    await until(lambda: points().get("health") == 1, "an OTLP export with the request histogram")
    statuses = {
        attribute.value.WhichOneof("value") + ":" + attribute.value.string_value
        for export in exports
        for scope in export.resource_metrics[0].scope_metrics
        for metric in scope.metrics
        if metric.name == "edge_proxy.request.duration"
        for point in metric.histogram.data_points
        for attribute in point.attributes
        if attribute.key == "status_code"
    }
    assert statuses == {"string_value:200"}  # a string, as a class ("5xx") is: one type per attribute
    resource = {a.key: a.value.string_value for a in exports[-1].resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "edge-proxy"
    # Each process its own series (a worker of --workers N is a process): a UUID per process.
    assert uuid.UUID(resource["service.instance.id"]).version == 4
    names = {m.name for e in exports for s in e.resource_metrics[0].scope_metrics for m in s.metrics}
    assert {
        "edge_proxy.definitions.etag",
        "edge_proxy.redis.up",
        "edge_proxy.redis.command.duration",
    } <= names
    await client.close()  # before the collector: the last export happens at shutdown


async def test_shutdown_with_a_collector_that_never_answers_fits_the_charts_margin(
    make_proxy: MakeProxy,
) -> None:
    """The last OTLP exports (metrics and spans) come after the drain and the final billing flush, inside the
    5 s the chart's shutdown arithmetic leaves: a collector that accepts and never answers must not hold
    the process past the grace period."""
    silent_connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)  # read nothing, answer nothing

    collector = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = collector.sockets[0].getsockname()[1]
    try:
        client = await make_proxy(
            telemetry={"otlp_endpoint": f"http://127.0.0.1:{port}", "trace_sampling_ratio": 1.0}
        )
        for _ in range(600):  # more spans than one export batch (512)
            assert (await client.get("/api/anything")).status == 200
        started = time.monotonic()
        await client.close()
        took = time.monotonic() - started
        assert silent_connections, "no export was attempted"
        assert took < 5.0, f"shutdown took {took:.1f} s with a silent collector"
    finally:
        for writer in silent_connections:
            writer.close()
        collector.close()


async def test_an_unexpected_error_in_a_background_loop_is_counted_by_task(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    refresh = DefinitionsCache.refresh
    failures = 0

    async def failing_twice(self: DefinitionsCache) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise ValueError("an input nobody expected")
        await refresh(self)

    monkeypatch.setattr(DefinitionsCache, "refresh", failing_twice)
    before = tasks.errors["definitions-refresher"]
    client = await make_proxy(definitions={"refresh_interval_seconds": 0.01})

    await until(lambda: tasks.errors["definitions-refresher"] == before + 2, "both failures counted")
    samples = await scrape(client)
    assert value(samples, "edge_proxy_background_errors_total", task="definitions-refresher") == before + 2


async def test_each_process_says_which_release_it_runs(make_proxy: MakeProxy) -> None:
    """target_info carries the version: a fleet halfway through a rollout shows which replica runs which
    release (found by a reviewer of rolling upgrades: nothing told them apart)."""
    samples = await scrape(await make_proxy())
    infos = [dict(labels) for name, labels in samples if name == "target_info"]
    assert len(infos) == 1
    assert infos[0]["service_version"] == __version__
    assert infos[0]["service_name"] == "edge-proxy"
