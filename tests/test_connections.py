"""How many clients a process admits: the open-file limit less what its own connections need."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import sys
from functools import partial
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy import connections
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
    assert client_cap(settings(), open_files, memory=NO_MEMORY_LIMIT) == cap


def test_no_open_file_limit_means_no_cap_to_speak_of() -> None:
    assert client_cap(settings(), resource.RLIM_INFINITY, memory=NO_MEMORY_LIMIT) == sys.maxsize - 184
    assert client_cap(settings(max_connections=100_000), resource.RLIM_INFINITY) == 100_000


MiB = 2**20
NO_MEMORY_LIMIT = None


@pytest.mark.parametrize(
    ("memory", "budget", "workers", "cap"),
    [
        # The chart's fleet pod: 768Mi, the default 256 MiB cache: (768 - 128 - 256) MiB at 16 KiB each.
        (768 * MiB, 256 * MiB, 1, 24_576),
        # Its sidecar: 256Mi, a 64 MiB cache.
        (256 * MiB, 64 * MiB, 1, 4096),
        # Two workers share the container: nothing left beside two caches, and a small floor still serves.
        (768 * MiB, 256 * MiB, 2, 1024),
        # Memory to spare: the open-file limit decides.
        (64 * 1024 * MiB, 256 * MiB, 1, 1_048_576 - 184),
    ],
)
def test_unset_the_cap_is_also_what_the_containers_memory_holds(
    memory: int, budget: int, workers: int, cap: int
) -> None:
    """Found by a reviewer: the open-file limit alone (a million in most clusters) let a reconnect storm
    take a 768Mi pod (8.3 KiB per idle connection, measured) past its memory limit long before the cap
    refused any."""
    configured = settings().model_copy(
        update={
            "workers": workers,
            "definitions": Settings().definitions.model_copy(update={"cache_budget_bytes": budget}),
        }
    )
    assert client_cap(configured, 1_048_576, memory=memory) == cap


@pytest.mark.parametrize(
    ("text", "limit"),
    [("805306368\n", 805306368), ("max\n", None), ("9223372036854771712\n", None), (None, None)],
    ids=["limited", "v2-no-limit", "v1-no-limit", "no-cgroup-file"],
)
def test_the_containers_memory_limit_is_read_from_its_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, limit: int | None
) -> None:
    path = tmp_path / "memory.max"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(connections, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"), str(path)))
    assert connections.container_memory() == limit


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


async def _serving(app: web.Application, clients: ClientConnections) -> tuple[web.AppRunner, int]:
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
    runner, port = await _serving(unsent.app, clients)
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
        await wait_until(partial(connections._idle, handler), "everything sent")
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
    runner, port = await _serving(app, clients)
    opened = []
    try:
        for count in range(1, 5):  # three busy at the front, one idle behind them
            opened.append(await asyncio.open_connection("127.0.0.1", port))
            await wait_until(partial(_open_is, clients, count), "admitted in order")
            if count < 4:
                opened[-1][1].write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                await wait_until(partial(_busy, clients, count - 1), "its request started")
        await wait_until(partial(connections._idle, list(clients._open)[3]), "the fourth idle")
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
    return not connections._idle(list(clients._open)[index])


async def test_a_client_that_takes_none_of_its_answer_is_aborted_after_the_send_timeout() -> None:
    """aiohttp has no send deadline: a client that stops reading kept its connection, its place under the cap
    and the answer's bytes for as long as it stayed connected (a few locked every newcomer out)."""
    unsent = _Unsent()
    clients = ClientConnections(10, send_timeout=30)
    runner, port = await _serving(unsent.app, clients)
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
    return transport.get_write_buffer_size() > 0 and connections._idle(list(clients._open)[index]) is False


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


def _head(path: str, lines: int, *extra: str) -> bytes:
    """A request head with `lines` header lines of 15,000 bytes (each within aiohttp's limits)."""
    fields = b"".join(b"X-P%d: " % i + b"a" * 15000 + b"\r\n" for i in range(lines))
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{''.join(extra)}".encode() + fields + b"\r\n"


async def _answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """The next `count` answers' status lines (each answer's body is `ok`, 2 bytes)."""
    lines = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines.append(head.partition(b"\r\n")[0])
        await reader.readexactly(2)
    return lines


async def test_a_request_head_is_bounded_as_a_whole_not_only_line_by_line() -> None:
    """aiohttp bounds each header line and their number, not a head: 128 lines of 16 KiB passed, and held
    ~7 MiB per request in flight (a reviewer's 64 clients: RSS 67 -> 511 MiB, never given back). Past
    MAX_HEAD_BYTES the answer is 431 and the connection closes, unparsed; heads within it are served, however
    they arrive, and bodies (which are no head) are not counted, nor the heads before on the connection."""
    seen: list[tuple[str, int]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.path, len(await request.read())))
        return web.Response(text="ok")

    app = web.Application(
        client_max_size=8 * 2**20,
        handler_args={"max_field_size": 16384, "max_line_size": 16384, "max_headers": 128},
    )
    app.router.add_route("*", "/{name}", answer)
    clients = ClientConnections(100)
    runner, port = await _serving(app, clients)
    try:
        # Three heads of 30 KB on one kept-alive connection: each counted afresh.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(_head(f"/kept{i}", 2) for i in range(3)))
        assert await _answers(reader, 3) == [b"HTTP/1.1 200 OK"] * 3
        # A head of 60 KB whose last byte comes with a 4 MB body: the end of the head spans the two chunks.
        upload = _head("/upload", 4, "Content-Length: 4000000\r\n")
        writer.write(upload[:-1])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(upload[-1:] + b"b" * 4_000_000)
        assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
        # Over the bound (75 KB), in pieces of 1,000 bytes: 431, unparsed, and closed.
        huge = _head("/huge", 5)
        for start in range(0, len(huge), 1000):
            writer.write(huge[start : start + 1000])
            await writer.drain()
        answer_to_huge = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await runner.cleanup()
    assert answer_to_huge.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer_to_huge
    assert b"Connection: close\r\n" in answer_to_huge
    assert seen == [("/kept0", 0), ("/kept1", 0), ("/kept2", 0), ("/upload", 4_000_000)]
    assert clients.heads_too_large == 1


