"""Gradual offload: which requests the proxy answers itself, changeable at runtime through one Redis hash."""

from __future__ import annotations

import contextlib
import logging
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


def parse_state(fields: Mapping[bytes, bytes], default: OffloadState) -> OffloadState:
    """The state from the control hash; a field that is absent or unreadable keeps the configured value."""
    text = {k.decode(errors="replace"): v.decode(errors="replace").strip() for k, v in fields.items()}
    weight = default.weight_percent
    try:
        if "weight_percent" in text:
            weight = min(100.0, max(0.0, float(text["weight_percent"])))
    except ValueError:
        log.warning(
            "offload control: weight_percent %r is not a number; keeping %g", text["weight_percent"], weight
        )
    kill = text["kill"] in ("1", "true", "on") if "kill" in text else default.kill
    shadow = text["shadow"] in ("1", "true", "on") if "shadow" in text else default.shadow
    return OffloadState(weight, kill, shadow)


class Offload:
    """The current state, re-read from Redis in the background; the request path reads attributes only."""

    def __init__(self, client: RedisClient, settings: OffloadSettings) -> None:
        self._client = client
        self._settings = settings
        self.configured = OffloadState(settings.weight_percent, kill=False, shadow=settings.shadow)
        self.state = self.configured
        self.threshold = self.state.threshold

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

    async def start(self) -> None:
        """Read the control hash before serving, so a replica starting during a rollback forwards at once.

        Bounded by the Redis timeout; an unreadable Redis leaves the configured state.
        """
        with contextlib.suppress(RedisError):
            await self.poll()

    async def poll(self) -> None:
        """Read the control hash once."""
        fields = cast(dict[bytes, bytes], await self._client.hgetall(self._settings.control_key))
        self.apply(parse_state(fields, self.configured))

    async def watch(self) -> None:
        """Follow the control hash forever; while Redis is unreadable the last state stays in force."""
        await every(
            self._settings.watch_interval_seconds,
            self.poll,
            what="offload control (keeping the last state)",
            log=log,
        )
