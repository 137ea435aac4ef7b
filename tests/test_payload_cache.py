"""The payload cache's memory budgets: LRU beyond the total, compressed-only beyond the decoded budget."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import keys
from proxy import memory as memory_module
from proxy.contract import DecodeError, RedisContract
from proxy.memory import resident_bytes
from proxy.payload import is_billable
from proxy.payload_cache import DefinitionsCache
from proxy.settings import DefinitionsSettings, RedisLayout
from tests.backend_writer import BackendWriter
from tests.chaos import ChaosProxy
from tests.conftest import MakeProxy
from tests.test_telemetry import scrape, value

SECRET = "phs_cache_secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}
TEAMS = (1, 2, 3)

Client = TestClient[Any, Any]
T = TypeVar("T")


def url(team_id: int) -> str:
    return f"/flags/definitions?token=phc_cache_{team_id}"


def flags(team_id: int, version: int = 1) -> list[dict[str, Any]]:
    """~30 KB of flags, distinct per team and version, compressible as real flag JSON is."""
    return [
        {
            "id": i,
            "key": f"team-{team_id}-flag-{i}-v{version}",
            "active": True,
            "filters": {"groups": [{"properties": [], "rollout_percentage": (i * 7) % 100}]},
        }
        for i in range(300)
    ]


@pytest.fixture
def payloads(redis_url: str) -> tuple[BackendWriter, dict[int, tuple[bytes, str]]]:
    """Three teams with ~30 KB payloads: team id -> (stored JSON bytes, ETag)."""
    writer = BackendWriter(redis_url)
    stored = {}
    for team_id in TEAMS:
        token = f"phc_cache_{team_id}"
        writer.set_team(token, {"id": team_id, "api_token": token, "secret_api_token": SECRET})
        text, etag = writer.set_definitions(team_id, flags(team_id))
        stored[team_id] = (text.encode(), etag)
    return writer, stored


async def served(client: Client, team_id: int, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    response = await client.get(url(team_id), headers={**AUTH, **(headers or {})})
    return response.status, await response.read()


async def test_total_budget_keeps_the_most_recently_used_payloads(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    _, stored = payloads
    size = len(stored[1][0])
    client = await make_proxy(definitions={"cache_budget_bytes": 2 * size + size // 2})
    cache = client.app[keys.DEFINITIONS].cache
    for team_id in TEAMS:
        assert await served(client, team_id) == (200, stored[team_id][0])
    assert len(cache) == 2  # team 1, least recently used, went first
    assert cache.bytes_held <= 2 * size + size // 2
    misses = cache.misses
    assert await served(client, 3) == (200, stored[3][0])
    assert cache.misses == misses  # held
    assert await served(client, 1) == (200, stored[1][0])
    assert cache.misses == misses + 1  # read from Redis again


async def test_beyond_the_decoded_budget_payloads_are_held_compressed_and_served_exactly(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    _, stored = payloads
    size = len(stored[1][0])
    client = await make_proxy(definitions={"cache_decoded_budget_bytes": size + size // 2})
    cache = client.app[keys.DEFINITIONS].cache
    for team_id in TEAMS:
        assert await served(client, team_id) == (200, stored[team_id][0])
    assert len(cache) == 3  # all held: one decoded (the last served), three compressed
    assert cache.decoded_size == size
    assert size < cache.bytes_held < size + 3 * size // 4
    misses = cache.misses

    # A 304 never needs the payload, so it never decompresses.
    status, _ = await served(client, 1, {"If-None-Match": f'W/"{stored[1][1]}"'})
    assert (status, cache.decompressions) == (304, 0)
    # A 200 from a compressed-only copy: decompressed in memory, byte for byte, no Redis read.
    for team_id in (1, 1, 2):
        assert await served(client, team_id) == (200, stored[team_id][0])
    assert cache.decompressions == 2  # team 1 once (then held decoded), team 2 once
    assert cache.misses == misses
    assert cache.decoded_size == size  # team 2 now, team 1 back to compressed only

    samples = await scrape(client)
    assert value(samples, "edge_proxy_definitions_cache_decompressions_total") == 2
    assert value(samples, "edge_proxy_definitions_cache_decoded_size_bytes") == size
    assert value(samples, "edge_proxy_definitions_cache_size_bytes") == cache.bytes_held


async def test_a_compressed_only_payload_follows_a_backend_rewrite(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    writer, stored = payloads
    client = await make_proxy(definitions={"cache_decoded_budget_bytes": 0})
    assert await served(client, 1) == (200, stored[1][0])
    assert client.app[keys.DEFINITIONS].cache.decoded_size == 0
    text, etag = writer.set_definitions(1, flags(1, version=2))
    deadline = time.monotonic() + 5
    while (answer := await served(client, 1)) != (200, text.encode()):
        assert answer == (200, stored[1][0]), "only the old or the new payload, never anything else"
        assert time.monotonic() < deadline, "the rewrite was never served"
        await asyncio.sleep(0.05)
    status, _ = await served(client, 1, {"If-None-Match": f'W/"{etag}"'})
    assert status == 304


async def test_compressed_copies_hold_only_their_own_size(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    # python-zstandard hands back its output in a buffer sized for the input: kept as is, each ~3 KB copy
    # would hold ~30 KB of heap, and the compact cache would save almost nothing.
    client = await make_proxy(definitions={"cache_decoded_budget_bytes": 0})
    cache = client.app[keys.DEFINITIONS].cache
    tracemalloc.start()
    try:
        for team_id in TEAMS:
            assert (await served(client, team_id))[0] == 200
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert cache.decoded_size == 0
    packed = cache.bytes_held
    # What is still allocated by the line that makes the compressed copies: the copies, and nothing more.
    source, first = inspect.getsourcelines(DefinitionsCache._store)
    line = first + next(i for i, text in enumerate(source) if ".compress(" in text)
    held = sum(
        trace.size
        for trace in snapshot.filter_traces(
            [tracemalloc.Filter(True, inspect.getfile(DefinitionsCache), line)]
        ).traces
    )
    assert packed < held < packed + 3 * 64, (held, packed)  # + a bytes object's header each


# Any sequence of reads, serves and backend rewrites keeps the cache's books right: what it says it holds is
# what its entries hold, within both budgets, and every 200 is the payload the backend stored.

Op = tuple[str, int, int]  # (what, team, flag count)
ops = st.lists(
    st.tuples(
        st.sampled_from(["etag", "serve", "rewrite", "refresh"]), st.sampled_from(TEAMS), st.integers(1, 60)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops, budget=st.integers(0, 40_000), decoded=st.one_of(st.none(), st.integers(0, 20_000)))
def test_the_books_balance_under_any_sequence(
    redis_url: str, steps: list[Op], budget: int, decoded: int | None
) -> None:
    asyncio.run(_run_books(redis_url, steps, budget, decoded))


async def _run_books(redis_url: str, steps: list[Op], budget: int, decoded: int | None) -> None:
    writer = BackendWriter(redis_url)
    redis.Redis.from_url(redis_url).flushall()
    current = {team: writer.set_definitions(team, flags(team)[:5]) for team in TEAMS}
    versions = {team: {text.encode()} for team, (text, _) in current.items()}
    settings_ = DefinitionsSettings(cache_budget_bytes=budget, cache_decoded_budget_bytes=decoded)
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(client, RedisContract(RedisLayout()), settings_)
    try:
        for what, team, count in steps:
            if what == "rewrite":
                current[team] = writer.set_definitions(team, flags(team, version=count)[:count])
                versions[team].add(current[team][0].encode())
            elif what == "refresh":
                await cache.refresh()
                # Every team held was checked against Redis: none is left on an old payload.
                assert all(e.etag == current[e.team_id][1] for e in cache._entries.values())
            else:
                entry = cache.get(team) or await cache.load(team, with_body=what == "serve")
                if what == "serve":
                    body = None if entry is None else cache.body(entry)
                    if body is None:  # an ETag-only entry: the 200 path loads the payload
                        loaded = await cache.load(team, with_body=True)
                        body = None if loaded is None else cache.body(loaded)
                    # One the backend stored (the latest, or one the last refresh has not seen replaced).
                    assert body in versions[team]
            held = list(cache._entries.values())  # the books, against the entries themselves
            assert cache.bytes_held == sum(entry.size for entry in held)
            assert cache.bytes_held <= budget
            assert cache.decoded_size == sum(len(e.body) for e in held if e.body is not None)
            if decoded is not None:
                assert cache.decoded_size <= decoded
                assert all(e.packed is not None for e in held if e.body is not None)
    finally:
        await client.aclose()


async def test_an_etag_only_read_confirming_a_held_payload_keeps_it(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]], redis_url: str
) -> None:
    """A 304's read (the ETag alone) past max staleness, after an outage for one: the payload held under
    the same ETag stays held, rather than an ETag-only entry replacing it (the next 200 then read Redis)."""
    _, stored = payloads
    client = await make_proxy(definitions={"max_staleness_seconds": 0.2, "refresh_interval_seconds": 3600})
    team_id = TEAMS[0]
    body, etag = stored[team_id]
    assert await served(client, team_id) == (200, body)
    await asyncio.sleep(0.3)  # past max staleness: the next request reads Redis
    assert await served(client, team_id, {"If-None-Match": f'W/"{etag}"'}) == (304, b"")
    cache = client.app[keys.DEFINITIONS].cache
    held = cache.get(team_id)
    assert held is not None
    assert cache.body(held) == body
    with redis.Redis.from_url(redis_url) as sync:
        sync.config_resetstat()
    assert await served(client, team_id) == (200, body)
    with redis.Redis.from_url(redis_url) as sync:
        stats = sync.info("commandstats")
    assert "cmdstat_get" not in stats
    assert "cmdstat_mget" not in stats


async def test_times_of_use_are_kept_for_the_teams_held_not_every_team_ever_loaded(redis_url: str) -> None:
    """Teams the budget pushed out kept their time of use for ever: one entry per team ever served."""
    writer = BackendWriter(redis_url)
    small = writer.set_definitions(1, flags(1)[:1])[0].encode()
    for team in range(2, 3001):
        writer.set_definitions(team, flags(team)[:1])
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(
        client, RedisContract(RedisLayout()), DefinitionsSettings(cache_budget_bytes=10 * len(small))
    )
    try:
        for team in range(1, 3001):
            assert await cache.load(team, with_body=True) is not None
        assert len(cache) <= 10
        await cache.refresh()
        assert len(cache._used_at) <= 2 * len(cache) + 1024
        assert set(cache._entries) <= set(cache._used_at)  # those held keep theirs
    finally:
        await client.aclose()


async def assert_held_is_never_older(cache: DefinitionsCache, team_id: int, latest: bytes) -> None:
    """What is held for `team_id` is the latest payload (`latest`) or nothing (two overlapping reads found
    different contents: neither trusted), and the next load reads the latest."""
    held = cache.get(team_id)
    assert held is None or cache.body(held) in (latest, None)
    if held is not None and held.body is None and held.packed is None:  # an ETag-only entry
        assert held.etag == hashlib.sha256(latest).hexdigest()[:16]
    loaded = await cache.load(team_id, with_body=True)
    assert loaded is not None
    assert cache.body(loaded) == latest
    again = cache.get(team_id)
    assert again is not None
    assert cache.body(again) == latest


class GatedRedis(aioredis.Redis):
    """A Redis client whose next MGET, once armed, reads at once and answers only when released."""

    gate: tuple[asyncio.Event, asyncio.Event] | None = None  # (read, release)

    async def mget(self, keys: Any, *args: Any) -> Any:
        gate, self.gate = self.gate, None
        values = await super().mget(keys, *args)
        if gate is not None:
            read, release = gate
            read.set()
            await release.wait()
        return values

    async def held_back(self, load: Coroutine[Any, Any, T]) -> tuple[asyncio.Task[T], asyncio.Event]:
        """Start `load` with its MGET armed; once Redis has answered it: the load and the event that hands
        the answer back."""
        read, release = asyncio.Event(), asyncio.Event()
        self.gate = (read, release)
        task = asyncio.create_task(load)
        await read.wait()
        return task, release


@asynccontextmanager
async def gated_cache(
    redis_url: str, settings: DefinitionsSettings | None = None
) -> AsyncIterator[tuple[GatedRedis, DefinitionsCache]]:
    """A payload cache on a GatedRedis client, closed on the way out."""
    client = cast(GatedRedis, GatedRedis.from_url(redis_url))
    try:
        yield (
            client,
            DefinitionsCache(client, RedisContract(RedisLayout()), settings or DefinitionsSettings()),
        )
    finally:
        await client.aclose()


async def test_a_load_that_read_before_a_newer_entry_was_held_does_not_replace_it(redis_url: str) -> None:
    """Found by a reviewer: a 200's payload read, answered after the refresher had held the next version's
    ETag, replaced it; clients holding that ETag (304) then got the older flags (200) from this replica."""
    writer = BackendWriter(redis_url)
    _, v1 = writer.set_definitions(1, flags(1, version=1))
    async with gated_cache(redis_url) as (client, cache):
        assert await cache.load(1, with_body=False) is not None  # a 304's read: the ETag alone
        loading, release = await client.held_back(
            cache.load(1, with_body=True)
        )  # a 200's read: reads version 1
        text, _ = writer.set_definitions(1, flags(1, version=2))
        await cache.refresh()  # holds version 2's ETag
        release.set()
        old = await loading
        assert old is not None
        assert old.etag == v1  # what that read returned, to whoever waited for it
        await assert_held_is_never_older(cache, 1, text.encode())


async def test_the_refresher_lets_requests_run_while_it_rebuilds_many_payloads(redis_url: str) -> None:
    """A backend-wide rewrite: every payload held changed at once. Each is decoded and parsed (~2 ms at
    64 KB); 1,000 held the event loop, liveness included, for 1.8 s."""
    writer = BackendWriter(redis_url)
    teams = range(1, 41)
    for team in teams:
        writer.set_definitions(team, flags(team)[:20])
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(client, RedisContract(RedisLayout()), DefinitionsSettings())
    try:
        for team in teams:
            assert await cache.load(team, with_body=True) is not None
        new = {team: writer.set_definitions(team, flags(team, version=2)[:20])[1] for team in teams}
        refreshing = asyncio.create_task(cache.refresh())
        seen = set()
        while not refreshing.done():
            seen.add(sum(entry.etag == new[entry.team_id] for entry in cache._entries.values()))
            await asyncio.sleep(0)
        await refreshing
        assert seen - {0, len(teams)}, seen  # this loop ran between rebuilds, not only before and after
        assert all(entry.etag == new[entry.team_id] for entry in cache._entries.values())
    finally:
        await client.aclose()


async def test_a_payload_without_etag_is_rebuilt_only_when_it_changes(redis_url: str) -> None:
    """With no ETag, the refresher reads the payload each cycle to see a change; it decoded and parsed it
    again each time too (1,000 such teams: half a core, and each cycle over 2 s)."""
    writer = BackendWriter(redis_url)
    writer.set_payload_without_etag(1, flags(1))
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(client, RedisContract(RedisLayout()), DefinitionsSettings())
    try:
        entry = await cache.load(1, with_body=True)
        assert entry is not None
        assert entry.etag is None
        await cache.refresh()
        await cache.refresh()
        assert cache.get(1) is entry  # confirmed as it stands
        text = writer.set_payload_without_etag(1, flags(1, version=2))
        await cache.refresh()
        changed = cache.get(1)
        assert changed is not None
        assert changed is not entry
        assert cache.body(changed) == text.encode()
    finally:
        await client.aclose()


async def test_an_entry_the_backend_deletes_right_after_its_load_is_dropped_at_the_next_refresh(
    redis_url: str,
) -> None:
    """Its ETag and payload both gone: a miss from then on (found unguarded by mutation testing: an absent
    ETag compared equal to the never-recorded raw ETag of a fresh entry, and it was served for ever)."""
    writer = BackendWriter(redis_url)
    writer.set_definitions(1, flags(1))
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(client, RedisContract(RedisLayout()), DefinitionsSettings())
    try:
        assert await cache.load(1, with_body=True) is not None
        contract = RedisContract(RedisLayout())
        await client.delete(contract.payload_key(1), contract.etag_key(1))
        await cache.refresh()
        assert cache.get(1) is None
    finally:
        await client.aclose()


def test_billed_unless_every_flag_key_has_an_unbilled_prefix() -> None:
    """Contract §3.8 (found unguarded by mutation testing)."""
    prefixes = ("survey-targeting-", "product-tour-targeting-")
    assert is_billable(b'{"flags":[{"key":"survey-targeting-a"}]}', prefixes) is False
    assert (
        is_billable(b'{"flags":[{"key":"survey-targeting-a"},{"key":"product-tour-targeting-b"}]}', prefixes)
        is False
    )
    assert is_billable(b'{"flags":[{"key":"survey-targeting-a"},{"key":"beta"}]}', prefixes) is True
    assert is_billable(b'{"flags":[{"key":1}]}', prefixes) is True


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b'"hello"',
        b"[1, 2]",
        b'{"flags": null}',
        b'{"flags": {"a": 1}}',
        b'{"flags": [1]}',
        b"\xef\xbb\xbf{}",
        b'{"n": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_a_payload_that_is_no_flags_object_is_refused(body: bytes) -> None:
    """The backend parses the payload to bill it and fails on these (a 500; found by a reviewer): refused
    here, so the request goes to the backend rather than being served and billed."""
    with pytest.raises(DecodeError, match="not a flags payload"):
        is_billable(body, ("survey-targeting-",))


async def test_billability_is_remembered_per_team_not_per_etag(make_proxy: MakeProxy, redis_url: str) -> None:
    """Found by a reviewer: remembered by ETag alone, a team whose stored ETag equals another team's (nothing
    compares an ETag with its payload on one node) was billed by the other team's flags."""
    writer = BackendWriter(redis_url)
    payload = "cache/teams/{}/feature_flags/flags_with_cohorts.json"
    for team_id, key in ((1, "survey-targeting-a"), (2, "beta")):
        token = f"phc_cache_{team_id}"
        writer.set_team(token, {"id": team_id, "api_token": token, "secret_api_token": SECRET})
        text = json.dumps({"flags": [{"key": key}]})
        writer.cache.set_many(
            {payload.format(team_id): text, payload.format(team_id) + ":etag": "0123456789abcdef"}
        )
    client = await make_proxy()
    cache = client.app[keys.DEFINITIONS].cache
    for team_id in (1, 2):
        assert (await served(client, team_id))[0] == 200
    survey_only, flagged = cache.get(1), cache.get(2)
    assert survey_only is not None
    assert flagged is not None
    assert (survey_only.billable, flagged.billable) == (False, True)


