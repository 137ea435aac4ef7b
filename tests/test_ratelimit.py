"""Rate limits on a real Redis: exact boundaries, both budgets, replicas sharing one counter, fail-open."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from pytest_aiohttp import AiohttpClient

from proxy import cluster, keys, ratelimit, tasks
from proxy.ratelimit import SYNC_FIRST, SYNC_SCRIPT, RateLimiter, ratelimit_ctx, too_many_requests
from proxy.redis_client import make_client, redis_ctx
from proxy.settings import RateLimitSettings, RedisSettings
from tests.chaos import ChaosProxy
from tests.conftest import settings_for
from tests.rig import RedisServer

TEAM = 42
MODES = pytest.mark.parametrize("mode", ["fast", "exact"])


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The proxy's own kind of client, on the test Redis."""
    redis = make_client(RedisSettings(url=redis_url))
    assert isinstance(redis, aioredis.Redis)  # a redis:// URL: the one-node client
    yield redis
    await redis.aclose()


def limiter(client: aioredis.Redis, **settings: Any) -> RateLimiter:
    """A limiter with `settings` over the defaults (which tests never reach)."""
    return RateLimiter(RateLimitSettings(**settings), client)


async def request(rl: RateLimiter, team_id: int = TEAM, conditional: bool = False) -> float | None:
    """One request's check, as the handler makes it: from memory in fast mode unless it must sync first."""
    retry_after = rl.check(team_id, conditional) if rl.fast else SYNC_FIRST
    if retry_after == SYNC_FIRST:
        retry_after = await rl.acheck(team_id, conditional)
    return retry_after


async def burst(rl: RateLimiter, n: int, team_id: int = TEAM, conditional: bool = False) -> int:
    """Send `n` requests; how many were admitted."""
    return sum([await request(rl, team_id, conditional) is None for _ in range(n)])


async def shared_count(client: aioredis.Redis, rl: RateLimiter, budget: str = "full") -> int:
    """The shared window counter, as Redis holds it."""
    raw = await client.get(rl.key(TEAM, "full" if budget == "full" else "conditional"))
    return int(raw or 0)


@MODES
async def test_limit_admits_exactly_its_amount_then_429_with_retry_after(
    client: aioredis.Redis, mode: str
) -> None:
    rl = limiter(client, default="5/minute", mode=mode)
    assert await burst(rl, 5) == 5
    retry_after = await request(rl)
    assert retry_after is not None
    assert 0 < retry_after <= 60
    await rl.sync()
    assert await shared_count(client, rl) >= 5
    assert 0 < await client.ttl(rl.key(TEAM, "full")) <= 60
    assert rl.limited == 1


def test_429_is_the_contract_body_with_whole_seconds() -> None:
    response = too_many_requests(12.2)
    assert response.status == 429
    assert response.content_type == "application/json"
    assert response.headers["Retry-After"] == "13"
    assert isinstance(response.body, bytes)
    assert json.loads(response.body) == {
        "type": "validation_error",
        "code": "rate_limit_exceeded",
        "detail": "Rate limit exceeded",
        "attr": None,
    }
    assert too_many_requests(0.01).headers["Retry-After"] == "1"


@MODES
async def test_team_override_replaces_the_default(client: aioredis.Redis, mode: str) -> None:
    rl = limiter(client, default="3/minute", team_overrides={"123": "7/minute"}, mode=mode)
    assert await burst(rl, 10, team_id=123) == 7
    assert await burst(rl, 10, team_id=TEAM) == 3


@MODES
async def test_allowlisted_team_is_never_limited_nor_counted(client: aioredis.Redis, mode: str) -> None:
    rl = limiter(client, default="1/minute", etag="1/minute", allowlist=("9",), mode=mode)
    assert await burst(rl, 20, team_id=9) == 20
    assert await burst(rl, 20, team_id=9, conditional=True) == 20
    await rl.sync()
    assert await client.keys("edge-proxy:ratelimit:*") == []


