"""Billing counters (contract §3 step 8): tallied in memory per request, flushed to Redis exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy import keys
from proxy.cluster import RedisClient, ScriptCall, hash_tagged, run_script, slot_of
from proxy.contract import RedisContract
from proxy.settings import BillingSettings
from proxy.tasks import background

log = logging.getLogger(__name__)

# (team_id, library, bucket) -> requests
Counts = dict[tuple[int, str, int], int]

# Applies batches in order; each batch is [mark][hash key]* in KEYS and [seq][n][field, increment]* in ARGV.
# Batches carry increasing sequence numbers, and a mark holds the last one applied (a high-water mark): a
# batch not above it was applied by an attempt whose reply was lost, and is skipped, so a retry (ours, or
# redis-py's own after a dropped connection, or a stale copy that arrives late) never counts twice. Pending
# batches are always sent oldest first, so no batch is ever applied after a later one under the same mark.
# A script runs atomically: no other client sees half a batch. (Redis does not roll back a script that fails
# midway; only a billing key of the wrong type can do that, and the batch is then marked applied and not
# retried.) One mark per tally (per process) on one node. On a Cluster a script may touch one slot only, so a
# batch is applied per slot group of its hashes, all pipelined; each group is marked in its own slot (a mark
# per process and group, hash-tagged with the group's smallest key). Each group is then applied exactly once,
# as a whole batch is on one node; only the groups of one batch are not applied atomically together (a
# reader may see the team hash counted before the SDK hash, never a count twice or lost).
_APPLY_BATCHES = """
local ttl = ARGV[1]
local k, a = 1, 2
local applied = 0
while k <= #KEYS do
  local seq, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local fresh = seq > (tonumber(redis.call('GET', KEYS[k])) or 0)
  if fresh then
    redis.call('SET', KEYS[k], seq, 'EX', ttl)
    applied = applied + 1
  end
  k, a = k + 1, a + 2
  for _ = 1, n do
    if fresh then
      redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    end
    k, a = k + 1, a + 2
  end
