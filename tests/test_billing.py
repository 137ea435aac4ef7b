"""Billing tally: counted in memory, written to the real Redis in one round trip, exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy import billing as billing_module
from proxy import keys, tasks
from proxy.billing import BillingTally, billing_ctx
from proxy.contract import RedisContract
from proxy.redis_client import make_client, redis_ctx
from proxy.settings import BILLING_DEDUPE_TTL_SECONDS, BillingSettings, RedisLayout, RedisSettings
from tests.chaos import ChaosProxy, Mode
from tests.conftest import settings_for
from tests.rig import RedisServer, free_port
from tests.test_reliability import eventually

CONTRACT = RedisContract(RedisLayout())
BUCKET = 120
T0 = 1_700_000_040.0  # the start of a bucket: 1_700_000_040 / 120 = 14_166_667
B0 = int(T0 // BUCKET)
MARK_PREFIX = CONTRACT.layout.billing_dedupe_key.partition("{")[0]  # the marks among a call's keys


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The proxy's own kind of client, on the test Redis."""
    redis = make_client(RedisSettings(url=redis_url))
    assert isinstance(redis, aioredis.Redis)  # a redis:// URL: the one-node client
    yield redis
    await redis.aclose()


@pytest.fixture
async def dead_client() -> AsyncIterator[aioredis.Redis]:
    """A client for a port nobody listens on: every command fails as with Redis down."""
    redis = make_client(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    assert isinstance(redis, aioredis.Redis)  # a redis:// URL: the one-node client
    yield redis
    await redis.aclose()


def tally(**settings: Any) -> BillingTally:
    """A tally with the PostHog layout."""
    return BillingTally(CONTRACT, BillingSettings(**settings))


def hashes(redis_server: RedisServer, team_id: int, library: str) -> tuple[dict[int, int], dict[int, int]]:
    """The team hash and the team+SDK hash, as {bucket: requests}."""
    sync = redis_server.client()
    team_key, sdk_key = CONTRACT.billing_keys(team_id, library)
    team = {int(k): int(v) for k, v in sync.hgetall(team_key).items()}
    sdk = {int(k): int(v) for k, v in sync.hgetall(sdk_key).items()}
    sync.close()
    return team, sdk


def commandstats(sync: redis.Redis) -> dict[str, int]:
    """Calls per command so far; one connection for every snapshot, so no handshake falls in between."""
    stats = sync.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def count_many(billing: BillingTally) -> None:
    """Three teams, two libraries, two buckets: 12 requests in all."""
    for _ in range(3):
        billing.count(1, "posthog-python", now=T0)
    billing.count(1, "posthog-node", now=T0 + 5)
    billing.count(1, "posthog-python", now=T0 + BUCKET)  # the next bucket
    for _ in range(5):
        billing.count(2, "posthog-go", now=T0 + 119.9)
    billing.count(3, "other", now=T0)
    billing.count(3, "other", now=T0 + BUCKET + 1)


def assert_counted_once(redis_server: RedisServer) -> None:
    """Exactly what count_many counted."""
    assert hashes(redis_server, 1, "posthog-python") == ({B0: 4, B0 + 1: 1}, {B0: 3, B0 + 1: 1})
    assert hashes(redis_server, 1, "posthog-node") == ({B0: 4, B0 + 1: 1}, {B0: 1})
    assert hashes(redis_server, 2, "posthog-go") == ({B0: 5}, {B0: 5})
    assert hashes(redis_server, 3, "other") == ({B0: 1, B0 + 1: 1}, {B0: 1, B0 + 1: 1})


async def test_flush_writes_exact_counts_per_team_library_and_bucket(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    billing = tally()
    count_many(billing)
    assert await billing.flush(client)
    assert_counted_once(redis_server)
    assert billing.flushed_requests == 12
    assert billing.unflushed_requests == 0
    # Nothing new: a second flush writes nothing.
    assert await billing.flush(client)
    assert_counted_once(redis_server)


async def _hincrbys(sync: redis.Redis, step: Awaitable[bool]) -> int:
    before = commandstats(sync).get("hincrby", 0)
    assert await step
    return commandstats(sync).get("hincrby", 0) - before


@pytest.mark.parametrize("hold_newest", [True, False], ids=["held", "written at once"])
async def test_a_bucket_begun_in_the_interval_is_held_for_the_next_periodic_flush(
    client: aioredis.Redis, redis_server: RedisServer, hold_newest: bool
) -> None:
    billing = tally()
    # An SDK polling across a bucket boundary (T0): twice before it, once after, then twice more.
    billing.count(1, "posthog-python", now=T0 - 20)
    billing.count(1, "posthog-python", now=T0 - 5)
    billing.count(1, "posthog-python", now=T0 + 5)
    with redis_server.client() as sync:
        first = await _hincrbys(sync, billing.flush(client, hold_newest=hold_newest, now=T0 + 10))
        after_first = hashes(redis_server, 1, "posthog-python")
        billing.count(1, "posthog-python", now=T0 + 25)
        billing.count(1, "posthog-python", now=T0 + 35)
        second = await _hincrbys(sync, billing.flush(client, hold_newest=hold_newest, now=T0 + 40))

    if hold_newest:
        assert after_first == ({B0 - 1: 2}, {B0 - 1: 2})  # the new bucket's one request waits
        assert (first, second) == (2, 2)  # one pair per bucket
    else:
        assert after_first == ({B0 - 1: 2, B0: 1}, {B0 - 1: 2, B0: 1})
        assert (first, second) == (4, 2)  # bucket B0 written twice
    assert hashes(redis_server, 1, "posthog-python") == ({B0 - 1: 2, B0: 3}, {B0 - 1: 2, B0: 3})
    assert billing.unflushed_requests == 0


async def test_nothing_is_held_without_a_boundary_in_the_interval_nor_at_the_final_flush(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    billing = tally()
    billing.count(1, "posthog-python", now=T0 + 5)
    billing.count(2, "posthog-node", now=T0 + 6)
    # Every count in the bucket of `now`: written, nothing waits.
    assert await billing.flush(client, hold_newest=True, now=T0 + 30)
    assert billing.unflushed_requests == 0
    assert hashes(redis_server, 2, "posthog-node") == ({B0: 1}, {B0: 1})

    # A boundary in the interval holds the new bucket's counts; the final flush at shutdown writes them.
    billing.count(1, "posthog-python", now=T0 + BUCKET - 1)
    billing.count(1, "posthog-python", now=T0 + BUCKET + 1)
    assert await billing.flush(client, hold_newest=True, now=T0 + BUCKET + 10)
    assert billing.unflushed_requests == 1
    await billing.close(client)
    assert billing.unflushed_requests == 0
    assert hashes(redis_server, 1, "posthog-python") == ({B0: 2, B0 + 1: 1}, {B0: 2, B0 + 1: 1})


async def test_one_flush_is_one_script_call(
    client: aioredis.Redis, dead_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    billing = tally()
    billing.count(9, "posthog-python", now=T0)
    assert await billing.flush(client)  # loads the script (NOSCRIPT, SCRIPT LOAD) and opens the connection

    # Two batches left over by failed flushes, plus the current tally: still one call.
    billing.count(1, "posthog-python", now=T0)
    assert not await billing.flush(dead_client)
    billing.count(2, "posthog-node", now=T0)
    assert not await billing.flush(dead_client)
    assert billing.pending_batches == 2
    count_many(billing)
    with redis_server.client() as sync:
        before = commandstats(sync)
        assert await billing.flush(client)
        after = commandstats(sync)

    delta = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    # GET, SET and HINCRBY run inside the script; INFO is the test's own.
    inside = {"get", "set", "hincrby", "info"}
    assert {name: n for name, n in delta.items() if name not in inside} == {"evalsha": 1}
    assert billing.pending_batches == 0
    assert hashes(redis_server, 2, "posthog-node")[1] == {B0: 1}


async def test_redis_down_keeps_counts_and_writes_them_once_when_it_returns(
    client: aioredis.Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    billing = tally()
    count_many(billing)
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="proxy.billing"):
        assert not await billing.flush(client)
        assert not await billing.flush(client)
    assert billing.failed_flushes == 2
    assert billing.unflushed_requests == 12
    # One warning for the outage, not one per failed flush.
    assert len([r for r in caplog.records if r.name == "proxy.billing"]) == 1

    redis_server.start()
    assert await billing.flush(client)  # NOSCRIPT after the restart is handled by redis-py's script object
    assert_counted_once(redis_server)
    assert await billing.flush(client)
    assert_counted_once(redis_server)
    assert (billing.flushed_requests, billing.pending_batches, billing.dropped_counts) == (12, 0, 0)


async def test_the_final_flush_writes_batches_a_failed_flush_left_pending(
    client: aioredis.Redis, dead_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """No request since the failed periodic flush: nothing newly counted, only the pending batch to write
    (found unguarded by mutation testing: a close() that looked at new counts alone passed every test)."""
    billing = tally()
    count_many(billing)
    assert not await billing.flush(dead_client)  # a blip: the batch stays pending
    await billing.close(client)  # shutdown, Redis back
    assert_counted_once(redis_server)
    assert billing.unflushed_requests == 0


async def test_the_final_flush_outlasts_a_blip(
    client: aioredis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two failed calls at shutdown (a Redis failover's moment) still end written: the final flush tries
    three times (found unguarded by mutation testing: one try passed every test)."""
    billing = tally()
    count_many(billing)
    real_evalsha: Callable[..., Awaitable[Any]] = client.evalsha
    failures = 2

    async def blip(*args: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise RedisConnectionError("a blip")
        return await real_evalsha(*args)

    monkeypatch.setattr(client, "evalsha", blip)
    await billing.close(client)
    assert_counted_once(redis_server)
    assert billing.unflushed_requests == 0


async def test_the_final_flush_stops_after_its_attempts_while_redis_is_down(
    dead_client: aioredis.Redis,
) -> None:
    """Three tries, then the log says what stayed unwritten: the shutdown does not spend the whole flush
    budget (a pod's grace period) retrying a Redis that is gone (found by mutation testing)."""
    billing = tally(final_flush_timeout_seconds=30)
    count_many(billing)
    await billing.close(dead_client)
    assert billing.failed_flushes == 3
    assert billing.unflushed_requests == 12


async def test_two_processes_each_bill_their_own_requests_and_each_mark_expires(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Each process has a mark of its own (a shared one skipped the second replica's batches as already
    applied), and each mark expires (one permanent key per process start otherwise)."""
    first, second = tally(), tally()
    for _ in range(3):
        first.count(5, "posthog-python", now=T0)
        assert await first.flush(client)
    second.count(5, "posthog-python", now=T0)
    assert await second.flush(client)
    assert hashes(redis_server, 5, "posthog-python") == ({B0: 4}, {B0: 4})
    with redis_server.client() as sync:
        marks = list(sync.scan_iter(f"{MARK_PREFIX}*"))
        assert len(marks) == 2
        assert all(0 < sync.ttl(mark) <= BILLING_DEDUPE_TTL_SECONDS for mark in marks)


def lose_replies(client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on Redis applies each billing call and its reply is lost on the way back."""
    real_evalsha: Callable[..., Awaitable[Any]] = client.evalsha

    async def applied_then_reply_lost(*args: Any) -> Any:
        await real_evalsha(*args)
        raise RedisConnectionError("connection dropped before the reply")

    monkeypatch.setattr(client, "evalsha", applied_then_reply_lost)


async def test_a_flush_whose_reply_is_lost_is_not_counted_twice(
    client: aioredis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = tally()
    count_many(billing)
    lose_replies(client, monkeypatch)
    assert not await billing.flush(client)
    assert_counted_once(redis_server)  # Redis did apply it
    assert billing.pending_batches == 1  # but the proxy cannot know, so it keeps the batch

    monkeypatch.undo()
    assert await billing.flush(client)  # the retry carries the same batch id: skipped by the script
    assert_counted_once(redis_server)
    assert billing.pending_batches == 0


async def test_a_stale_copy_of_an_applied_flush_arriving_late_is_skipped(
    client: aioredis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A flush sent to a Redis that hung: the proxy gave up on it, then wrote later batches; Redis resumes and
    # runs the old command. The mark holds the last batch applied, so the late copy changes nothing.
    billing = tally()
    count_many(billing)
    sent: list[tuple[Any, ...]] = []
    real_evalsha: Callable[..., Awaitable[Any]] = client.evalsha

    async def recorded(*args: Any) -> Any:
        sent.append(args)
        return await real_evalsha(*args)

    monkeypatch.setattr(client, "evalsha", recorded)
    assert await billing.flush(client)
    billing.count(2, "posthog-go", now=T0)
    assert await billing.flush(client)
    assert len(sent) == 2
    await real_evalsha(*sent[0])
    assert hashes(redis_server, 2, "posthog-go") == ({B0: 6}, {B0: 6})
    assert hashes(redis_server, 1, "posthog-python") == ({B0: 4, B0 + 1: 1}, {B0: 3, B0 + 1: 1})


async def test_batches_are_never_kept_pending_longer_than_their_dedupe_mark_lives(
    dead_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Half-day flushes with the default max_pending_batches (1000): one batch is kept, not 1000 (500 days,
    long past the day the mark of an applied batch lives, after which its retry would count it twice)."""
    billing = tally(flush_interval_seconds=43200)
    for _ in range(2):
        billing.count(7, "posthog-ruby", now=T0)
        assert not await billing.flush(dead_client)
    assert (billing.dropped_counts, billing.pending_batches) == (1, 1)
    assert "more than 1 batches unwritten" in caplog.text


async def test_a_part_sent_nearly_a_day_ago_is_dropped_with_an_error_never_counted_twice(
    client: aioredis.Redis,
    dead_client: aioredis.Redis,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A quiet replica seals nothing new, so the bound above (counted in seals) never drops its pending
    part: applied, its reply lost, then Redis out of reach for a day, its retry found the mark expired and
    counted it a second time (a reviewer's). Past 23 h since first sent it is dropped, the mark named."""
    billing = tally()
    billing.count(5, "posthog-python", now=T0)
    lose_replies(client, monkeypatch)
    assert not await billing.flush(client)  # applied, reply lost
    monkeypatch.undo()
    assert not await billing.flush(dead_client)
    assert billing.pending_batches == 1

    real = time.monotonic
    later = SimpleNamespace(time=time.time, monotonic=lambda: real() + 23.5 * 3600)
    monkeypatch.setattr(billing_module, "time", later)
    redis_server.client().delete(*redis_server.client().keys(MARK_PREFIX + "*"))  # its day is up in Redis
    assert await billing.flush(dead_client)  # nothing left to send
    assert (billing.pending_batches, billing.dropped_counts) == (0, 1)
    errors = [
        r.getMessage() for r in caplog.records if r.name == "proxy.billing" and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    assert "1 request(s) pending for nearly the 24 h their dedupe mark lives, dropped" in errors[0]
    assert f"GET {MARK_PREFIX}" in errors[0]
    assert f"5/posthog-python/{B0}=1" in errors[0]
    assert await billing.flush(client)
    assert hashes(redis_server, 5, "posthog-python") == ({B0: 1}, {B0: 1})


async def test_too_many_pending_batches_drops_the_oldest_with_an_error(
    client: aioredis.Redis,
    dead_client: aioredis.Redis,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    billing = tally(max_pending_batches=2)
    for requests in (1, 2, 3):
        for _ in range(requests):
            billing.count(7, "posthog-ruby", now=T0)
        assert not await billing.flush(dead_client)
    errors = [r for r in caplog.records if r.name == "proxy.billing" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "1 request(s) not confirmed written" in errors[0].getMessage()
    assert "7/posthog-ruby/" in errors[0].getMessage()
    assert (billing.dropped_counts, billing.pending_batches) == (1, 2)

    assert await billing.flush(client)
    assert hashes(redis_server, 7, "posthog-ruby") == ({B0: 5}, {B0: 5})


def count_teams(billing: BillingTally, teams: range) -> None:
    """One request per team, one library, one bucket: one entry per team."""
    for team_id in teams:
        billing.count(team_id, "posthog-python", now=T0)


def assert_each_team_counted_once(redis_server: RedisServer, teams: range) -> None:
    sync = redis_server.client()
    with sync.pipeline(transaction=False) as pipe:
        for team_id in teams:
            for key in CONTRACT.billing_keys(team_id, "posthog-python"):
                pipe.hgetall(key)
        replies = pipe.execute()
    sync.close()
    assert replies == [{str(B0).encode(): b"1"}] * (2 * len(teams))


async def test_a_large_tally_is_written_in_bounded_calls_each_counted_once(
    client: aioredis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One interval's tally holds every team served: sent in one script call, 100,000 teams would block
    # Redis for ~200 ms and build ~130 MiB of arguments. It goes in calls of at most 1,000 increments.
    billing = tally()
    teams = range(1, 1201)  # 1,200 entries: parts of 500, 500 and 200, 2 increments each
    count_teams(billing, teams)
    increments_per_call: list[int] = []
    real_evalsha: Callable[..., Awaitable[Any]] = client.evalsha

    async def recorded(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        marks = sum(1 for key in keys_and_args[:numkeys] if key.startswith(MARK_PREFIX))
        increments_per_call.append(numkeys - marks)
        return await real_evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(client, "evalsha", recorded)
    with redis_server.client() as sync:
        before = commandstats(sync)
        assert await billing.flush(client)
        after = commandstats(sync)
    assert increments_per_call == [1000, 1000, 400]
    assert after["hincrby"] - before.get("hincrby", 0) == 2400
    assert_each_team_counted_once(redis_server, teams)
    assert (billing.pending_batches, billing.flushed_requests, billing.flushes) == (0, 1200, 1)


async def test_a_reply_lost_between_calls_is_retried_without_counting_twice(
    client: aioredis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = tally()
    teams = range(1, 1201)
    count_teams(billing, teams)
    calls = 0
    real_evalsha: Callable[..., Awaitable[Any]] = client.evalsha

    async def second_reply_lost(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        reply = await real_evalsha(*args)
        if calls == 2:
            raise RedisConnectionError("connection dropped before the reply")
        return reply

    monkeypatch.setattr(client, "evalsha", second_reply_lost)
    assert not await billing.flush(client)
    # The first part is confirmed; the second was applied, unknown to the proxy; the third was not sent.
    assert (billing.pending_batches, billing.unflushed_requests) == (1, 700)

    monkeypatch.undo()
    assert await billing.flush(client)
    assert_each_team_counted_once(redis_server, teams)
    assert (billing.pending_batches, billing.unflushed_requests) == (0, 0)


async def test_a_batch_of_several_parts_is_dropped_whole_when_too_many_are_pending(
    client: aioredis.Redis,
    dead_client: aioredis.Redis,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    billing = tally(max_pending_batches=1)
    count_teams(billing, range(1, 1201))  # one interval, three parts
    assert not await billing.flush(dead_client)
    assert billing.pending_batches == 1
    count_teams(billing, range(5001, 5003))
    assert not await billing.flush(dead_client)
    errors = [r for r in caplog.records if r.name == "proxy.billing" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "1200 request(s) not confirmed written" in errors[0].getMessage()
    assert (billing.dropped_counts, billing.pending_batches, billing.unflushed_requests) == (1200, 1, 2)

    assert await billing.flush(client)
    assert_each_team_counted_once(redis_server, range(5001, 5003))
    assert hashes(redis_server, 1, "posthog-python") == ({}, {})


async def _app_with_billing(redis_url: str, **billing: float) -> web.AppRunner:
    app = web.Application()
    app[keys.SETTINGS] = settings_for("http://127.0.0.1:9", redis_url, billing=billing)
    app.cleanup_ctx.extend([redis_ctx, billing_ctx])
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


async def test_cleanup_flushes_what_was_counted(redis_url: str, redis_server: RedisServer) -> None:
    # The background flusher never runs within the test: only the shutdown flush can write these.
    runner = await _app_with_billing(redis_url, flush_interval_seconds=3600)
    count_many(runner.app[keys.BILLING])
    assert hashes(redis_server, 1, "posthog-python") == ({}, {})
    await runner.cleanup()
    assert_counted_once(redis_server)


async def test_cleanup_with_redis_down_ends_and_logs_the_lost_counts(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    runner = await _app_with_billing(redis_url, flush_interval_seconds=3600, final_flush_timeout_seconds=2)
    billing = runner.app[keys.BILLING]
    billing.count(4, "posthog-php", now=T0)
    billing.count(4, "posthog-php", now=T0)
    redis_server.stop()
    await runner.cleanup()
    errors = [
        r.getMessage() for r in caplog.records if r.name == "proxy.billing" and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    mark = billing._mark
    assert errors[0].startswith(
        "billing: 2 request(s) not confirmed written at shutdown: a part was applied if GET "
        f"{mark} (kept 24 h) is its number or more, else re-apply it by hand (team/library/bucket=n): "
    )
    assert errors[0].endswith(f": part 1: 4/posthog-php/{B0}=2")
    redis_server.start()
    assert redis_server.client().get(mark) is None  # never applied: re-applying it is right


async def test_counts_redis_applied_but_never_confirmed_are_told_apart_in_the_shutdown_log(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by two reviewers: Redis ran the final flush and its reply was lost (a hung or partitioned Redis),
    and the log asked the operator to re-apply counts Redis already had, without a way to tell."""
    chaos = ChaosProxy(redis_server.port)
    await chaos.start()
    try:
        runner = await _app_with_billing(
            chaos.url, flush_interval_seconds=3600, final_flush_timeout_seconds=1
        )
        billing = runner.app[keys.BILLING]
        billing.count(5, "posthog-go", now=T0)
        assert await billing.flush(runner.app[keys.REDIS])  # part 1, confirmed (and the script loaded)
        for _ in range(3):
            billing.count(5, "posthog-go", now=T0)
        chaos.mode = Mode.SWALLOW_REPLIES
        await runner.cleanup()
    finally:
        await chaos.close()
    errors = [
        r.getMessage() for r in caplog.records if r.name == "proxy.billing" and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    assert f"GET {billing._mark} (kept 24 h) is its number or more" in errors[0]
    assert errors[0].endswith(f": part 2: 5/posthog-go/{B0}=3")
    applied = redis_server.client().get(billing._mark)
    assert isinstance(applied, bytes)
    assert int(applied) >= 2  # applied, as the log's test tells
    assert hashes(redis_server, 5, "posthog-go") == ({B0: 4}, {B0: 4})


async def test_background_flusher_writes_without_a_request_touching_redis(
    redis_url: str, redis_server: RedisServer
) -> None:
    runner = await _app_with_billing(redis_url, flush_interval_seconds=0.02)
    try:
        count_many(runner.app[keys.BILLING])
        for _ in range(400):
            if hashes(redis_server, 2, "posthog-go") == ({B0: 5}, {B0: 5}):
                break
            await asyncio.sleep(0.025)
        assert_counted_once(redis_server)
    finally:
        await runner.cleanup()
    assert_counted_once(redis_server)


async def test_the_periodic_flush_holds_back_the_bucket_begun_during_its_interval(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The background flusher writes the bucket that ended and keeps the one begun for its next flush (one
    HINCRBY pair per bucket and flush; found unguarded by mutation testing: a flusher writing both passed)."""
    billing = tally()
    now = time.time()
    current = int(now // BUCKET)
    billing.count(4, "posthog-python", now=now - BUCKET)  # the bucket that ended
    billing.count(4, "posthog-python", now=now)  # the bucket begun
    flusher = asyncio.create_task(billing_module._flush_forever(billing, client, 0.01))
    try:
        await eventually(lambda: billing.flushed_requests == 1, "a periodic flush")
    finally:
        await tasks.cancelled(flusher)
    if int(time.time() // BUCKET) != current:
        pytest.skip("a bucket boundary passed during the test")
    assert hashes(redis_server, 4, "posthog-python") == ({current - 1: 1}, {current - 1: 1})
    assert billing.unflushed_requests == 1


async def test_a_billing_key_of_another_type_loses_only_its_own_increments(
    client: aioredis.Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The backend's pipeline of HINCRBYs fails on that one key only; the script used to stop there, with the
    # part marked applied, so every team after it in the part was never written (and "every pending batch
    # written" logged).
    team_key, _ = CONTRACT.billing_keys(2, "posthog-go")
    with redis_server.client() as sync:
        sync.set(team_key, "not a hash")
    billing = tally()
    count_many(billing)
    with caplog.at_level(logging.ERROR, logger="proxy.billing"):
        assert await billing.flush(client)
    assert hashes(redis_server, 1, "posthog-python") == ({B0: 4, B0 + 1: 1}, {B0: 3, B0 + 1: 1})
    assert hashes(redis_server, 3, "other") == ({B0: 1, B0 + 1: 1}, {B0: 1, B0 + 1: 1})
    with redis_server.client() as sync:
        assert sync.hgetall(CONTRACT.billing_keys(2, "posthog-go")[1]) == {str(B0).encode(): b"5"}
    assert f"HINCRBY {team_key} {B0} 5" in caplog.text


async def test_a_dropped_batch_that_redis_applied_is_not_logged_as_lost(
    client: aioredis.Redis,
    dead_client: aioredis.Redis,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Applied, reply lost, then Redis unreachable long enough for the batch to be dropped: the ERROR said
    # "lost" and named the counts, which an operator re-applying them by hand would count twice.
    billing = tally(max_pending_batches=1)
    billing.count(7, "posthog-python", now=T0)
    lose_replies(client, monkeypatch)
    assert not await billing.flush(client)
    billing.count(7, "posthog-python", now=T0 + 1)
    with caplog.at_level(logging.ERROR, logger="proxy.billing"):
        assert not await billing.flush(dead_client)
    assert hashes(redis_server, 7, "posthog-python") == ({B0: 1}, {B0: 1})  # in Redis after all
    [error] = [r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert "lost" not in error
    assert f"GET {billing._mark}" in error
    assert "part 1 (sent)" in error
