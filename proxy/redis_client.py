"""The one Redis client (one node, Sentinel's master or a Cluster): every call bounded by the timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from proxy import keys
from proxy.cluster import RedisClient
from proxy.redis_observer import ClusterAdmission, ObservedRedis, ObservedRedisCluster
from proxy.redis_urls import CLUSTER_SCHEME, SENTINEL_SCHEME, cluster_nodes, sentinel_parts
from proxy.settings import RedisSettings


def _options(settings: RedisSettings) -> dict[str, Any]:
    """What every client gets, on one node, through Sentinel or on a Cluster (there per node).

    A call that finds all `max_connections` busy waits for one, up to `timeout_seconds` (redis-py's plain
    pool fails at once: a cold burst of more distinct teams than connections, as after a deploy, sent most
    of them to the backend). On one node and through Sentinel the pool waits (BlockingConnectionPool); a
    Cluster's per-node pools cannot, so its calls wait to be admitted instead (ClusterAdmission).
    """
    return {
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        "max_connections": settings.max_connections,
        # Raw bytes: values are pickles, often compressed, never text to be decoded by the client.
        "decode_responses": False,
        # One immediate retry, for a pooled connection that died with a Redis restart (on a Cluster it first
        # re-reads the slot map); no backoff, so a call is never much longer than twice the timeout
        # (redis-py's default is three retries with exponential backoff: seconds per call with a node down).
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }


def make_client(settings: RedisSettings) -> ObservedRedis | ObservedRedisCluster:
    """A client for `settings.url` whose every command and connect is bounded by `timeout_seconds`."""
    if settings.url.startswith(SENTINEL_SCHEME):
        return _sentinel_client(settings)
    if settings.url.startswith(CLUSTER_SCHEME):
        return _cluster_client(settings)
    # ObservedRedis behaves exactly as redis.asyncio.Redis until an observer is set (redis_ctx). from_pool
    # builds `cls`, though redis-py annotates it as returning Redis.
    options = _options(settings)
    pool = BlockingConnectionPool.from_url(settings.url, timeout=settings.timeout_seconds, **options)
    return cast(ObservedRedis, ObservedRedis.from_pool(pool))


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master pool, waiting for a free connection as BlockingConnectionPool does."""


def _sentinel_client(settings: RedisSettings) -> ObservedRedis:
    """The master of `redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`, found via
    Sentinel.

    Every connection asks the sentinels for the current master first, so a failover is followed without a
    restart. The URL's credentials are the master's; the sentinels are asked with `sentinel_password`, if set.
    """
    parts = sentinel_parts(settings.url)
    timeout = settings.timeout_seconds
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # unannotated before redis-py 8.2
        parts.sentinels,
        # No retries: a sentinel that does not answer is skipped for the next one at once (redis-py's default
        # retry with backoff made one dead sentinel cost seconds per master lookup).
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "password": settings.sentinel_secret,
        },
    )
    client = sentinel.master_for(
        parts.service,
        redis_class=ObservedRedis,
        connection_pool_class=_BlockingSentinelPool,
        username=parts.username,
        password=parts.password,
        db=parts.db,
        timeout=timeout,
        **_options(settings),
    )
    return cast(ObservedRedis, client)


def _cluster_client(settings: RedisSettings) -> ObservedRedisCluster:
    """A Redis Cluster client, `redis+cluster://[user:password@]host:port[,host:port...]`.

    The nodes listed are only where discovery starts (any one answering is enough); the client then follows
    the slot map, MOVED/ASK redirections and failovers by itself. Connections are opened at first use.
    """
    nodes, username, password = cluster_nodes(settings.url)
    client = ObservedRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        username=username,
        password=password,
        **_options(settings),
    )
    client.admission = ClusterAdmission(settings.max_connections, settings.timeout_seconds)
    return client


def limits_storage(client: RedisClient, key_prefix: str) -> RedisStorage:
    """`limits`' async storage on the app's Redis; close it with `close_limits_storage`.

    On one node it shares the app's pool. `limits` cannot be handed a Cluster client, so on a Cluster it gets
    its own, to the same nodes with the same credentials, timeouts and retry as the app's.
    """
    if not isinstance(client, RedisCluster):
        return RedisStorage(
            "async+redis://",
            implementation="redispy",
            wrap_exceptions=True,
            key_prefix=key_prefix,
            connection_pool=client.connection_pool,  # type: ignore[arg-type]  # typed as scalars only
        )
    hosts = ",".join(
        f"[{n.host}]:{n.port}" if ":" in n.host else f"{n.host}:{n.port}" for n in client.startup_nodes
    )
    options = client.connection_kwargs
    return RedisClusterStorage(
        f"async+{CLUSTER_SCHEME}{hosts}",
        implementation="redispy",
        wrap_exceptions=True,
        key_prefix=key_prefix,
        **{
            name: options[name]
            for name in (
                "username",
                "password",
                "socket_timeout",
                "socket_connect_timeout",
                "max_connections",
            )
            if options.get(name) is not None
        },
        retry=Retry(NoBackoff(), 1),  # type: ignore[arg-type]  # typed as scalars only
    )


async def close_limits_storage(storage: RedisStorage) -> None:
    """Close the client `limits_storage` opened for a Cluster (the one-node storage uses the app's pool)."""
    if isinstance(storage, RedisClusterStorage):
        await cast(RedisCluster, cast(RedispyBridge, storage.bridge).get_connection()).aclose()


async def _close_sentinels(client: ObservedRedis | ObservedRedisCluster) -> None:
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
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
