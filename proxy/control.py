"""Operator commands against the shared Redis: offload weight, kill switch, shadow, verdict revocation."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import redis
from redis.cluster import ClusterNode
from redis.sentinel import Sentinel

from proxy.offload import OffloadState, parse_state
from proxy.redis_urls import CLUSTER_SCHEME, SENTINEL_SCHEME, cluster_nodes, sentinel_parts
from proxy.settings import Settings
from proxy.verdicts import revoke_pattern, verdict_key


@contextmanager
def _client(settings: Settings) -> Iterator[redis.Redis | redis.RedisCluster]:
    """A synchronous client for the configured Redis, closed (through Sentinel: with the sentinels') after."""
    url = settings.redis.url
    if url.startswith(SENTINEL_SCHEME):
        parts = sentinel_parts(url)
        asked = {"socket_timeout": 5, "socket_connect_timeout": 5, "password": settings.redis.sentinel_secret}
        # redis-py before 8.2 leaves the synchronous Sentinel unannotated.
        sentinel = Sentinel(parts.sentinels, sentinel_kwargs=asked)  # type: ignore[no-untyped-call, unused-ignore]
        master = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            parts.service,
            username=parts.username,
            password=parts.password,
            db=parts.db,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        try:
            with cast(redis.Redis, master) as client:
                yield client
        finally:
            for asked_sentinel in sentinel.sentinels:
                asked_sentinel.close()
        return
    with _plain_client(settings) as client:
        yield client


def _plain_client(settings: Settings) -> redis.Redis | redis.RedisCluster:
    url = settings.redis.url
    if url.startswith(CLUSTER_SCHEME):
        # Connects at once (finding the slot map); SCAN then walks every primary.
        nodes, username, password = cluster_nodes(url)
        # redis-py leaves the synchronous ClusterNode unannotated.
        startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(
            startup_nodes=startup,
            username=username,
            password=password,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


@dataclass(frozen=True)
class Status:
    """The control hash read over the configured defaults, and the fields of it no one can read."""

    state: OffloadState
    # Each running replica keeps its own value of these (the one in force when the field went bad), and a
    # replica started since takes the file's: `state` cannot say which, so they are shown as unreadable.
    unreadable: frozenset[str] = frozenset()


def offload_status(settings: Settings) -> Status:
    """The state every replica follows now: the control hash over the configured defaults (what in the hash
    cannot be read is said on stderr, and shown unreadable)."""
    offload = settings.definitions.offload
    configured = OffloadState(offload.weight_percent, kill=False, shadow=offload.shadow)
    with _client(settings) as client:
        fields = cast(dict[bytes, bytes], client.hgetall(offload.control_key))
    state, problems = parse_state(fields, configured)
    for problem in problems.values():
        print(
            f"edge-proxy: the control hash's {problem}: running replicas keep the value they had, a replica "
            "started since takes the configuration file's",
            file=sys.stderr,
        )
    return Status(state, frozenset(problems))


def offload_update(settings: Settings, **fields: str) -> Status:
    """Write fields of the control hash (every replica follows within its watch interval); the hash is the
    operator's again, no longer a copy a replica wrote back (which another could replace)."""
    args = [part for item in fields.items() for part in item]
    with _client(settings) as client:
        client.eval(_UPDATE, 1, settings.definitions.offload.control_key, *args)
    return offload_status(settings)


_UPDATE = "redis.call('HDEL', KEYS[1], 'restored_from') redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"


def offload_reset(settings: Settings) -> Status:
    """Every replica back to its configuration file: the control hash replaced by one that only says when it
    was reset (deleted, replicas would write back the state they follow, as after a Redis flush)."""
    key = settings.definitions.offload.control_key
    with _client(settings) as client:
        client.eval(_RESET, 1, key, str(int(time.time())))
    return offload_status(settings)


# In one step (a replica reading between a delete and a write would take it for a flush).
_RESET = "redis.call('DEL', KEYS[1]) redis.call('HSET', KEYS[1], 'reset', ARGV[1]) return 1"


def describe(status: Status) -> str:
    """One line for the terminal."""
    state, unreadable = status.state, status.unreadable
    weight = "unreadable" if "weight_percent" in unreadable else f"{state.weight_percent:g}%"
    kill = "unreadable" if "kill" in unreadable else "ON: everything forwarded" if state.kill else "off"
    shadow = "unreadable" if "shadow" in unreadable else "on" if state.shadow else "off"
    return f"definitions offload {weight} (kill switch {kill}, shadow {shadow})"


def revoke(settings: Settings, team_id: int | None, credential: str | None) -> int:
    """Delete learned verdicts: one (team + credential), a team's, or all; the number deleted."""
    auth = settings.definitions.auth
    if auth.hmac_key is None:
        raise ValueError(
            "definitions.auth.hmac_key is not set: verdicts are kept in each proxy's memory, not in Redis, "
            f"and cannot be revoked from here; they expire after {auth.allowed_ttl_seconds:g} s "
            "(allowed) or a restart of the proxies"
        )
    with _client(settings) as client:
        if credential is not None and team_id is not None:
            key = verdict_key(auth.hmac_key.get_secret_value().encode(), auth.key_prefix, team_id, credential)
            return int(client.delete(key))
        deleted = 0
        for key in client.scan_iter(revoke_pattern(auth.key_prefix, team_id), count=1000):
            deleted += int(client.delete(key))
        return deleted


def read_credential() -> str:
    """A credential from standard input (never from argv, where `ps` and shell history would keep it)."""
    return sys.stdin.readline().strip()
