"""The verdict store on a real Redis: revalidation never mistakes a write in flight for a revocation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.redis_client import make_client
from proxy.settings import RedisSettings
from proxy.verdicts import Verdict, VerdictStore


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The proxy's own kind of client, on the test Redis."""
    redis = make_client(RedisSettings(url=redis_url))
    assert isinstance(redis, aioredis.Redis)  # a redis:// URL: the one-node client
    yield redis
    await redis.aclose()


def store_for(client: aioredis.Redis) -> VerdictStore:
    """A shared store with the default TTLs."""
    return VerdictStore(
        client,
        hmac_key=b"k" * 32,
        key_prefix="edge-proxy:verdict:v1",
        allowed_ttl_seconds=300,
        denied_ttl_seconds=30,
    )


async def test_a_verdict_whose_write_is_in_flight_survives_revalidation(client: aioredis.Redis) -> None:
    store = store_for(client)
    written = asyncio.Event()
    real_set = client.set

    async def slow_set(*args: object, **kwargs: object) -> object:
        await written.wait()  # the SET reaches Redis only after the revalidation's MGET
        return await real_set(*args, **kwargs)  # type: ignore[arg-type]

    client.set = slow_set  # type: ignore[method-assign,assignment]
    key = store.key(7, "phx_some_key")
    denied = Verdict(401, b'{"detail":"no"}', {"Content-Type": "application/json"})
    store.learn(key, denied)
    await store.revalidate()
    assert store.cached(key) == denied
    written.set()
    await store.close()
    assert await client.exists(key) == 1
    await store.revalidate()
    assert store.cached(key) == denied


async def test_a_deleted_verdict_is_dropped_at_the_next_revalidation(client: aioredis.Redis) -> None:
    store = store_for(client)
    key = store.key(7, "phx_some_key")
    store.learn(key, Verdict(200))
    await store.close()  # the write has landed
    await store.revalidate()
    assert store.cached(key) == Verdict(200)
    await client.delete(key)
    await store.revalidate()
    assert store.cached(key) is None