end
return applied
"""
# A batch stays pending about max_pending_batches x flush_interval at most (~8 h by default), far below
# this: a retry always finds the mark of an earlier attempt that was applied. Each write renews it.
_DEDUPE_TTL_SECONDS = 86400
# Redis runs a script alone; ~1 µs per HINCRBY keeps one call under ~20 ms. A backlog drains over flushes.
_MAX_INCREMENTS_PER_CALL = 20_000
_FINAL_FLUSH_ATTEMPTS = 3
_FINAL_FLUSH_PAUSE_SECONDS = 0.1


@dataclass
class _Batch:
    counts: Counts
    seq: int  # increasing in the order batches are sealed

    @property
    def requests(self) -> int:
        return sum(self.counts.values())


def _describe(counts: Counts) -> str:
    # Enough to re-apply by hand: team, library, bucket and requests of every entry.
    return ", ".join(
        f"{team}/{library}/{bucket}={n}" for (team, library, bucket), n in sorted(counts.items())
    )


class BillingTally:
    """Requests billed per (team, library, bucket) since the last flush, and batches waiting to be written."""

    def __init__(self, contract: RedisContract, settings: BillingSettings) -> None:
        self.contract = contract
        self.settings = settings
        self._bucket_seconds = contract.layout.billing_bucket_seconds
        self._counts: Counts = {}
        self._pending: deque[_Batch] = deque()
        self._sealed = 0
        # This tally's mark (one per process): a fresh id, so no two processes ever share one.
        self._mark = contract.layout.billing_dedupe_key.format(batch_id=uuid.uuid4().hex)
        self._script: AsyncScript | None = None
        # Flushes must not overlap: a batch leaves the queue only once the call that carried it succeeded.
        self._flushing = asyncio.Lock()
        self._failing = False
        # Counters for metrics.
        self.flushes = 0
        self.flushed_requests = 0
        self.failed_flushes = 0
        self.dropped_counts = 0

    @property
    def pending_batches(self) -> int:
        """Batches sealed but not yet confirmed written."""
        return len(self._pending)

    @property
    def unflushed_requests(self) -> int:
        """Requests counted but not yet confirmed written (tally plus pending batches)."""
        return sum(self._counts.values()) + sum(batch.requests for batch in self._pending)

    def count(self, team_id: int, library: str, now: float | None = None) -> None:
        """Bill one request to the bucket of `now` (request time, not flush time); memory only."""
        bucket = int((time.time() if now is None else now) // self._bucket_seconds)
        counts = self._counts
        entry = (team_id, library, bucket)
        counts[entry] = counts.get(entry, 0) + 1

    async def flush(self, redis: RedisClient) -> bool:
        """Seal the tally, then write the pending batches in order in one round trip; False if Redis fails.

        One round trip per node on a Cluster, where the batches are applied slot by slot.
        """
        async with self._flushing:
            self._seal()
            if not self._pending:
                return True
            batches = self._next_call()
            try:
                await run_script(redis, self._apply(redis), self._encode(batches, redis))
            except (RedisError, OSError) as exc:
                # Outcome unknown: the batches stay pending with their numbers, so the retry is idempotent.
                self.failed_flushes += 1
                if not self._failing:
                    log.warning(
                        "billing: flush failed (%s); %d request(s) kept for retry",
                        type(exc).__name__,
                        self.unflushed_requests,
                    )
                    self._failing = True
                return False
            for _ in batches:
                self._pending.popleft()
            self.flushes += 1
            self.flushed_requests += sum(batch.requests for batch in batches)
            if self._failing:
                log.info("billing: flush succeeded again; %d batch(es) still pending", len(self._pending))
                self._failing = False
            return True

    async def close(self, redis: RedisClient) -> None:
        """Final flush at shutdown, bounded in attempts and time; logs at ERROR whatever stays unwritten."""
        failures = 0
        budget = self.settings.final_flush_timeout_seconds
        deadline = asyncio.get_running_loop().time() + budget
        try:
            async with asyncio.timeout(budget):
                while self._counts or self._pending:
                    if await self.flush(redis):
                        continue
                    failures += 1
                    # The deadline is checked too: redis-py can swallow the timeout's cancellation.
                    if failures >= _FINAL_FLUSH_ATTEMPTS or asyncio.get_running_loop().time() >= deadline:
                        break
                    await asyncio.sleep(_FINAL_FLUSH_PAUSE_SECONDS)
        except TimeoutError:
            log.warning("billing: final flush timed out after %.1f s", budget)
        self._seal()
        if self._pending:
            lost: Counts = {}
            for batch in self._pending:
                for entry, n in batch.counts.items():
                    lost[entry] = lost.get(entry, 0) + n
            log.error(
                "billing: %d request(s) not confirmed written at shutdown (team/library/bucket=n): %s",
                sum(lost.values()),
                _describe(lost),
            )

    def _apply(self, redis: RedisClient) -> AsyncScript:
        # redis-py's script object sends EVALSHA and loads the script only on NOSCRIPT (e.g. after a restart).
        if self._script is None or self._script.registered_client is not redis:
            self._script = redis.register_script(_APPLY_BATCHES)
        return self._script

    def _seal(self) -> None:
        if not self._counts:
            return
        self._sealed += 1
        self._pending.append(_Batch(self._counts, self._sealed))
        self._counts = {}
        while len(self._pending) > self.settings.max_pending_batches:
            dropped = self._pending.popleft()
            self.dropped_counts += dropped.requests
            log.error(
                "billing: more than %d batches unwritten; dropped the oldest, %d request(s) lost: %s",
                self.settings.max_pending_batches,
                dropped.requests,
                _describe(dropped.counts),
            )

    def _next_call(self) -> list[_Batch]:
        batches: list[_Batch] = []
        increments = 0
        for batch in self._pending:
            increments += 2 * len(batch.counts)
            if batches and increments > _MAX_INCREMENTS_PER_CALL:
                break
            batches.append(batch)
        return batches

    def _encode(self, batches: list[_Batch], redis: RedisClient) -> list[ScriptCall]:
        # One script call per slot: a single one on one node, where every key is in "slot 0".
        slot = slot_of(redis)
        clustered = isinstance(redis, RedisCluster)
        calls: dict[int, tuple[list[str], list[str | int]]] = {}
        for batch in batches:
            # Requests of one team over several libraries go into one HINCRBY of the team hash.
            increments: dict[tuple[str, int], int] = {}
            for (team_id, library, bucket), n in batch.counts.items():
                for key in self.contract.billing_keys(team_id, library):
                    increments[key, bucket] = increments.get((key, bucket), 0) + n
            groups: dict[int, list[tuple[str, int, int]]] = {}
            for (key, bucket), n in increments.items():
                groups.setdefault(slot(key), []).append((key, bucket, n))
            for group_slot, group in groups.items():
                script_keys, args = calls.setdefault(group_slot, ([], [_DEDUPE_TTL_SECONDS]))
                # A retry must find the same mark: the group's smallest key names it, whatever the order.
                script_keys.append(
                    hash_tagged(self._mark, min(k for k, _, _ in group)) if clustered else self._mark
                )
                args += (batch.seq, len(group))
                for key, bucket, n in group:
                    script_keys.append(key)
                    args.extend((bucket, n))
        return list(calls.values())


async def billing_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create app[keys.BILLING] and flush it in the background; on cleanup, flush what is left."""
    settings = app[keys.SETTINGS]
    redis = app[keys.REDIS]
    tally = BillingTally(RedisContract(settings.layout), settings.billing)
    app[keys.BILLING] = tally
    flusher = _flush_forever(tally, redis, settings.billing.flush_interval_seconds)
    async with background(flusher, name="billing-flusher"):
        yield
    # After the flusher has stopped, so the two never write the same batch at once.
    await tally.close(redis)


async def _flush_forever(tally: BillingTally, redis: RedisClient, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await tally.flush(redis)
        # redis-py can swallow a cancellation that lands inside a command (redis/redis-py#2028): honour it,
        # or cleanup would wait for this task forever and the final flush would never run.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
