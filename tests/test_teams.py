"""Team records: read through on first use, answered from memory, re-read in the background in one MGET."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from proxy import teams
from proxy.contract import DecodeError, RedisContract
from proxy.settings import RedisLayout
from proxy.teams import MAX_TOKEN_CHARS, Team, TeamStore, parse_team
from tests.backend_writer import BackendWriter
from tests.chaos import ChaosProxy
from tests.conftest import MakeProxy
from tests.test_reliability import eventually

TEAMS = 50
TTL = 0.2
URL = "/flags/definitions?token={token}"


def token_of(team_id: int) -> str:
    return f"phc_store_{team_id}"


def secret_of(team_id: int, version: int = 1) -> str:
    return f"phs_store_{team_id}_v{version}"


@pytest.fixture
def writer(redis_url: str) -> BackendWriter:
    """TEAMS team records written as the backend writes them."""
    writer = BackendWriter(redis_url)
    for team_id in range(1, TEAMS + 1):
        write_team(writer, team_id)
    return writer


def write_team(writer: BackendWriter, team_id: int, version: int = 1) -> None:
    token = token_of(team_id)
    record = {"id": team_id, "api_token": token, "secret_api_token": secret_of(team_id, version)}
    writer.set_team(token, record)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[TeamStore]:
    """A TeamStore on its own client (nothing else of the proxy runs), records past their TTL after TTL s."""
    client = aioredis.Redis.from_url(redis_url)
    store = TeamStore(client, RedisContract(RedisLayout()), ttl_seconds=TTL, miss_ttl_seconds=TTL)
    yield store
    await store.close()
    await client.aclose()


class Clock:
    """A monotonic clock the test moves by hand: the TeamStore's, so expiry is decided without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """proxy.teams reads this clock (only that module: the event loop keeps its own)."""
    clock = Clock()
    monkeypatch.setattr(teams, "time", SimpleNamespace(monotonic=clock))
    return clock


