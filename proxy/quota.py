"""Quota-limited projects (contract §3 step 5): a snapshot in memory, kept fresh by a background poller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import cast

from aiohttp import web
from redis.exceptions import RedisError

from proxy import keys
from proxy.cluster import RedisClient
from proxy.contract import RedisContract
from proxy.tasks import background

log = logging.getLogger(__name__)


class QuotaSnapshot:
    """Project token -> unix time its limit lasts until, as last read from the backend's sorted set."""

    def __init__(
        self, key: str, max_staleness_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.key = key
        self.max_staleness_seconds = max_staleness_seconds
        self._clock = clock
        self._until: dict[str, float] = {}
        # Monotonic time of the last successful read; None before the first one.
        self.read_at: float | None = None
        self.failing = False
        self.cleared = False

    def __len__(self) -> int:
        return len(self._until)

    def is_limited(self, token: str, now: float | None = None) -> bool:
        """True iff the token's limit lasts until `now` or later (checked per request, so it ends on time)."""
        until = self._until.get(token)
        if until is None:
            return False
        return until >= (time.time() if now is None else now)

    async def refresh(self, redis: RedisClient, now: float | None = None) -> None:
        """Read the tokens limited at `now` or later (one ZRANGEBYSCORE), swap them in; raises RedisError."""
        now = time.time() if now is None else now
        rows = await redis.zrangebyscore(self.key, now, "+inf", withscores=True)
        # withscores on a bytes client: (member, score) pairs; redis-py types every reply shape at once.
        pairs = cast("list[tuple[bytes, float]]", rows)
        # One assignment: a request never sees half of an old and half of a new snapshot.
        until = {}
        for member, score in pairs:
            # The backend compares bytes: a member that is no UTF-8 matches no token a request can name (it
            # matched a token holding U+FFFD when decoded with replacement; found by a reviewer).
            with contextlib.suppress(UnicodeDecodeError):
                until[member.decode()] = float(score)
        self._until = until
        self.read_at = self._clock()

    async def poll(self, redis: RedisClient) -> None:
        """Refresh; on a Redis error keep the snapshot up to max_staleness_seconds, then fail open."""
        try:
            await self.refresh(redis)
        except (RedisError, OSError) as exc:
            self._failed(exc)
        else:
            if self.failing:
                log.info("quota: redis readable again, %d project(s) limited", len(self._until))
            self.failing = self.cleared = False

    def _failed(self, exc: Exception) -> None:
        if not self.failing:
            log.warning(
                "quota: cannot read %s (%s); keeping the last snapshot for up to %.1f s",
                self.key,
                type(exc).__name__,
                self.max_staleness_seconds,
            )
            self.failing = True
        stale = self.read_at is None or self._clock() - self.read_at > self.max_staleness_seconds
        if stale and not self.cleared:
            if self._until:
                log.warning(
                    "quota: snapshot older than %.1f s, cleared: %d project(s) no longer limited (fail open)",
                    self.max_staleness_seconds,
                    len(self._until),
                )
            self._until = {}
            self.cleared = True


async def quota_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create app[keys.QUOTA] and poll the quota set in the background; startup does not wait for Redis."""
    settings = app[keys.SETTINGS]
    snapshot = QuotaSnapshot(RedisContract(settings.layout).quota_key, settings.quota.max_staleness_seconds)
    app[keys.QUOTA] = snapshot
    poller = partial(_poll_forever, snapshot, app[keys.REDIS], settings.quota.poll_interval_seconds)
    async with background(poller, name="quota-poller"):
        yield


async def _poll_forever(snapshot: QuotaSnapshot, redis: RedisClient, interval: float) -> None:
    while True:
        await snapshot.poll(redis)
        # redis-py can swallow a cancellation that lands inside a command (seen here with redis-py 8 when
        # Redis restarts; redis/redis-py#2028): honour it, or cleanup would wait for this task forever.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(interval)
