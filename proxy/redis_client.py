"""The one Redis connection pool: every call bounded by the configured timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import unquote, urlsplit

from aiohttp import web
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from proxy import keys
from proxy.redis_observer import ObservedRedis
from proxy.settings import SENTINEL_SCHEME, RedisSettings


def make_client(settings: RedisSettings) -> ObservedRedis:
    """A client for `settings.url` whose every command and connect is bounded by `timeout_seconds`."""
    if settings.url.startswith(SENTINEL_SCHEME):
        return _sentinel_client(settings)
    # ObservedRedis behaves exactly as redis.asyncio.Redis until an observer is set (redis_ctx). from_url
    # builds `cls`, though redis-py annotates it as returning Redis.
    client = ObservedRedis.from_url(
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
    return cast(ObservedRedis, client)


def _sentinel_client(settings: RedisSettings) -> ObservedRedis:
    """The master of `redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`, found via Sentinel.

    Every connection asks the sentinels for the current master first, so a failover is followed without a
    restart; the password (if any) is the master's, the sentinels are asked without one.
    """
    parts = urlsplit(settings.url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = [(host.rpartition(":")[0], int(host.rpartition(":")[2])) for host in hosts.split(",")]
    service, _, db = parts.path.strip("/").partition("/")
    timeout = settings.timeout_seconds
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves __init__ unannotated
        nodes,
        # No retries: a sentinel that does not answer is skipped for the next one at once (redis-py's default
        # retry with backoff made one dead sentinel cost seconds per master lookup).
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client = sentinel.master_for(
        service,
        redis_class=ObservedRedis,
        password=unquote(userinfo.partition(":")[2]) or None,
        db=int(db or 0),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=settings.max_connections,
        decode_responses=False,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
    return cast(ObservedRedis, client)


async def _close_sentinels(client: ObservedRedis) -> None:
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel_client in manager.sentinels if manager is not None else ():
        await sentinel_client.aclose()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the pool for the app's lifetime; connections are lazy, so a dead Redis does not block start."""
    client = make_client(app[keys.SETTINGS].redis)
    client.observer = telemetry.redis_observer() if (telemetry := app.get(keys.TELEMETRY)) else None
    app[keys.REDIS] = client
    yield
    await client.aclose()
    await _close_sentinels(client)
