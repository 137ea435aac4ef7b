"""Per-team rate limits (contract §3 step 4): fixed windows shared by every replica through Redis.

Two budgets per team, as in the reference's flag-definitions limiter: "full" (default 600/minute, per-team
overrides) and "conditional" (default 6000/minute) for requests that carry If-None-Match. Allowlisted teams
bypass both. The window counters are the keys `limits`' FixedWindowRateLimiter uses
(`<key_prefix>:LIMITER/<budget>/<team>/<amount>/<multiples>/<granularity>`, started by the first increment,
expiring with the window), so both modes below can run side by side during a rollout.

exact: `limits`' async Redis storage and fixed-window strategy, one round trip per request (two when limited).

fast (default): a request is admitted from memory when `shared + pending < limit`, where `shared` is the count
read from Redis at this replica's last sync and `pending` what it admitted since. Every
`sync_interval_seconds` a Lua script pushes the pending counts of all recently active teams into the shared
counters and reads them back with their time left. A replica never over-admits on its own, but it cannot see
what other replicas have admitted and not pushed yet, so it holds at most a lump of push_fraction * limit (at
least 1) admitted and not pushed: a request past that waits for a sync (at once, one for all the requests
waiting) and is then decided on the fresh count. Over-admission bound, per team and window, with N replicas:
admitted <= limit + (N - 1) * lump. (Before, the lump only said when a push was due, at the next interval: a
burst inside one interval let every replica admit the whole limit.) Half a lump admitted starts a push at
once, in the background, so a request waits only in a burst (a lump within one round trip). Below half the
limit a team's admissions are pushed that way, past half every interval as well. A push is idempotent (a mark
per replica and window holds what it has applied), so a sync that timed out here after Redis ran it is not
counted again by the next. Redis cost: one script entry per half lump for a team far below its limit (none for
one polling a few times a window), one script entry per sync interval for a team past half of it, and one
small key per replica and pushed window, expiring with the window. On a Redis Cluster the counters are spread
over the slots (each mark in its counter's); the sync script then runs once per slot group of keys, all
pipelined (one round trip per node), and exact mode uses `limits`' Cluster storage.

Redis unreachable: both modes fail open (the request is served, `fail_open` counts it), logged once per
outage; exact mode then tries Redis again only every sync interval, so requests do not each wait on it. Fast
mode still counts what it admits, in the window, and pushes it once Redis answers (a PING tells when nothing
is to be pushed). Syncs are sent in calls of at most SYNC_CHUNK windows, so none holds Redis for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from aiohttp import web
from limits import RateLimitItem, parse
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from proxy import keys, tasks
from proxy.cluster import RedisClient, hash_tagged, run_script, slot_of
from proxy.errors import error_body, json_response
from proxy.logs import where
from proxy.redis_client import close_limits_storage, limits_storage
from proxy.settings import RateLimitSettings
from proxy.tasks import background, cancelled

log = logging.getLogger(__name__)

RATE_LIMITED = error_body("validation_error", "rate_limit_exceeded", "Rate limit exceeded")
# check()'s answer when the replica holds all it may admitted and not pushed: decide with `await acheck()`.
SYNC_FIRST = -1.0
# Windows per sync script call (each a few commands in Redis): ~1,000 keys, a few ms of Redis per call.
SYNC_CHUNK = 500
# The background task's name, and the label of its errors (edge_proxy_background_errors_total).
SYNC_TASK = "ratelimit-sync"

Budget = Literal["full", "conditional"]

# KEYS: per window, its counter and this replica's mark beside it; ARGV: per window, the milliseconds left in
# the replica's window, its window epoch, what it has admitted in that window in all, and how much of that it
# has not seen confirmed. Adds what the counter lacks as limits' incr_expire.lua does (the increment that
# creates the key starts the window), the key expiring when the window began here ends (with the full window
# from the push, a lump's worth of requests later, every window was that much longer: a team at 95 % of its
# limit was limited) and returns, per window, the shared count and the milliseconds left in its window (-2: no
# key, nothing counted in this window yet). Idempotent: the mark holds "epoch:admitted" as last applied, so a
# call that timed out here but ran in Redis, sent again with the same or a larger total, adds only the
# difference (a plain INCRBY of the unconfirmed count would add it twice, and limit teams below their limit:
# fail closed). Without a mark (the first push, or the window gone), the unconfirmed count is added.
SYNC_SCRIPT = """
local out = {}
for i = 1, #KEYS / 2 do
  local key, mark = KEYS[2 * i - 1], KEYS[2 * i]
  local epoch, admitted, unconfirmed = ARGV[4 * i - 2], tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i])
  local delta = unconfirmed
  local last = redis.call("get", mark)
  if last then
    local sep = string.find(last, ":", 1, true)
    if sep and string.sub(last, 1, sep - 1) == epoch then
      delta = admitted - tonumber(string.sub(last, sep + 1))
    end
  end
  local count
  if delta > 0 then
    count = redis.call("incrby", key, delta)
    if count == delta then
      redis.call("pexpire", key, ARGV[4 * i - 3])
    end
  else
    count = tonumber(redis.call("get", key) or "0")
  end
  local ttl = redis.call("pttl", key)
  if delta > 0 and ttl > 0 then
    redis.call("set", mark, epoch .. ":" .. admitted, "px", ttl)
  end
  out[2 * i - 1] = count
  out[2 * i] = ttl
