"""Background tasks tied to a cleanup context: started on entry, cancelled and awaited on exit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any


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
