"""Background tasks tied to a cleanup context: started on entry, cancelled and awaited on exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from redis.exceptions import RedisError


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Run `coro` as a task for the duration of the block; cancel and await it on the way out."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        # Cancel until it is really done: redis-py can swallow a cancellation that lands inside a command
        # while Redis restarts, and a loop that lost its cancellation would hang the app's cleanup.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"background task {name} failed") from task.exception()


async def every(
    interval: float,
    step: Callable[[], Awaitable[None]],
    *,
    what: str,
    log: logging.Logger,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Run `step` every `interval` seconds forever; a Redis outage is logged once, and its end once."""
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except RedisError as exc:
            if on_error is not None:
                on_error()
            if not failing:
                log.warning("%s failing (%s)", what, type(exc).__name__)
            failing = True
        else:
            if failing:
                log.info("%s recovered", what)
            failing = False
