"""Auth verdicts learned from the backend (contract §4), shared by every replica through Redis.

Key format, so the backend (or `edge-proxy revoke`) can delete one to revoke at once:

    <key_prefix>:<team_id>:<hex HMAC-SHA256(hmac_key, credential)>

The value is JSON: `{"s": 200}` for allowed, `{"s": 401|403, "b": "<exact body>", "h": {<headers>}}` for
denied. Neither the credential nor an unkeyed hash of it is ever stored, logged or used as a label.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from redis.exceptions import RedisError

from proxy.cluster import RedisClient, mget
from proxy.logs import Throttled
from proxy.singleflight import SingleFlight
from proxy.tasks import every

log = logging.getLogger(__name__)

# Response headers of a denial that a client may act on; everything else is the backend's business.
DENIAL_HEADERS = ("Content-Type", "WWW-Authenticate")
MAX_DENIAL_BODY_BYTES = 8192
# A refusal is a verdict on the credential only when it is the backend's refusal of that credential
# (contract §3 step 3: "Personal API key is invalid.", "Secret API token is invalid.", a key without the
# scopes). Its 401 for the project token (step 2: unknown, or rotated away while this proxy still held its
# team record), for a header it could not read (not_authenticated), or a page of an ingress says nothing
# about the credential: learned, it refused the credential for every client of the team, on every replica,
# for denied_ttl_seconds (found by a reviewer: one poll with the old token after a rotation, and new-token
# SDKs got 401 for 30 s).
CREDENTIAL_REFUSAL_CODES = frozenset({"authentication_failed", "permission_denied"})
# The backend's message, not a secret.
TOKEN_INVALID_DETAIL = " ".join(
    ("The provided API key is invalid or has expired.", "Please check your API key and try again.")
)
_MGET_CHUNK = 1000
# Read verdicts spared at the front per one dropped, at most: then the oldest goes even if read, so making
# room costs a bounded number of moves when nearly every verdict held is in use.
_SECOND_CHANCES = 16


@dataclass(frozen=True, slots=True)
class Verdict:
    """The backend's answer on one credential for one team: allowed, or denied with its exact answer."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] | None = None

    @property
    def allowed(self) -> bool:
        """Whether the backend let this credential read this team's definitions."""
        return self.status < 400

    def encode(self) -> bytes:
        """The JSON stored in Redis."""
        if self.allowed:
            return b'{"s":200}'
        return json.dumps({"s": self.status, "b": self.body.decode(), "h": dict(self.headers or {})}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Verdict | None:
        """A verdict from its stored JSON; None if it is not one (then the backend decides again)."""
        try:
            data = json.loads(raw)
            status = int(data["s"])
            body = str(data.get("b", "")).encode()
            headers = {str(k): str(v) for k, v in dict(data.get("h") or {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None
        # What verdict_of keeps, and header values aiohttp can write: anything else (CR/LF, a name of its own)
        # did not come from this proxy, and would cut the connection of every request it answered.
        if any(name not in DENIAL_HEADERS or not _header_safe(value) for name, value in headers.items()):
            return None
        if status not in (200, 401, 403):
            return None
        return cls(status, body, headers or None)


def _header_safe(value: str) -> bool:
    return all(" " <= c <= "~" or c == "\t" for c in value)


def verdict_of(status: int, headers: Mapping[str, str], body: bytes | None) -> Verdict | None:
    """The verdict an upstream answer carries: 2xx/304 allowed, 401/403 denied; None for anything else."""
    if 200 <= status < 300 or status == 304:
        return Verdict(200)
    if (
        status in (401, 403)
        and body is not None
        and len(body) <= MAX_DENIAL_BODY_BYTES
        # A compressed refusal (an ingress gzipping it) would be sent again without its Content-Encoding.
        and headers.get("Content-Encoding", "identity").lower() == "identity"
    ):
        kept = {name: headers[name] for name in DENIAL_HEADERS if name in headers}
        if not all(_header_safe(value) for value in kept.values()):
            return None  # what decode() would refuse once it is read back from Redis: learned, then dropped
        if not _refuses_the_credential(body):
            return None
        return Verdict(status, body, kept)
    return None


def _refuses_the_credential(body: bytes) -> bool:
    try:
        # UTF-8 first, as the verdict stores it (json.loads would take UTF-16 and -32 bytes too).
        error = json.loads(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return (
        isinstance(error, dict)
        and error.get("type") == "authentication_error"
        and error.get("code") in CREDENTIAL_REFUSAL_CODES
        and error.get("detail") != TOKEN_INVALID_DETAIL
    )


@dataclass(slots=True)
class _Held:
    verdict: Verdict
    expires_at: float  # monotonic; never later than the Redis key's own expiry
    raw: bytes  # the verdict as stored in Redis: revalidation decodes only what differs from it
    used: bool = False  # read since it was learned or last spared: spared once more at the front


class VerdictStore:
    """Verdicts in memory (the hot path) and in Redis (shared); re-validated in one MGET per cycle."""

    def __init__(
        self,
        client: RedisClient,
        *,
        hmac_key: bytes | None,
        key_prefix: str,
        allowed_ttl_seconds: float,
        denied_ttl_seconds: float,
        max_entries: int = 200_000,
        redis_up: Callable[[], bool] = lambda: True,
    ) -> None:
        self._client = client
        # False while the health monitor finds Redis down (Health.redis_reads): a lookup is undecided at once.
        self._redis_up = redis_up
        # Warnings a request can raise (Redis failing): at most one line per kind per interval.
        self._warn = Throttled(log)
        # Without a configured key verdicts stay in this process: a random key cannot be shared.
        self.shared = hmac_key is not None
        self._hmac_key = hmac_key if hmac_key is not None else secrets.token_bytes(32)
        self._prefix = key_prefix
        self._allowed_ttl = allowed_ttl_seconds
        self._denied_ttl = denied_ttl_seconds
        self._max_entries = max_entries
        # Oldest first, evicted from the front at max_entries: an OrderedDict, since a plain dict's front
        # deletions leave dead slots that next(iter()) walks through on every later eviction.
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._flight: SingleFlight[str, Verdict | None] = SingleFlight()
        self._writes: set[asyncio.Task[None]] = set()
        # Learned here, Redis write still in flight: revalidation must not read "absent" as "revoked".
        self._unshared: set[str] = set()

    def key(self, team_id: int, credential: str) -> str:
        """The Redis key of a (team, credential) verdict: keyed hash only, never the credential."""
        return verdict_key(self._hmac_key, self._prefix, team_id, credential)

    def __len__(self) -> int:
        return len(self._held)

    def cached(self, key: str) -> Verdict | None:
        """The verdict held in memory, if any and not expired."""
        held = self._held.get(key)
        if held is None:
            return None
        if held.expires_at < time.monotonic():
            del self._held[key]
            return None
        held.used = True
        return held.verdict

    async def lookup(self, key: str) -> Verdict | None:
        """Memory, else one Redis read shared by concurrent callers; None means undecided."""
        verdict = self.cached(key)
        if verdict is not None or not self.shared or not self._redis_up():
            return verdict
        return await self._flight.do(key, lambda: self._read(key))

    async def _read(self, key: str) -> Verdict | None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                raw, pttl = cast(tuple[bytes | None, int], await pipe.execute())
        except RedisError as exc:
            self._warn.warning("verdict lookup failed: %s", type(exc).__name__)
            return None
        verdict = Verdict.decode(raw) if raw is not None else None
        if verdict is not None and raw is not None and pttl > 0:
            self._hold(key, verdict, pttl / 1000, raw)
        return verdict

    def learn(self, key: str, verdict: Verdict) -> None:
        """Remember the backend's verdict: in memory now (waiting requests read it), in Redis soon after."""
        ttl = self._allowed_ttl if verdict.allowed else self._denied_ttl
        raw = verdict.encode()
        self._hold(key, verdict, ttl, raw)
        if self.shared:
            self._unshared.add(key)
            task = asyncio.create_task(self._share(key, raw, ttl))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _share(self, key: str, raw: bytes, ttl: float) -> None:
        try:
            await self._client.set(key, raw, px=int(ttl * 1000))
        except RedisError as exc:
            self._warn.warning("verdict not shared: %s", type(exc).__name__)
        finally:
            self._unshared.discard(key)

    def _hold(self, key: str, verdict: Verdict, ttl: float, raw: bytes) -> None:
        if key not in self._held and len(self._held) >= self._max_entries:
            self._make_room()
        self._held[key] = _Held(verdict, time.monotonic() + ttl, raw)

    def _make_room(self) -> None:
        """Drop the oldest verdict not read since it was learned or last spared (a second chance, as CLOCK
        page replacement): under a spray of new keys, the verdicts in use stay held; oldest-first dropped
        them all in turn, each then read again from Redis, or without hmac_key asked of the backend."""
        held = self._held
        for _ in range(_SECOND_CHANCES):
            key, entry = held.popitem(last=False)
            if not entry.used:
                return
            entry.used = False
            held[key] = entry  # to the back
        held.popitem(last=False)

    async def revalidate(self) -> None:
        """One cycle: drop expired verdicts and those whose Redis key is gone (revoked) or changed.

        Read, expired and applied a chunk at a time, the loop free between chunks; a verdict whose stored
        bytes did not change is not decoded again. Clients decide how many verdicts are held (every new
        credential the backend refuses is one, up to max_entries): at 200,000, decoding them all in one pass
        held the event loop for 1.35-1.39 s of every cycle; now its longest stall is 29-41 ms (measured
        with a 5 ms ticker beside it, one real Redis).
        """
        # Keys only (strings): a list of (key, entry) pairs would be 200,000 new tuples each cycle, enough
        # allocations to set off a full garbage collection of everything held (~0.3 s at 200,000).
        keys = list(self._held)
        held = self._held
        for start in range(0, len(keys), _MGET_CHUNK):
            chunk = keys[start : start + _MGET_CHUNK]
            self._expire(chunk)
            if not self.shared:
                await asyncio.sleep(0)  # expiry only: still the loop's turn between chunks
                continue
            # As they were when this chunk's MGET left, and the writes still in flight then.
            entries = [held.get(key) for key in chunk]
            unshared = set(self._unshared)
            try:
                raws = await mget(self._client, chunk)
            except RedisError:
                self._expire(keys[start + _MGET_CHUNK :])  # Redis down: the rest still expire this cycle
                raise
            for key, seen, raw in zip(chunk, entries, raws, strict=True):
                # Dropped before, re-learned while the MGET was out, or not yet written when it left: Redis
                # cannot know yet. Unchanged bytes: nothing to decode.
                if seen is None or held.get(key) is not seen or key in unshared or raw == seen.raw:
                    continue
                if raw is None or (verdict := Verdict.decode(raw)) is None:
                    del held[key]  # revoked (deleted), or not a verdict any more
                else:
                    seen.verdict, seen.raw = verdict, raw

    def _expire(self, keys: list[str]) -> None:
        now, held = time.monotonic(), self._held
        for key in keys:
            entry = held.get(key)
            if entry is not None and entry.expires_at < now:
                del held[key]

    async def run_revalidation(self, interval: float) -> None:
        """Revalidate forever; while Redis cannot be read, held verdicts live out their own TTL."""
        await every(interval, self.revalidate, what="verdict revalidation", log=log)

    async def close(self) -> None:
        """Finish verdict writes, cancel reads still in flight."""
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self._flight.close()


def verdict_key(hmac_key: bytes, key_prefix: str, team_id: int, credential: str) -> str:
    """The Redis key of a (team, credential) verdict: keyed hash only, never the credential."""
    digest = hmac.digest(hmac_key, credential.encode(), "sha256").hex()
    return f"{key_prefix}:{team_id}:{digest}"


def revoke_pattern(key_prefix: str, team_id: int | None) -> str:
    """The SCAN pattern for every verdict of a team (or of all teams)."""
    return f"{key_prefix}:{team_id if team_id is not None else '*'}:*"