end
return out
"""


class _Window:
    """One team's budget as this replica sees it (fast mode)."""

    __slots__ = (
        "admitted",
        "epoch",
        "expiry",
        "key",
        "limit",
        "mark",
        "pending",
        "push_at",
        "push_lump",
        "reset_at",
        "seen",
        "shared",
    )

    def __init__(self, key: str, mark: str, item: RateLimitItem, push_fraction: float) -> None:
        self.key = key
        self.mark = mark  # this replica's "epoch:admitted" as last applied, in the counter's slot
        self.limit = item.amount
        self.push_lump = max(1, math.floor(item.amount * push_fraction))
        # Pushed at once from here (half a lump): the lump is reached, and a request waits, only in a burst.
        self.push_at = max(1, self.push_lump // 2)
        self.expiry = item.get_expiry()
        self.shared = 0  # the shared count at the last sync, this replica's pushed admissions included
        self.pending = 0  # admitted here since the last sync
        self.admitted = 0  # admitted here in this window, pushed or not
        self.reset_at = 0.0  # monotonic end of the window; provisional until a sync reads its TTL
        self.seen = 0.0
        # New when the window ends, so a sync in flight does not touch the next one; unique in the replica
        # (not per window object), so a mark left by a window dropped while idle never matches a later one.
        self.epoch = 0


class RateLimiter:
    """Admits or limits a team's request; `check` in fast mode (no I/O), `acheck` in either mode."""

    def __init__(
        self,
        settings: RateLimitSettings,
        redis: RedisClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = settings.enabled
        # check() is valid (and never waits) unless limits are on in exact mode.
        self.fast = settings.mode == "fast" or not settings.enabled
        self.sync_interval_seconds = settings.sync_interval_seconds
        self.failing = False
        self.fail_open = 0
        self._sync_bug = False  # the last sync raised: logged once per streak
        self.limited = 0
        self._clock = clock
        self._idle_seconds = settings.idle_seconds
        self._push_fraction = settings.push_fraction
        self._prefix = settings.key_prefix
        self._default = parse(settings.default)
        self._etag = parse(settings.etag)
        self._overrides = {int(team): parse(rate) for team, rate in settings.team_overrides.items()}
        self._allowlist = frozenset(
            int(team) for team in settings.allowlist if team.isascii() and team.isdigit()
        )
        ignored = [team for team in settings.allowlist if not (team.isascii() and team.isdigit())]
        if ignored:
            log.warning("rate limits: allowlist entries must be team ids; ignoring %d other(s)", len(ignored))
        # This replica's name in its push marks (the process's, like billing's batch marks).
        self._replica = uuid.uuid4().hex
        self._epochs = itertools.count(1)
        self._clustered = isinstance(redis, RedisCluster)
        self._full: dict[int, _Window] = {}
        self._conditional: dict[int, _Window] = {}
        self._redis = redis
        self._script = redis.register_script(SYNC_SCRIPT)
        self._storage = limits_storage(redis, settings.key_prefix)
        self._strategy = FixedWindowRateLimiter(self._storage)
        self._probe_at = 0.0
        self._syncing: asyncio.Future[None] | None = None

    def item(self, team_id: int, budget: Budget) -> RateLimitItem:
        """The rate that applies to `team_id` in `budget`; overrides apply to the full budget only."""
        if budget == "conditional":
            return self._etag
        return self._overrides.get(team_id, self._default)

    def key(self, team_id: int, budget: Budget) -> str:
        """The Redis key of the team's current window counter, as `limits` names it."""
        return f"{self._prefix}:{self.item(team_id, budget).key_for(budget, team_id)}"

    def check(self, team_id: int, conditional: bool) -> float | None:
        """Fast mode: None if admitted (and counted), else seconds until the window frees."""
        if team_id in self._allowlist or not self.enabled:
            return None
        if not self.fast:
            raise TypeError("check() is for fast mode; exact mode needs `await acheck()`")
        windows = self._conditional if conditional else self._full
        window = windows.get(team_id)
        if window is None:
            budget: Budget = "conditional" if conditional else "full"
            key = self.key(team_id, budget)
            name = f"{self._prefix}:pushed:{self._replica}"
            # On a Cluster in the counter's slot (the script touches both); the settings refuse a key_prefix
            # that would make that impossible.
            mark = hash_tagged(name, key) if self._clustered else f"{name}:{key}"
            window = windows[team_id] = _Window(key, mark, self.item(team_id, budget), self._push_fraction)
        now = self._clock()
        window.seen = now
        if now >= window.reset_at:
            window.shared = window.pending = window.admitted = 0
            window.reset_at = now + window.expiry
            window.epoch = next(self._epochs)
        if self.failing:
            # Admitted unchecked, and counted: pushed once Redis answers, so the team's window still holds
            # them (one slow reply used to lift every team's limit, uncounted, for an interval or more).
            self.fail_open += 1
            window.pending += 1
            window.admitted += 1
            return None
        if window.shared + window.pending >= window.limit:
            self.limited += 1
            return window.reset_at - now
        if window.pending >= window.push_lump:
            return SYNC_FIRST  # all this replica may hold unpushed: the caller awaits acheck()
        window.pending += 1
        window.admitted += 1
        if (
            window.pending >= window.push_at
            and (window.shared + window.pending) * 2 < window.limit  # past half: synced every interval
            and (self._syncing is None or self._syncing.done())
        ):
            with contextlib.suppress(RuntimeError):  # no running loop (a caller outside one): next interval
                self._start_sync()  # in the background: this request goes on from memory
        return None

    async def acheck(self, team_id: int, conditional: bool) -> float | None:
        """Either mode: None if admitted (and counted), else seconds until the window frees."""
        if self.fast:
            while (retry_after := self.check(team_id, conditional)) == SYNC_FIRST:
                # Pushes this window (it holds a lump) and reads the count back. A sync that raised had a
                # bug (it keeps Redis's errors to itself), logged and counted in _synced: admitted, as when
                # Redis fails, rather than waiting on sync after failing sync.
                running = self._joined()
                await asyncio.wait({running})  # cancelling the caller does not cancel the sync
                if running.cancelled() or running.exception() is not None:
                    self.fail_open += 1
                    return None
            return retry_after
        if team_id in self._allowlist:
            return None
        if self.failing and self._clock() < self._probe_at:
            self.fail_open += 1
            return None
        budget: Budget = "conditional" if conditional else "full"
        item = self.item(team_id, budget)
        try:
            if await self._strategy.hit(item, budget, str(team_id)):
                self._recovered()
                return None
            reset = await self._storage.get_expiry(item.key_for(budget, team_id))
        # limits wraps RedisError only; its Cluster client raises RedisClusterException when no node answers.
        except (StorageError, RedisClusterException) as exc:
            self._failed(exc)
            self._probe_at = self._clock() + self.sync_interval_seconds
            self.fail_open += 1
            return None
        self._recovered()
        self.limited += 1
        return max(reset - time.time(), 0.0)

    async def sync(self) -> None:
        """Fast mode: push admitted counts and re-read the shared ones of active teams (one script call per
        SYNC_CHUNK windows, all pipelined on a Cluster).

        One at a time: a call while one is under way shares it (the caller's window, if it was not in that run
        yet, goes in the next: acheck() loops). Cancelling a caller does not cancel the sync.
        """
        await asyncio.shield(self._joined())

    def _joined(self) -> asyncio.Future[None]:
        """The sync under way, or a new one."""
        running = self._syncing
        # A finished one too: its done callback runs a loop pass later, and awaiting a finished future does
        # not yield, so a caller looping in acheck() between the two spun for ever, the loop held (found by
        # a reviewer). A new run is a new task: awaiting it yields.
        if running is None or running.done():
            running = self._start_sync()
        return running

    def _start_sync(self) -> asyncio.Future[None]:
        running = self._syncing = asyncio.get_running_loop().create_task(self._sync())
        running.add_done_callback(self._synced)
        return running

    def _synced(self, task: asyncio.Future[None]) -> None:
        # Where every sync ends, whoever started it (the loop, a request in a burst, check()'s background
        # push, which nobody awaits): the one place a failure is seen. _sync keeps Redis's errors to itself,
        # so what it raises is a bug: counted every time, logged once per streak with where it was raised.
        if self._syncing is task:
            self._syncing = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._sync_bug = False
            return
        tasks.errors[SYNC_TASK] += 1
        if not self._sync_bug:
            self._sync_bug = True
            log.error(
                "rate limits: sync failed: %s at %s; admitting what waits on it",
                type(exc).__name__,
                where(exc),
            )

    async def _sync(self) -> None:
        now = self._clock()
        slot = slot_of(self._redis)
        # Per slot (one on one node), in calls of at most SYNC_CHUNK windows: the windows synced, the
        # script's keys and its arguments. (One call for every window held blocked Redis for a second with
        # 100,000, past the client's timeout: a sync after an outage could then never succeed.)
        calls: list[tuple[list[tuple[_Window, int, int]], list[str], list[int]]] = []
        open_calls: dict[int, tuple[list[tuple[_Window, int, int]], list[str], list[int]]] = {}
        for windows in (self._full, self._conditional):
            for team_id, window in list(windows.items()):
                if now >= window.reset_at and now - window.seen > self._idle_seconds:
                    # Its window ended and no request came since: what it held (pushed or not) counts for
                    # nothing any more. (Kept until then: a stale shared count is still a floor of the real
                    # one.) Windows holding less than half a lump unpushed were never dropped.
                    del windows[team_id]
                    continue
                if not window.pending:
                    if now - window.seen > self._idle_seconds:
                        continue
                    if window.shared * 2 < window.limit:
                        continue  # far below its limit: nothing to re-read (a push brings it up to date)
                    if window.shared >= window.limit and now < window.reset_at and not self.failing:
                        continue  # limited until a known reset: a fixed window's count only grows
                elif not self._worth_syncing(window):
                    continue
                group = slot(window.key)
                call = open_calls.get(group)
                if call is None or len(call[0]) >= SYNC_CHUNK:
                    call = open_calls[group] = ([], [], [])
                    calls.append(call)
                batch, names, args = call
                batch.append((window, window.pending, window.epoch))
                names += (window.key, window.mark)
                left_ms = max(1, math.ceil((window.reset_at - now) * 1000))
                args += (left_ms, window.epoch, window.admitted, window.pending)
        try:
            if not calls:
                if self.failing:
                    # Nothing to push: this is how recovery is noticed. Every primary on a Cluster (one
                    # node's answer said nothing of the node whose slots failed, found by a reviewer).
                    if self._clustered:
                        await self._redis.ping(target_nodes=RedisCluster.PRIMARIES)
                    else:
                        await self._redis.ping()
                    self._recovered()
                return
            replies = await run_script(self._redis, self._script, [(names, args) for _, names, args in calls])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return
        done = self._clock()
        for (batch, _, _), reply in zip(calls, replies, strict=True):
            for i, (window, delta, epoch) in enumerate(batch):
                if window.epoch != epoch:
                    continue  # the window ended while the reply was on its way; this one is the next window's
                window.pending -= delta
                window.shared = int(reply[2 * i])
                ttl_ms = int(reply[2 * i + 1])
                if ttl_ms > 0:
                    window.reset_at = done + ttl_ms / 1000
        self._recovered()

    def _worth_syncing(self, window: _Window) -> bool:
        # A team far below its limit costs Redis little: its admissions are pushed half a lump at a time,
        # and only a team past half its budget is synced every interval. SDKs poll every 30 s, so most teams
        # never come near their limit, and Redis sees O(teams near limit).
        used = window.shared + window.pending
        return used * 2 >= window.limit or window.pending >= window.push_at

    async def stop_syncing(self) -> None:
        """Cancel a sync under way (shielded from its callers, it would outlive the Redis client)."""
        if self._syncing is not None:
            await cancelled(self._syncing)

    async def aclose(self) -> None:
        """Close what `limits` holds of its own (a Cluster client; on one node it shares the app's pool)."""
        await close_limits_storage(self._storage)

    async def run(self) -> None:
        """Sync every sync_interval_seconds until cancelled."""
        while True:
            await asyncio.sleep(self.sync_interval_seconds)
            await asyncio.wait({self._joined()})  # a failure is counted and logged in _synced, once

    def _failed(self, exc: BaseException) -> None:
        if not self.failing:
            log.warning(
                "rate limits: redis unavailable (%s); failing open until it answers", type(exc).__name__
            )
            self.failing = True

    def _recovered(self) -> None:
        if self.failing:
            log.info(
                "rate limits: redis answers again; %d request(s) were admitted unchecked", self.fail_open
            )
            self.failing = False


def too_many_requests(retry_after: float) -> web.Response:
    """The contract's 429, with Retry-After in whole seconds (at least 1)."""
    return json_response(429, RATE_LIMITED, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


async def ratelimit_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create app[keys.RATE_LIMITS] on the app's Redis pool; in fast mode, sync it in the background."""
    limiter = RateLimiter(app[keys.SETTINGS].rate_limits, app[keys.REDIS])
    app[keys.RATE_LIMITS] = limiter
    try:
        if not (limiter.enabled and limiter.fast):
            yield
            return
        async with background(limiter.run, name=SYNC_TASK):
            yield
    finally:
        await limiter.stop_syncing()
        await limiter.aclose()