async def test_a_payload_larger_than_the_whole_budget_is_served_and_never_held(
    redis_url: str, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    """Held, it would push every other team out first (found unguarded by mutation testing)."""
    _, stored = payloads
    client = aioredis.Redis.from_url(redis_url)
    budget = len(stored[1][0]) * 3 // 2
    cache = DefinitionsCache(
        client, RedisContract(RedisLayout()), DefinitionsSettings(cache_budget_bytes=budget)
    )
    big = BackendWriter(redis_url).set_definitions(9, flags(9) * 2)[0].encode()
    try:
        assert await cache.load(1, with_body=True) is not None
        entry = await cache.load(9, with_body=True)
        assert entry is not None
        assert cache.body(entry) == big
        assert cache.get(9) is None
        assert cache.get(1) is not None  # still held
    finally:
        await client.aclose()


async def test_a_team_not_asked_for_within_idle_evict_seconds_is_let_go(redis_url: str) -> None:
    """Found unguarded by mutation testing: with idle eviction gone, every team ever served stayed held
    (and re-read every cycle) until the budget pushed it out."""
    writer = BackendWriter(redis_url)
    for team in (1, 2):
        writer.set_definitions(team, flags(team)[:5])
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(
        client, RedisContract(RedisLayout()), DefinitionsSettings(idle_evict_seconds=1.0)
    )
    try:
        for team in (1, 2):
            assert await cache.load(team, with_body=True) is not None
        await asyncio.sleep(0.6)
        await cache.load(2, with_body=True)  # team 2 is asked for again; team 1 is not
        await asyncio.sleep(0.5)
        await cache.refresh()
        assert list(cache._entries) == [2]
    finally:
        await client.aclose()


class _Paced:
    """The test's Redis client: GET answered by Redis at once but returned when `got` opens; MGET sent only
    when `send_mget` opens (a loop busy elsewhere, a wait for a pool connection)."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real
        self.got = asyncio.Event()
        self.send_mget = asyncio.Event()

    async def get(self, key: str) -> Any:
        value = await self.real.get(key)
        await self.got.wait()
        return value

    async def mget(self, keys: Any) -> Any:
        await self.send_mget.wait()
        return await self.real.mget(keys)


async def test_of_two_reads_the_later_begun_is_held_whichever_finishes_last(redis_url: str) -> None:
    """Found by the review of this change's first version, which ordered reads by when they finished: a
    304's read (the ETag, version 1) finishing after a 200's read of version 2 had begun refused version 2,
    and the replica answered version 1 after it had answered version 2."""
    writer = BackendWriter(redis_url)
    writer.set_definitions(7, flags(7, version=1))
    real = aioredis.Redis.from_url(redis_url)
    client = _Paced(real)
    cache = DefinitionsCache(
        cast(aioredis.Redis, client), RedisContract(RedisLayout()), DefinitionsSettings()
    )
    try:
        etag_only = asyncio.create_task(cache.load(7, with_body=False))  # reads version 1's ETag
        await asyncio.sleep(0.05)
        whole = asyncio.create_task(cache.load(7, with_body=True))  # begins later
        await asyncio.sleep(0.05)
        client.got.set()
        assert await etag_only is not None  # held: version 1, from the earlier-begun read
        text, _ = writer.set_definitions(7, flags(7, version=2))
        client.send_mget.set()
        assert (await whole) is not None
        await assert_held_is_never_older(cache, 7, text.encode())
    finally:
        await real.aclose()


async def test_the_refresher_never_brings_back_an_entry_a_load_found_deleted(redis_url: str) -> None:
    """Found by the review of this change's first version: while the refresher let requests run between
    its rebuilds, a load found team 9's entry deleted (a miss, forwarded, dropped); the refresher then held
    it again from its own earlier read, and served the deleted payload from memory."""
    teams = range(1, 10)  # team 9 is built after the refresher's first pause
    contract = RedisContract(RedisLayout())
    writer = BackendWriter(redis_url)
    for team in teams:
        writer.set_definitions(team, flags(team)[:3])
    real = aioredis.Redis.from_url(redis_url)
    loading: list[asyncio.Task[Any]] = []
    released = asyncio.Event()

    class Client:
        async def get(self, key: str) -> Any:
            return await real.get(key)

        async def mget(self, keys: Any) -> Any:
            values = await real.mget(keys)
            if len(keys) == 2 * len(teams):  # the refresher's read of every changed payload
                await real.delete(contract.payload_key(9), contract.etag_key(9))  # the backend deletes it
                loading.append(asyncio.create_task(cache.load(9, with_body=True)))  # and a request loads it
                await asyncio.sleep(0.05)
            elif list(keys) == [contract.payload_key(9), contract.etag_key(9)] and loading:
                await released.wait()  # that load finishes during the refresher's pause
            return values

    cache = DefinitionsCache(cast(aioredis.Redis, Client()), contract, DefinitionsSettings())
    try:
        for team in teams:
            assert await cache.load(team, with_body=True) is not None
        for team in teams:
            writer.set_definitions(team, flags(team, version=2)[:3])
        builds = 0
        build = cache._build

        def counted(*args: Any) -> Any:
            nonlocal builds
            builds += 1
            if builds == 8:
                released.set()
            return build(*args)

        cache._build = counted  # type: ignore[method-assign, assignment]
        await cache.refresh()
        assert await loading[0] is None  # the request's load: a miss
        assert cache.get(9) is None
    finally:
        await real.aclose()


async def test_a_rollback_the_refresher_confirmed_is_not_undone_by_an_earlier_begun_read(
    redis_url: str,
) -> None:
    """Found by the review of the read-order fix: A, then B, then A again (a rollback). A 200's read of B,
    begun before the refresher confirmed A, finished after it and held B: a confirmation did not count as
    a read."""
    writer = BackendWriter(redis_url)
    writer.set_definitions(7, flags(7, version=1))
    async with gated_cache(redis_url) as (client, cache):
        assert await cache.load(7, with_body=False) is not None  # a 304's read: A's ETag held
        writer.set_definitions(7, flags(7, version=2))  # B
        reading_b, release = await client.held_back(cache.load(7, with_body=True))
        text, _ = writer.set_definitions(7, flags(7, version=1))  # A again
        await cache.refresh()  # confirms A
        release.set()
        await reading_b
        await assert_held_is_never_older(cache, 7, text.encode())


async def test_without_etags_an_earlier_begun_read_does_not_replace_a_later_ones_payload(
    redis_url: str,
) -> None:
    """Found by the same review: with no ETag on either side the contents were taken for the same."""
    writer = BackendWriter(redis_url)
    writer.set_payload_without_etag(8, flags(8, version=1))
    async with gated_cache(redis_url) as (client, cache):
        reading_v1, release = await client.held_back(
            cache.load(8, with_body=False)
        )  # without an ETag: the payload
        text = writer.set_payload_without_etag(8, flags(8, version=2))
        assert await cache.load(8, with_body=True) is not None  # begun later: version 2
        release.set()
        await reading_v1
        await assert_held_is_never_older(cache, 8, text.encode())


async def test_an_earlier_begun_read_does_not_bring_back_what_a_later_one_found_deleted(
    redis_url: str,
) -> None:
    """Found by a review of the read-order rule: with nothing held (a later-begun load had found the payload
    deleted), no order was checked, and the earlier read's payload was held again."""
    writer = BackendWriter(redis_url)
    writer.set_definitions(9, flags(9)[:3])
    contract = RedisContract(RedisLayout())
    async with gated_cache(redis_url) as (client, cache):
        earlier, release = await client.held_back(
            cache.load(9, with_body=True)
        )  # reads the payload; answer held back
        await client.delete(contract.payload_key(9), contract.etag_key(9))
        assert await cache.load(9, with_body=False) is None  # begun later: deleted, a miss
        release.set()
        await earlier
        assert cache.get(9) is None


async def test_an_earlier_begun_read_does_not_replace_a_newer_entry_the_budget_pushed_out(
    redis_url: str,
) -> None:
    """Found by the same review: the newer entry, pushed out by the budget, left no trace of having been
    held, and the earlier read's older version was held after it."""
    writer = BackendWriter(redis_url)
    writer.set_definitions(7, flags(7, version=1)[:50])
    size = len(writer.set_definitions(8, flags(8)[:200])[0])
    writer.set_definitions(9, flags(9)[:200])
    settings = DefinitionsSettings(cache_budget_bytes=size + size // 2)
    async with gated_cache(redis_url, settings) as (client, cache):
        assert await cache.load(7, with_body=False) is not None  # a 304: version 1's ETag held
        earlier, release = await client.held_back(cache.load(7, with_body=True))  # reads version 1; held back
        text, v2 = writer.set_definitions(7, flags(7, version=2)[:50])
        await cache.refresh()  # holds version 2's ETag: a 304 for it is answered from memory
        held = cache.get(7)
        assert held is not None
        assert held.etag == v2
        for team in (8, 9):  # the budget pushes team 7 out
            await cache.load(team, with_body=True)
        assert cache.get(7) is None
        release.set()
        await earlier
        await assert_held_is_never_older(cache, 7, text.encode())


async def test_a_later_begun_read_that_reached_redis_first_is_not_replaced_by_the_earlier_one(
    redis_url: str,
) -> None:
    """Found by a review of the order by when reads began: a 200's read waiting for a connection reached
    Redis after a 304's read begun later (version 1), saw version 2 and held it; the 304's answer, handed
    back last, then held version 1. Two overlapping reads that disagree are neither trusted."""
    writer = BackendWriter(redis_url)
    writer.set_definitions(7, flags(7, version=1))
    real = aioredis.Redis.from_url(redis_url)
    client = _Paced(real)
    cache = DefinitionsCache(
        cast(aioredis.Redis, client), RedisContract(RedisLayout()), DefinitionsSettings()
    )
    try:
        whole = asyncio.create_task(cache.load(7, with_body=True))  # its MGET not sent yet
        await asyncio.sleep(0.05)
        etag_only = asyncio.create_task(cache.load(7, with_body=False))  # reads version 1; handed back late
        await asyncio.sleep(0.05)
        text, _ = writer.set_definitions(7, flags(7, version=2))
        client.send_mget.set()
        assert await whole is not None  # version 2, held
        client.got.set()
        await etag_only
        await assert_held_is_never_older(cache, 7, text.encode())
    finally:
        await real.aclose()


def refused_team(redis_url: str, etag: str | None) -> BackendWriter:
    """Team 1 with a payload whose flags are no list (the backend fails on it), with this ETag or none."""
    writer = BackendWriter(redis_url)
    token = "phc_cache_1"
    writer.set_team(token, {"id": 1, "api_token": token, "secret_api_token": SECRET})
    key = "cache/teams/1/feature_flags/flags_with_cohorts.json"
    writer.cache.set(key, json.dumps({"flags": {"not": "a list"}}))
    if etag is not None:
        writer.cache.set(key + ":etag", etag)
    return writer


async def forwarded_without_reading_the_payload(client: Client, redis_url: str, requests: int = 5) -> None:
    """`requests` more requests of team 1 are forwarded at one GET each, no payload read."""
    with redis.Redis.from_url(redis_url) as sync:
        sync.config_resetstat()
    for _ in range(requests):
        assert (await (await client.get(url(1), headers=AUTH)).json())["upstream"] is True
    with redis.Redis.from_url(redis_url) as sync:
        stats = sync.info("commandstats")
    assert "cmdstat_mget" not in stats
    assert stats["cmdstat_get"]["calls"] == requests


async def test_a_refused_payload_is_not_read_nor_parsed_again_until_its_etag_changes(
    make_proxy: MakeProxy, redis_url: str
) -> None:
    """Found by a reviewer: a payload that is no flags object was read and parsed again by every request
    (0.4 s of the event loop each for 6 MB) before it was forwarded. Remembered by its ETag, the next
    requests cost one GET, until the backend writes a new one."""
    writer = refused_team(redis_url, "0123456789abcdef")
    client = await make_proxy()
    assert (await (await client.get(url(1), headers=AUTH)).json())["upstream"] is True
    await forwarded_without_reading_the_payload(client, redis_url)
    text, _ = writer.set_definitions(1, flags(1))
    served_now = await client.get(url(1), headers=AUTH)
    assert (served_now.status, await served_now.read()) == (200, text.encode())


async def test_reads_racing_past_a_refusal_whose_etag_changed_both_answer(
    make_proxy: MakeProxy, redis_url: str, chaos: ChaosProxy
) -> None:
    """Found by a reviewer: two reads of a refused team (a 200's and a 304's, not shared) that both saw its
    new ETag both forgot the refusal, and the second raised KeyError: a 500. Redis's replies are held back
    here so that both reads are out at once."""
    writer = refused_team(redis_url, "00000000000000aa")
    client = await make_proxy(redis={"url": chaos.url, "timeout_seconds": 2.0})
    assert (await (await client.get(url(1), headers=AUTH)).json())["upstream"] is True
    text, _ = writer.set_definitions(1, flags(1))
    chaos.reply_delay = 0.2
    plain, conditional = await asyncio.gather(
        client.get(url(1), headers=AUTH),
        client.get(url(1), headers={**AUTH, "If-None-Match": 'W/"0123"'}),
    )
    assert (plain.status, await plain.read()) == (200, text.encode())
    assert (conditional.status, await conditional.read()) == (200, text.encode())


async def test_a_refused_payload_without_an_etag_is_not_parsed_again_for_a_while(
    make_proxy: MakeProxy, redis_url: str
) -> None:
    """With the backend's ETags off only time can tell a change: the refusal holds a few seconds, each
    request meanwhile one GET (found by a reviewer: a full read and parse each)."""
    refused_team(redis_url, None)
    client = await make_proxy()
    assert (await (await client.get(url(1), headers=AUTH)).json())["upstream"] is True
    await forwarded_without_reading_the_payload(client, redis_url)


async def test_heap_pages_a_spike_freed_go_back_to_the_os_once_the_process_has_grown(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages freed after a spike of requests in flight (large heads, bodies) stayed in the C heap: only
    payload churn handed them back, so each spike raised the floor under a container's memory limit."""
    client = aioredis.Redis.from_url(redis_url)
    cache = DefinitionsCache(client, RedisContract(RedisLayout()), DefinitionsSettings())
    try:
        cache.heap.maybe_trim(now=100.0)  # the first look sets where the process stands
        # 80 MB of malloc'd buffers, one in 16 kept: freed, but inside the heap, where glibc keeps the pages.
        buffers = [bytes(4000) for _ in range(20_000)]
        kept = buffers[::16]
        del buffers
        before = resident_bytes()
        cache.heap.maybe_trim(now=200.0)
        after = resident_bytes()
        assert before is not None
        assert after is not None
        assert before - after > 40 * 2**20, (before, after)

        trims: list[float] = []

        def counted() -> bool:
            trims.append(1)
            return True

        monkeypatch.setattr(memory_module, "release_free_memory", counted)
        cache.heap.maybe_trim(now=300.0)  # grown by nothing since: no trim
        more = [bytes(4000) for _ in range(12_000)]  # 48 MB more, held
        cache.heap.maybe_trim(now=301.0)  # within the interval: no trim
        cache.heap.maybe_trim(now=400.0)
        assert trims == [1]
        del kept, more
    finally:
        await client.aclose()
