"""Background loops outlive the unexpected: a failing loop is logged (where, never what) and runs on."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy import tasks

SECRET_LOOKING = "posthog:1:team_token:phc_must_never_be_logged"


async def _run_every(
    outcomes: list[BaseException | None], log: logging.Logger, on_error: Callable[[], None] | None = None
) -> None:
    """every() over a step raising each of `outcomes` in turn (None: a step that succeeds), until done."""
    done = asyncio.Event()

    async def step() -> None:
        if not outcomes:
            done.set()
            return
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    runner = asyncio.create_task(tasks.every(0.001, step, what=log.name, log=log, on_error=on_error))
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        runner.cancel()


async def test_a_background_loop_that_raises_is_logged_and_started_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks, "RESTART_FIRST_SECONDS", 0.01)
    caplog.set_level(logging.ERROR, logger="proxy.tasks")
    runs = 0
    again = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise KeyError(SECRET_LOOKING)
        again.set()
        await asyncio.Event().wait()  # runs until cancelled

    async with tasks.background(loop, name="test-loop") as task:
        await asyncio.wait_for(again.wait(), 5)
        assert not task.done()
    assert task.done()
    assert runs == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("background task test-loop stopped: KeyError at test_tasks.py:")
    assert messages[0].endswith("in loop; starting it again in 0 s")
    assert SECRET_LOOKING not in caplog.text
    assert "phc_" not in caplog.text


async def test_a_background_loop_that_returns_is_not_started_again() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    async with tasks.background(once, name="once") as task:
        await asyncio.wait_for(task, 5)
    assert runs == 1


async def test_every_runs_on_after_an_unexpected_error_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    log = logging.getLogger("test.every")
    outcomes: list[BaseException | None] = [
        RecursionError(SECRET_LOOKING),
        ValueError(SECRET_LOOKING),
        None,
        RedisConnectionError(SECRET_LOOKING),
        None,
    ]
    errors = 0

    def on_error() -> None:
        nonlocal errors
        errors += 1

    await _run_every(outcomes, log, on_error)
    assert errors == 3
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "test.every"]
    assert [level for level, _ in lines] == ["ERROR", "INFO", "WARNING", "INFO"]
    assert lines[0][1].startswith("test.every failing: RecursionError at test_tasks.py:")
    assert lines[1][1] == "test.every recovered"
    assert lines[2][1] == "test.every failing (ConnectionError)"
    assert "phc_" not in caplog.text


async def test_errors_are_counted_by_task_name_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "RESTART_FIRST_SECONDS", 0.001)
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise ValueError("unexpected")
        done.set()

    before = tasks.errors["counted-loop"]
    async with tasks.background(flaky, name="counted-loop"):
        await asyncio.wait_for(done.wait(), 5)
    assert tasks.errors["counted-loop"] == before + 3


async def test_every_logs_an_unexpected_error_that_begins_during_a_redis_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    log = logging.getLogger("test.every.both")
    await _run_every([RedisConnectionError(), ValueError(), RedisConnectionError(), None], log)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "test.every.both"]
    assert [level for level, _ in lines] == ["WARNING", "ERROR", "INFO"]
    assert lines[1][1].startswith("test.every.both failing: ValueError at test_tasks.py:")


async def test_a_task_that_raises_as_it_is_cancelled_leaves_no_unretrieved_error() -> None:
    """cancelled() replaced a gather(return_exceptions=True) that retrieved such an error; without it the
    loop logs "Task exception was never retrieved" when the task is collected (found by a reviewer)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:

        async def cleanup_fails() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed") from None

        task = asyncio.create_task(cleanup_fails())
        await asyncio.sleep(0)
        await tasks.cancelled(task)
        assert task.done()
        assert not task.cancelled()  # it ended with its own error
        del task
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []
