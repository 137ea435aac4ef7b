"""Gradual offload: which requests the proxy answers itself, changeable at runtime through one Redis hash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from redis.exceptions import RedisError

from proxy.cluster import RedisClient
from proxy.settings import OffloadSettings
from proxy.tasks import every

log = logging.getLogger(__name__)

# Weight resolution: 0.01 %. CRC32 rather than hash(): the same client lands in the same bucket on every
# replica and after every restart (str hashes are salted per process).
BUCKETS = 10_000


def bucket(credential: str, token: str) -> int:
    """The client's sticky bucket in [0, BUCKETS): one SDK (credential + project) never flip-flops."""
    # surrogateescape: header bytes that are not UTF-8 reach here as lone surrogates (and still bucket).
    return zlib.crc32(f"{credential}\n{token}".encode("utf-8", "surrogateescape")) % BUCKETS


@dataclass(frozen=True, slots=True)
class OffloadState:
    """What every replica follows: the weight, the kill switch, shadow on or off."""

    weight_percent: float
    kill: bool
    shadow: bool

    @property
    def threshold(self) -> int:
        """Buckets below this are answered locally."""
        return 0 if self.kill else round(self.weight_percent * BUCKETS / 100)

    def encode(self) -> dict[str, str]:
        """Fields of the control hash."""
        return {
            "weight_percent": f"{self.weight_percent:g}",
            "kill": "1" if self.kill else "0",
            "shadow": "1" if self.shadow else "0",
        }


# What an operator may type for on and off (redis-cli HSET, by hand, under pressure), in any case.
_ON = frozenset({"1", "true", "on", "yes"})
_OFF = frozenset({"0", "false", "off", "no"})


def parse_state(
    fields: Mapping[bytes, bytes], default: OffloadState, last: OffloadState | None = None
) -> tuple[OffloadState, dict[str, str]]:
    """The state from the control hash, and what in it could not be read (field -> what is wrong).

    A field that is absent takes the configured value; one that is unreadable keeps `last` (the state in
    force: a typo must not send everything back to the file's weight), else the configured value.
    """
    text = {k.decode(errors="replace"): v.decode(errors="replace").strip() for k, v in fields.items()}
    kept = last or default
    problems: dict[str, str] = {}
    weight = default.weight_percent
    if "weight_percent" in text:
        try:
            weight = float(text["weight_percent"])
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            problems["weight_percent"] = f"weight_percent {text['weight_percent']!r} is not a number"
            weight = kept.weight_percent
        weight = min(100.0, max(0.0, weight))
    switches = {"kill": default.kill, "shadow": default.shadow}
    for name in switches:
        if name in text:
            value = text[name].lower()
            if value in _ON or value in _OFF:
                switches[name] = value in _ON
            else:
                problems[name] = f"{name} {text[name]!r} is neither on nor off"
                switches[name] = getattr(kept, name)
    return OffloadState(weight, switches["kill"], switches["shadow"]), problems


# Set by a replica that wrote the hash back: when what it wrote was last read as an operator wrote it (wall
# clock), and a digest of the fields it wrote. Another replica that read it later, differently, puts its own
# copy in place (the freshest wins); fields that no longer match the digest were edited since, by hand: the
# operator's, followed as written.
RESTORED_FROM = b"restored_from"
# Write back as last read, unless someone wrote it meanwhile (one step, on a Cluster too).
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], unpack(ARGV))
    return 1
end
return 0
"""
# Drop a write-back's marker, unless another write-back replaced it meanwhile.
_ADOPT = """
if redis.call('HGET', KEYS[1], 'restored_from') == ARGV[1] then
    redis.call('HDEL', KEYS[1], 'restored_from')
    return 1
end
return 0
"""
# Replace a copy written back from an older read, unless the hash changed meanwhile in any field: ARGV is the
# number of field/value pairs expected, those pairs, then the pairs to write.
_REPLACE = """
local current = redis.call('HGETALL', KEYS[1])
local n = tonumber(ARGV[1])
if #current ~= 2 * n then return 0 end
local have = {}
for i = 1, #current, 2 do have[current[i]] = current[i + 1] end
for i = 2, 2 * n, 2 do
    if have[ARGV[i]] ~= ARGV[i + 1] then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2 * n + 2))
