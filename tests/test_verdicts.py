"""The verdict store on a real Redis: revalidation never mistakes a write in flight for a revocation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.redis_client import make_client
from proxy.settings import RedisSettings
from proxy.verdicts import MAX_DENIAL_BODY_BYTES, Verdict, VerdictStore, verdict_of
from tests.rig import RedisServer
from tests.standin_backend import drf_error
from tests.test_teams import command_calls, reset_stats


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


DENIED = Verdict(401, b'{"detail":"Invalid API key"}', {"Content-Type": "application/json"})
# Writes in flight at once while a test fills a store: 2,500 SETs together outwaited the pool's timeout
# (16 connections, 0.5 s) under CPU load, and the verdicts whose SET failed read as revoked.
LEARN_BATCH = 100


async def learn_all(store: VerdictStore, keys: list[str], verdict: Verdict) -> None:
    """Learn `verdict` for every key, a batch of writes at a time, each batch landed before the next."""
    for start in range(0, len(keys), LEARN_BATCH):
        for key in keys[start : start + LEARN_BATCH]:
            store.learn(key, verdict)
        await store.close()  # this batch's writes have landed


async def test_revalidation_decodes_only_what_changed_and_leaves_the_loop_free_between_chunks(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients decide how many verdicts are held (each new credential the backend refuses is one): at
    200,000, decoding them all in one pass every cycle held the event loop for 1.4 s of each 2.7 s."""
    store = store_for(client)
    keys = [store.key(7, f"phx_random_{i}") for i in range(2500)]
    await learn_all(store, keys, DENIED)
    assert await client.dbsize() == len(keys)  # every write has landed
    changed, revoked = keys[1200], keys[2400]
    await client.set(changed, Verdict(403, b"{}", {"Content-Type": "application/json"}).encode(), px=60_000)
    await client.delete(revoked)

    decoded: list[bytes] = []
    real_decode = Verdict.decode

    def counting_decode(raw: bytes) -> Verdict | None:
        decoded.append(raw)
        return real_decode(raw)

    monkeypatch.setattr(Verdict, "decode", staticmethod(counting_decode))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    beside = asyncio.create_task(ticker())
    try:
        await store.revalidate()
    finally:
        beside.cancel()
    assert len(decoded) == 1  # the changed one; the 2,498 unchanged ones and the deleted one are not decoded
    assert store.cached(changed) == Verdict(403, b"{}", {"Content-Type": "application/json"})
    assert store.cached(revoked) is None
    assert store.cached(keys[0]) == DENIED
    assert len(store) == 2499
    assert ticks >= 3  # the loop ran other tasks while each of the three chunks was read
    await store.revalidate()
    assert len(decoded) == 1  # the changed one is held with its new bytes: not decoded again


def _local_store(client: aioredis.Redis, max_entries: int) -> VerdictStore:
    """A store without hmac_key (verdicts in this process only), holding `max_entries` at most."""
    return VerdictStore(
        client,
        hmac_key=None,
        key_prefix="edge-proxy:verdict:v1",
        allowed_ttl_seconds=300,
        denied_ttl_seconds=30,
        max_entries=max_entries,
    )


async def test_the_oldest_verdict_gives_way_at_max_entries(client: aioredis.Redis) -> None:
    store = _local_store(client, max_entries=3)
    keys = [store.key(7, f"phx_{i}") for i in range(5)]
    for key in keys:
        store.learn(key, DENIED)
    assert len(store) == 3
    assert [store.cached(key) for key in keys] == [None, None, DENIED, DENIED, DENIED]
    # Learning again a verdict already held takes no one's place (found by mutation testing).
    store.learn(keys[3], Verdict(200))
    assert [store.cached(key) for key in keys] == [None, None, DENIED, Verdict(200), DENIED]


async def test_a_verdict_read_since_it_was_learned_is_spared_when_room_is_made(
    client: aioredis.Redis,
) -> None:
    """Oldest-first dropped the verdicts of every credential in use in turn under a spray of new keys: each
    then read again from Redis, or without hmac_key asked of the backend again (a second chance now)."""
    store = _local_store(client, max_entries=3)
    hot, *sprayed = [store.key(7, f"phx_{i}") for i in range(40)]
    store.learn(hot, Verdict(200))
    for key in sprayed:
        assert store.cached(hot) == Verdict(200)  # the credential in use, between sprayed keys
        store.learn(key, DENIED)
    assert len(store) == 3
    assert store.cached(hot) == Verdict(200)
    # Spared once, a verdict not read since goes in its turn.
    fresh = [store.key(7, f"phx_fresh_{i}") for i in range(6)]
    for key in fresh:
        store.learn(key, DENIED)
    assert [store.cached(key) for key in [hot, *fresh]] == [None, None, None, None, DENIED, DENIED, DENIED]
    crowded = _local_store(client, max_entries=40)
    keys = [crowded.key(7, f"phx_{i}") for i in range(41)]
    for key in keys:
        crowded.learn(key, DENIED)
    assert [crowded.cached(key) for key in keys[1:]] == [DENIED] * 40
    crowded.learn(keys[0], DENIED)  # all 40 read: 16 spared to the back, the 17th oldest goes
    assert [key for key in keys if crowded.cached(key) is None] == [keys[17]]