def _app(seen: list[str]) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/slow":
            await asyncio.sleep(0.3)
        seen.append(request.path)
        return web.Response(text="ok")

    app = web.Application(handler_args={"max_field_size": 16384, "max_line_size": 16384, "max_headers": 128})
    app.router.add_route("*", "/{name}", answer)
    return app


async def test_a_head_begun_after_a_pipelined_request_is_bounded_too() -> None:
    """The bytes after a head in the chunk that completed it were not counted: a pipelined next head could be
    a whole read (256 KiB) over the bound (a reviewer's)."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await _serving(_app(seen), clients)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        huge = _head("/huge", 8)  # 120 KB
        writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n" + huge[:60_000])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(huge[60_000:])
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await runner.cleanup()
    assert b"431 Request Header Fields Too Large" in answer, answer[:300]
    assert seen == ["/small"]
    assert clients.heads_too_large == 1


async def test_a_head_within_the_bound_whose_end_comes_in_1_byte_chunks_is_served() -> None:
    """Only the last chunk's 3 bytes were kept to find a head's end across chunks: an end that came a byte at
    a time was missed, and a head within the bound refused with its body (a reviewer's)."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await _serving(_app(seen), clients)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        upload = _head("/upload", 4, "Content-Length: 8000\r\n")  # ~60 KB, under the bound
        for piece in (upload[:-2], upload[-2:-1], upload[-1:] + b"b" * 8000):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.1)
        assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
        writer.close()
    finally:
        await runner.cleanup()
    assert seen == ["/upload"]


async def test_a_head_over_the_bound_behind_a_request_in_progress_never_answers_in_its_place() -> None:
    """The 431 was written at once, ahead of the answer to the request before it on the connection: its
    client took the 431 for that answer (a reviewer's). Now that answer goes out whole, then the close."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await _serving(_app(seen), clients)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        huge = _head("/huge", 5)
        for start in range(0, len(huge), 1000):
            writer.write(huge[start : start + 1000])
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\nok")
    assert b"431" not in answer
    assert seen == ["/slow"]
    assert clients.heads_too_large == 1


async def test_pipelined_heads_read_at_once_are_each_bounded() -> None:
    """Heads whole within one read were measured for the first only: a pipelined one after it passed at any
    size up to the read (256 KiB). One read, made certain: the chunk handed to the connection's handler."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await _serving(_app(seen), clients)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert runner.server is not None
        server = runner.server
        await wait_until(lambda: len(server.connections) == 1, "the connection accepted")
        chunk = (
            b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
            + _head("/huge", 5)
            + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        server.connections[0].data_received(chunk)
        await asyncio.wait_for(reader.read(), 5)  # closed
        writer.close()
    finally:
        await runner.cleanup()
    assert "/huge" not in seen
    assert "/after" not in seen
    assert clients.heads_too_large == 1


async def test_an_oversized_head_met_before_the_handlers_task_first_runs_is_answered_431_and_closed() -> None:
    """On Python 3.11 aiohttp starts a connection's handler task one loop pass after connection_made, and
    uvloop can hand it the first read before that (a busy loop, a client that writes at once). No request was
    ever parsed there, so nothing can be answered in the 431's place: 431 and closed, where it was left open
    and unanswered until the keep-alive timeout (a reviewer's). The read is handed over in the accept's own
    loop pass here, on a real connection, to make that order certain."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await _serving(_app(seen), clients)
    assert runner.server is not None
    server = runner.server
    admitted = server.connection_made

    def read_at_once(handler: RequestHandler, transport: asyncio.Transport) -> None:
        admitted(handler, transport)
        handler.data_received(_head("/huge", 5))

    server.connection_made = read_at_once  # type: ignore[method-assign]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)  # closed
        writer.close()
    finally:
        await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
    assert clients.heads_too_large == 1
    assert seen == []


async def test_a_head_aiohttp_held_behind_32_queued_requests_is_bounded_too() -> None:
    """aiohttp parses at most 32 pipelined requests ahead of its handler and keeps the rest of the read
    unparsed, reparsing it (data_received(b"")) as the queue drains: a 75 KB head read behind 40 slow requests
    was never measured, and was served (diff2)."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        seen.append(request.path)
        return web.Response(text="ok")

    app = web.Application(handler_args={"max_field_size": 16384, "max_line_size": 16384, "max_headers": 128})
    app.router.add_get("/{name}", answer)
    clients = ClientConnections(100)
    runner, port = await _serving(app, clients)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n" * 40 + _head("/huge", 5))
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), 3)  # until the connection closes (it stayed open, served)
        writer.close()
    finally:
        await runner.cleanup()
    assert "/huge" not in seen
    assert clients.heads_too_large == 1
