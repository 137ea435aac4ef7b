"""Quota snapshot: limits read from the real sorted set, checked in memory, failing open without Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy import keys
from proxy.quota import QuotaSnapshot, quota_ctx
from proxy.redis_client import make_client, redis_ctx
from proxy.settings import RedisLayout, RedisSettings
from tests.conftest import settings_for
from tests.rig import RedisServer

QUOTA_KEY = RedisLayout().quota_key


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The proxy's own kind of client, on the test Redis."""
    redis = make_client(RedisSettings(url=redis_url))
    assert isinstance(redis, aioredis.Redis)  # a redis:// URL: the one-node client
    yield redis
    await redis.aclose()


class Clock:
    """A monotonic clock the test moves by hand, so staleness is decided without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit(redis_server: RedisServer, token: str, until: float) -> None:
    """Write a quota limit as the backend does."""
    sync = redis_server.client()
    sync.zadd(QUOTA_KEY, {token: until})
    sync.close()


async def test_token_with_a_future_score_is_limited(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    limit(redis_server, "phc_limited", time.time() + 3600)
    snapshot = QuotaSnapshot(QUOTA_KEY, max_staleness_seconds=6)
    await snapshot.refresh(client)
    assert snapshot.is_limited("phc_limited")
    assert not snapshot.is_limited("phc_other")


async def test_a_member_that_is_no_utf8_limits_no_token(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The backend compares bytes; decoded with replacement, b"phc_\\xff" limited the token "phc_\\ufffd"."""
    sync = redis_server.client()
    sync.zadd(QUOTA_KEY, {b"phc_\xff": time.time() + 3600})
    sync.close()
    limit(redis_server, "phc_limited", time.time() + 3600)
    snapshot = QuotaSnapshot(QUOTA_KEY, max_staleness_seconds=6)
    await snapshot.refresh(client)
    assert not snapshot.is_limited("phc_\ufffd")
    assert snapshot.is_limited("phc_limited")  # the others are read as before


async def test_expired_score_is_not_limited(client: aioredis.Redis, redis_server: RedisServer) -> None:
    limit(redis_server, "phc_expired", time.time() - 1)
    snapshot = QuotaSnapshot(QUOTA_KEY, max_staleness_seconds=6)
    await snapshot.refresh(client)
    assert not snapshot.is_limited("phc_expired")
    assert len(snapshot) == 0


async def test_limit_ends_at_its_score_without_another_poll(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    until = time.time() + 3600
    limit(redis_server, "phc_ending", until)
    snapshot = QuotaSnapshot(QUOTA_KEY, max_staleness_seconds=6)
    await snapshot.refresh(client)
    assert snapshot.is_limited("phc_ending", now=until - 1)
    # "limited iff score >= now": still limited at the score itself, free right after it.
    assert snapshot.is_limited("phc_ending", now=until)
    assert not snapshot.is_limited("phc_ending", now=until + 0.001)


async def test_a_new_limit_shows_up_after_one_poll(client: aioredis.Redis, redis_server: RedisServer) -> None:
    snapshot = QuotaSnapshot(QUOTA_KEY, max_staleness_seconds=6)
    await snapshot.refresh(client)
    limit(redis_server, "phc_new", time.time() + 3600)
    assert not snapshot.is_limited("phc_new")
    await snapshot.poll(client)
    assert snapshot.is_limited("phc_new")


async def test_redis_down_keeps_the_snapshot_then_fails_open_then_recovers(
    client: aioredis.Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    snapshot = QuotaSnapshot(QUOTA_KEY, max_staleness_seconds=10, clock=clock)
    limit(redis_server, "phc_limited", time.time() + 3600)
    await snapshot.poll(client)
    assert snapshot.is_limited("phc_limited")

    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="proxy.quota"):
        clock.now += 5
        await snapshot.poll(client)
        await snapshot.poll(client)
        assert snapshot.is_limited("phc_limited"), "kept while younger than max_staleness_seconds"
        clock.now += 6
        await snapshot.poll(client)
        await snapshot.poll(client)
        assert not snapshot.is_limited("phc_limited"), "stale: fails open"
    # One record per transition, not one per failed poll.
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.quota"]
    assert len(messages) == 2
    assert "keeping the last snapshot" in messages[0]
    assert "1 project(s) no longer limited" in messages[1]

    redis_server.start()
    limit(redis_server, "phc_limited", time.time() + 3600)
    await snapshot.poll(client)
    assert snapshot.is_limited("phc_limited")
    assert not snapshot.failing

    # A second outage fails open the same way (a recovery that left "cleared" set made it keep the snapshot
    # for good; found unguarded by mutation testing).
    redis_server.stop()
    clock.now += 11
    await snapshot.poll(client)
    assert not snapshot.is_limited("phc_limited")
    redis_server.start()


async def _app_with_quota(redis_url: str, **quota: float) -> web.AppRunner:
    app = web.Application()
    app[keys.SETTINGS] = settings_for("http://127.0.0.1:9", redis_url, quota=quota)
    app.cleanup_ctx.extend([redis_ctx, quota_ctx])
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


@pytest.mark.slow
async def test_poller_in_the_cleanup_context_follows_redis(redis_url: str, redis_server: RedisServer) -> None:
    runner = await _app_with_quota(redis_url, poll_interval_seconds=0.02, max_staleness_seconds=0.1)
    snapshot = runner.app[keys.QUOTA]
    try:
        limit(redis_server, "phc_limited", time.time() + 3600)
        await _until(lambda: snapshot.is_limited("phc_limited"), "limit picked up by the poller")
        redis_server.stop()
        await _until(lambda: not snapshot.is_limited("phc_limited"), "fail open once stale")
        redis_server.start()
        limit(redis_server, "phc_limited", time.time() + 3600)
        await _until(lambda: snapshot.is_limited("phc_limited"), "poller recovered")
    finally:
        await runner.cleanup()


async def test_startup_does_not_wait_for_redis(redis_url: str, redis_server: RedisServer) -> None:
    redis_server.stop()
    runner = await _app_with_quota(redis_url)
    assert not runner.app[keys.QUOTA].is_limited("phc_any")
    await runner.cleanup()