def command_calls(redis_url: str) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (INFO commandstats)."""
    with redis.Redis.from_url(redis_url) as sync:
        stats: dict[str, Any] = sync.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def reset_stats(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as sync:
        sync.config_resetstat()


async def test_expired_records_answer_from_memory_and_are_reread_together_in_one_mget(
    store: TeamStore, writer: BackendWriter, redis_url: str, clock: Clock
) -> None:
    """Past the TTL (the clock driven by hand: under load a 0.2 s TTL slept past twice-the-TTL and failed)."""
    for team_id in range(1, TEAMS + 1):
        assert await store.get(token_of(team_id)) == Team(team_id, (secret_of(team_id).encode(),))
    for team_id in range(1, TEAMS + 1):
        write_team(writer, team_id, version=2)
    clock.now += TTL * 1.5

    reset_stats(redis_url)
    # Past their TTL: every request is still answered from memory, with no Redis read of its own.
    for team_id in range(1, TEAMS + 1):
        assert store.fresh(token_of(team_id)) == Team(team_id, (secret_of(team_id).encode(),))
    assert command_calls(redis_url).get("get", 0) == 0

    await store.refresh()
    calls = command_calls(redis_url)
    assert calls.get("mget") == 1
    assert calls.get("get", 0) == 0
    for team_id in range(1, TEAMS + 1):
        assert store.fresh(token_of(team_id)) == Team(team_id, (secret_of(team_id, 2).encode(),))

    # Fresh again: nothing is due, so the next refresh reads nothing.
    reset_stats(redis_url)
    await store.refresh()
    assert command_calls(redis_url).get("mget", 0) == 0


async def test_only_records_requested_past_their_ttl_are_reread(
    store: TeamStore, writer: BackendWriter, redis_url: str
) -> None:
    for team_id in (1, 2, 3):
        await store.get(token_of(team_id))
    await asyncio.sleep(TTL * 1.5)
    write_team(writer, 1, version=2)
    write_team(writer, 2, version=2)
    store.fresh(token_of(1))  # only team 1 is asked for

    await store.refresh()
    assert store.fresh(token_of(1)) == Team(1, (secret_of(1, 2).encode(),))
    # Team 2 was not asked for: still the record in memory, queued when it is next asked for.
    assert store.fresh(token_of(2)) == Team(2, (secret_of(2).encode(),))
    await store.refresh()
    assert store.fresh(token_of(2)) == Team(2, (secret_of(2, 2).encode(),))


async def test_a_record_gone_from_redis_becomes_a_miss_at_the_refresh(
    store: TeamStore, writer: BackendWriter
) -> None:
    assert await store.get(token_of(7)) is not None
    writer.delete_team(token_of(7))
    await asyncio.sleep(TTL * 1.5)
    assert store.fresh(token_of(7)) is not None  # until the refresh, memory answers
    await store.refresh()
    assert store.fresh(token_of(7)) is None
    assert await store.get(token_of(7)) is None


async def test_a_record_not_asked_for_past_twice_its_ttl_is_read_again_before_it_answers(
    store: TeamStore, writer: BackendWriter
) -> None:
    """Found by a reviewer: after a quiet spell longer than the TTL, the first requests were answered from
    the old record, however old: a token rotated away, or a project secret removed, was accepted."""
    assert await store.get(token_of(7)) is not None
    assert await store.get(token_of(8)) == Team(8, (secret_of(8).encode(),))
    writer.delete_team(token_of(7))
    write_team(writer, 8, version=2)
    await asyncio.sleep(TTL * 2.5)  # no request meanwhile, so no refresh either
    assert store.fresh(token_of(7)) is None
    assert await store.get(token_of(7)) is None
    assert await store.get(token_of(8)) == Team(8, (secret_of(8, 2).encode(),))


async def test_at_the_cap_the_least_recently_confirmed_record_goes(
    redis_url: str, writer: BackendWriter
) -> None:
    """The oldest inserted went, even when it was the one in use (then read again from Redis)."""
    client = aioredis.Redis.from_url(redis_url)
    store = TeamStore(
        client, RedisContract(RedisLayout()), ttl_seconds=TTL, miss_ttl_seconds=TTL, max_entries=3
    )
    try:
        for team_id in (1, 2, 3):
            assert await store.get(token_of(team_id)) is not None
        await asyncio.sleep(TTL * 1.5)
        assert store.fresh(token_of(1)) is not None  # team 1 in use: confirmed by the refresh
        await store.refresh()
        assert await store.get(token_of(4)) is not None
        assert [token_of(team_id) for team_id in (3, 1, 4)] == list(store._cached)
    finally:
        await store.close()
        await client.aclose()


async def test_a_team_created_after_a_remembered_miss_is_found(
    store: TeamStore, writer: BackendWriter
) -> None:
    """The backend fills team records lazily: a miss is remembered for team_miss_ttl_seconds, then read
    again (found unguarded by mutation testing: never read again, the team was forwarded for ever)."""
    token = token_of(TEAMS + 1)
    assert await store.get(token) is None
    write_team(writer, TEAMS + 1)
    assert await store.get(token) is None  # remembered: not read again yet
    await asyncio.sleep(TTL * 1.5)
    await store.get(token)  # past the miss TTL: read again (in the background)
    await asyncio.sleep(0.05)
    assert await store.get(token) == Team(TEAMS + 1, (secret_of(TEAMS + 1).encode(),))


async def test_a_miss_is_remembered_for_the_miss_ttl_not_the_records(
    redis_url: str, writer: BackendWriter
) -> None:
    """team_miss_ttl_seconds (1 s by default), not team_ttl_seconds (30 s): a team the backend creates
    after a first miss is found that soon (found unguarded by mutation testing)."""
    client = aioredis.Redis.from_url(redis_url)
    store = TeamStore(client, RedisContract(RedisLayout()), ttl_seconds=60, miss_ttl_seconds=TTL)
    token = token_of(TEAMS + 2)
    try:
        assert await store.get(token) is None
        write_team(writer, TEAMS + 2)
        await asyncio.sleep(TTL * 1.5)
        await store.get(token)
        await asyncio.sleep(0.05)
        assert await store.get(token) == Team(TEAMS + 2, (secret_of(TEAMS + 2).encode(),))
    finally:
        await store.close()
        await client.aclose()


@pytest.mark.parametrize("team_id", ["true", "1.0", '"7"', "null"])
def test_a_team_id_that_is_not_an_integer_is_no_record(team_id: str) -> None:
    with pytest.raises(DecodeError):
        parse_team(f'{{"id": {team_id}}}')


async def test_a_failed_refresh_keeps_the_records_and_retries_on_the_next_request(
    store: TeamStore, writer: BackendWriter, redis_url: str
) -> None:
    assert await store.get(token_of(3)) is not None
    await asyncio.sleep(TTL * 1.5)
    store.fresh(token_of(3))
    broken = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens there
    healthy = store._client
    store._client = broken
    try:
        with pytest.raises(redis.RedisError):
            await store.refresh()
        # Kept: while Redis fails, a request is answered from it, however old it grows.
        assert await store.get(token_of(3)) == Team(3, (secret_of(3).encode(),))
    finally:
        store._client = healthy
        await broken.aclose()
    write_team(writer, 3, version=2)
    store.fresh(token_of(3))
    await store.refresh()
    assert await store.get(token_of(3)) == Team(3, (secret_of(3, 2).encode(),))


async def test_rotated_secret_takes_effect_through_the_background_refresh(
    make_proxy: MakeProxy, writer: BackendWriter
) -> None:
    writer.set_definitions(5, [{"id": 1, "key": "f", "active": True, "filters": {}}])
    client = await make_proxy(definitions={"team_ttl_seconds": TTL, "refresh_interval_seconds": 0.05})
    url = URL.format(token=token_of(5))
    old = {"Authorization": f"Bearer {secret_of(5)}"}
    new = {"Authorization": f"Bearer {secret_of(5, 2)}"}
    assert (await client.get(url, headers=old)).status == 200
    write_team(writer, 5, version=2)
    deadline = time.monotonic() + 5
    while (await client.get(url, headers=old)).status == 200:
        assert time.monotonic() < deadline, "the rotated secret was never picked up"
        await asyncio.sleep(0.02)
    assert (await client.get(url, headers=old)).status == 401
    assert (await client.get(url, headers=new)).status == 200


async def test_a_cold_burst_of_more_teams_than_redis_connections_is_answered_locally(
    make_proxy: MakeProxy, upstream: Any, redis_url: str
) -> None:
    # After a deploy every team is cold at once. With 4 connections and 60 distinct teams asking together,
    # requests wait for a connection (up to redis.timeout_seconds) instead of failing over to the backend.
    recorder, _ = upstream
    burst = range(1001, 1061)
    with BackendWriter(redis_url) as writer:
        for team_id in burst:
            write_team(writer, team_id)
            writer.set_definitions(team_id, [{"key": f"flag-{team_id}", "active": True}])
    client = await make_proxy(redis={"max_connections": 4})

    answers = await asyncio.gather(
        *(
            client.get(
                URL.format(token=token_of(team_id)), headers={"Authorization": f"Bearer {secret_of(team_id)}"}
            )
            for team_id in burst
        )
    )

    assert [answer.status for answer in answers] == [200] * len(burst)
    for team_id, answer in zip(burst, answers, strict=True):
        assert (await answer.json())["flags"][0]["key"] == f"flag-{team_id}"
    assert recorder.seen == []


async def test_a_flood_of_unknown_tokens_keeps_the_teams_held_and_stays_small(
    redis_url: str, writer: BackendWriter
) -> None:
    """The team lookup comes before any credential check: anyone can send unknown tokens, of any length."""
    client = aioredis.Redis.from_url(redis_url)
    store = TeamStore(
        client,
        RedisContract(RedisLayout()),
        ttl_seconds=60,
        miss_ttl_seconds=60,
        max_entries=5,
        max_misses=10,
    )
    try:
        held = [await store.get(token_of(team_id)) for team_id in (1, 2)]
        assert [team.id for team in held if team is not None] == [1, 2]
        for n in range(50):
            assert await store.get(f"phc_unknown_{n}") is None
        for n in range(50):
            assert await store.get("phc_" + "x" * 8000 + str(n)) is None

        assert store.fresh(token_of(1)) is held[0]  # the teams held are still held
        assert store.fresh(token_of(2)) is held[1]
        assert len(store._missed) == 10  # the newest short misses; no long token kept
        assert all(len(token) <= MAX_TOKEN_CHARS for token in store._missed)
        reset_stats(redis_url)
        assert await store.get("phc_unknown_49") is None  # remembered: no read
        assert command_calls(redis_url).get("get", 0) == 0
    finally:
        await store.close()
        await client.aclose()


# Behaviour a mutation-testing reviewer changed with no test failing (each test here fails with its mutant).


async def test_concurrent_misses_of_one_token_share_one_redis_read(
    store: TeamStore, writer: BackendWriter, redis_url: str
) -> None:
    """A cold token asked for by 50 requests at once is read from Redis once (found by mutation testing:
    with the read not registered as in flight, each request read it)."""
    reset_stats(redis_url)
    found = await asyncio.gather(*(store.get(token_of(3)) for _ in range(50)))
    assert found == [Team(3, (secret_of(3).encode(),))] * 50
    assert command_calls(redis_url).get("get") == 1


async def test_a_client_leaving_does_not_cancel_the_read_the_others_wait_for(
    writer: BackendWriter, chaos: ChaosProxy
) -> None:
    """Two requests wait for one slow read of a team record; the first one's client goes away (its handler
    cancelled): the second still gets the team (found by mutation testing: the shared read was cancelled
    with it, and the second request failed)."""
    client = aioredis.Redis.from_url(chaos.url)
    store = TeamStore(client, RedisContract(RedisLayout()), ttl_seconds=60, miss_ttl_seconds=60)
    try:
        chaos.reply_delay = 0.3  # a slow Redis: the read is still out when the first client leaves
        leaving = asyncio.create_task(store.get(token_of(4)))
        staying = asyncio.create_task(store.get(token_of(4)))
        await asyncio.sleep(0.05)
        leaving.cancel()
        assert await asyncio.wait_for(staying, 5) == Team(4, (secret_of(4).encode(),))
        assert leaving.cancelled()
    finally:
        await store.close()
        await client.aclose()


async def test_a_team_found_after_a_remembered_miss_is_not_taken_for_a_miss_again(
    store: TeamStore, writer: BackendWriter, clock: Clock
) -> None:
    """Once a remembered miss is read again and found, the miss is forgotten: after a quiet spell (past twice
    the TTL, so the record is read again first) the team is still found (found by mutation testing: the old
    miss came back, and every request of the team was forwarded as unknown)."""
    token = token_of(TEAMS + 3)
    assert await store.get(token) is None
    write_team(writer, TEAMS + 3)
    clock.now += TTL * 1.5  # past the miss TTL
    assert await store.get(token) is None  # read again, in the background
    await eventually(lambda: store.fresh(token) is not None, "the team read again")
    clock.now += TTL * 2.5  # past twice the record's TTL: read again before it answers
    assert await store.get(token) == Team(TEAMS + 3, (secret_of(TEAMS + 3).encode(),))


async def test_a_refresh_reply_that_left_before_a_record_was_removed_does_not_bring_it_back(
    store: TeamStore, writer: BackendWriter, clock: Clock
) -> None:
    """The refresher's MGET is out; meanwhile a request reads the record again and finds it removed (the
    token rotated away). The MGET's older reply must not put the record back (found by mutation testing:
    the removed token was accepted again for a whole TTL)."""
    token = token_of(9)
    assert await store.get(token) is not None
    clock.now += TTL * 1.5
    assert store.fresh(token) is not None  # answered past its TTL: due for the refresher
    replied, release = asyncio.Event(), asyncio.Event()
    real_mget = store._client.mget

    async def held_mget(*args: Any, **kwargs: Any) -> Any:
        raws = await real_mget(*args, **kwargs)  # the record as it was
        replied.set()
        await release.wait()  # ... and its reply is read only after the record is removed
        return raws

    store._client.mget = held_mget  # type: ignore[method-assign]
    refreshing = asyncio.create_task(store.refresh())
    try:
        await asyncio.wait_for(replied.wait(), 5)
        writer.delete_team(token)
        clock.now += TTL  # past twice its TTL: the next request reads it again, and finds it gone
        assert await store.get(token) is None
    finally:
        release.set()
    await asyncio.wait_for(refreshing, 5)
    assert store.fresh(token) is None
    assert await store.get(token) is None


async def test_a_flood_of_wrong_secrets_reaches_the_backend_once_per_team_while_the_recheck_is_queued(
    make_proxy: MakeProxy, upstream: Any, writer: BackendWriter, clock: Clock
) -> None:
    """A wrong project secret refused by a record not re-read lately goes to the backend (it may be one
    rotated in), once: the others wait for the queued re-read and are refused here. The refresher is frozen
    (its interval an hour), so the re-read stays queued (found by mutation testing: every request of the
    flood was queued again, and forwarded)."""
    recorder, _ = upstream
    writer.set_definitions(5, [{"id": 1, "key": "f", "active": True, "filters": {}}])
    client = await make_proxy(
        definitions={
            "refresh_interval_seconds": 3600,
            "team_ttl_seconds": 36_000,
            "max_staleness_seconds": 36_000,
        }
    )
    url = URL.format(token=token_of(5))

    async def status(secret: str) -> int:
        async with client.get(url, headers={"Authorization": f"Bearer {secret}"}) as response:
            await response.read()
            return response.status

    assert await status(secret_of(5)) == 200
    assert recorder.seen == []
    clock.now += 7300  # past the recheck delay (twice the refresh interval); within the TTL and staleness
    statuses = [await status(f"phs_wrong_{n}") for n in range(20)]
    assert statuses == [200] + [401] * 19  # the first is the backend's answer (the rig's upstream)
    assert [seen.path_qs for seen in recorder.seen] == [url]
