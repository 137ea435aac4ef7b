"""FreshFlight: a caller only shares a load begun after it asked; those asking meanwhile share the next."""

from __future__ import annotations

import asyncio

from proxy.singleflight import FreshFlight


async def test_callers_asking_while_a_load_is_out_share_the_next_one_not_it() -> None:
    flight: FreshFlight[str, int] = FreshFlight()
    started = 0
    gates: list[asyncio.Event] = []

    async def load() -> int:
        nonlocal started
        started += 1
        number = started
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return number

    first = asyncio.create_task(flight.do("team", load))
    await asyncio.sleep(0)
    later = [asyncio.create_task(flight.do("team", load)) for _ in range(5)]
    await asyncio.sleep(0)
    assert started == 1  # the next load waits for the one out to end
    gates[0].set()
    assert await first == 1
    await asyncio.sleep(0)
    assert started == 2
    gates[1].set()
    assert await asyncio.gather(*later) == [2] * 5
    assert started == 2


async def test_a_caller_that_leaves_does_not_cancel_the_load_for_the_others() -> None:
    flight: FreshFlight[str, int] = FreshFlight()
    release = asyncio.Event()

    async def load() -> int:
        await release.wait()
        return 7

    leaving = asyncio.create_task(flight.do("team", load))
    staying = asyncio.create_task(flight.do("team", load))  # shares the next one
    leaving_next = asyncio.create_task(flight.do("team", load))
    await asyncio.sleep(0)
    leaving.cancel()
    leaving_next.cancel()
    release.set()
    assert await asyncio.wait_for(staying, 5) == 7
    await flight.close()


async def test_close_cancels_loads_out_and_callers_waiting_for_the_next() -> None:
    flight: FreshFlight[str, int] = FreshFlight()

    async def forever() -> int:
        await asyncio.Event().wait()
        return 0

    out = asyncio.create_task(flight.do("team", forever))
    waiting = asyncio.create_task(flight.do("team", forever))
    await asyncio.sleep(0)
    await flight.close()
    results = await asyncio.gather(out, waiting, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)


async def test_a_caller_asking_while_close_waits_starts_no_load_that_outlives_it() -> None:
    """Found by a reviewer: a load slow to die kept close() waiting, and a caller that asked meanwhile got a
    new load close() never saw."""
    flight: FreshFlight[str, int] = FreshFlight()
    started: list[str] = []

    async def slow_to_die() -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # as redis-py finishing a command
            raise
        return 0

    async def late_load() -> int:
        started.append("late")
        await asyncio.Event().wait()
        return 1

    first = asyncio.create_task(flight.do("team", slow_to_die))
    await asyncio.sleep(0)
    closing = asyncio.create_task(flight.close())
    await asyncio.sleep(0.01)
    late = asyncio.create_task(flight.do("team", late_load))
    await closing
    results = await asyncio.gather(first, late, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert started == []
