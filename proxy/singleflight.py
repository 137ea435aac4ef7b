"""Coalesce concurrent loads of the same key into one Redis read (Go's singleflight, for asyncio), and a
variant whose callers only share a read begun after they asked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from functools import partial
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


class FreshFlight(Generic[K, V]):
    """Like SingleFlight, but a caller only shares a load begun after it asked.

    A load under way may have been answered before something the caller already knows of (its client holds
    a newer ETag): who asks while one is out waits for the next, which starts when it ends and is shared by
    everyone who asked meanwhile. So each caller gets a read begun after it asked, and a burst of callers
    costs two reads, not one each.
    """

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}
        self._next: dict[K, tuple[asyncio.Future[V], Callable[[], Coroutine[Any, Any, V]]]] = {}
        self._tasks: set[asyncio.Task[V]] = set()
        self._closed = False

    async def do(self, key: K, load: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """Await a load of `key` begun after this call; a caller cancelled does not cancel it for others."""
        if self._closed:
            raise asyncio.CancelledError  # closing: no new load would be awaited by close()
        if key not in self._running:
            return await asyncio.shield(self._start(key, load))
        queued = self._next.get(key)
        if queued is None:
            queued = self._next[key] = (asyncio.get_running_loop().create_future(), load)
        return await asyncio.shield(queued[0])

    def _start(self, key: K, load: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        task = asyncio.create_task(load())
        self._running[key] = task
        self._tasks.add(task)
        task.add_done_callback(partial(self._ended, key))
        return task

    def _ended(self, key: K, task: asyncio.Task[V]) -> None:
        self._tasks.discard(task)
        del self._running[key]
        queued = self._next.pop(key, None)
        if queued is not None:
            future, load = queued
            if self._closed:
                future.cancel()
            else:
                self._start(key, load).add_done_callback(partial(_settle, future))

    async def close(self) -> None:
        """Cancel and await every load still in flight; callers waiting for a next one are cancelled, and
        no load starts from here (found by a reviewer: one queued during the close outlived it)."""
        self._closed = True
        for future, _ in self._next.values():
            future.cancel()
        self._next.clear()
        for task in list(self._tasks):
            await cancelled(task)


def _settle(future: asyncio.Future[V], task: asyncio.Task[V]) -> None:
    """Hand `task`'s outcome to the callers waiting on `future`."""
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif (exc := task.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(task.result())
