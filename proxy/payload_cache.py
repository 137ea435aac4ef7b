"""Definitions payloads in process memory: byte-budgeted LRU, kept fresh by one pipelined MGET per cycle."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

import zstandard
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.cluster import RedisClient, mget, mget_many
from proxy.contract import DecodeError, RedisContract
from proxy.logs import Throttled
from proxy.memory import HeapTrimmer
from proxy.payload import Definitions, is_billable
from proxy.payload import contents as _contents
from proxy.payload import etag_safe as _etag_safe
from proxy.read_order import DELETED, ReadOrder
from proxy.settings import DefinitionsSettings
from proxy.singleflight import FreshFlight, SingleFlight
from proxy.tasks import every

log = logging.getLogger(__name__)

# LRU order and idle time are kept to this precision: a team polled many times a second is moved up once.
_TOUCH_PRECISION_SECONDS = 1.0
# The refresher lets requests run between every this many payloads it decodes and parses.
_BUILDS_PER_YIELD = 8
# ETags per team this replica held and then replaced with a newer read: known older, and answered from
# memory. The newest few; an older one than these is checked against Redis like an unknown one.
_REPLACED_KEPT = 4
# Teams whose refused entry is remembered; past this the memory starts over.
_REFUSED_KEPT = 4096
# ... and for this long at most (monotonic seconds) before it is read again.
_REFUSED_SECONDS = 5.0
# (team, ETag) pairs whose billability is remembered; past this the memo starts over.
_BILLABLE_MEMO_SIZE = 16384


# Reads of a team's entry, by (team, with the payload): shared by whoever asks meanwhile, or only by those who
# asked before the read began.
_Flight = (
    SingleFlight[tuple[int, bool], "Definitions | None"] | FreshFlight[tuple[int, bool], "Definitions | None"]
)


class DefinitionsCache:
    """team id -> Definitions: `get` reads memory, `load` reads Redis on a miss, `refresh` keeps it fresh."""

    def __init__(
        self,
        client: RedisClient,
        contract: RedisContract,
        settings: DefinitionsSettings,
        *,
        redis_up: Callable[[], bool] = lambda: True,
    ) -> None:
        self._client = client
        # False while the health monitor finds Redis down (Health.redis_reads): a load is a miss at once.
        self._redis_up = redis_up
        # On a Cluster a payload and its ETag live in different slots: the backend's write of the pair and
        # this read of it are atomic per slot only, so a read can pair one write's payload with another's
        # ETag. Served, an SDK would keep that ETag and get 304s for the new flags; so there each pair is
        # checked against the contract's ETag (sha256 of the JSON, 16 hex digits) when it is first built.
        # One node reads and writes the pair atomically (MGET, MSET): nothing to check.
        self._check_pairs = isinstance(client, RedisCluster)
        self._contract = contract
        # Warnings a request can raise (Redis failing, a bad entry): at most one line per kind per interval.
        self._warn = Throttled(log)
        self._settings = settings
        self._entries: OrderedDict[int, Definitions] = OrderedDict()
        self._used_at: dict[int, float] = {}
        self._flight: _Flight = SingleFlight()
        self._fresh: _Flight = FreshFlight()
        self._billable: dict[tuple[int, str], bool] = {}
        # Per team, the ETag (as Redis returned it) of a payload or ETag refused, and until when that holds.
        self._refused: dict[int, tuple[bytes | None, float]] = {}
        # Per team, the ETag headers held here and replaced by a newer read (at most _REPLACED_KEPT).
        self._replaced: dict[int, tuple[str, ...]] = {}
        # Which of two overlapping reads of a team has the last word.
        self._order = ReadOrder()
        self.bytes_held = 0
        # With a decoded budget, every payload is also held compressed, and only the most recently served are
        # held decoded too: these team ids, least recently served first, holding decoded_bytes.
        self._decoded_budget = settings.cache_decoded_budget_bytes
        self._decoded: OrderedDict[int, None] | None = None if self._decoded_budget is None else OrderedDict()
        self.decoded_bytes = 0
        self._compressor = zstandard.ZstdCompressor(level=3) if self._decoded_budget is not None else None
        self._decompressor = zstandard.ZstdDecompressor()
        self.decompressions = 0
        self.refresh_failures = 0
        # Payload bytes built or dropped count towards handing the freed heap pages back to the OS.
        self.heap = HeapTrimmer()
        # Lookups in memory, for metrics (a miss reads Redis).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def decoded_size(self) -> int:
        """Payload bytes held decoded, ready to send."""
        return self.bytes_held if self._decoded is None else self.decoded_bytes

    def oldest_check_age(self) -> float:
        """Seconds since Redis last confirmed the least recently confirmed entry (0 with none held)."""
        # list() copies in one step: an OTLP export thread may call this while the loop changes entries.
        entries = list(self._entries.values())
        return time.monotonic() - min(e.checked_at for e in entries) if entries else 0.0

    def get(self, team_id: int) -> Definitions | None:
        """The entry in memory, unless absent or older than max staleness (the caller loads or forwards)."""
        entry = self._entries.get(team_id)
        if entry is None:
            self.misses += 1
            return None
        now = time.monotonic()
        if now - entry.checked_at > self._settings.max_staleness_seconds:
            self.misses += 1
            return None
        self.hits += 1
        if now - entry.touched_at > _TOUCH_PRECISION_SECONDS:
            entry.touched_at = now
            self._entries.move_to_end(team_id)
            self._used_at[team_id] = now
        return entry

    def body(self, entry: Definitions) -> bytes | None:
        """The payload to send: held decoded, else decompressed from the compressed copy (and held again)."""
        body = entry.body
        decoded = self._decoded
        if body is not None:
            if decoded is not None and entry.team_id in decoded:
                decoded.move_to_end(entry.team_id)
            return body
        if entry.packed is None:
            return None
        body = self._decompressor.decompress(entry.packed)
        self.decompressions += 1
        if decoded is not None and self._entries.get(entry.team_id) is entry:
            entry.body = body
            self._hold_decoded(entry, body)
        return body

    async def load(self, team_id: int, *, with_body: bool) -> Definitions | None:
        """Read the team's entry from Redis (concurrent loads share one read); None is a miss."""
        return await self._read_through(self._flight, team_id, with_body)

    async def _read(self, team_id: int, with_body: bool) -> Definitions | None:
        read_at = time.monotonic()
        try:
            refused = self._refused.get(team_id)
            if refused is not None and read_at >= refused[1]:
                self._refused.pop(team_id, None)
                refused = None
            if not with_body or refused is not None:
                raw_etag = cast(bytes | None, await self._client.get(self._contract.etag_key(team_id)))
                if refused is not None:
                    if raw_etag == refused[0]:
                        return None  # unchanged since it was refused: not read, decoded nor parsed again
                    # (Another read may have seen the change first: a second `del` raised, a 500.)
                    self._refused.pop(team_id, None)
            if not with_body:
                try:
                    etag = self._decode_etag(raw_etag)
                except DecodeError as exc:
                    self._unreadable(team_id, read_at, "ETag", exc, raw_etag)
                    return None
                if etag is not None:
                    held = self._entries.get(team_id)
                    if held is not None and held.etag == etag and (held.body or held.packed) is not None:
                        # Confirmed as it stands (after an outage, say): the payload held stays held, and the
                        # next 200 needs no read; an ETag-only entry in its place would throw it away.
                        if self._taken(team_id, read_at, _contents(held)):
                            held.checked_at = time.monotonic()
                        return held
                    return self._store(Definitions(team_id, etag, None, True, time.monotonic()), read_at)
            keys = (self._contract.payload_key(team_id), self._contract.etag_key(team_id))
            raw_body, raw_etag = await mget(self._client, keys)
        except RedisError as exc:
            self._warn.warning("definitions read failed for team %s: %s", team_id, type(exc).__name__)
            return None
        return self._build(team_id, raw_body, raw_etag, read_at)

    def _decode_etag(self, raw: bytes | None) -> str | None:
        """The stored ETag, None if there is none; DecodeError if there is one this proxy does not send."""
        etag = self._contract.decode_text(raw, marked=False)  # the marker stands for a payload, not an ETag
        if etag is not None and not _etag_safe(etag):
            # The contract's is 16 hex digits. A control character (CR/LF) would break the header, and aiohttp
            # would cut the connection of every answer carrying it; the backend sends a space, a quote or a
            # non-ASCII letter as it is (found by a reviewer): the team's requests go to the backend.
            raise DecodeError("characters an ETag here may not hold")
        return etag

    def _unreadable(
        self, team_id: int, read_at: float, what: str, exc: DecodeError, raw_etag: bytes | None
    ) -> None:
        """A read that found what the backend would not serve as this proxy would: a miss, nothing held.

        Remembered by its ETag, as Redis holds it: until that changes, the team's requests go to the backend
        at the cost of one GET (a 6 MB payload refused was read and parsed again for each, ~0.4 s of the
        loop every time; found by a reviewer). For _REFUSED_SECONDS at most, as a read between the two
        halves of the backend's write can pair a refused payload with the ETag of the next one.
        """
        self._warn.warning("undecodable %s for team %s: %s", what, team_id, exc)
        self._taken(team_id, read_at, DELETED)
        self._drop(team_id)  # not to be served from an older read either
        # Without an ETag (the backend's ETags off) only the time tells: a payload fixed meanwhile waits
        # _REFUSED_SECONDS at most.
        if len(self._refused) >= _REFUSED_KEPT:
            self._refused.clear()
        self._refused[team_id] = (raw_etag, read_at + _REFUSED_SECONDS)

    def _build(
        self, team_id: int, raw_body: bytes | None, raw_etag: bytes | None, read_at: float
    ) -> Definitions | None:
        """The entry for what a read begun at `read_at` returned; held unless a newer one is. None: a miss."""
        if raw_body is not None and raw_etag is None:
            held = self._entries.get(team_id)
            if held is not None and held.etag is None and held.raw_hash == hash(raw_body):
                # No ETag to tell a change: the payload itself is compared, and an unchanged one is not
                # decoded and parsed again at every cycle (1,000 such teams took half a core).
                if self._taken(team_id, read_at, _contents(held)):
                    held.checked_at = time.monotonic()
                return held
        try:
            text = self._contract.decode_text(raw_body)
            etag = self._decode_etag(raw_etag)
        except DecodeError as exc:
            self._unreadable(team_id, read_at, "definitions", exc, raw_etag)
            return None
        if text is None:
            self._taken(team_id, read_at, DELETED)
            self._drop(team_id)  # gone, or (overlapping a read that found it) not to be trusted
            return None
        body = text.encode()
        self.heap.churn += len(body)
        if self._check_pairs and etag is not None and hashlib.sha256(body).hexdigest()[:16] != etag:
            # Read between the two halves of a write (or the backend hashes otherwise): a miss, read again
            # next time, never served or kept.
            self._warn.warning("definitions for team %s do not match their ETag; treated as a miss", team_id)
            self._drop(team_id)
            return None
        # The ETag is a hash of the payload: parse each payload once, not at every re-read (a cache
        # smaller than the working set re-reads the same payloads over and over). Per team: an ETag that
        # does not match its payload (nothing compares them on one node) must not bill another team's
        # payload by this one's flags (found by a reviewer).
        memo = None if etag is None else (team_id, etag)
        billable = None if memo is None else self._billable.get(memo)
        if billable is None:
            try:
                billable = is_billable(body, self._settings.unbilled_flag_prefixes)
            except DecodeError as exc:
                self._unreadable(team_id, read_at, "definitions", exc, raw_etag)
                return None
            if memo is not None:
                if len(self._billable) >= _BILLABLE_MEMO_SIZE:
                    self._billable.clear()
                self._billable[memo] = billable
        entry = Definitions(team_id, etag, body, billable, time.monotonic())
        if etag is None:
            entry.raw_hash = hash(raw_body)
        return self._store(entry, read_at)

    def _taken(self, team_id: int, read_at: float, contents: tuple[object, ...]) -> bool:
        """ReadOrder.taken; a read not taken drops the entry held (neither read is trusted)."""
        if self._order.taken(team_id, read_at, contents):
            return True
        self._drop(team_id)
        return False

    async def recheck(self, team_id: int, *, with_body: bool = False) -> Definitions | None:
        """The team's entry as Redis holds it now, in a read begun after this call (None: unknown, or Redis
        cannot tell); concurrent callers share one such read.

        Never a share of a read already under way, which may have been answered before a change the
        caller's client already knows (found by two reviewers: a client on the newer ETag took older flags).
        """
        return await self._read_through(self._fresh, team_id, with_body)

    async def _read_through(self, flight: _Flight, team_id: int, with_body: bool) -> Definitions | None:
        if not self._redis_up():
            return None
        entry = await flight.do((team_id, with_body), lambda: self._read(team_id, with_body))
        if entry is not None:
            self._used_at[team_id] = time.monotonic()
        return entry

    def replaced(self, team_id: int) -> tuple[str, ...]:
        """ETag headers of the team this replica held and replaced with a newer read: a client sending one
        holds older flags than these (unless a change went back to it, which the next refresh shows)."""
        return self._replaced.get(team_id, ())

    def _store(self, entry: Definitions, read_at: float) -> Definitions:
        if not self._taken(entry.team_id, read_at, _contents(entry)):
            return entry
        held = self._entries.get(entry.team_id)
        if held is not None and held.etag_header is not None and held.etag != entry.etag:
            # (One that is current again, a change gone back to it, is matched before this list is asked.)
            kept = [e for e in self._replaced.get(entry.team_id, ()) if e != held.etag_header]
            self._replaced[entry.team_id] = (*kept, held.etag_header)[-_REPLACED_KEPT:]
        self._drop(entry.team_id)
        if self._compressor is not None and entry.body is not None:
            # Copied: python-zstandard returns its output in a buffer sized for the input (compressBound),
            # so the bytes it returns hold ~50 KiB of heap for a 5 KiB result (measured with tracemalloc).
            entry.packed = bytes(memoryview(self._compressor.compress(entry.body)))
        if entry.size > self._settings.cache_budget_bytes:
            # Larger than the whole budget: served this once, never held.
            return entry
        self._entries[entry.team_id] = entry
        self._used_at.setdefault(entry.team_id, time.monotonic())
        self.bytes_held += entry.size - (len(entry.body) if entry.body is not None else 0)
        if entry.body is not None:
            self._hold_decoded(entry, entry.body)
        self._fit()
        return entry

    def _hold_decoded(self, entry: Definitions, body: bytes) -> None:
        """Count a held entry's decoded payload; with a decoded budget, compress-only the least recent."""
        self.bytes_held += len(body)
        decoded = self._decoded
        if decoded is None or self._decoded_budget is None:
            return
        decoded[entry.team_id] = None
        self.decoded_bytes += len(body)
        while self.decoded_bytes > self._decoded_budget and decoded:
            team_id, _ = decoded.popitem(last=False)
            held = self._entries[team_id]
            if held.body is not None:
                self.decoded_bytes -= len(held.body)
                self.bytes_held -= len(held.body)
                self.heap.churn += len(held.body)
                held.body = None  # its compressed copy stays: the next 200 decompresses it
        self._fit()

    def _fit(self) -> None:
        while self.bytes_held > self._settings.cache_budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, team_id: int) -> None:
        old = self._entries.pop(team_id, None)
        if old is not None:
            self.bytes_held -= old.size
            self.heap.churn += old.size
            if old.body is not None and self._decoded is not None:
                del self._decoded[team_id]
                self.decoded_bytes -= len(old.body)

    async def refresh(self) -> None:
        """One cycle: evict idle teams, MGET every ETag, re-read the payloads whose ETag changed."""
        now = time.monotonic()
        idle = [
            t for t in self._entries if now - self._used_at.get(t, 0.0) > self._settings.idle_evict_seconds
        ]
        for team_id in idle:
            self._drop(team_id)
            self._used_at.pop(team_id, None)
        if len(self._used_at) > 2 * len(self._entries) + 1024:
            # Teams dropped otherwise (the budget, a payload gone) keep their time of use, so a team loaded
            # again is not taken for a new one; past twice what is held, only those held keep it.
            self._used_at = {t: self._used_at[t] for t in self._entries if t in self._used_at}
        self._order.prune(self._entries, now)
        if len(self._replaced) > len(self._entries):
            self._replaced = {t: e for t, e in self._replaced.items() if t in self._entries}
        self.heap.maybe_trim(now)
        team_ids = list(self._entries)
        if not team_ids:
            return
        raw_etags = await mget_many(self._client, [self._contract.etag_key(t) for t in team_ids])
        stale: list[int] = []
        for team_id, raw in zip(team_ids, raw_etags, strict=True):
            entry = self._entries.get(team_id)
            if entry is None:
                continue
            if raw is not None and raw == entry.raw_etag:
                # The same bytes as last cycle (the common case): not decoded again (~2.5 µs each).
                if self._taken(team_id, now, _contents(entry)):
                    entry.checked_at = now
                continue
            try:
                etag = self._decode_etag(raw)
            except DecodeError:
                stale.append(team_id)  # read again with its payload, and dropped (and logged) there
                continue
            if etag is not None and etag == entry.etag:
                if self._taken(team_id, now, _contents(entry)):
                    entry.checked_at = now
                    entry.raw_etag = raw
            elif etag is not None and entry.body is None and entry.packed is None:
                self._store(Definitions(team_id, etag, None, True, now), now)
            else:
                # Changed, deleted, or never had an ETag (then the payload is the only way to see a change).
                stale.append(team_id)
        if not stale:
            return
        keys = [k for t in stale for k in (self._contract.payload_key(t), self._contract.etag_key(t))]
        read_at = time.monotonic()
        raws = await mget_many(self._client, keys)
        for index, team_id in enumerate(stale):
            # Gone meanwhile (the budget, idle, a load that found it deleted): not brought back. A change a
            # load took meanwhile is ordered against this read by _taken.
            if team_id in self._entries:
                self._build(team_id, raws[2 * index], raws[2 * index + 1], read_at)
            if index % _BUILDS_PER_YIELD == _BUILDS_PER_YIELD - 1:
                # Each build decodes and parses a payload (~2 ms at 64 KB): a backend-wide rewrite of 1,000
                # teams held every request, liveness included, for 1.8 s.
                await asyncio.sleep(0)

    async def run_refresher(self) -> None:
        """Refresh forever at the configured interval; while Redis fails, memory keeps serving."""
        await every(
            self._settings.refresh_interval_seconds,
            self.refresh,
            what="definitions refresh (serving from memory)",
            log=log,
            on_error=self._refresh_failed,
        )

    def _refresh_failed(self) -> None:
        self.refresh_failures += 1

    async def close(self) -> None:
        """Cancel loads still in flight."""
        await self._flight.close()
        await self._fresh.close()
