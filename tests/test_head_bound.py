"""A request head bounded as a whole: 431 and close past MAX_HEAD_BYTES, pipelined or not."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.connections import ClientConnections
from tests.test_connections import serving
from tests.test_server import wait_until


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
    runner, port = await serving(app, clients)
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
    assert clients.heads.too_large == 1


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
    runner, port = await serving(_app(seen), clients)
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
    assert clients.heads.too_large == 1


async def test_a_head_within_the_bound_whose_end_comes_in_1_byte_chunks_is_served() -> None:
    """Only the last chunk's 3 bytes were kept to find a head's end across chunks: an end that came a byte at
    a time was missed, and a head within the bound refused with its body (a reviewer's)."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await serving(_app(seen), clients)
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
    runner, port = await serving(_app(seen), clients)
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
    assert clients.heads.too_large == 1


async def test_pipelined_heads_read_at_once_are_each_bounded() -> None:
    """Heads whole within one read were measured for the first only: a pipelined one after it passed at any
    size up to the read (256 KiB). One read, made certain: the chunk handed to the connection's handler."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await serving(_app(seen), clients)
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
    assert clients.heads.too_large == 1


async def test_an_oversized_head_met_before_the_handlers_task_first_runs_is_answered_431_and_closed() -> None:
    """On Python 3.11 aiohttp starts a connection's handler task one loop pass after connection_made, and
    uvloop can hand it the first read before that (a busy loop, a client that writes at once). No request was
    ever parsed there, so nothing can be answered in the 431's place: 431 and closed, where it was left open
    and unanswered until the keep-alive timeout (a reviewer's). The read is handed over in the accept's own
    loop pass here, on a real connection, to make that order certain."""
    seen: list[str] = []
    clients = ClientConnections(100)
    runner, port = await serving(_app(seen), clients)
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
    assert clients.heads.too_large == 1
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
    runner, port = await serving(app, clients)
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
    assert clients.heads.too_large == 1
