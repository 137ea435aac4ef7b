"""Health endpoints: never forwarded, readiness follows Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestServer

from proxy import health
from tests.conftest import MakeProxy
from tests.rig import RedisServer, Upstream, free_port


async def test_liveness_and_startup_answer_locally(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer]
) -> None:
    client = await make_proxy()
    for path in ("/_liveness", "/_startup"):
        response = await client.get(path)
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    assert upstream[0].seen == []


async def test_readiness_follows_redis(make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    client = await make_proxy(redis={"health_check_interval_seconds": 0.05})
    await _wait_status(client, 200)
    redis_server.stop()
    body = await _wait_status(client, 503)
    assert body == {"status": "unavailable", "reasons": ["redis unreachable"]}
    redis_server.start()
    await _wait_status(client, 200)


async def test_a_host_clock_off_rediss_is_logged_and_measured_until_back_in_step(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Quota limits end, and billed requests fall into buckets, by this host's wall clock: one 5 minutes
    behind (NTP not synced at boot) refused freed projects with 402 and billed into past buckets, unsaid."""
    offset = -300.0
    monkeypatch.setattr(health, "time", SimpleNamespace(time=lambda: time.time() + offset))
    monkeypatch.setattr(health, "CLOCK_CHECK_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="proxy.health")
    client = await make_proxy(redis={"health_check_interval_seconds": 0.05})
    assert "clock: this host's wall clock is -300.0 s off Redis's" in caplog.text
    measured = await _clock_offset(client)
    assert measured is not None
    assert -300.5 < measured < -299.5

    offset = 0.0
    for _ in range(200):
        if "clock: back in step with Redis's" in caplog.text:
            break
        await asyncio.sleep(0.025)
    assert "clock: back in step with Redis's" in caplog.text
    measured = await _clock_offset(client)
    assert measured is not None
    assert abs(measured) < 0.5
    assert caplog.text.count("off Redis's") == 1  # said once, not at every check


async def test_a_clock_not_measured_has_no_offset_and_says_so(
    make_proxy: MakeProxy, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user denied TIME left no gauge and no line: "not measured" looked like "in step" (a
    reviewer's); and while Redis is down the last figure is no measure either."""
    admin = redis_server.client()
    admin.acl_setuser(
        "notime", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-time"]
    )
    try:
        client = await make_proxy(
            redis={
                "url": f"redis://notime:pw@127.0.0.1:{redis_server.port}/0",
                "health_check_interval_seconds": 0.05,
            }
        )
        assert (
            "clock: cannot read Redis's TIME (NoPermissionError): the offset is not measured" in caplog.text
        )
        assert await _clock_offset(client) is None
    finally:
        admin.acl_deluser("notime")
        admin.close()

    client = await make_proxy(redis={"health_check_interval_seconds": 0.05})
    assert await _clock_offset(client) is not None
    redis_server.stop()
    await _wait_status(client, 503)
    assert await _clock_offset(client) is None
    redis_server.start()
    await _wait_status(client, 200)
    for _ in range(200):
        if await _clock_offset(client) is not None:
            break
        await asyncio.sleep(0.025)
    assert await _clock_offset(client) is not None


async def _clock_offset(client: object) -> float | None:
    response = await client.get("/metrics")  # type: ignore[attr-defined]
    text = await response.text()
    lines = [line for line in text.splitlines() if line.startswith("edge_proxy_clock_offset_seconds")]
    return float(lines[0].split()[-1]) if lines else None


async def _wait_status(client: object, status: int) -> object:
    for _ in range(200):
        response = await client.get("/_readiness")  # type: ignore[attr-defined]
        if response.status == status:
            return await response.json()
        await asyncio.sleep(0.025)
    raise AssertionError(f"readiness never became {status}")


async def test_with_health_port_only_the_probe_and_metrics_paths_are_forwarded_on_binds_port(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer]
) -> None:
    # In front of a sidecar's app, the public never sees readiness's reasons or the metrics: those paths are
    # the app's there, and the probes and the scrape go to health_port (tests/test_server.py).
    recorder, _ = upstream
    client = await make_proxy(health_port=free_port(), health_port_only=True)
    paths = ["/_liveness", "/_readiness", "/_startup", "/metrics"]
    for path in paths:
        response = await client.get(path)
        assert (response.status, await response.json()) == (
            200,
            {"upstream": True, "method": "GET", "path": path},
        )
    assert [seen.path_qs for seen in recorder.seen] == paths