async def test_with_redis_down_every_expired_verdict_is_still_dropped_each_cycle(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Expiry runs chunk by chunk before each chunk's MGET: with Redis down the first MGET fails, and the
    chunks after it must still expire (they were swept 1,000 a cycle: 200 s for 200,000)."""
    store = VerdictStore(
        client,
        hmac_key=b"k" * 32,
        key_prefix="edge-proxy:verdict:v1",
        allowed_ttl_seconds=300,
        denied_ttl_seconds=0.01,
    )
    for i in range(2500):
        store.learn(store.key(7, f"phx_random_{i}"), DENIED)
    await store.close()
    await asyncio.sleep(0.05)  # all expired
    redis_server.stop()
    try:
        with pytest.raises(RedisError):
            await store.revalidate()
    finally:
        redis_server.start()
    assert len(store) == 0


@pytest.mark.parametrize(
    ("stored", "verdict"),
    [
        (b'{"s":200}', Verdict(200)),
        (b'{"s":401,"b":"no"}', Verdict(401, b"no")),
        (b'{"s":500}', None),  # not a verdict this proxy learns: replayed, it would be a 500 from memory
        (b'{"s":204}', None),  # nor one counted as allowed
        (b'{"b":"x"}', None),
        (b"not json", None),
    ],
)
def test_only_the_verdicts_this_proxy_learns_are_read_back(stored: bytes, verdict: Verdict | None) -> None:
    assert Verdict.decode(stored) == verdict


# Behaviour a mutation-testing reviewer changed with no test failing (each test here fails with its mutant).


async def test_a_verdict_read_from_redis_is_held_and_not_read_again(
    client: aioredis.Redis, redis_url: str
) -> None:
    """A verdict another replica learned is read from Redis once, then answered from memory (found by
    mutation testing: not held, every request of the credential read Redis)."""
    learner, reader = store_for(client), store_for(client)
    key = learner.key(7, "phx_learned_elsewhere")
    learner.learn(key, DENIED)
    await learner.close()  # the write has landed
    assert await reader.lookup(key) == DENIED
    reset_stats(redis_url)
    assert await reader.lookup(key) == DENIED
    calls = command_calls(redis_url)
    assert (calls.get("get", 0), calls.get("pttl", 0)) == (0, 0)
    assert reader.cached(key) == DENIED
    await reader.close()


async def test_a_verdict_learned_again_while_the_revalidation_reads_survives_it(
    client: aioredis.Redis,
) -> None:
    """The revalidation's MGET finds a verdict's key gone (revoked); meanwhile the backend decided the
    credential again and it was learned anew: that new verdict is kept (found by mutation testing: the
    revalidation deleted it with the one it read)."""
    store = store_for(client)
    key = store.key(7, "phx_decided_again")
    store.learn(key, DENIED)
    await store.close()
    await client.delete(key)  # revoked
    replied, release = asyncio.Event(), asyncio.Event()
    real_mget = client.mget

    async def held_mget(*args: Any, **kwargs: Any) -> Any:
        raws = await real_mget(*args, **kwargs)  # the key gone
        replied.set()
        await release.wait()  # ... and the reply is read only after the verdict is learned again
        return raws

    client.mget = held_mget  # type: ignore[method-assign]
    revalidating = asyncio.create_task(store.revalidate())
    try:
        await asyncio.wait_for(replied.wait(), 5)
        store.learn(key, Verdict(200))
    finally:
        release.set()
    await asyncio.wait_for(revalidating, 5)
    assert store.cached(key) == Verdict(200)
    await store.close()


def refusal(size: int) -> bytes:
    """The backend's refusal of a personal API key, its detail padded to `size` bytes in all."""
    body = drf_error("authentication_error", "authentication_failed", "")
    return drf_error("authentication_error", "authentication_failed", "x" * (size - len(body)))


def test_a_refusal_is_learned_up_to_exactly_the_body_cap() -> None:
    """MAX_DENIAL_BODY_BYTES is the largest refusal learned (found by mutation testing: the boundary moved
    unnoticed)."""
    headers = {"Content-Type": "application/json"}
    at_cap, over = refusal(MAX_DENIAL_BODY_BYTES), refusal(MAX_DENIAL_BODY_BYTES + 1)
    assert len(at_cap) == MAX_DENIAL_BODY_BYTES
    assert verdict_of(401, headers, at_cap) == Verdict(401, at_cap, headers)
    assert verdict_of(401, headers, over) is None


@pytest.mark.parametrize(
    ("value", "kept"),
    [('Bearer realm="a~"', True), ("a\tb c", True), ("a\x7fb", False), ("a\x1fb", False), ("a\xa0b", False)],
)
def test_a_refusal_header_is_kept_only_when_every_character_is_printable_ascii(
    value: str, kept: bool
) -> None:
    """Space to "~" and tab: what aiohttp writes back unchanged (found by mutation testing: "~" and DEL, the
    range's ends, were never tried)."""
    body = refusal(100)
    headers = {"Content-Type": "application/json", "WWW-Authenticate": value}
    learned = verdict_of(401, headers, body)
    assert (learned is not None) is kept
    stored = json.dumps({"s": 401, "b": body.decode(), "h": headers}).encode()
    assert (Verdict.decode(stored) is not None) is kept