@MODES
async def test_if_none_match_requests_spend_their_own_budget(client: aioredis.Redis, mode: str) -> None:
    rl = limiter(
        client, default="2/minute", etag="4/minute", team_overrides={str(TEAM): "3/minute"}, mode=mode
    )
    assert await burst(rl, 10, conditional=True) == 4  # the override is for the full budget only
    assert await burst(rl, 10) == 3  # and the conditional budget did not spend it
    await rl.sync()
    assert await shared_count(client, rl, "conditional") >= 4


async def test_disabled_admits_everything_without_redis(client: aioredis.Redis) -> None:
    rl = limiter(client, enabled=False, default="1/minute", mode="exact")
    assert rl.fast  # check() is valid: nothing to wait for
    assert await burst(rl, 10) == 10
    assert rl.check(TEAM, conditional=True) is None
    assert await client.keys("*") == []


async def test_check_refuses_exact_mode(client: aioredis.Redis) -> None:
    rl = limiter(client, mode="exact")
    with pytest.raises(TypeError, match="acheck"):
        rl.check(TEAM, conditional=False)


async def test_fast_mode_makes_no_redis_call_per_request(client: aioredis.Redis) -> None:
    rl = limiter(client, default="600/minute")
    assert await burst(rl, 29) == 29  # from memory
    assert await client.keys("*") == []
    assert await burst(rl, 1) == 1  # half a lump (5 % of the limit): pushed, in the background
    await rl.sync()  # (the same push)
    assert await shared_count(client, rl) == 30


async def test_fast_and_exact_replicas_share_one_counter(client: aioredis.Redis) -> None:
    exact = limiter(client, default="5/minute", mode="exact")
    fast = limiter(client, default="5/minute")
    assert await burst(exact, 3) == 3
    fast.check(TEAM, conditional=False)  # admitted from an empty view, then reconciled
    await fast.sync()
    assert await burst(fast, 5) == 1
    await fast.sync()
    assert await burst(exact, 5) == 0
    # The key is the one limits' own fixed-window limiter counts in.
    storage = RedisStorage(
        "async+redis://",
        implementation="redispy",
        key_prefix="edge-proxy:ratelimit",
        connection_pool=client.connection_pool,  # type: ignore[arg-type]
    )
    assert not await FixedWindowRateLimiter(storage).test(parse("5/minute"), "full", str(TEAM))


async def test_two_replicas_admit_exactly_the_limit_when_synced_between_bursts(
    client: aioredis.Redis,
) -> None:
    a, b = limiter(client, default="10/minute"), limiter(client, default="10/minute")
    admitted = 0
    for replica in (a, b):
        admitted += replica.check(TEAM, False) is None
    for replica in (a, b, a):
        await replica.sync()
    for _ in range(6):
        for first, second in ((a, b), (b, a)):
            admitted += await burst(first, 3)
            await first.sync()
            await second.sync()
    assert admitted == 10
    assert await shared_count(client, a) == 10
    assert a.check(TEAM, False) is not None
    assert b.check(TEAM, False) is not None


async def test_two_replicas_hammered_between_syncs_stay_within_the_bound(client: aioredis.Redis) -> None:
    # A lump of 2: each replica holds at most 2 admitted and not pushed.
    a, b = (limiter(client, default="10/minute", push_fraction=0.2) for _ in range(2))
    # Four each (two from memory, a sync, two more): 8 in all, still under the limit.
    assert await burst(a, 4) == 4
    assert await burst(b, 4) == 4
    await a.sync()
    await b.sync()
    await a.sync()
    # Both now see 8 and admit 2 each from that view: 12 = limit + (N - 1) * lump.
    assert await burst(a, 5) == 2
    assert await burst(b, 5) == 2
    await a.sync()
    await b.sync()
    assert await shared_count(client, a) == 12
    assert a.check(TEAM, False) is not None
    assert b.check(TEAM, False) is not None


