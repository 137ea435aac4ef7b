"""Team records by project token: read through from the backend's Redis entry, held in memory."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from redis.exceptions import RedisError

from proxy.cluster import RedisClient, mget_many
from proxy.contract import DecodeError, RedisContract
from proxy.logs import Throttled
from proxy.singleflight import SingleFlight
from proxy.tasks import every

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Team:
    """What the request path needs of a team record."""

    id: int
    # secret_api_token and secret_api_token_backup, as bytes for hmac.compare_digest; empty when unknown.
    secrets: tuple[bytes, ...]


# PostHog's project tokens are 47 characters ("phc_" and 43); an unknown token longer than this is not
# remembered as a miss (each such request reads Redis, shared by concurrent ones).
MAX_TOKEN_CHARS = 128


@dataclass(slots=True)
class _Cached:
    team: Team
    expires_at: float


def parse_team(text: str) -> Team:
    """A Team from the backend's JSON team record; DecodeError if it has no integer id."""
    try:
        record = json.loads(text)
        team_id = record["id"]
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # RecursionError: nested too deep
        raise DecodeError("team record is not a JSON object with an id") from exc
    if not isinstance(team_id, int) or isinstance(team_id, bool):
        raise DecodeError("team id is not an integer")
    secrets = tuple(
        value.encode()
        for key in ("secret_api_token", "secret_api_token_backup")
        if isinstance(value := record.get(key), str) and value
    )
    return Team(id=team_id, secrets=secrets)


class TeamStore:
    """Token -> Team in memory; a miss reads Redis once (concurrent misses share the read)."""

    def __init__(
        self,
        client: RedisClient,
        contract: RedisContract,
        *,
        ttl_seconds: float,
        miss_ttl_seconds: float,
        max_entries: int = 100_000,
        max_misses: int = 10_000,
        redis_up: Callable[[], bool] = lambda: True,
    ) -> None:
        self._client = client
        # False while the health monitor finds Redis down (Health.redis_reads): then nothing is read from it.
        self._redis_up = redis_up
        self._contract = contract
        # Warnings a request can raise (Redis failing, a bad record): at most one line per kind per interval.
        self._warn = Throttled(log)
        self._ttl = ttl_seconds
        self._miss_ttl = miss_ttl_seconds
        self._max_entries = max_entries
        self._max_misses = max_misses
        # Oldest use first (a record moves up when the refresher confirms it, which it does only for records
        # in use): at the cap the least recently used goes, in O(1).
        self._cached: OrderedDict[str, _Cached] = OrderedDict()
        # Tokens Redis has no record for -> when to ask again. Apart, and smaller: anyone can send unknown
        # tokens, and a flood of them must neither push out the teams held nor grow memory with their length
        # (a token longer than any real one is never remembered).
        # An OrderedDict: popping its oldest stays O(1) while a flood churns it (next(iter(dict)) walks the
        # deleted slots at its front: 8 -> 66 us per insert measured during one).
        self._missed: OrderedDict[str, float] = OrderedDict()
        self._flight: SingleFlight[str, Team | None] = SingleFlight()
        # Tokens whose record was answered past its TTL: the refresher re-reads them together.
        self._due: set[str] = set()

    def __len__(self) -> int:
        return len(self._cached)

    def fresh(self, token: str) -> Team | None:
        """The team when memory holds its record (no coroutine, no Redis: the hot path's common case).

        Past its TTL a record is still answered (stale-while-revalidate) and queued for the refresher,
        which re-reads every queued record in one MGET: teams loaded together expire together, and that
        must not become a burst of reads on the request path. Past twice its TTL (no request for a whole
        TTL after it expired) it is not: `get` reads it again first, so a record the backend removed
        (a token rotated away, the team deleted) never answers after a quiet spell, however long.
        """
        cached = self._cached.get(token)
        if cached is None:
            return None
        expires_at = cached.expires_at
        if expires_at < time.monotonic():
            if expires_at + self._ttl < time.monotonic():
                return None
            self._due.add(token)
        return cached.team

    def recheck(self, token: str) -> bool:
        """Queue `token`'s record for the refresher's next read; False if it already is (or is not held)."""
        if token not in self._cached or token in self._due:
            return False
        self._due.add(token)
        return True

    def confirmed_since(self, token: str, seconds: float) -> bool:
        """Whether Redis confirmed `token`'s record within the last `seconds` (its secrets are that fresh)."""
        cached = self._cached.get(token)
        return cached is not None and cached.expires_at - self._ttl >= time.monotonic() - seconds

    async def get(self, token: str) -> Team | None:
        """The team for `token`, or None when Redis has no record (or cannot be read): a miss."""
        team = self.fresh(token)
        if team is not None:
            return team
        if not self._redis_up():
            # Known unreachable: no request waits out the timeout for it (the record held, if any, serves).
            return self._current(token)
        retry_at = self._missed.get(token)
        if retry_at is None:
            return await self._flight.do(token, lambda: self._read(token))
        if retry_at < time.monotonic():
            # A remembered miss is re-read at once: a team the backend just created is found quickly.
            self._flight.start(token, lambda: self._read(token))
        return None

    async def refresh(self) -> None:
        """Re-read the records answered past their TTL since the last call, in one MGET; raises RedisError.

        On failure the records stay as they were, past their TTL: the next request queues them again.
        """
        if not self._due:
            return
        tokens = [token for token in self._due if token in self._cached]
        self._due.clear()
        raws = await mget_many(self._client, [self._contract.team_key(token) for token in tokens])
        for token, raw in zip(tokens, raws, strict=True):
            if token in self._cached and token not in self._flight:
                self._remember(token, self._decode(raw))

    async def run_refresher(self, interval_seconds: float) -> None:
        """Refresh forever; while Redis fails, records in memory keep answering."""
        await every(interval_seconds, self.refresh, what="team record refresh (serving from memory)", log=log)

    async def _read(self, token: str) -> Team | None:
        try:
            raw = cast(bytes | None, await self._client.get(self._contract.team_key(token)))
        except RedisError as exc:
            # Not remembered: the next request tries again; this one is forwarded.
            self._warn.warning("team lookup failed: %s", type(exc).__name__)
            return self._current(token)
        team = self._decode(raw)
        self._remember(token, team)
        return team

    def _decode(self, raw: bytes | None) -> Team | None:
        try:
            text = self._contract.decode_text(raw)
            return parse_team(text) if text is not None else None
        except DecodeError as exc:
            self._warn.warning("undecodable team record for a token: %s", exc)
            return None

    def _current(self, token: str) -> Team | None:
        cached = self._cached.get(token)
        return cached.team if cached is not None else None

    def _remember(self, token: str, team: Team | None) -> None:
        if team is None:
            self._cached.pop(token, None)  # a record the backend removed
            if len(token) > MAX_TOKEN_CHARS:
                return
            if token not in self._missed and len(self._missed) >= self._max_misses:
                self._missed.popitem(last=False)  # oldest first
            self._missed[token] = time.monotonic() + self._miss_ttl
            return
        self._missed.pop(token, None)
        if token not in self._cached and len(self._cached) >= self._max_entries:
            # Least recently confirmed first: memory stays bounded whatever the number of teams.
            self._cached.popitem(last=False)
        self._cached[token] = _Cached(team, time.monotonic() + self._ttl)
        self._cached.move_to_end(token)

    async def close(self) -> None:
        """Cancel reads still in flight."""
        await self._flight.close()
