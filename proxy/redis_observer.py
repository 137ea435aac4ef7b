"""Redis command latency, errors and (when a request is traced) spans, for every command of the app's client.

Client subclasses (one node, Cluster) rather than redis-py's own observability, which reports through the
process-global MeterProvider with the SDK's per-call cost. Covers commands, scripts and pipelines of the
app's client, background loops included; `limits`' exact-mode storage builds its own client and is not seen.
The Cluster client also waits for a free connection (ClusterAdmission), as the one-node pool does.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from time import perf_counter
from typing import Any, TypeVar

import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.histogram import InMemoryHistogram
from proxy.tracing import child_span

Send = Callable[..., Awaitable[Any]]
T = TypeVar("T")


class RedisObserver:
    """Latency histogram and error counts by command; spans under a recorded request span."""

    def __init__(self, max_series: int) -> None:
        self.latency = InMemoryHistogram(
            "edge_proxy.redis.command.duration",
            "Redis command (or pipeline) round trips, as the proxy's client saw them",
            "s",
            ("command",),
            max_series,
        )
        self.errors: Counter[tuple[str, str]] = Counter()
        self.tracer: trace.Tracer | None = None

    async def call(self, command: str, send: Callable[[], Awaitable[T]]) -> T:
        """Await `send()` (one command or pipeline), timing it and counting a RedisError by type."""
        span = child_span(
            self.tracer, f"redis {command}", {"db.system.name": "redis", "db.operation.name": command}
        )
        start = perf_counter()
        try:
            return await send()
        except NoScriptError:
            # A script's first call on a node (after a deploy or a Redis restart): redis-py loads it and calls
            # again, as designed. Counted, it made an alert on this counter fire on every deploy.
            raise
        except RedisError as exc:
            self.errors[command, type(exc).__name__] += 1
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            self.latency.observe((command,), perf_counter() - start)
            if span is not None:
                span.end()


def _command(
    observer: RedisObserver | None, send: Send, args: tuple[Any, ...], options: Any
) -> Awaitable[Any]:
    # The command itself when unobserved: no closure, no extra frame on the hot path.
    if observer is None:
        return send(*args, **options)
    # Commands are our own code's, so the names are a bounded set.
    return observer.call(str(args[0]).upper(), lambda: send(*args, **options))


def _pipeline(observer: RedisObserver | None, send: Send, *args: Any) -> Awaitable[Any]:
    if observer is None:
        return send(*args)
    return observer.call("PIPELINE", lambda: send(*args))


class ObservedRedis(aioredis.Redis):
    """The app's Redis client; reports to `observer` once one is set."""

    observer: RedisObserver | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """As redis-py's, observed."""
        return await _command(self.observer, super().execute_command, args, options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        """A pipeline whose execute() is observed as one "PIPELINE" command."""
        pipe = _ObservedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.observer = self.observer
        return pipe


class _ObservedPipeline(Pipeline):
    observer: RedisObserver | None = None

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        result: list[Any] = await _pipeline(self.observer, super().execute, raise_on_error)
        return result


# Set while a task runs a call admitted by ClusterAdmission: the calls redis-py makes within it (a pipeline
# re-sending redirected commands, one command's per-node tasks) are part of it and need no admission.
_ADMITTED: ContextVar[bool] = ContextVar("edge_proxy_cluster_call_admitted", default=False)


class ClusterAdmission:
    """At most `max_calls` Cluster calls in flight; a call finding them all in flight waits up to `timeout`.

    redis-py's Cluster pools (one per node, `max_connections` each) raise MaxConnectionsError at once when
    they are all busy, so a cold burst of distinct teams (a deploy, a restart) went to the backend. A call
    (a command, or a pipeline: one round trip per node) holds at most one connection per node, so with as
    many calls in flight as a node has connections no node ever runs out: calls wait here instead, as they
    wait for a connection on one node (BlockingConnectionPool). Past the timeout a call fails as a dead node
    does, with a ConnectionError.
    """

    def __init__(self, max_calls: int, timeout: float) -> None:
        self._free = asyncio.Semaphore(max_calls)
        self._timeout = timeout

    async def run(self, send: Send, *args: Any, **kwargs: Any) -> Any:
        """`await send(*args, **kwargs)` once admitted (at once when already inside an admitted call)."""
        if _ADMITTED.get():
            return await send(*args, **kwargs)
        try:
            async with asyncio.timeout(self._timeout):
                await self._free.acquire()
        except TimeoutError:
            raise RedisConnectionError("no Redis Cluster connection free within the timeout") from None
        admitted = _ADMITTED.set(True)
        try:
            return await send(*args, **kwargs)
        finally:
            _ADMITTED.reset(admitted)
            self._free.release()


class ObservedRedisCluster(RedisCluster):
    """The app's Redis Cluster client: observed like ObservedRedis, admitted by ClusterAdmission once one is
    set; no reachable node is a RedisError."""

    observer: RedisObserver | None = None
    admission: ClusterAdmission | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """As redis-py's, observed (a command on several nodes, like PING, is one observation)."""
        send = _converted(super().execute_command)
        if self.admission is None:
            return await _command(self.observer, send, args, kwargs)
        return await self.admission.run(_command, self.observer, send, args, kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        """A pipeline (one round trip per node) whose execute() is observed as one "PIPELINE" command."""
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # Typed as abstract (an attribute redis-py sets in __init__); redis-py builds its own the same way.
        pipe = _ObservedClusterPipeline(self, transaction)  # type: ignore[abstract]
        pipe.observer = self.observer
        pipe.admission = self.admission
        return pipe

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        """Discover the cluster (at first use, and again after a connection error or a failover)."""
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            # redis-py raises this non-RedisError when no startup node answers (or slots are uncovered); the
            # proxy's fail-open and forward policies catch RedisError, as for a single node that is down.
            raise ClusterError(f"Redis Cluster unreachable: {exc}") from exc


class _ObservedClusterPipeline(ClusterPipeline):
    observer: RedisObserver | None = None
    admission: ClusterAdmission | None = None

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        send = _converted(super().execute)
        if self.admission is None:
            result: list[Any] = await _pipeline(self.observer, send, raise_on_error, allow_redirections)
        else:
            result = await self.admission.run(
                _pipeline, self.observer, send, raise_on_error, allow_redirections
            )
        return result


def _converted(send: Send) -> Send:
    """`send` raising redis-py's non-RedisError cluster failures (slots not covered while the cluster
    re-forms, say) as a ClusterError: what every fail-open, forward and retry policy here catches, as for a
    node that is down, and what the observer counts. Named by type only: a message can quote a command,
    and its key holds a token."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await send(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterError(f"Redis Cluster: {type(exc).__name__}") from exc

    return call