async def test_concurrent_replicas_with_background_sync_stay_within_the_bound(
    client: aioredis.Redis,
) -> None:
    limit, replicas = 50, 2
    pool = [limiter(client, default=f"{limit}/minute", sync_interval_seconds=0.002) for _ in range(replicas)]
    most_unpushed = [0] * replicas
    admitted = 0

    async def requests(index: int) -> None:
        nonlocal admitted
        rl = pool[index]
        for i in range(400):
            admitted += rl.check(TEAM, False) is None
            window = rl._full.get(TEAM)
            if window is not None:
                most_unpushed[index] = max(most_unpushed[index], window.pending)
            if i % 5 == 0:
                await asyncio.sleep(0.001)  # let the sync loops run between small bursts

    syncs = [asyncio.create_task(rl.run()) for rl in pool]
    await asyncio.gather(*(requests(i) for i in range(replicas)))
    for task in syncs:
        task.cancel()
    await asyncio.gather(*syncs, return_exceptions=True)
    for rl in pool:
        await rl.sync()
    assert limit <= admitted <= limit + (replicas - 1) * max(most_unpushed)
    assert admitted <= replicas * limit
    assert await shared_count(client, pool[0]) == admitted


async def test_replicas_bursting_inside_one_sync_interval_stay_within_the_bound(
    client: aioredis.Redis,
) -> None:
    """Found by a reviewer: the lump only said when a push was due, at the next interval (0.2 s), so a burst
    inside one let each replica admit the whole limit (200 of 100 with two). Now a replica past a lump
    unpushed syncs before deciding: at most limit + (N - 1) * lump."""
    limit, lump, replicas = 100, 10, 2
    rate = f"{limit}/10 seconds"
    pool = [limiter(client, default=rate, push_fraction=lump / limit) for _ in range(replicas)]
    syncs = [asyncio.create_task(rl.run()) for rl in pool]
    try:
        admitted = [await burst(rl, 150) for rl in pool]  # well inside one sync interval each
    finally:
        for task in syncs:
            task.cancel()
        await asyncio.gather(*syncs, return_exceptions=True)
    assert admitted[0] == limit  # the first alone: exactly its limit
    assert limit <= sum(admitted) <= limit + (replicas - 1) * lump
    for rl in pool:
        await rl.sync()
    assert await shared_count(client, pool[0]) == sum(admitted)


async def test_requests_past_the_lump_share_one_sync_per_lump(client: aioredis.Redis) -> None:
    rl = limiter(client, default="1000/minute", push_fraction=0.01)  # a lump of 10
    await client.script_load(SYNC_SCRIPT)
    before = await _script_calls(client)
    results = await asyncio.gather(*(request(rl) for _ in range(100)))  # all at once
    assert results == [None] * 100
    assert await _script_calls(client) - before <= 11  # about one a lump (10), not one a request
    await rl.sync()
    assert await shared_count(client, rl) == 100


async def test_a_team_below_its_limit_is_pushed_before_any_request_waits(client: aioredis.Redis) -> None:
    """Half a lump admitted starts a push in the background: a request waits for Redis only in a burst (a
    lump within one round trip), never in steady traffic (a reviewer saw 53 of 15,682 wait, up to 6 ms)."""
    rl = limiter(client, default="100/minute")  # a lump of 10, pushed from 5
    for _ in range(9):  # up to half the limit (past it, the team is synced every interval)
        for _ in range(5):
            assert rl.check(TEAM, False) is None  # never SYNC_FIRST
        await asyncio.sleep(0.05)  # the push started by the fifth ends
    assert await shared_count(client, rl) == 45


