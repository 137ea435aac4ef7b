"""Liveness, readiness and startup: answered in every mode, never forwarded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy import keys
from proxy.errors import json_response, only
from proxy.settings import HEALTH_PATHS
from proxy.tasks import background
from proxy.telemetry import HEALTH, expect_continue, observed

log = logging.getLogger(__name__)

_OK = b'{"status":"ok"}'


# Failed PINGs in a row after which the request path stops reading Redis: one can be a pool that every request
# holds for a moment (a cold burst), not Redis.
READS_OFF_AFTER = 2
CLUSTER_NODE = "redis.url names a Redis Cluster node: use redis+cluster://"
# Quota limits end, and billed requests fall into 120 s buckets, by this host's wall clock, as the backend's
# do by its own: a clock that is off (NTP not yet synced at boot) serves a limited project or refuses a free
# one, and bills into the wrong bucket, with nothing else to show it. Redis's clock is the one every replica
# and the backend share: compared every CLOCK_CHECK_SECONDS; an offset past CLOCK_SKEW_WARN_SECONDS is logged.
CLOCK_CHECK_SECONDS = 60.0
CLOCK_SKEW_WARN_SECONDS = 1.0


@dataclass
class Health:
    """What readiness reports: Redis reachable, startup finished, not draining; and whether the request path
    reads Redis at all."""

    started: bool = False
    redis_ok: bool = False
    draining: bool = False
    # False once Redis failed READS_OFF_AFTER PINGs in a row (one node; on a Cluster never: a hung node would
    # stop reads from the healthy ones too), until one answers: then what memory cannot answer is forwarded
    # at once, rather than each request waiting out the timeout for an answer that does not come.
    redis_reads: bool = True
    failed_pings: int = 0
    # redis:// (one node) names a node of a Redis Cluster: it answers PING, and MOVED to most keys.
    cluster_node: bool = False
    # Redis's clock less this host's (seconds), as last measured; None before the first measure.
    clock_offset_seconds: float | None = None

    def record_ping(self, answered: bool, *, cluster: bool, failures: int = 1) -> None:
        """Take one PING's outcome (`failures`: how many failed PINGs it counts for): readiness follows each;
        reads stop after several failures in a row."""
        self.redis_ok = answered
        self.failed_pings = 0 if answered else self.failed_pings + failures
        self.redis_reads = cluster or self.failed_pings < READS_OFF_AFTER

    @property
    def ready(self) -> bool:
        """Ready means: take traffic. Definitions without Redis would all be misses, so Redis is required."""
        return self.started and self.redis_ok and not self.draining and not self.cluster_node

    def problems(self) -> list[str]:
        """Why the pod is not ready, for the readiness body."""
        return [
            reason
            for reason, bad in (
                ("starting", not self.started),
                ("redis unreachable", not self.redis_ok),
                ("draining", self.draining),
                (CLUSTER_NODE, self.cluster_node),
            )
            if bad
        ]


async def liveness(request: web.Request) -> web.Response:
    """The process answers: the event loop is alive."""
    return json_response(200, _OK)


async def readiness(request: web.Request) -> web.Response:
    """503 until Redis (every primary of a Cluster) answers a PING, and from the moment draining begins."""
    health = request.app[keys.HEALTH]
    if health.ready:
        return json_response(200, _OK)
    reasons = ",".join(f'"{reason}"' for reason in health.problems())
    return json_response(503, f'{{"status":"unavailable","reasons":[{reasons}]}}'.encode())


async def startup(request: web.Request) -> web.Response:
    """200 once every cleanup context has started."""
    if request.app[keys.HEALTH].started:
        return json_response(200, _OK)
    return json_response(503, b'{"status":"starting"}')


async def redis_monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    """PING Redis in the background: readiness, and the request path (which reads nothing from a Redis
    that does not answer), follow it."""
    health = app[keys.HEALTH]
    client = app[keys.REDIS]
    interval = app[keys.SETTINGS].redis.health_check_interval_seconds
    # On a Cluster every primary must answer (redis-py would ask one node): each serves a share of the teams.
    cluster = isinstance(client, RedisCluster)
    ping = partial(client.ping, target_nodes=RedisCluster.PRIMARIES) if cluster else client.ping

    loop = asyncio.get_running_loop()
    clock_checked_at: float | None = None
    skewed = False
    unmeasured = False  # whether TIME's failure was logged (an ACL user denied it, say)

    async def check_clock() -> None:
        nonlocal clock_checked_at, skewed, unmeasured
        if clock_checked_at is not None and loop.time() - clock_checked_at < CLOCK_CHECK_SECONDS:
            return
        clock_checked_at = loop.time()
        try:
            before = time.time()
            seconds, micros = await client.time()
            after = time.time()
        except RedisError as exc:
            # No figure rather than a stale one, and said once: "not measured" is not "in step".
            health.clock_offset_seconds = None
            if not unmeasured:
                log.warning(
                    "clock: cannot read Redis's TIME (%s): the offset is not measured", type(exc).__name__
                )
                unmeasured = True
            return
        unmeasured = False
        offset = seconds + micros / 1e6 - (before + after) / 2
        health.clock_offset_seconds = offset
        if abs(offset) > CLOCK_SKEW_WARN_SECONDS + (after - before) / 2:
            if not skewed:
                log.warning(
                    "clock: this host's wall clock is %+.1f s off Redis's: quota limits end and billing "
                    "buckets are counted by it (is NTP synced?)",
                    -offset,
                )
            skewed = True
        elif skewed:
            log.info("clock: back in step with Redis's (%+.3f s)", -offset)
            skewed = False

    told = False  # whether a state was logged yet: a Redis refused from the start (a wrong password, a port
    # nothing listens on) was said by no line, readiness 503 the only sign

    async def check() -> None:
        nonlocal told, clock_checked_at
        try:
            await ping()
        except (RedisError, OSError) as exc:
            if health.redis_ok or not told:
                log.warning("redis unreachable: %s", type(exc).__name__)
            health.record_ping(False, cluster=cluster)
            # The last offset is no longer a measure; Redis's clock is read again as soon as it answers.
            health.clock_offset_seconds = None
            clock_checked_at = None
        else:
            if not health.redis_ok:
                log.info("redis reachable")
                if not cluster:
                    await check_topology()
            health.record_ping(True, cluster=cluster)
            await check_clock()
        told = True

    async def check_topology() -> None:
        # Once per recovery. Such a node answers PING and redirects most keys (MOVED), which redis://'s client
        # does not follow: every definitions request was forwarded while readiness said 200.
        try:
            info = await client.info("cluster")
        except RedisError:
            return  # INFO denied to this ACL user, say: nothing to tell
        on_cluster = info.get("cluster_enabled") == 1
        if on_cluster and not health.cluster_node:
            log.error("%s (every key on another node is a miss, forwarded): not ready", CLUSTER_NODE)
        health.cluster_node = on_cluster

    async def watch() -> None:
        while True:
            await asyncio.sleep(interval)
            await check()

    # Once before serving (the request path reads Redis only while this says it answers), bounded: with
    # Redis down or silent the proxy starts anyway, forwarding what memory (empty yet) cannot answer without
    # waiting for Redis, and the watch carries on.
    try:
        async with asyncio.timeout(app[keys.SETTINGS].redis.timeout_seconds):
            await check()
    except TimeoutError:
        log.warning("redis unreachable: no answer to a PING within redis.timeout_seconds")
        told = True
    if not health.redis_ok:
        # Nothing is in memory yet: until a PING answers, no request waits for Redis at all.
        health.record_ping(False, cluster=cluster, failures=READS_OFF_AFTER)
    async with background(watch, name="redis-monitor"):
        yield


def add_routes(app: web.Application) -> None:
    """Register the health routes; they exist in every SERVICE_MODE."""
    for path, handler in zip(HEALTH_PATHS, (liveness, readiness, startup), strict=True):
        app.router.add_get(
            path, observed(app, HEALTH, handler), allow_head=True, expect_handler=expect_continue
        )
        app.router.add_route(
            "*", path, observed(app, HEALTH, only("GET, HEAD")), expect_handler=expect_continue
        )
