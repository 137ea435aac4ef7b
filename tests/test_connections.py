"""The client connections a server admits: idle ones make room, send timeouts, malformed requests counted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from functools import partial

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import aiohttp_internals, connections
from proxy.connections import ClientConnections
from tests.conftest import MakeProxy
from tests.rig import Upstream
from tests.test_server import wait_until


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


class _Unsent:
    """An app whose /large answer is written until the kernel's buffers are full and the transport keeps the
    rest: less than its high-water mark, so the handler never waits, ends, and its connection waits for the
    next request with the end of that answer unsent (to a client that does not read)."""

    def __init__(self) -> None:
        self.sent = 0
        self.app = web.Application()
        self.app.router.add_get("/large", self.large)

    async def large(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        assert request.transport is not None
        while request.transport.get_write_buffer_size() == 0 and self.sent < 256 * 1024 * 1024:
            await response.write(b"x" * 8192)
            self.sent += 8192
        await response.write_eof()
        return response


async def serving(app: web.Application, clients: ClientConnections) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    clients.admit_on(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_a_connection_still_sending_its_last_answer_is_not_idle() -> None:
    """Closed with bytes still to send, a socket stays open until its reader takes them: a client that
    stopped reading kept its descriptor for ever, no longer counted against the cap."""
    unsent = _Unsent()
    clients = ClientConnections(1)
    runner, port = await serving(unsent.app, clients)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the kernel fills sooner
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")  # and nothing read yet
        await wait_until(lambda: clients.open == 1, "the connection admitted")
        (handler,) = clients._open

        def answered_but_unsent() -> bool:
            waiter = handler._waiter
            waiting = waiter is not None and not waiter.done()
            return waiting and handler.transport is not None and handler.transport.get_write_buffer_size() > 0

        # The answer is written (the handler waits for the next request), its tail still in the transport.
        await wait_until(answered_but_unsent, "the answer written, its end still unsent")
        assert not clients._make_room()
        assert clients.closed_idle == 0
        # The client reads it all (chunked: up to the last chunk): then it is idle, and makes room.
        answer = bytearray()
        while not answer.endswith(b"\r\n0\r\n\r\n"):
            answer += await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.count(b"x") == unsent.sent
        await wait_until(partial(aiohttp_internals.idle, handler), "everything sent")
        assert clients._make_room()
        sock.close()
    finally:
        await runner.cleanup()


async def test_busy_connections_looked_at_make_way_for_the_ones_behind_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the cap only the first IDLE_SCAN connections are looked at: those found busy go to the back, so
    that a few slow clients at the front cannot lock every newcomer out while idle ones wait behind them."""
    monkeypatch.setattr(connections, "IDLE_SCAN", 3)
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/slow", slow)
    clients = ClientConnections(10)
    runner, port = await serving(app, clients)
    opened = []
    try:
        for count in range(1, 5):  # three busy at the front, one idle behind them
            opened.append(await asyncio.open_connection("127.0.0.1", port))
            await wait_until(partial(_open_is, clients, count), "admitted in order")
            if count < 4:
                opened[-1][1].write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                await wait_until(partial(_busy, clients, count - 1), "its request started")
        await wait_until(partial(aiohttp_internals.idle, list(clients._open)[3]), "the fourth idle")
        assert not clients._make_room()  # the three looked at are busy: they go to the back
        assert clients._make_room()  # the next look starts at the idle one
        assert clients.closed_idle == 1
        assert await asyncio.wait_for(opened[3][0].read(), 5) == b""
        release.set()
        for reader, _ in opened[:3]:
            assert (await asyncio.wait_for(reader.readuntil(b"slow"), 5)).startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in opened:
            writer.close()
        await runner.cleanup()


def _open_is(clients: ClientConnections, count: int) -> bool:
    return clients.open == count


def _busy(clients: ClientConnections, index: int) -> bool:
    return not aiohttp_internals.idle(list(clients._open)[index])