async def test_a_request_woken_as_a_sync_ends_does_not_spin(client: aioredis.Redis) -> None:
    """Found by a reviewer: a sync's task ends a loop pass before its done callback forgets it, and awaiting a
    finished task does not yield: a request looping in acheck() in between spun for ever, the event loop
    (health checks included) held at 100 % CPU."""
    rl = limiter(client, default="100/minute", push_fraction=0.05)  # a lump of 5
    calls = 0
    check = rl.check

    def counted(team_id: int, conditional: bool) -> float | None:
        nonlocal calls
        calls += 1
        assert calls < 1000, "acheck() spinning"
        return check(team_id, conditional)

    rl.check = counted  # type: ignore[method-assign]
    for _ in range(5):
        assert rl.check(1, False) is None
    woken = asyncio.get_running_loop().create_future()
    script = ratelimit.run_script  # type: ignore[attr-defined]

    async def run_script(*args: Any, **kwargs: Any) -> Any:
        replies = await script(*args, **kwargs)
        # Team 2 fills its lump while this sync (which does not hold it) is under way, and a request of it is
        # woken in the same pass that ends the sync: before the sync's done callback.
        for _ in range(5):
            assert rl.check(2, False) is None
        assert rl.check(2, False) == SYNC_FIRST
        woken.set_result(None)
        return replies

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ratelimit, "run_script", run_script)

        async def late_request() -> float | None:
            await woken
            return await rl.acheck(2, False)

        waiting = asyncio.ensure_future(late_request())
        await rl.sync()
        assert await asyncio.wait_for(waiting, 5) is None


