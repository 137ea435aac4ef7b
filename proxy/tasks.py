"""Background tasks tied to a cleanup context: started on entry, restarted if they fail, cancelled on exit."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from redis.exceptions import RedisError

from proxy.logs import where

log = logging.getLogger(__name__)

# A background loop that fails is started again after 1 s, then 2, 4 ... up to 30 s while it keeps failing
# (the delay starts over once a run has lasted longer than the longest delay).
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0

# Errors other than Redis's raised in background loops, by task name: each one a bug or an input nobody
# expected, logged once per streak; the metric counts every one (edge_proxy.background.errors).
errors: Counter[str] = Counter()


def _count_error() -> None:
    task = asyncio.current_task()
    errors[task.get_name() if task is not None else "?"] += 1


async def _supervised(run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    """`run()` until it returns; when it raises, log it and start it again (its state lives on in its
    object: a billing tally, a snapshot), so one unexpected error never stops a loop until a restart."""
    loop = asyncio.get_running_loop()
    delay = RESTART_FIRST_SECONDS
    while True:
        started = loop.time()
        try:
            await run()
        except Exception as exc:
            if not isinstance(exc, RedisError):
                _count_error()
            if loop.time() - started > RESTART_MAX_SECONDS:
                delay = RESTART_FIRST_SECONDS
            # Not log.exception: the message and a traceback's text can hold a key name, and so a token.
            log.error(  # noqa: TRY400
                "background task %s stopped: %s at %s; starting it again in %.0f s",
                name,
                type(exc).__name__,
                where(exc),
                delay,
            )
        else:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_SECONDS)


@asynccontextmanager
async def background(
    run: Callable[[], Coroutine[Any, Any, None]], name: str
) -> AsyncIterator[asyncio.Task[None]]:
    """Run `run()` as a task for the duration of the block, started again whenever it raises; cancel and
    await it on the way out."""
    task = asyncio.create_task(_supervised(run, name), name=name)
    errors[name] += 0  # its series exists from the start, at 0, so an alert on its increase sees the first
    try:
        yield task
    finally:
        await cancelled(task)


async def cancelled(task: asyncio.Future[Any]) -> None:
    """Cancel `task` until it is really done: redis-py can swallow a cancellation that lands inside a command
    while Redis restarts, and a task that lost its cancellation would hang the app's cleanup."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved (it ended otherwise meanwhile): no "never retrieved" line at exit


async def every(
    interval: float,
    step: Callable[[], Awaitable[None]],
    *,
    what: str,
    log: logging.Logger,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Run `step` every `interval` seconds forever; a Redis outage is logged once, and its end once.

    Any other exception (data no decoder expected, a bug) is logged once too, at ERROR with where it was
    raised, and the next step runs as usual.
    """
    # Apart, so an error of the second kind that begins during an outage (the first) is still logged.
    redis_failing = other_failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except RedisError as exc:
            if on_error is not None:
                on_error()
            if not redis_failing:
                log.warning("%s failing (%s)", what, type(exc).__name__)
            redis_failing = True
        except Exception as exc:
            _count_error()
            if on_error is not None:
                on_error()
            if not other_failing:
                log.error("%s failing: %s at %s", what, type(exc).__name__, where(exc))  # noqa: TRY400 (as above)
            other_failing = True
        else:
            if redis_failing or other_failing:
                log.info("%s recovered", what)
            redis_failing = other_failing = False