async def test_a_client_that_takes_none_of_its_answer_is_aborted_after_the_send_timeout() -> None:
    """aiohttp has no send deadline: a client that stops reading kept its connection, its place under the cap
    and the answer's bytes for as long as it stayed connected (a few locked every newcomer out)."""
    unsent = _Unsent()
    clients = ClientConnections(10, send_timeout=30)
    runner, port = await serving(unsent.app, clients)
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(2):  # two that never read
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
            await wait_until(partial(_open_is, clients, len(socks)), "admitted")
            unsent.sent = 0
            await wait_until(partial(_unsent, clients, len(socks) - 1), "its answer's end unsent")
        stuck, watched = clients._open
        clients.relaying.add(watched)  # as while a stream relays: the relay's own bound applies, not this
        clients.sweep(0.0)
        # Another request on the stuck one: one more answer queued behind. A look cannot tell it from a client
        # that read its answer and asked again (the buffer emptied in between): the clock starts again.
        before = clients._open[stuck].get_write_buffer_size()
        await loop.sock_sendall(socks[0], b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(partial(_more_unsent, clients, stuck, before), "the second answer queued")
        clients.sweep(29.0)
        clients.sweep(58.0)
        assert clients.send_timeouts == 0  # not yet: 29 s since the count last moved
        clients.sweep(59.0)
        assert clients.send_timeouts == 1
        await wait_until(partial(_open_is, clients, 1), "the stalled one aborted, and counted out")
        assert list(clients._open) == [watched]
        received = bytearray()  # what the kernel held, then the end: never the whole answer
        while chunk := await asyncio.wait_for(loop.sock_recv(socks[0], 1 << 20), 5):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        assert not received.endswith(b"\r\n0\r\n\r\n")
        # A client that reads (however slowly) moves its count: never aborted.
        clients.relaying.discard(watched)
        clients.sweep(100.0)
        for _ in range(1000):  # read a little at a time until the server could send some more
            await asyncio.wait_for(loop.sock_recv(socks[1], 4096), 5)
            if _unsent_changed(clients, watched):
                break
        else:
            raise AssertionError("the server never sent more")
        clients.sweep(200.0)
        assert clients.send_timeouts == 1
    finally:
        for sock in socks:
            sock.close()
        await runner.cleanup()


def _unsent(clients: ClientConnections, index: int) -> bool:
    transport = list(clients._open.values())[index]
    return (
        transport.get_write_buffer_size() > 0 and aiohttp_internals.idle(list(clients._open)[index]) is False
    )


def _unsent_changed(clients: ClientConnections, handler: object) -> bool:
    size, _ = clients._stalled[handler]  # type: ignore[index]
    return bool(clients._open[handler].get_write_buffer_size() != size)  # type: ignore[index]


def _more_unsent(clients: ClientConnections, handler: object, than: int) -> bool:
    return bool(clients._open[handler].get_write_buffer_size() > than)  # type: ignore[index]


async def test_each_server_counts_only_its_own_malformed_requests() -> None:
    """The count hooks aiohttp's error handler once per process; several servers (the metrics port's, a
    test's) each count what they answered, and a server without the hook counts nothing."""

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(text="answer")

    runners, ports, counted = [], [], []
    for admitted in (True, True, False):
        app = web.Application()
        app.router.add_get("/", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        assert runner.server is not None
        clients = ClientConnections(16)
        if admitted:
            clients.admit_on(runner.server)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(runner.addresses[0][1])
        counted.append(clients)
    try:
        for port, times in zip(ports, (2, 1, 1), strict=True):
            for _ in range(times):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")
                assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.0 400 ")
                writer.close()
                await writer.wait_closed()
        assert [clients.malformed for clients in counted] == [2, 1, 0]
    finally:
        for runner in runners:
            await runner.cleanup()


async def _three_requests_a_connection(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A proxy closing connections after 3 requests, with a streamed upstream route; a connection to it."""
    recorder, _ = upstream

    async def streamed(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse()  # no length: relayed as it arrives
        await response.prepare(request)
        await response.write(b"tick")
        return response

    recorder.routes["/streamed"] = streamed
    client = await make_proxy(client_limits={"max_requests_per_connection": 3})
    assert client.server.port is not None
    return await asyncio.open_connection("127.0.0.1", client.server.port)


async def _answer_head(reader: asyncio.StreamReader) -> bytes:
    """The next answer's head, its body read past (chunked or Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if b"Transfer-Encoding: chunked" in head:
        await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    else:
        await reader.readexactly(int(head.partition(b"Content-Length: ")[2].partition(b"\r\n")[0]))
    return head


@pytest.mark.parametrize("path", ["/_liveness", "/streamed", "/small"])
async def test_a_connection_is_closed_after_its_max_requests_answer(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer], path: str
) -> None:
    """client_limits.max_requests_per_connection (nginx's keepalive_requests): the last answer says
    Connection: close and the connection ends, so a client reconnects and may land on another worker (a
    worker restarted after a crash got none of its siblings' kept-alive clients back, a reviewer's)."""
    reader, writer = await _three_requests_a_connection(make_proxy, upstream)
    try:
        heads = []
        for _ in range(3):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            heads.append(await _answer_head(reader))
        assert [head.startswith(b"HTTP/1.1 200 ") for head in heads] == [True] * 3
        assert [b"Connection: close" in head for head in heads] == [False, False, True]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    finally:
        writer.close()
    unlimited = await make_proxy(client_limits={"max_requests_per_connection": None})
    async with unlimited.get(path) as answer:
        assert answer.status == 200
    for _ in range(5):
        async with unlimited.get(path) as answer:
            assert "Connection" not in answer.headers


@pytest.mark.parametrize("path", ["/_liveness", "/small", "/streamed"])
async def test_pipelined_requests_within_max_requests_are_all_answered(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer], path: str
) -> None:
    """aiohttp counts a request when it parses it, and pipelined requests are parsed before their turn:
    three pipelined at a limit of 3 got one answer, saying close, and two dropped (a diff reviewer's). Each
    request's place on the connection counts, as nginx's keepalive_requests counts requests served."""
    reader, writer = await _three_requests_a_connection(make_proxy, upstream)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 4)  # one past the limit
        heads = []
        with contextlib.suppress(asyncio.IncompleteReadError):  # closed after the third
            while True:
                heads.append(await _answer_head(reader))
    finally:
        writer.close()
    assert [head.startswith(b"HTTP/1.1 200 ") for head in heads] == [True] * 3
    assert [b"Connection: close" in head for head in heads] == [False, False, True]
