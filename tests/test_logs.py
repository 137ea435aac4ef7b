"""Log configuration: a malformed request costs one quiet line, not an ERROR traceback, and a failing
dependency costs one line per kind of failure per interval, not one per request."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy import keys
from proxy.errors import BAD_GATEWAY
from proxy.logs import ClientErrorFilter, JsonFormatter, Throttled
from tests.conftest import MakeProxy
from tests.rig import free_port


async def test_malformed_requests_do_not_log_tracebacks(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy()
    server_logger = logging.getLogger("aiohttp.server")
    server_logger.addFilter(ClientErrorFilter())  # what logs.configure installs
    try:
        caplog.set_level(logging.INFO)
        assert client.server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
    finally:
        server_logger.filters.clear()
    assert status_line.split()[1] == b"400"
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.INFO]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_warning_is_written_once_per_interval_with_the_count_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    warn = Throttled(logging.getLogger("edge-test"), interval_seconds=10, clock=clock)
    caplog.set_level(logging.WARNING, logger="edge-test")

    for _ in range(500):
        warn.warning("upstream unreachable (%s) on %s", "refused", "/a")
        clock.now += 0.01
    warn.warning("team lookup failed: %s", "TimeoutError")  # another kind: not held back by the first
    clock.now = 1011.0
    warn.warning("upstream unreachable (%s) on %s", "refused", "/b")
    clock.now = 1030.0
    warn.warning("upstream unreachable (%s) on %s", "refused", "/c")

    assert [record.getMessage() for record in caplog.records] == [
        "upstream unreachable (refused) on /a",
        "team lookup failed: TimeoutError",
        "upstream unreachable (refused) on /b (499 more like it in the 11 s before)",
        "upstream unreachable (refused) on /c",
    ]
    assert getattr(caplog.records[2], "repeated", None) == 499
    assert json.loads(JsonFormatter().format(caplog.records[2]))["repeated"] == 499
    assert not hasattr(caplog.records[3], "repeated")


async def test_a_dead_upstream_fails_every_request_but_logs_once(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(upstream={"url": f"http://127.0.0.1:{free_port()}"})
    caplog.set_level(logging.WARNING, logger="proxy.forward")

    for _ in range(40):
        async with client.get("/api/anything") as response:
            assert response.status == 502
            assert await response.read() == BAD_GATEWAY

    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.forward"]
    assert lines == ["upstream unreachable or broken (refused: ConnectionRefusedError) on GET /api/anything"]
    assert client.app[keys.FORWARDER].failures["refused"] == 40


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/api/projects/phc_token_in_the_path/flags", "/api/projects/ph*_***/flags"),
        ("/api/x/ph%63_encoded_key/y", "/api/x/***/y"),  # the key, percent-encoded
        ("/shared/Xq3vT9kL2mNpQ8rS1tUvWxYz", "/shared/***"),  # a share link's token
        ("/embedded/EmbedTokenNoDigitsAtAll", "/embedded/***"),
        ("/signup/0b3f1c2e-9a8d-4f6e-b1c2-d3e4f5a6b7c8", "/signup/***"),  # an invite
        ("/reset/MTI/c5k2l9-8f3e0a9b1c2d3e4f5a6b", "/reset/MTI/***"),  # Django's password-reset link
        ("/reset/MTI/c5k2l9-8f3e0a9b1c2d3e4f%35a6b", "/reset/MTI/***"),
        ("/api/environments/2/feature_flags/local_evaluation",) * 2,
        # Any token-shaped run in a segment, not only a whole one (found by a reviewer): with a suffix, the
        # parts of a JWT, a signed value's signature. A hashed asset name goes too: masked errs safe.
        ("/shared/Xq3vT9kL2mNpQ8rS1tUvWxYz.png", "/shared/***.png"),
        ("/unsubscribe/eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyIjoxMjN9.c2lnbmF0dXJlc2ln", "/unsubscribe/***.***.***"),
        ("/verify/Y2xp:1tQxyz:AbCdEfGhIjKlMnOpQrStUv", "/verify/Y2xp:1tQxyz:***"),
        ("/embedded/Xq3vT9kL2mNpQ8rS1tUvWxYz;x", "/embedded/***;x"),
        ("/shared/Xq3vT9kL2mNpQ8rS1tUvWxYz%2F", "/shared/***"),
        ("/api/projects/phc_abc.Xq3vT9kL2mNpQ8rS1tUv/x", "/api/projects/ph*_***.***/x"),
        ("/static/chunk-3F4A5B6C7D8E9F.js", "/static/***.js"),
        ("/api/feature_flags/local_evaluation.json", "/api/feature_flags/local_evaluation.json"),
        ("/api/projects/12345/insights/987/", "/api/projects/12345/insights/987/"),
        ("/a%0Ab", "/a%0Ab"),  # still as received: an encoded newline cannot forge a line
    ],
)
def test_secrets_in_the_path_are_masked_before_any_log_sees_them(path: str, logged: str) -> None:
    from proxy.access_log import masked

    assert masked(path) == logged


async def test_an_upstream_failure_log_masks_a_token_in_the_path(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(upstream={"url": f"http://127.0.0.1:{free_port()}"})
    caplog.set_level(logging.DEBUG, logger="proxy.forward")
    async with client.get("/api/projects/phc_token_in_the_path/flags?token=phc_in_the_query") as response:
        assert response.status == 502
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.forward"]
    assert lines == [
        "upstream unreachable or broken (refused: ConnectionRefusedError) on GET /api/projects/ph*_***/flags"
    ]


def test_a_malformed_otlp_headers_entry_is_logged_without_its_credential(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`Authorization: Bearer <key>` (a colon, as in HTTP) was logged whole by the OpenTelemetry SDK."""
    from opentelemetry.util.re import parse_env_headers

    from proxy.logs import configure
    from proxy.settings import LoggingSettings

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure(LoggingSettings())
        assert parse_env_headers("Authorization: Bearer OTLPSECRETMARK", liberal=True) == {}
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    logged = capsys.readouterr().err
    assert "an entry of OTEL_EXPORTER_OTLP_*HEADERS is not comma-separated name=value pairs" in logged
    assert "OTLPSECRETMARK" not in logged
