"""Redis command latency, errors and (when a request is traced) spans, for every command of the app's client.

A client subclass rather than redis-py's own observability, which reports through the process-global
MeterProvider with the SDK's per-call cost. Covers commands, scripts and pipelines of the app's client,
background loops included; `limits`' exact-mode storage builds its own client on the pool and is not seen.
"""

from __future__ import annotations

from collections import Counter
from time import perf_counter
from typing import Any

import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from proxy.histogram import InMemoryHistogram
from proxy.tracing import child_span


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

    async def call(self, command: str, send: Any) -> Any:
        """Await `send()` (one command or pipeline), timing it and counting a RedisError by type."""
        span = child_span(
            self.tracer, f"redis {command}", {"db.system.name": "redis", "db.operation.name": command}
        )
        start = perf_counter()
        try:
            return await send()
        except RedisError as exc:
            self.errors[command, type(exc).__name__] += 1
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            self.latency.observe((command,), perf_counter() - start)
            if span is not None:
                span.end()


class ObservedRedis(aioredis.Redis):
    """The app's Redis client; reports to `observer` once one is set."""

    observer: RedisObserver | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """As redis-py's, observed (commands are our own code's, so the names are a bounded set)."""
        observer = self.observer
        if observer is None:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        send = super().execute_command
        return await observer.call(str(args[0]).upper(), lambda: send(*args, **options))  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        """A pipeline whose execute() is observed as one "PIPELINE" command."""
        pipe = _ObservedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.observer = self.observer
        return pipe


class _ObservedPipeline(Pipeline):
    observer: RedisObserver | None = None

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        observer = self.observer
        if observer is None:
            return await super().execute(raise_on_error)
        send = super().execute
        result: list[Any] = await observer.call("PIPELINE", lambda: send(raise_on_error))
        return result