async def test_a_request_waiting_for_a_sync_is_admitted_when_redis_is_down(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    rl = limiter(client, default="5/minute")  # a lump of 1: the second request must sync first
    assert await request(rl) is None
    redis_server.stop()
    try:
        assert await request(rl) is None
        assert rl.failing
        assert rl.fail_open == 1
    finally:
        redis_server.start()


async def test_the_shared_window_ends_when_the_one_begun_here_does(client: aioredis.Redis) -> None:
    """Found by a reviewer: the counter took a full window from the first push, a lump of requests after the
    window began here, and the sync then moved the local end to match: every window that much longer, so a
    team at 95 % of its limit was limited (the limit in effect ~limit / (1 + push_fraction))."""
    now = [1000.0]
    rl = RateLimiter(RateLimitSettings(default="100/minute"), client, clock=lambda: now[0])
    assert await burst(rl, 1) == 1  # the window begins here, at 1000
    now[0] += 45
    assert await burst(rl, 9) == 9  # a lump, 45 s in: pushed at the next sync
    await rl.sync()
    assert await shared_count(client, rl) == 10
    assert 14_000 < await client.pttl(rl.key(TEAM, "full")) <= 15_000  # what is left of the minute
    window = rl._full[TEAM]
    assert window.reset_at <= 1060.0  # the local end was not moved later
    # Another replica's window for the team begins later: its push leaves the counter's expiry where the
    # first push set it (found unguarded by mutation testing: an expiry set by every push let each replica
    # stretch the shared window to its own end).
    other = RateLimiter(RateLimitSettings(default="100/minute"), client, clock=lambda: 5000.0)
    assert await burst(other, 10) == 10
    await other.sync()
    assert await shared_count(client, rl) == 20
    assert await client.pttl(rl.key(TEAM, "full")) <= 15_000


async def test_a_sync_of_many_windows_is_sent_in_bounded_calls(client: aioredis.Redis) -> None:
    """Found by a reviewer: one script call for every window held blocked Redis for a second with 100,000,
    past the client's timeout, so the sync after an outage (which sent them all) could never succeed."""
    rl = limiter(client, default="2/minute")  # a lump of 1: one request makes a window worth pushing
    await client.script_load(SYNC_SCRIPT)
    for team_id in range(1, 1201):
        assert rl.check(team_id, False) is None
    before = await _script_calls(client)
    await rl.sync()
    assert await _script_calls(client) - before == 3  # 500 + 500 + 200
    assert all(window.shared == 1 and window.pending == 0 for window in rl._full.values())


async def test_windows_are_forgotten_once_ended_and_idle_whatever_they_held_unpushed(
    client: aioredis.Redis,
) -> None:
    """Found by a reviewer: a team that made fewer requests than half a lump in its last window, then went,
    was kept for ever (50,000 such: 59 MB, and a 104 ms sync every interval)."""
    now = [1000.0]
    rl = RateLimiter(RateLimitSettings(default="600/minute"), client, clock=lambda: now[0])
    for team_id in range(100):
        assert rl.check(team_id, False) is None  # one each: nothing worth a push
    await rl.sync()
    assert len(rl._full) == 100
    now[0] += 61  # the window over, and no request since
    await rl.sync()
    assert rl._full == {}


async def test_a_team_far_below_its_limit_is_not_read_again_after_a_push(client: aioredis.Redis) -> None:
    rl = limiter(client, default="600/minute")
    await client.script_load(SYNC_SCRIPT)
    before = await _script_calls(client)
    assert await burst(rl, 30) == 30  # half a lump: one push
    for _ in range(5):  # the intervals after it, within idle_seconds
        await rl.sync()
    assert await _script_calls(client) - before == 1  # it was re-read at every one (a reviewer counted 10)


@pytest.mark.slow
async def test_failing_with_nothing_to_push_notices_recovery_with_a_ping(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    now = [1000.0]
    rl = RateLimiter(RateLimitSettings(default="2/minute"), client, clock=lambda: now[0])
    assert rl.check(TEAM, False) is None
    redis_server.stop()
    try:
        await rl.sync()
        assert rl.failing
    finally:
        redis_server.start()
    now[0] += 61  # the window is forgotten: nothing left to push
    await rl.sync()
    assert rl._full == {}
    assert not rl.failing


def test_check_outside_a_running_loop_still_decides_from_memory() -> None:
    rl = RateLimiter(RateLimitSettings(default="100/minute"), aioredis.Redis())
    assert [rl.check(TEAM, False) for _ in range(10)] == [None] * 10  # past half a lump: no push started
    assert rl.check(TEAM, False) == SYNC_FIRST


async def test_a_new_window_admits_again(client: aioredis.Redis) -> None:
    rl = limiter(client, default="2/second")
    assert await burst(rl, 3) == 2
    await rl.sync()
    deadline = time.monotonic() + 10
    while rl.check(TEAM, False) is not None:
        assert time.monotonic() < deadline, "the window never ended"
        await asyncio.sleep(0.05)
        await rl.sync()


async def test_a_sync_that_ran_in_redis_but_timed_out_here_is_not_counted_twice(
    client: aioredis.Redis, chaos: ChaosProxy
) -> None:
    """Redis runs the sync, its reply comes after the timeout (a busy Redis): the admissions stay
    unconfirmed here and go again with the next sync (redis-py retries once, too). Counted once all the
    same, or the team would be limited below its limit until the window ends (failing closed)."""
    slow = make_client(RedisSettings(url=chaos.url, timeout_seconds=0.2))
    assert isinstance(slow, aioredis.Redis)  # a redis:// URL: the one-node client
    try:
        rl = limiter(slow, default="10/minute")
        assert await burst(rl, 9, team_id=TEAM + 1) == 9
        await rl.sync()  # the script is loaded in Redis: from here on it runs at the first try
        assert await burst(rl, 6) == 6
        chaos.reply_delay = 0.5
        await rl.sync()
        assert rl.failing
        chaos.reply_delay = 0.0
        await rl.sync()
        assert not rl.failing
        assert await shared_count(client, rl) == 6
        assert await burst(rl, 10) == 4
        await rl.sync()
        assert await shared_count(client, rl) == 10
    finally:
        await slow.aclose()


async def test_a_window_dropped_while_idle_and_begun_again_never_takes_its_old_mark_for_its_own(
    client: aioredis.Redis,
) -> None:
    """Here the window ended and its idle entry was dropped while Redis's (begun later, by the first push)
    still runs, holding this replica's mark: the next window's admissions must still be pushed."""
    now = [1000.0]
    rl = RateLimiter(RateLimitSettings(default="10/minute", idle_seconds=1), client, clock=lambda: now[0])
    assert await burst(rl, 6) == 6
    await rl.sync()
    assert await shared_count(client, rl) == 6
    now[0] += 120  # past the local window's end (Redis's counter still has most of its minute)
    await rl.sync()  # idle past its window: dropped
    assert await burst(rl, 2) == 2
    await rl.sync()
    assert await shared_count(client, rl) == 8


@pytest.mark.slow
async def test_fast_mode_fails_open_while_redis_is_down_then_recovers(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    rl = limiter(client, default="3/minute")
    assert await burst(rl, 3) == 3
    await rl.sync()
    assert rl.check(TEAM, False) is not None
    redis_server.stop()
    assert rl.check(TEAM + 1, False) is None  # something to push, so the next sync meets the outage
    await rl.sync()
    assert rl.failing
    assert await burst(rl, 10) == 10
    assert rl.fail_open == 10
    redis_server.start()  # empty: the outage lost the shared counts
    deadline = time.monotonic() + 30
    while rl.failing:
        assert time.monotonic() < deadline, "never noticed that Redis is back"
        await asyncio.sleep(0.05)
        await rl.sync()
    # The ten admitted unchecked were counted, and pushed once Redis answered: the team is over its limit for
    # the rest of the window (before, they were forgotten, and it got a whole limit more).
    assert await shared_count(client, rl) == 10  # the 3 before went with the old Redis
    assert await burst(rl, 10) == 0
    assert rl.fail_open == 10


@pytest.mark.slow
async def test_exact_mode_fails_open_while_redis_is_down_then_recovers(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    rl = limiter(client, default="3/minute", mode="exact", sync_interval_seconds=0.2)
    assert await burst(rl, 4) == 3
    redis_server.stop()
    assert await rl.acheck(TEAM, False) is None
    assert rl.failing
    # Until the next probe, requests do not wait on Redis at all.
    assert await rl.acheck(TEAM, False) is None
    assert rl.fail_open == 2
    redis_server.start()
    deadline = time.monotonic() + 30
    while rl.failing:
        assert time.monotonic() < deadline, "never noticed that Redis is back"
        await asyncio.sleep(0.05)
        await rl.acheck(TEAM, False)
    assert await burst(rl, 10) < 3
    assert await rl.acheck(TEAM, False) is not None


async def test_ratelimit_ctx_syncs_in_the_background_and_stops_cleanly(
    aiohttp_client: AiohttpClient, redis_url: str, client: aioredis.Redis
) -> None:
    settings = settings_for(
        "http://127.0.0.1:9", redis_url, rate_limits={"default": "5/minute", "sync_interval_seconds": 0.01}
    )

    async def handler(http_request: web.Request) -> web.Response:
        conditional = "If-None-Match" in http_request.headers
        retry_after = await request(http_request.app[keys.RATE_LIMITS], conditional=conditional)
        return web.Response(text="ok") if retry_after is None else too_many_requests(retry_after)

    app = web.Application()
    app[keys.SETTINGS] = settings
    app.cleanup_ctx.extend([redis_ctx, ratelimit_ctx])
    app.router.add_get("/", handler)
    http = await aiohttp_client(app)
    for _ in range(5):
        async with http.get("/") as response:
            assert response.status == 200
    async with http.get("/") as response:
        assert response.status == 429
        assert 0 < int(response.headers["Retry-After"]) <= 60
        assert (await response.json())["code"] == "rate_limit_exceeded"
    rl = app[keys.RATE_LIMITS]
    deadline = time.monotonic() + 10
    while await shared_count(client, rl) < 5:
        assert time.monotonic() < deadline, "the background sync never ran"
        await asyncio.sleep(0.01)


async def test_fast_mode_costs_redis_nothing_for_teams_far_below_their_limit(client: aioredis.Redis) -> None:
    rl = limiter(client, default="600/minute", etag="6000/minute", push_fraction=0.1)
    await client.script_load(SYNC_SCRIPT)  # so the one call below is one EVALSHA, not EVALSHA + EVAL
    before = await _script_calls(client)
    for team_id in range(100):  # a typical fleet: many teams, each polling a few times a minute
        assert await burst(rl, 3, team_id=team_id) == 3
        assert await burst(rl, 3, team_id=team_id, conditional=True) == 3
    for _ in range(5):
        await rl.sync()
    assert await _script_calls(client) == before
    # A team reaching half a lump (5 % of 600) is pushed at once; past half its limit, every interval.
    assert await burst(rl, 57) == 57
    await rl.sync()
    assert await shared_count(client, rl) == 60
    assert await _script_calls(client) == before + 1


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


@pytest.mark.parametrize("prefix", ["rl}", "a{}b", "{edge}"])
async def test_any_key_prefix_works_on_one_node(client: aioredis.Redis, prefix: str) -> None:
    """The push marks need a hash tag only on a Cluster (where the settings refuse braces)."""
    rl = limiter(client, default="3/minute", key_prefix=prefix)
    assert await burst(rl, 4) == 3
    await rl.sync()
    assert int(await client.get(rl.key(TEAM, "full")) or 0) == 3


async def test_a_sync_reply_for_a_window_that_ended_meanwhile_leaves_the_next_window_alone(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply carries the ended window's count: applied to the next one, a team began its new window
    with the old one's count (limited at once) and a negative count of admissions not yet pushed (found
    unguarded by mutation testing)."""
    now = [1000.0]
    rl = RateLimiter(RateLimitSettings(default="100/minute"), client, clock=lambda: now[0])
    assert await burst(rl, 60) == 60  # past half the limit: synced at every interval
    replied, release = asyncio.Event(), asyncio.Event()
    real_run_script = cluster.run_script

    async def held_back(*args: Any) -> Any:
        replies = await real_run_script(*args)
        replied.set()
        await release.wait()
        return replies

    monkeypatch.setattr(ratelimit, "run_script", held_back)
    syncing = asyncio.create_task(rl.sync())
    await replied.wait()
    now[0] += 61  # the window ends while the reply is on its way
    assert await request(rl) is None  # the first request of the next window
    release.set()
    await syncing
    window = rl._full[TEAM]
    assert (window.shared, window.pending) == (0, 1)


async def test_a_sync_that_raises_a_bug_admits_its_waiters_and_is_logged_once_a_streak_and_counted(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a reviewer: a sync that raised anything but a Redis error (a bug) admitted the request
    waiting on it with no log line and no count anywhere."""
    rl = limiter(client, default="5/minute")  # a lump of 1: every request after the first must sync first
    assert await request(rl) is None
    script = ratelimit.run_script  # type: ignore[attr-defined]

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("not a Redis error")

    def logged() -> list[str]:
        records = caplog.records
        return [r.getMessage() for r in records if r.name == "proxy.ratelimit" and r.levelname == "ERROR"]

    before = tasks.errors[ratelimit.SYNC_TASK]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ratelimit, "run_script", broken)
        assert await request(rl) is None
        assert await request(rl) is None
    assert rl.fail_open == 2
    assert tasks.errors[ratelimit.SYNC_TASK] == before + 2
    assert len(logged()) == 1
    assert logged()[0].startswith("rate limits: sync failed: KeyError at ")
    assert await request(rl) is None  # synced: the streak ends
    assert rl.fail_open == 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ratelimit, "run_script", broken)
        assert await request(rl) is None
    assert len(logged()) == 2
    assert tasks.errors[ratelimit.SYNC_TASK] == before + 3
    assert ratelimit.run_script is script  # type: ignore[attr-defined]
