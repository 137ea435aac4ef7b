"""How many clients a process admits: the open-file limit less what its own connections need."""

from __future__ import annotations

import asyncio
import resource
import sys

import pytest
from aiohttp import web

from proxy.connections import ClientConnections, client_cap, reserved_descriptors
from proxy.settings import ConfigError, Settings
from tests.test_server import wait_until


def settings(**client_limits: int) -> Settings:
    return Settings.model_validate(
        {
            "upstream": {"max_connections": 100},
            "redis": {"max_connections": 10},
            "client_limits": client_limits,
        }
    )


def test_the_reserve_is_the_upstream_pool_redis_twice_and_spares() -> None:
    assert reserved_descriptors(settings()) == 100 + 2 * 10 + 64


@pytest.mark.parametrize(
    ("open_files", "cap"),
    [
        (1_048_576, 1_048_576 - 184),  # a container's usual limit: all but the reserve
        (1024, 1024 - 184),
        (300, 150),  # the reserve would leave 116: half the limit instead, so a low limit still serves
        (100, 50),
        (1, 1),
    ],
)
def test_unset_the_cap_follows_the_open_file_limit(open_files: int, cap: int) -> None:
    assert client_cap(settings(), open_files) == cap


def test_no_open_file_limit_means_no_cap_to_speak_of() -> None:
    assert client_cap(settings(), resource.RLIM_INFINITY) == sys.maxsize - 184
    assert client_cap(settings(max_connections=100_000), resource.RLIM_INFINITY) == 100_000


def test_a_cap_within_the_limit_is_kept_as_set() -> None:
    assert client_cap(settings(max_connections=840), 1024) == 840


def test_a_cap_the_limit_cannot_hold_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        client_cap(settings(max_connections=841), 1024)
    message = str(refused.value)
    assert "client_limits.max_connections: 841 client connections" in message
    assert "need 1025 open files; this process may open 1024" in message


async def test_a_connection_whose_request_was_read_is_never_taken_for_idle() -> None:
    """aiohttp takes a parsed request off its queue, then starts its task on a later loop pass: in between
    neither "request in progress" nor "queued" says busy, and a new client at the cap closed it as idle, the
    request then running with nowhere to send its answer. The handler's own idle test (its keep-alive
    timer's: waiting for the next request) says busy."""
    handled: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        handled.append(request.path)
        return web.Response(text="answer")

    app = web.Application()
    app.router.add_post("/capture", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    clients = ClientConnections(1)
    assert runner.server is not None
    clients.admit_on(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: clients.open == 1, "the connection admitted")
        (handler,) = clients._open
        made_room: list[bool] = []
        # The request's bytes as the transport hands them over, then, one loop pass later, a new client at
        # the cap: what its connection_made asks.
        handler.data_received(b"POST /capture HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        asyncio.get_running_loop().call_soon(lambda: made_room.append(clients._make_room()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert made_room == [False]
        assert head.startswith(b"HTTP/1.1 200 ")
        assert handled == ["/capture"]
        # Once answered and waiting for its next request, it is idle: it makes room.
        await asyncio.sleep(0.05)
        assert clients._make_room()
        assert clients.closed_idle == 1
        assert await asyncio.wait_for(reader.read(), 5) == b"answer"  # the rest of the answer, then EOF
        writer.close()
    finally:
        await runner.cleanup()
