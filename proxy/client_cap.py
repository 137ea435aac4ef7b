"""How many client connections a process admits: descriptors kept for Redis and the upstream, memory.

Every client connection is a file descriptor, and so is every connection the proxy opens itself. Without a
cap, a surge of clients (thousands of SDK processes keeping their connection alive, a reconnect storm)
takes the last descriptor: libuv then accepts and drops new clients without a word, and, worse, the
upstream pool and Redis can no longer connect. Here the process first raises its soft RLIMIT_NOFILE to the
hard limit (what Go's runtime does at start), then derives a cap that leaves room for its own connections
and fits the container's memory. Imported by the supervisor of --workers N, which never imports aiohttp.
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

from proxy.settings import ConfigError, Settings

log = logging.getLogger(__name__)

# Descriptors a serving process holds besides its clients and its two pools: listening sockets (the bind
# and the worker metrics port), the event loop's epoll and signal pipes, stdio, the OTLP exporters'
# connections, shadow comparisons' threads. Generous: a descriptor kept spare costs nothing.
SPARE_DESCRIPTORS = 64
# Memory an idle keep-alive client connection holds (measured by a reviewer: 8,000 of them took RSS from 65 to
# 131 MiB, 8.3 KiB each), doubled for what a busy one has in flight.
CONNECTION_BYTES = 16 * 1024
# The derived cap never goes below this for memory: a container sized too small still serves clients.
MIN_MEMORY_CAP = 1024
# A serving process without clients or payloads (~70 MiB measured: interpreter, imports, pools), and margin.
BASE_BYTES = 128 * 2**20
# The container's memory limit: cgroup v2, then v1 (whose "no limit" is a number near 2**63).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as far as the kernel allows; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft  # a hard limit above the kernel's nr_open: keep what we have
        return hard
    return soft


def reserved_descriptors(settings: Settings) -> int:
    """Descriptors kept for the proxy's own connections: the upstream pool, Redis, and spares.

    Redis counts twice: on a Cluster, exact-mode rate limits keep a second client (`limits`' own) with pools
    of the same size; on one node they share the proxy's pool and the second share is spare. On a Cluster
    `redis.max_connections` is per node: with many nodes, set `client_limits.max_connections`.
    """
    return settings.upstream.max_connections + 2 * settings.redis.max_connections + SPARE_DESCRIPTORS


def container_memory() -> int | None:
    """The memory limit of this process's cgroup (a container's `resources.limits.memory`); None if none."""
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < 2**60 else None
    return None


# client_cap's default `memory`: the container's limit, read from the cgroup.
FROM_CGROUP = -1


def client_cap(settings: Settings, open_files: int | None = None, memory: int | None = FROM_CGROUP) -> int:
    """How many client connections this process admits at once (`client_limits.max_connections`).

    Unset, it is the open-file limit less the reserve (at least half the limit, so a low limit still
    serves), and no more than the container's memory holds (`memory`; None: no limit) beside the payload
    cache, CONNECTION_BYTES each: the open-file limit alone (a million in most clusters)
    let a reconnect storm grow a pod past its memory limit long before the cap refused anyone. Set above
    what the open-file limit allows, the configuration is refused, naming the key.
    """
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:  # no limit at all (not on Linux, where nr_open bounds it)
        open_files = sys.maxsize
    reserve = reserved_descriptors(settings)
    configured = settings.client_limits.max_connections
    if configured is None:
        by_files = max(open_files - reserve, open_files // 2, 1)  # see warn_if_short for the floor
        if memory == FROM_CGROUP:
            memory = container_memory()
        if memory is None:
            return by_files
        # Each worker holds its own connections and cache in the container's memory.
        room = memory // settings.workers - BASE_BYTES - settings.definitions.cache_budget_bytes
        return min(by_files, max(room // CONNECTION_BYTES, MIN_MEMORY_CAP))
    if configured + reserve > open_files:
        raise ConfigError(
            "invalid configuration (1 problem):\n"
            f"  client_limits.max_connections: {configured} client connections and {reserve} descriptors "
            f"for the proxy's own (upstream.max_connections + 2 x redis.max_connections + "
            f"{SPARE_DESCRIPTORS}) need {configured + reserve} open files; this process may open "
            f"{open_files} (RLIMIT_NOFILE, `ulimit -n`): lower it, or raise the limit"
        )
    return configured


def warn_if_short(settings: Settings) -> None:
    """Log at start when the open-file limit is too low to keep the reserve beside the derived cap.

    Below twice the reserve (~704 descriptors with the defaults), the derived cap stays at half the limit
    so the proxy still serves clients, and the reserve is no longer whole.
    """
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if settings.client_limits.max_connections is not None or open_files == resource.RLIM_INFINITY:
        return
    cap, reserve = client_cap(settings, open_files), reserved_descriptors(settings)
    if cap + reserve > open_files:
        log.warning(
            "the open-file limit (%d) is too low to keep %d descriptors for the upstream pool and Redis "
            "beside %d client connections: raise it (ulimit -n), or lower upstream.max_connections",
            open_files,
            reserve,
            cap,
        )
