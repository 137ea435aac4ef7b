"""The one Redis connection pool: every call bounded by the configured timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy import keys
from proxy.settings import RedisSettings


def make_client(settings: RedisSettings) -> aioredis.Redis:
    """A client for `settings.url` whose every command and connect is bounded by `timeout_seconds`."""
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=settings.timeout_seconds,
        socket_connect_timeout=settings.timeout_seconds,
        max_connections=settings.max_connections,
        # Raw bytes: values are pickles, often compressed, never text to be decoded by the client.
        decode_responses=False,
        # One immediate retry, for a pooled connection that died with a Redis restart; no backoff, so a
        # call is never much longer than twice the timeout.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the pool for the app's lifetime; connections are lazy, so a dead Redis does not block start."""
    client = make_client(app[keys.SETTINGS].redis)
    app[keys.REDIS] = client
    yield
    await client.aclose()