return 1
"""


class Offload:
    """The current state, re-read from Redis in the background; the request path reads attributes only."""

    def __init__(self, client: RedisClient, settings: OffloadSettings) -> None:
        self._client = client
        self._settings = settings
        self.configured = OffloadState(settings.weight_percent, kill=False, shadow=settings.shadow)
        self.state = self.configured
        self.threshold = self.state.threshold
        # The control hash as last read (empty: never set, or reset), when that was known to be current (wall
        # clock: compared across replicas), and what in it was unreadable.
        self._fields: dict[bytes, bytes] = {}
        self._read_at = 0.0
        self._problems: dict[str, str] = {}
        self.restored = 0  # times the hash vanished (Redis restarted empty, flushed) and was written back

    def local(self, credential: str, token: str) -> bool:
        """Whether this client's requests are answered locally at the current weight."""
        threshold = self.threshold
        if threshold >= BUCKETS:
            return True
        return threshold > 0 and bucket(credential, token) < threshold

    def apply(self, state: OffloadState) -> None:
        """Switch to `state` (logged when it changes)."""
        if state != self.state:
            log.info(
                "offload now %g%% (kill switch %s, shadow %s)",
                state.weight_percent,
                "on" if state.kill else "off",
                "on" if state.shadow else "off",
            )
        self.state = state
        self.threshold = state.threshold

    async def start(self, within: float) -> None:
        """Read the control hash before serving, so a replica starting during a rollback forwards at once.

        Bounded by `within` (the Redis timeout) in all: a call is bounded per attempt, and with its connect
        and a retry a hung Redis held the listener back ~4x that. An unreadable Redis leaves the configured
        state; the watch reads the hash once Redis answers.
        """
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(within):
                await self.poll()

    async def poll(self) -> None:
        """Read the control hash once.

        A hash that vanishes after it was read (Redis restarted empty, a FLUSHALL, a failover to a replica
        that never had it) is not a return to the file: that would undo a kill switch or a 10 % rollout on
        every replica at once, in the middle of the incident. It is written back as last read, marked with
        when that read was; a replica that read it later and differently (one was cut off while an operator
        changed it) replaces that copy with its own, so the freshest read wins within a watch interval.
        `edge-proxy offload reset` returns to the file by writing a hash that says so.
        """
        key = self._settings.control_key
        fields = cast(dict[bytes, bytes], await self._client.hgetall(key))
        marker = fields.pop(RESTORED_FROM, None)
        if not fields and marker is None:
            if self._fields and await self._client.eval(_RESTORE, 1, key, *self._marked()):
                self._restored(key, "vanished (Redis restarted empty or flushed?)")
            return
        read_at, digest = _marker(marker)
        if marker is None or digest != _digest(fields):
            read_at = time.time()  # as an operator wrote it (or edited a copy since): current now
            if marker is not None:
                # A copy edited by hand is the operator's for good: its marker goes, so that an edit undone
                # later (the copy's own values back) is not taken for the old copy again.
                await self._client.eval(_ADOPT, 1, key, marker)
        else:
            if self._read_at and fields != self._fields and read_at < self._read_at:
                # Written back from an older read than this replica's: this one's is put in its place.
                expected = [part for item in (*fields.items(), (RESTORED_FROM, marker)) for part in item]
                replace = [len(expected) // 2, *expected, *self._marked()]
                if await self._client.eval(_REPLACE, 1, key, *replace):
                    self._restored(key, "was written back from an older read than this replica's")
                return
            if fields == self._fields:
                read_at = max(read_at, self._read_at)
        state, problems = parse_state(fields, self.configured, self.state)
        if problems != self._problems:
            for problem in problems.values():
                log.warning("offload control: %s; that field keeps the value in force", problem)
        self._fields, self._read_at, self._problems = fields, read_at, problems
        self.apply(state)

    def _marked(self) -> list[bytes | str | int]:
        """The hash as last read, with when that was and a digest of it, as HSET arguments."""
        pairs: list[bytes | str | int] = [part for item in self._fields.items() for part in item]
        return [*pairs, RESTORED_FROM, f"{self._read_at!r} {_digest(self._fields)}"]

    def _restored(self, key: str, what: str) -> None:
        self.restored += 1
        log.warning(
            "offload control hash %s %s: written back as this replica last read it; offload stays at %g%% "
            "(kill switch %s); `edge-proxy offload reset` returns to the configuration file",
            key,
            what,
            self.state.weight_percent,
            "on" if self.state.kill else "off",
        )

    async def watch(self) -> None:
        """Follow the control hash forever; while Redis is unreadable the last state stays in force."""
        await every(
            self._settings.watch_interval_seconds,
            self.poll,
            what="offload control (keeping the last state)",
            log=log,
        )


def _digest(fields: Mapping[bytes, bytes]) -> str:
    """The fields' digest, whatever their order."""
    crc = zlib.crc32(b"\n".join(sorted(k + b"=" + v for k, v in fields.items())))
    return f"{crc:08x}"


def _marker(raw: bytes | None) -> tuple[float, str | None]:
    """A write-back's read time and digest (0 and None when absent or garbled)."""
    if raw is None:
        return 0.0, None
    seconds, _, digest = raw.decode(errors="replace").partition(" ")
    try:
        value = float(seconds)
    except ValueError:
        return 0.0, None
    return (value if math.isfinite(value) else 0.0), digest or None
