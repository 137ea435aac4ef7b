"""Billing counters (contract §3 step 8): tallied in memory per request, flushed to Redis exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy import keys
from proxy.cluster import RedisClient, ScriptCall, hash_tagged, run_script, slot_of
from proxy.contract import RedisContract
from proxy.settings import BILLING_DEDUPE_TTL_SECONDS, BillingSettings
from proxy.tasks import background

log = logging.getLogger(__name__)

# (team_id, library, bucket) -> requests
Counts = dict[tuple[int, str, int], int]

# Each flush interval's tally is sealed into a batch of one or more parts (see _ENTRIES_PER_PART). Applies
# parts in order; each part is [mark][hash key]* in KEYS and [seq][n][field, increment]* in ARGV. Parts
# carry increasing sequence numbers, and a mark holds the last one applied (a high-water mark): a part not
# above it was applied by an attempt whose reply was lost, and is skipped, so a retry (ours, or redis-py's
# own after a dropped connection, or a stale copy that arrives late) never counts twice. Pending parts are
# always sent oldest first, so no part is ever applied after a later one under the same mark. A script runs
# atomically: no other client sees half a part. (Redis does not roll back a script that fails midway; only a
# billing key of the wrong type can do that, and the part is then marked applied and not retried.) One mark
# per tally (per process) on one node. On a Cluster a script may touch one slot only, so a part is applied
# per slot group of its hashes, all pipelined; each group is marked in its own slot (a mark per process and
# group, hash-tagged with the group's smallest key). Each group is then applied exactly once, as a whole
# part is on one node; only the groups of one part are not applied atomically together (a reader may see the
# team hash counted before the SDK hash, never a count twice or lost).
_APPLY_BATCHES = """
local ttl = ARGV[1]
local k, a = 1, 2
local failed = {}
while k <= #KEYS do
  local seq, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local fresh = seq > (tonumber(redis.call('GET', KEYS[k])) or 0)
  if fresh then
    redis.call('SET', KEYS[k], seq, 'EX', ttl)
  end
  k, a = k + 1, a + 2
  for _ = 1, n do
    if fresh then
      -- pcall: one hash that refuses (WRONGTYPE) fails alone, as one HINCRBY of the backend's pipeline does;
      -- the rest of the part is still applied, and the refused increments are returned to be logged.
      local reply = redis.pcall('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
      if type(reply) == 'table' and reply.err then
        failed[#failed + 1] = KEYS[k]
        failed[#failed + 1] = ARGV[a]
        failed[#failed + 1] = ARGV[a + 1]
      end
    end
    k, a = k + 1, a + 2
  end
end
return failed
"""
# A batch stays pending about max_pending_batches x flush_interval at most (~8 h by default; never a day,
# see BillingSettings.pending_batches_kept), counted in seals; and, on a replica too quiet to seal anything,
# at most a day less _MARK_MARGIN_SECONDS after it was first sent (_drop_outliving_their_mark): a retry
# always finds the mark of an earlier attempt that was applied. Each write renews it.
_DEDUPE_TTL_SECONDS = BILLING_DEDUPE_TTL_SECONDS
# Redis runs a script alone, and the proxy builds each call's arguments at once. One interval's tally can
# hold every team the process served (100,000 teams: 200,000 HINCRBYs, ~200 ms of Redis blocked and ~130 MiB
# of arguments in one call), so it is sealed in parts of at most _ENTRIES_PER_PART (team, library, bucket)
# entries, each numbered, and a call carries up to _MAX_INCREMENTS_PER_CALL increments (~1 ms of Redis,
# measured ~1.3 MiB of Python objects per 2,000); a flush sends its calls one after the other.
_ENTRIES_PER_PART = 500
_MAX_INCREMENTS_PER_CALL = 2 * _ENTRIES_PER_PART
_FINAL_FLUSH_ATTEMPTS = 3
# A part sent this long short of its mark's TTL ago is no longer retried (see _drop_outliving_their_mark).
_MARK_MARGIN_SECONDS = 3600
_FINAL_FLUSH_PAUSE_SECONDS = 0.1


@dataclass
class _Part:
    """Part of one interval's sealed tally: what one mark check covers."""

    counts: Counts
    seq: int  # increasing in the order parts are sealed
    batch: int  # the seal (flush interval) it came from; consecutive over what is pending
    sent: bool = False  # a call carried it: Redis may have applied it though no reply confirmed it
    first_sent_at: float | None = None  # monotonic time of the first call that carried it

    @property
    def requests(self) -> int:
        return sum(self.counts.values())


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


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
        # Sealed parts, oldest first: written in this order, and each leaves only once written.
        self._pending: deque[_Part] = deque()
        self._sealed = 0  # seals (batches) so far
        self._parts = 0  # parts so far: the last part's seq
        # This tally's mark (one per process): a fresh id, so no two processes ever share one.
        self._mark = contract.layout.billing_dedupe_key.format(batch_id=uuid.uuid4().hex)
        self._clustered = False  # the client of the last flush is a Cluster's: marks are <mark>:{...} there
        self._script: AsyncScript | None = None
        # Flushes must not overlap: a part leaves the queue only once the call that carried it succeeded.
        self._flushing = asyncio.Lock()
        self._failing = False
        # Counters for metrics.
        self.flushes = 0
        self.flushed_requests = 0
        self.failed_flushes = 0
        self.dropped_counts = 0

    @property
    def pending_batches(self) -> int:
        """Batches (one per flush interval with counts) sealed but not yet wholly confirmed written."""
        return self._pending[-1].batch - self._pending[0].batch + 1 if self._pending else 0

    @property
    def unflushed_requests(self) -> int:
        """Requests counted but not yet confirmed written (tally plus pending batches)."""
        # list() first, in one C call: the OTLP export thread reads this while the loop may change the deque
        # (a generator over it could raise "deque mutated during iteration" there and lose the point).
        return sum(self._counts.values()) + sum(part.requests for part in list(self._pending))

    def _bucket(self, now: float | None) -> int:
        return int((time.time() if now is None else now) // self._bucket_seconds)

    def count(self, team_id: int, library: str, now: float | None = None) -> None:
        """Bill one request to the bucket of `now` (request time, not flush time); memory only."""
        counts = self._counts
        entry = (team_id, library, self._bucket(now))
        counts[entry] = counts.get(entry, 0) + 1

    async def flush(self, redis: RedisClient, *, hold_newest: bool = False, now: float | None = None) -> bool:
        """Seal the tally, then write every pending batch in order; False if Redis fails.

        One script call (one round trip) per _MAX_INCREMENTS_PER_CALL increments, one after the other; on
        a Cluster each call is one round trip per node, the parts applied slot by slot.

        `hold_newest` (the periodic flush): when a bucket boundary fell inside the interval, the counts of the
        bucket begun (that of `now`) stay in the tally for the next flush. Written now, each (team, library)
        still polling would be written again into the same bucket a flush later: one HINCRBY pair per bucket
        and flush instead of two, a fifth fewer with 120 s buckets and 30 s flushes, for at most one interval
        more before those counts reach Redis.
        """
        async with self._flushing:
            self._clustered = isinstance(redis, RedisCluster)
            self._seal(self._bucket(now) if hold_newest else None)
            self._drop_outliving_their_mark()
            if not self._pending:
                return True
            while self._pending:
                parts = self._next_call()
                for part in parts:
                    part.sent = True
                    if part.first_sent_at is None:
                        part.first_sent_at = time.monotonic()
                try:
                    replies = await run_script(redis, self._apply(redis), self._encode(parts, redis))
                except (RedisError, OSError) as exc:
                    # Outcome unknown: the parts stay pending with their numbers, so the retry is idempotent.
                    self.failed_flushes += 1
                    if not self._failing:
                        log.warning(
                            "billing: flush failed (%s); %d request(s) kept for retry",
                            type(exc).__name__,
                            self.unflushed_requests,
                        )
                        self._failing = True
                    return False
                for _ in parts:
                    self._pending.popleft()
                self._refused(replies)
                self.flushed_requests += sum(part.requests for part in parts)
            self.flushes += 1
            if self._failing:
                log.info("billing: flush succeeded again; every pending batch written")
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
            # Not confirmed is not unwritten: Redis may have run a call whose reply never came (a hung or
            # partitioned Redis). The mark tells, for a day: a part was applied iff the mark holds its number
            # or more. (Found by two reviewers: re-applied as the log said, lost replies counted twice.)
            log.error(
                "billing: %d request(s) not confirmed written at shutdown: a part was applied if GET %s%s "
                "(kept %d h) is its number or more, else re-apply it by hand (team/library/bucket=n): %s",
                self.unflushed_requests,
                self._mark,
                " (on a Cluster, each slot's <mark>:{...}: SCAN MATCH <mark>:*)"
                if isinstance(redis, RedisCluster)
                else "",
                _DEDUPE_TTL_SECONDS // 3600,
                "; ".join(f"part {part.seq}: {_describe(part.counts)}" for part in self._pending),
            )

    def _refused(self, replies: list[object]) -> None:
        # Increments a hash refused (a key of another type): applied nowhere, and never retried (the part is
        # marked applied). Logged with what re-applies them by hand; the rest of their part was written.
        refused = [
            (key, field, n)
            for reply in replies
            if isinstance(reply, list)
            for key, field, n in zip(reply[::3], reply[1::3], reply[2::3], strict=True)
        ]
        if not refused:
            return
        log.error(
            "billing: Redis refused %d increment(s) (a billing key of another type?); not written: %s",
            len(refused),
            ", ".join(f"HINCRBY {_text(key)} {_text(field)} {_text(n)}" for key, field, n in refused),
        )

    def _apply(self, redis: RedisClient) -> AsyncScript:
        # redis-py's script object sends EVALSHA and loads the script only on NOSCRIPT (e.g. after a restart).
        if self._script is None or self._script.registered_client is not redis:
            self._script = redis.register_script(_APPLY_BATCHES)
        return self._script

    def _seal(self, hold_bucket: int | None = None) -> None:
        counts = self._counts
        held: Counts = {}
        if hold_bucket is not None and any(bucket != hold_bucket for _, _, bucket in counts):
            held = {entry: n for entry, n in counts.items() if entry[2] == hold_bucket}
        entries = [item for item in counts.items() if item[0] not in held]
        self._counts = held
        if not entries:
            return
        self._sealed += 1
        for start in range(0, len(entries), _ENTRIES_PER_PART):
            self._parts += 1
            part = dict(entries[start : start + _ENTRIES_PER_PART])
            self._pending.append(_Part(part, self._parts, self._sealed))
        while self.pending_batches > self.settings.pending_batches_kept:
            oldest = self._pending[0].batch
            dropped: list[_Part] = []
            while self._pending and self._pending[0].batch == oldest:
                dropped.append(self._pending.popleft())
            requests = sum(part.requests for part in dropped)
            self.dropped_counts += requests
            # A part that was sent may have been applied (its reply lost): as in the shutdown log, the mark
            # tells, so nobody re-applies by hand what Redis already holds.
            log.error(
                "billing: more than %d batches unwritten; dropped the oldest, %d request(s) not confirmed "
                "written (a part sent before was applied if GET %s%s is its number or more): %s",
                self.settings.pending_batches_kept,
                requests,
                self._mark,
                " (on a Cluster, each slot's <mark>:{...}: SCAN MATCH <mark>:*)" if self._clustered else "",
                "; ".join(
                    f"part {part.seq}{' (sent)' if part.sent else ' (never sent)'}: {_describe(part.counts)}"
                    for part in dropped
                ),
            )

    def _drop_outliving_their_mark(self) -> None:
        # The bound of _seal counts seals, and a quiet replica seals only when it billed something: a part
        # sent (perhaps applied, its reply lost) could stay pending past its mark's day and then count twice.
        # Parts first sent more than that day less _MARK_MARGIN_SECONDS ago go, logged while the mark tells.
        limit = time.monotonic() - (_DEDUPE_TTL_SECONDS - _MARK_MARGIN_SECONDS)
        dropped: list[_Part] = []
        while self._pending and (sent_at := self._pending[0].first_sent_at) is not None and sent_at < limit:
            dropped.append(self._pending.popleft())
        if not dropped:
            return
        requests = sum(part.requests for part in dropped)
        self.dropped_counts += requests
        log.error(
            "billing: %d request(s) pending for nearly the %d h their dedupe mark lives, dropped rather than "
            "risk counting them twice (a part was applied if GET %s%s is its number or more): %s",
            requests,
            _DEDUPE_TTL_SECONDS // 3600,
            self._mark,
            " (on a Cluster, each slot's <mark>:{...}: SCAN MATCH <mark>:*)" if self._clustered else "",
            "; ".join(f"part {part.seq}: {_describe(part.counts)}" for part in dropped),
        )

    def _next_call(self) -> list[_Part]:
        parts: list[_Part] = []
        increments = 0
        for part in self._pending:
            increments += 2 * len(part.counts)
            if parts and increments > _MAX_INCREMENTS_PER_CALL:
                break
            parts.append(part)
        return parts

    def _encode(self, parts: list[_Part], redis: RedisClient) -> list[ScriptCall]:
        # One script call per slot: a single one on one node, where every key is in "slot 0".
        slot = slot_of(redis)
        clustered = isinstance(redis, RedisCluster)
        calls: dict[int, tuple[list[str], list[str | int]]] = {}
        for part in parts:
            # Requests of one team over several libraries go into one HINCRBY of the team hash.
            increments: dict[tuple[str, int], int] = {}
            for (team_id, library, bucket), n in part.counts.items():
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
                args += (part.seq, len(group))
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
    if settings.billing.pending_batches_kept < settings.billing.max_pending_batches:
        log.warning(
            "billing: keeping %d unwritten batches, not max_pending_batches=%d: at %.0f s each, more would "
            "outlive the %d s mark that keeps a retried batch from counting twice",
            settings.billing.pending_batches_kept,
            settings.billing.max_pending_batches,
            settings.billing.flush_interval_seconds,
            _DEDUPE_TTL_SECONDS,
        )
    flusher = partial(_flush_forever, tally, redis, settings.billing.flush_interval_seconds)
    try:
        async with background(flusher, name="billing-flusher"):
            yield
    finally:
        # After the flusher has stopped, so the two never write the same batch at once.
        await tally.close(redis)


async def _flush_forever(tally: BillingTally, redis: RedisClient, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await tally.flush(redis, hold_newest=True)
        # redis-py can swallow a cancellation that lands inside a command (redis/redis-py#2028): honour it,
        # or cleanup would wait for this task forever and the final flush would never run.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
