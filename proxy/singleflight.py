"""Coalesce concurrent loads of the same key into one Redis read (Go's singleflight, for asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from proxy.tasks import cancelled

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One task per key in flight; every caller of the same key shares its result."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def start(self, key: K, load: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The running load for `key`, started now if none is in flight."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(load())
            self._tasks[key] = task
            task.add_done_callback(lambda _done: self._tasks.pop(key, None))
        return task

    async def do(self, key: K, load: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """Await the shared load; a cancelled caller (client gone) does not cancel it for the others."""
        return await asyncio.shield(self.start(key, load))

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    async def close(self) -> None:
        """Cancel and await every load still in flight."""
        for task in list(self._tasks.values()):
            await cancelled(task)  # a Redis read: redis-py can swallow a first cancellation
