"""The upstream client (proxy/upstream.py) through the real app, against raw scripted upstreams.

The rig's aiohttp upstream always speaks well; these servers speak exactly the bytes a test gives them, so
pooling, keep-alive races, framing without a length, 1xx answers, malformed heads, slow bodies and TLS are
each exercised on real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import random
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy import keys
from proxy.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, UPSTREAM_BUSY
from proxy.upstream import Connection, Limits, Pool, UpstreamError
from proxy.upstream_conn import READ_HIGH_WATER
from tests.chaos import ChaosProxy
from tests.conftest import MakeProxy
from tests.rig import Upstream
from tests.test_forward import read_into
from tests.test_server import wait_until
from tests.test_telemetry import scrape, value

Client = TestClient[Any, Any]
Rig = tuple[Upstream, TestServer]
# Answers one request: (its index on the connection, its head, the connection) -> keep the connection open?
Handler = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


@dataclass
class Scripted:
    """A raw TCP upstream answering each request head through `handler`, counting its connections."""

    handler: Handler
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    peak_open: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        try:
            index = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                if not await self.handler(index, head, writer):
                    return
                index += 1
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Awaitable[Scripted]]]:
    started: list[Scripted] = []

    async def start(handler: Handler) -> Scripted:
        upstream = Scripted(handler)
        upstream.server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        assert upstream.server is not None
        upstream.server.close()


def answering(*replies: bytes) -> Handler:
    """A handler writing `replies[i]` for the i-th request on a connection (the last one repeats)."""

    async def handler(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(replies[min(index, len(replies) - 1)])
        await writer.drain()
        return True

    return handler


def holding_until(release: asyncio.Event) -> Handler:
    """A handler answering OK at once, except GET /hold, answered once `release` is set."""

    async def handler(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /hold "):
            await release.wait()
        writer.write(OK)
        await writer.drain()
        return True

    return handler


async def first_only(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
    """Answer a connection's first request; read the next one and close without a word."""
    if index > 0:
        return False
    writer.write(OK)
    await writer.drain()
    return True


async def proxy_to(make_proxy: MakeProxy, upstream: Scripted, **upstream_settings: Any) -> Client:
    return await make_proxy(upstream={"url": upstream.url, **upstream_settings})


async def pool_get(pool: Pool, path: bytes, wanted: Callable[[], bool] | None = None) -> bytes:
    """GET `path` through `pool` alone; the whole body."""
    response = await pool.send(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path, None, wanted=wanted)
    try:
        return await response.read()
    finally:
        response.release()


def failures(client: Client) -> dict[str, int]:
    return {kind: n for kind, n in client.app[keys.FORWARDER].failures.items() if n}


# Connections


async def test_one_keep_alive_connection_carries_sequential_requests(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(answering(OK))
    client = await proxy_to(make_proxy, upstream)

    for _ in range(5):
        resp = await client.get("/thing")
        assert (resp.status, await resp.read()) == (200, b"ok")

    assert upstream.connections == 1
    assert len(upstream.heads) == 5
    samples = await scrape(client)
    assert value(samples, "edge_proxy_upstream_connects_total") == 1
    assert value(samples, "edge_proxy_upstream_connections", state="idle") == 1
    assert value(samples, "edge_proxy_upstream_connections", state="busy") == 0
    assert value(samples, "edge_proxy_upstream_waiting") == 0


async def test_the_pool_never_opens_more_than_max_connections(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    release = asyncio.Event()

    async def slow(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(OK)
        await writer.drain()
        return True

    upstream = await scripted(slow)
    client = await proxy_to(make_proxy, upstream, max_connections=2)

    requests = [asyncio.ensure_future(client.get(f"/n{i}")) for i in range(6)]
    await wait_until(lambda: len(upstream.heads) == 2, "two requests upstream")
    pool = client.app[keys.FORWARDER].pool
    await wait_until(lambda: pool.waiting == 4, "the other four waiting for a connection, not opening one")
    samples = await scrape(client)
    assert value(samples, "edge_proxy_upstream_waiting") == 4
    assert value(samples, "edge_proxy_upstream_connections", state="busy") == 2
    assert upstream.connections == 2
    release.set()
    statuses = [(await resp).status for resp in requests]

    assert statuses == [200] * 6
    assert upstream.peak_open == 2
    assert len(upstream.heads) == 6


async def test_a_connection_the_upstream_closed_while_idle_is_retried_once_for_a_get(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    # The keep-alive race: the upstream closes an idle connection just as the proxy sends on it.
    upstream = await scripted(first_only)
    client = await proxy_to(make_proxy, upstream)

    assert (await client.get("/one")).status == 200
    resp = await client.get("/two")

    assert (resp.status, await resp.read()) == (200, b"ok")
    assert upstream.connections == 2
    assert [head.split(b" ")[1] for head in upstream.heads] == [b"/one", b"/two", b"/two"]
    assert failures(client) == {}
    samples = await scrape(client)
    assert value(samples, "edge_proxy_upstream_retries_total") == 1
    assert value(samples, "edge_proxy_upstream_connects_total") == 2


async def test_the_retry_goes_on_a_new_connection_not_another_idle_one(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    # Two idle connections, both closed by the upstream (each answers one request, then closes on the next):
    # the retry after the first fails must not take the second, as stale as the first.
    both_open = asyncio.Event()

    async def one_each(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if index > 0:
            return False
        if upstream.connections == 2:
            both_open.set()
        await both_open.wait()
        writer.write(OK)
        await writer.drain()
        return True

    upstream = await scripted(one_each)
    client = await proxy_to(make_proxy, upstream)
    first = await asyncio.gather(client.get("/a"), client.get("/b"))
    assert [r.status for r in first] == [200, 200]
    assert upstream.connections == 2

    resp = await client.get("/c")

    assert (resp.status, await resp.read()) == (200, b"ok")
    assert upstream.connections == 3
    assert failures(client) == {}
    assert value(await scrape(client), "edge_proxy_upstream_retries_total") == 1


async def test_a_post_on_a_connection_closed_while_idle_is_not_sent_twice(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(first_only)
    client = await proxy_to(make_proxy, upstream)

    assert (await client.get("/one")).status == 200
    resp = await client.post("/capture", data=b"{}")

    # The upstream may have acted on it: a POST is never replayed, the client decides.
    assert (resp.status, await resp.read()) == (502, BAD_GATEWAY)
    assert [head.split(b" ")[1] for head in upstream.heads] == [b"/one", b"/capture"]
    assert failures(client) == {"disconnected": 1}


async def test_idle_connections_close_after_the_keepalive_timeout(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(answering(OK))
    client = await proxy_to(make_proxy, upstream, keepalive_timeout_seconds=0.2)

    assert (await client.get("/one")).status == 200
    assert upstream.open_now == 1
    await wait_until(lambda: upstream.open_now == 0, "the idle connection closed by the proxy")
    assert (await client.get("/two")).status == 200

    assert upstream.connections == 2


async def one_per_connection(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
    """gunicorn's sync workers: answer with Connection: close, then close."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    return False


async def test_connection_close_answers_are_not_reused(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(one_per_connection)
    client = await proxy_to(make_proxy, upstream)

    for _ in range(3):
        resp = await client.get("/x")
        assert (resp.status, await resp.read()) == (200, b"ok")
        assert "Connection" not in resp.headers or resp.headers["Connection"] != "close"

    assert upstream.connections == 3
    assert failures(client) == {}


async def test_a_connection_closed_after_its_answer_is_freed_without_the_cycle_collector(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    # Behind a backend that closes every connection, cyclic garbage per request kept the collector busy
    # (~8 % of the proxy's CPU forwarding to gunicorn's sync worker): each connection must go by refcount.
    upstream = await scripted(one_per_connection)
    client = await proxy_to(make_proxy, upstream)
    assert (await client.get("/x")).status == 200  # the first request's one-off objects

    def connections() -> int:
        return sum(type(o) is Connection for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            resp = await client.get("/x")
            assert (resp.status, await resp.read()) == (200, b"ok")
        # With the collector off, only refcounting can free them (the last one once its close completes).
        await wait_until(lambda: connections() == 0, "every closed connection freed", within=2)
    finally:
        gc.enable()
    assert upstream.connections == 6


async def test_shutdown_closes_idle_upstream_connections(
    aiohttp_client: Any, scripted: Callable[[Handler], Awaitable[Scripted]], redis_url: str
) -> None:
    from proxy.app import create_app
    from tests.conftest import settings_for

    upstream = await scripted(answering(OK))
    client = await aiohttp_client(create_app(settings_for(upstream.url, redis_url)))
    assert (await client.get("/x")).status == 200
    assert upstream.open_now == 1

    await client.close()

    await wait_until(lambda: upstream.open_now == 0, "the pool closed on shutdown")


# Framing


async def test_head_answer_declaring_a_length_has_no_body_and_the_connection_goes_on(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    head_reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: application/json\r\n\r\n"

    async def handler(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(head_reply if head.startswith(b"HEAD ") else OK)
        await writer.drain()
        return True

    upstream = await scripted(handler)
    client = await proxy_to(make_proxy, upstream)

    head = await client.head("/doc")
    after = await client.get("/doc")

    assert head.status == 200
    assert head.headers["Content-Length"] == "1234"
    assert await head.read() == b""
    assert (after.status, await after.read()) == (200, b"ok")
    assert upstream.connections == 1


async def test_informational_answers_are_skipped(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    upstream = await scripted(answering(early + OK))
    client = await proxy_to(make_proxy, upstream)

    resp = await client.get("/page")

    assert (resp.status, await resp.read()) == (200, b"ok")
    assert "Link" not in resp.headers
    assert (await client.get("/again")).status == 200
    assert upstream.connections == 1


async def test_an_answer_without_a_length_ends_when_the_upstream_closes(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    async def until_close(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")
        await writer.drain()
        return False

    upstream = await scripted(until_close)
    client = await proxy_to(make_proxy, upstream)

    resp = await client.get("/legacy")

    assert (resp.status, await resp.read()) == (200, b"hello world")
    assert failures(client) == {}


async def test_a_chunked_answer_is_decoded_and_reframed(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Mark: kept\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    )
    upstream = await scripted(answering(chunked))
    client = await proxy_to(make_proxy, upstream)

    first = await client.get("/a")
    second = await client.get("/b")

    assert (first.status, await first.read(), first.headers["X-Mark"]) == (200, b"hello world", "kept")
    assert (second.status, await second.read()) == (200, b"hello world")
    assert upstream.connections == 1


@pytest.mark.parametrize(
    ("connection", "kept"),
    [
        # Only fields dropped anyway: cut out where the parse found them (forward_headers.end_to_end).
        (b"keep-alive", ["X-A", "Set-Cookie", "Set-Cookie", "Content-Length", "X-B"]),
        (b"Keep-Alive, TE", ["X-A", "Set-Cookie", "Set-Cookie", "Content-Length", "X-B"]),
        # Naming another field, or an option that is no field: each header's name is looked up instead.
        (b"keep-alive, X-B", ["X-A", "Set-Cookie", "Set-Cookie", "Content-Length"]),
        (b"close", ["X-A", "Set-Cookie", "Set-Cookie", "Content-Length", "X-B"]),
    ],
)
async def test_hop_by_hop_answer_headers_in_any_case_leave_the_rest_in_order(
    make_proxy: MakeProxy,
    scripted: Callable[[Handler], Awaitable[Scripted]],
    connection: bytes,
    kept: list[str],
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nconnection: %b\r\nSet-Cookie: a=1\r\nKEEP-ALIVE: timeout=5\r\n"
        b"Set-Cookie: b=2\r\nTrailer: X-Sum\r\nContent-Length: 2\r\nProxy-Connection: x\r\nX-B: 2\r\n\r\nok"
    ) % connection
    upstream = await scripted(answering(answer))
    client = await proxy_to(make_proxy, upstream)

    for _ in range(2):  # the second with every name already classified
        resp = await client.get("/h")
        sent = {"X-A", "X-B", "Connection", "Set-Cookie", "Keep-Alive", "Trailer", "Content-Length"}
        sent.add("Proxy-Connection")
        names = [name.decode() for name, _ in resp.raw_headers if name.decode().title() in sent]
        assert (resp.status, await resp.read(), names) == (200, b"ok", kept)
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Mark: 1\r\n\r\nhello world", b"hello world"),
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\n"
            b"Transfer-Encoding: chunked\r\nX-Mark: 1\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"hello world",
        ),
    ],
    ids=["content-length", "1xx then chunked"],
)
async def test_answers_split_at_every_byte_boundary_parse_the_same(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]], answer: bytes, body: bytes
) -> None:
    # The parser sees the answer in whatever pieces TCP delivers: here one to three bytes at a time.
    rng = random.Random(7)

    async def trickles(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        offset = 0
        while offset < len(answer):
            step = rng.randint(1, 3)
            writer.write(answer[offset : offset + step])
            await writer.drain()
            await asyncio.sleep(0.001)  # a separate segment, most of the time
            offset += step
        return True

    upstream = await scripted(trickles)
    client = await proxy_to(make_proxy, upstream)

    status, _, reason = answer.rsplit(b"HTTP/1.1 ", 1)[1].split(b"\r\n")[0].decode().partition(" ")
    for _ in range(3):
        resp = await client.get("/trickle")
        assert (await resp.read(), resp.headers["X-Mark"]) == (body, "1")
        assert (resp.status, resp.reason) == (int(status), reason)
    assert upstream.connections == 1
    assert failures(client) == {}


MALFORMED = {
    "not http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "bad length": b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nok",
    "length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "header over 16 KiB": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 16385 + b"\r\nContent-Length: 2\r\n\r\nok",
    "129 headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(129)) + b"\r\nok",
    "protocol switch": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    ),
    "transfer coding not chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00",
    "coding list not ending in chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    "a coding before chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    # aiohttp refuses to write these reasons: an empty reply and a traceback (200 in the access log), or a
    # 500 once streamed.
    "a control character in the reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
    "a control character in a streamed answer's reason": (
        b"HTTP/1.1 200 O\x7fK\r\nConnection: close\r\n\r\nok"
    ),
    # Taken for an informational answer: the client waited for the read timeout (504).
    "status 099": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
    "status 600": b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("reply", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_answers_are_502_and_counted(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]], reply: bytes
) -> None:
    upstream = await scripted(answering(reply))
    client = await proxy_to(make_proxy, upstream)

    resp = await client.get("/x")

    assert (resp.status, await resp.read()) == (502, BAD_GATEWAY)
    assert failures(client) == {"malformed": 1}


async def test_bytes_after_an_answer_are_not_taken_for_the_next_one(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    # An upstream that says more than its Content-Length: the extra bytes must not become the next
    # request's answer (response splitting); the connection is dropped instead.
    upstream = await scripted(answering(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"))
    client = await proxy_to(make_proxy, upstream)

    first = await client.get("/one")
    assert (first.status, await first.read()) == (200, b"ok")
    await wait_until(lambda: upstream.open_now == 0, "the connection dropped")
    second = await client.get("/two")

    assert (second.status, await second.read()) == (200, b"ok")
    assert upstream.connections == 2


# Time and flow


async def test_silence_mid_body_is_a_read_timeout_that_cuts_the_stream(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    stall = asyncio.Event()

    async def stalls(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        await stall.wait()
        return False

    upstream = await scripted(stalls)
    client = await proxy_to(make_proxy, upstream, read_timeout_seconds=0.3)
    try:
        resp = await client.get("/big")
        assert resp.status == 200
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_into(resp, received)
        assert bytes(received) == b"x" * len(received)
        assert len(received) <= 100_000
        assert failures(client) == {"timeout": 1}
    finally:
        stall.set()


async def test_reading_pauses_while_the_client_is_slower_than_the_upstream(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    total, block = 256 * 1024 * 1024, b"\x01\x02\x03\x04" * 16384
    sent = [0]

    async def floods(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent[0] < total:
            writer.write(block)
            await writer.drain()
            sent[0] += len(block)
        return True

    upstream = await scripted(floods)
    client = await proxy_to(make_proxy, upstream)
    resp = await client.get("/flood")
    assert resp.status == 200

    # Nothing is read: once the socket buffers on the way fill, the upstream's writes must stall.
    last = -1
    while last != sent[0]:
        last = sent[0]
        await asyncio.sleep(0.3)
    assert sent[0] < total // 4, "the proxy kept reading into memory for a client that read nothing"

    digest = hashlib.sha256()
    async for chunk in resp.content.iter_chunked(1024 * 1024):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(block * (total // len(block))).hexdigest()


async def test_waiting_for_a_connection_ends_cleanly_when_the_request_is_abandoned(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    release = asyncio.Event()

    async def slow(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/hold" in head.split(b"\r\n")[0]:
            await release.wait()
        writer.write(OK)
        await writer.drain()
        return True

    upstream = await scripted(slow)
    client = await proxy_to(make_proxy, upstream, max_connections=1)
    held = asyncio.ensure_future(client.get("/hold"))
    await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")

    # Waits for the pool; the client gives up (aiohttp then cancels nothing: the handler waits on).
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.get("/waits")
    release.set()
    assert (await held).status == 200
    after = await client.get("/after")

    assert (after.status, await after.read()) == (200, b"ok")
    assert upstream.connections == 1


async def test_a_cancelled_wait_for_a_connection_leaves_the_pool_whole(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    release = asyncio.Event()

    upstream = await scripted(holding_until(release))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1))

    def get(path: bytes) -> Awaitable[bytes]:
        return pool_get(pool, path)

    try:
        held = asyncio.ensure_future(get(b"/hold"))
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        waiting = [asyncio.ensure_future(get(b"/w%d" % i)) for i in range(3)]
        await asyncio.sleep(0.05)
        waiting[0].cancel()
        waiting[2].cancel()
        release.set()

        assert await held == b"ok"
        assert await waiting[1] == b"ok"
        assert list(await asyncio.gather(get(b"/a"), get(b"/b"))) == [b"ok", b"ok"]
        for cancelled in (waiting[0], waiting[2]):
            assert cancelled.cancelled()
        assert upstream.connections == 1
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/hold", b"/w1", b"/a", b"/b"]
    finally:
        pool.close()


async def test_a_client_that_left_ends_its_exchange_and_only_its_own(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """Pool.client_left: the exchange of that client's request ends ("abandoned"), its connection closed,
    never reused; a client whose answer was already released, or an unknown one, changes nothing."""
    release = asyncio.Event()
    upstream = await scripted(holding_until(release))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1))
    head = b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        held = asyncio.ensure_future(pool.send(head, None, client="gone"))
        await wait_until(lambda: len(upstream.heads) == 1, "the request upstream")
        pool.client_left("someone else")
        pool.client_left("gone")
        with pytest.raises(UpstreamError) as abandoned:
            await held
        assert abandoned.value.kind == "abandoned"
        assert pool.connections() == {"idle": 0, "busy": 0}
        release.set()
        answer = await pool.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", None, client="here")
        assert await answer.read() == b"ok"
        pool.client_left("here")  # left once its whole answer was in: the connection stays good
        answer.release()
        assert pool.connections() == {"idle": 1, "busy": 0}
        answer = await pool.send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", None, client="there")
        assert await answer.read() == b"ok"
        answer.release()
        assert pool._by_client == {}  # released: forgotten
        assert upstream.connections == 2  # the abandoned one, then one kept for /a and /b
    finally:
        pool.close()


async def _handed_over_then_closed(method: bytes) -> tuple[bytes, list[list[bytes]], int, dict[str, int]]:
    """A request waiting for the only connection is handed it, and the connection closes before it runs.

    What that request got, the request lines the upstream saw, its connections, and the pool's state.
    """
    upstream = Scripted(answering(OK))
    upstream.server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, read_timeout=5))
    try:
        first = await pool.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n", None)
        assert await first.read() == b"ok"
        request = b"%b /waiter HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n" % method
        waiter = asyncio.ensure_future(pool.send(request, b"hi"))
        await wait_until(lambda: pool.waiting == 1, "a request waiting for the only connection")
        transport = first._conn._transport
        assert transport is not None
        first.release()  # handed to the waiter, which has not run yet ...
        transport.close()  # ... and closed before it does
        answer = await waiter  # a RuntimeError, a read timeout or a 502 would raise here
        body = await answer.read()
        answer.release()
        lines = [head.split(b" ")[:2] for head in upstream.heads]
        return body, lines, upstream.connections, pool.connections()
    finally:
        pool.close()
        upstream.server.close()


@pytest.mark.parametrize("method", [b"GET", b"POST"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_connection_closed_after_it_was_handed_to_a_waiter_is_replaced_not_written_to(
    loop: str, method: bytes
) -> None:
    """The upstream ends a keep-alive connection in the loop pass that frees it for a waiting request.

    Writing to it raised RuntimeError under uvloop (the serving loop: a 500) and, under asyncio, was dropped
    (a POST then waited out the read timeout: a 504). Nothing was written on it, so even a POST goes on a
    new connection.
    """
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        body, lines, connections, pool = runner.run(_handed_over_then_closed(method))
    assert body == b"ok"
    assert lines == [[b"GET", b"/first"], [method, b"/waiter"]]
    assert connections == 2
    assert pool == {"idle": 1, "busy": 0}


async def test_an_answer_completed_while_reading_was_paused_leaves_a_connection_that_reads_again(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """The last bytes of an answer arrive in the read that fills the buffer past its high-water mark
    (reading pauses), the client leaves without reading it, and the connection goes back to the pool: the
    next request on it must be read, not left waiting on a paused socket past every timeout."""
    body = b"b" * (READ_HIGH_WATER + 512)
    tail = 1024  # the read that crosses the mark also completes the answer

    async def in_two_parts(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if index > 0:
            writer.write(OK)
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body[:-tail]))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body[-tail:])
        await writer.drain()
        return True

    upstream = await scripted(in_two_parts)
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, read_timeout=1.0))
    try:
        first = await pool.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n", None)
        conn = first._conn
        await wait_until(lambda: conn._complete, "the whole answer in, none of it read")
        assert conn._buffered > READ_HIGH_WATER  # reading was paused by the read that completed it
        first.release()  # as when the client leaves: the answer was complete, so the connection is kept

        second = await asyncio.wait_for(pool.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", None), 5)
        assert await asyncio.wait_for(second.read(), 5) == b"ok"
        second.release()
        assert upstream.connections == 1
    finally:
        pool.close()


async def test_an_upload_longer_than_the_read_timeout_is_not_cut(
    make_proxy: MakeProxy, upstream: Rig
) -> None:
    # The read timeout is the upstream's silence once it has the body; a slow, steady upload is not that.
    recorder, _ = upstream
    client = await make_proxy(upstream={"read_timeout_seconds": 0.5})

    async def steady() -> AsyncIterator[bytes]:
        for _ in range(20):
            await asyncio.sleep(0.05)
            yield b"x" * 1000

    resp = await client.post("/upload", data=steady())

    assert resp.status == 200
    assert recorder.seen[-1].body == b"x" * 20_000
    assert failures(client) == {}


# Bytes as they came


async def test_request_header_bytes_reach_the_upstream_unchanged(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(answering(OK))
    client = await proxy_to(make_proxy, upstream)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    # obs-text (not UTF-8) and UTF-8 in values, a target with escapes and an empty query.
    writer.write(
        b"GET /a%2Fb/%C3%A9?x=1&x=2&e=%00& HTTP/1.1\r\nHost: example.test\r\n"
        b"X-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    sent = upstream.heads[0]
    assert sent.startswith(b"GET /a%2Fb/%C3%A9?x=1&x=2&e=%00& HTTP/1.1\r\nHost: example.test\r\n")
    assert b"\r\nX-Latin: caf\xe9\r\n" in sent
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in sent


# What Django under gunicorn sends for `filename="résumé.csv"` in a Content-Disposition: WSGI header values
# are latin-1, so each é goes out as the single byte 0xE9 (tests/e2e/test_forwarded.py runs the real thing).
LATIN_1_FIELD = b'Content-Disposition: attachment; filename="r\xe9sum\xe9.csv"'


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 2\r\n\r\nok", b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
    ids=["buffered", "streamed"],
)
async def test_answer_header_bytes_reach_the_client_unchanged(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]], framing: bytes
) -> None:
    # obs-text (latin-1, as WSGI servers write it), UTF-8, and a reason phrase with obs-text, in a buffered
    # answer (head and body in one write) and a streamed one.
    answer = (
        b"HTTP/1.1 200 Tr\xe8s bien\r\n"
        + LATIN_1_FIELD
        + b"\r\nX-Utf8: caf\xc3\xa9\r\nX-Ascii: plain\r\n"
        + framing
    )
    upstream = await scripted(answering(answer))
    client = await proxy_to(make_proxy, upstream)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /export HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    await writer.drain()
    got = await reader.read()
    writer.close()

    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 Tr\xe8s bien"
    assert LATIN_1_FIELD in lines
    assert b"X-Utf8: caf\xc3\xa9" in lines
    assert b"X-Ascii: plain" in lines
    assert body in (b"ok", b"2\r\nok\r\n0\r\n\r\n")
    assert failures(client) == {}


@pytest.mark.parametrize(
    "line",
    [b"X-A: a\rX-B: b", b"X-A: a\x00b", b"X-A: a\x0bb", b"X-A: a\x7fb"],
    ids=["CR", "NUL", "VT", "DEL"],
)
async def test_control_bytes_in_a_header_never_reach_the_upstream(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]], line: bytes
) -> None:
    # The request head is written from the parsed request as it came: this is why that is safe. aiohttp's
    # parser refuses control bytes in field values (HTAB aside), so none can split a header upstream.
    upstream = await scripted(answering(OK))
    client = await proxy_to(make_proxy, upstream)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n" + line + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()

    assert answer.split(b"\r\n")[0].split(b" ")[1] == b"400"
    assert upstream.heads == []


async def test_a_name_resolves_and_its_connection_is_reused(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(answering(OK))
    url = upstream.url.replace("127.0.0.1", "localhost")
    client = await make_proxy(upstream={"url": url, "host_header": "upstream"})

    for _ in range(3):
        assert (await client.get("/x")).status == 200

    assert upstream.connections == 1
    assert upstream.heads[0].split(b"\r\n")[1] == b"Host: " + url.removeprefix("http://").encode()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_an_ipv6_literal_upstream_is_reached_with_a_bracketed_host(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    upstream = await scripted(answering(OK))
    assert upstream.server is not None
    upstream.server.close()
    upstream.server = await asyncio.start_server(upstream.serve, "::1", 0)
    port = upstream.server.sockets[0].getsockname()[1]
    client = await make_proxy(upstream={"url": f"http://[::1]:{port}", "host_header": "upstream"})

    for _ in range(2):
        resp = await client.get("/v6")
        assert (resp.status, await resp.read()) == (200, b"ok")

    assert upstream.connections == 1
    assert upstream.heads[0].split(b"\r\n")[1] == b"Host: [::1]:%d" % port


# TLS


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


async def https_upstream(ca: trustme.CA, aiohttp_server: Any) -> TestServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls {request.secure}")

    app = web.Application()
    app.router.add_get("/hello", hello)
    server: TestServer = await aiohttp_server(app, ssl=context)
    return server


async def test_an_https_upstream_is_verified_against_the_trusted_authorities(
    make_proxy: MakeProxy,
    aiohttp_server: Any,
    certificate_authority: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await https_upstream(certificate_authority, aiohttp_server)
    url = f"https://localhost:{server.port}"
    untrusted = await make_proxy(upstream={"url": url})
    refused = await untrusted.get("/hello")
    assert (refused.status, await refused.read()) == (502, BAD_GATEWAY)
    assert failures(untrusted) == {"refused": 1}

    # The system's trust store, as OpenSSL finds it: SSL_CERT_FILE names our authority.
    bundle = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    trusted = await make_proxy(upstream={"url": url})

    resp = await trusted.get("/hello")
    assert (resp.status, await resp.text()) == (200, "tls True")
    assert failures(trusted) == {}


# Chaos


async def test_connections_cut_under_load_never_mix_answers_or_leak_pool_places(
    make_proxy: MakeProxy, upstream: Rig
) -> None:
    _, server = upstream
    assert server.port is not None
    chaos = ChaosProxy(server.port)
    await chaos.start()
    try:
        client = await make_proxy(upstream={"url": f"http://127.0.0.1:{chaos.port}", "max_connections": 4})
        statuses: Counter[int] = Counter()
        stop = time.monotonic() + 2

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < stop:
                path = f"/w{n}/{i}"
                # Half the workers POST: never sent twice, so a cut reaches the client as a 502.
                resp = await (client.post(path, data=b"x") if n % 2 else client.get(path))
                body = await resp.read()
                statuses[resp.status] += 1
                if resp.status == 200:
                    assert json.loads(body)["path"] == path  # never another request's answer
                else:
                    assert (resp.status, body) == (502, BAD_GATEWAY)
                i += 1

        async def cutter() -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(0.03)
                await chaos.reset_all()

        await asyncio.gather(*(worker(n) for n in range(8)), cutter())

        pool = client.app[keys.FORWARDER].pool
        assert statuses[200] > 0
        assert set(statuses) <= {200, 502}
        assert pool.retried + statuses[502] > 0, "no cut hit a request: the test proved nothing"
        # The cuts are over: every request succeeds, and no place in the pool was lost on the way.
        answers = await asyncio.gather(*(client.get(f"/after/{i}") for i in range(8)))
        assert [resp.status for resp in answers] == [200] * 8
        assert pool.connections()["busy"] == 0
        assert 1 <= pool.connections()["idle"] <= 4
        assert pool.waiting == 0
    finally:
        await chaos.close()


async def test_a_wait_for_a_connection_is_bounded_and_an_abandoned_one_is_never_sent(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """Behind a backend too slow to free a connection, requests do not wait longer than an answer may take
    (504), and one whose client left while it waited is not sent: its turn goes to the next."""
    release = asyncio.Event()

    async def slow(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if not head.startswith(b"GET /hold "):
            writer.write(OK)
            await writer.drain()
            return True
        # A byte every 0.1 s until released: never silent for the read timeout, the connection held.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        sent = 0
        while not release.is_set():
            writer.write(b"k")
            sent += 1
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"k" * (1000 - sent))
        await writer.drain()
        return True

    upstream = await scripted(slow)
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, read_timeout=0.3))

    def get(path: bytes, wanted: Callable[[], bool] | None = None) -> Awaitable[bytes]:
        return pool_get(pool, path, wanted)

    try:
        held = asyncio.ensure_future(get(b"/hold"))
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        with pytest.raises(UpstreamError) as timed_out:
            await get(b"/late")
        assert timed_out.value.kind == "pool_timeout"  # not the backend's silence: its own kind

        gone = asyncio.ensure_future(get(b"/gone", wanted=lambda: False))
        after = asyncio.ensure_future(get(b"/after"))
        await asyncio.sleep(0.05)
        release.set()
        assert await held == b"k" * 1000
        with pytest.raises(UpstreamError) as abandoned:
            await gone
        assert abandoned.value.kind == "abandoned"
        assert await after == b"ok"
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/hold", b"/after"]
        assert pool.connections() == {"idle": 1, "busy": 0}
    finally:
        release.set()
        pool.close()


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_upstream_connection(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    total = 64 * 1024 * 1024

    async def floods(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"z" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(total // len(block)):
                writer.write(block)
                await writer.drain()
        return False

    upstream = await scripted(floods)
    client = await proxy_to(make_proxy, upstream, read_timeout_seconds=1)
    assert client.port is not None
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    pool = client.app[keys.FORWARDER].pool
    await wait_until(lambda: pool.connections()["busy"] == 1, "the forward under way")
    await wait_until(lambda: pool.connections()["busy"] == 0, "the stalled client cut off", within=10)
    writer.close()


async def _small_window_client(client: Client) -> socket.socket:
    """A raw client socket connected to the proxy with a 4 KiB receive buffer: the kernel holds little for it,
    so what it does not read soon waits unsent in the proxy's transport."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    assert client.port is not None
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    return sock


async def test_a_client_that_stops_reading_a_trickling_stream_is_cut_off_too(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    """A write waits only once 64 KiB are unsent: a stream that trickles (a server-sent-events heartbeat)
    behind a client that stopped reading never reached that, and held its client and upstream connections for
    as long as the upstream kept sending (found by a reviewer: 40 s of heartbeats with a 2 s timeout)."""
    full = asyncio.Event()
    ended: list[str] = []

    async def trickles(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while not full.is_set():  # until the kernel holds all it will for the client: bytes wait unsent
                writer.write(b"4000\r\n%b\r\n" % (b"x" * 0x4000))
                await writer.drain()
                await asyncio.sleep(0.005)
            for _ in range(200):  # then a heartbeat every 0.1 s, for 20 s
                writer.write(b"e\r\n: keep-alive\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
            ended.append("sent all")
        except ConnectionError:
            ended.append("cut off")
        return False

    upstream = await scripted(trickles)
    client = await proxy_to(make_proxy, upstream, read_timeout_seconds=1)
    assert client.port is not None
    sock = await _small_window_client(client)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    try:
        server = client.server.runner.server if client.server.runner is not None else None
        assert server is not None

        def unsent() -> int:
            return sum(h.transport.get_write_buffer_size() for h in server.connections if h.transport)

        await wait_until(lambda: unsent() > 0, "bytes waiting unsent")
        full.set()
        assert unsent() < 65536  # so no write waits: the trickle's case
        pool = client.app[keys.FORWARDER].pool
        await wait_until(lambda: pool.connections()["busy"] == 0, "the stalled client cut off", within=8)
        await wait_until(lambda: ended == ["cut off"], "the upstream connection closed")
    finally:
        sock.close()


async def test_a_client_slower_than_the_stream_but_reading_is_never_cut_off(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    """The other side of the rule above: bytes wait unsent without a break for over twice the timeout (the
    client reads, slower than the upstream sends), and the client gets the whole stream."""
    full = asyncio.Event()

    async def streams(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not full.is_set():
            writer.write(b"400\r\n%b\r\n" % (b"x" * 0x400))
            await writer.drain()
            await asyncio.sleep(0.005)
        for _ in range(150):  # then 1 KiB every 10 ms (~100 KB/s) for 1.5 s
            writer.write(b"400\r\n%b\r\n" % (b"y" * 0x400))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return False

    upstream = await scripted(streams)
    client = await proxy_to(make_proxy, upstream, read_timeout_seconds=0.5)
    assert client.port is not None
    server = client.server.runner.server if client.server.runner is not None else None
    assert server is not None
    sock = await _small_window_client(client)
    loop = asyncio.get_running_loop()
    await wait_until(lambda: len(server.connections) == 1, "the connection accepted")
    transport = server.connections[0].transport
    assert transport is not None
    # A small send buffer, so the kernel hands space back as the client reads (a large one only once half of
    # what it holds is read: no reader slower than that shows progress, as for nginx's send_timeout).
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    await loop.sock_sendall(sock, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: transport.get_write_buffer_size() > 0, "bytes waiting unsent")
    full.set()
    received = bytearray()
    unsent: list[tuple[float, int]] = []
    try:
        async with asyncio.timeout(30):
            while not received.endswith(b"0\r\n\r\n"):
                data = await loop.sock_recv(sock, 4096)
                assert data, f"cut off after {len(received)} bytes"
                received += data
                unsent.append((loop.time(), transport.get_write_buffer_size()))
                if b"y" in data:
                    await asyncio.sleep(0.08)  # ~50 KB/s: slower than the upstream sends
    finally:
        sock.close()
    assert received.partition(b"\r\n\r\n")[2].count(b"y") == 150 * 0x400
    # The case checked: bytes waited unsent, without a break, for longer than the timeout.
    longest, since = 0.0, None
    for at, size in unsent:
        since = (since or at) if size else None
        longest = max(longest, at - since) if since is not None else longest
    assert longest > 1.0, longest


def holding(release: asyncio.Event) -> Handler:
    """An upstream that answers OK, a `GET /hold` once `release` is set: the pool's one connection held."""

    async def held(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /hold "):
            await release.wait()
        writer.write(OK)
        await writer.drain()
        return True

    return held


async def test_requests_whose_clients_left_give_their_pending_place_to_a_live_one(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """aiohttp does not cancel a handler whose client left (the test server does: hence the pool, with its
    `wanted`): such requests waited on, each holding a max_pending_requests place, and once enough had
    piled up every live request was 503 pool_full, where it had waited and been served (a reviewer's)."""
    release = asyncio.Event()

    upstream = await scripted(holding(release))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, max_pending=2, read_timeout=5))
    left = False
    try:
        hold = asyncio.ensure_future(pool_get(pool, b"/hold"))
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        gone = [
            asyncio.ensure_future(pool_get(pool, b"/gone%d" % i, wanted=lambda: not left)) for i in range(2)
        ]
        await wait_until(lambda: pool.waiting == 2, "two waiting")
        left = True  # both their clients leave
        live = asyncio.ensure_future(pool_get(pool, b"/live", wanted=lambda: True))
        await asyncio.sleep(0.05)
        assert not live.done() or live.exception() is None, live.exception()
    finally:
        release.set()
    await hold
    assert await live == b"ok"
    for request in gone:
        with pytest.raises(UpstreamError) as abandoned:
            await request
        assert abandoned.value.kind == "abandoned"
    assert [h.split(b" ")[1] for h in upstream.heads] == [b"/hold", b"/live"]
    pool.close()


async def test_at_max_pending_the_waiters_are_looked_through_at_most_every_sweep_interval(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """Each refused request walked every waiter asking whether its client was still there: 88 against 34 µs
    a refusal with 1,024 waiting (a reviewer's), paid in a flood behind a stalled backend."""
    release = asyncio.Event()

    upstream = await scripted(holding(release))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, max_pending=1, read_timeout=5))
    asked = 0

    def still_there() -> bool:
        nonlocal asked
        asked += 1
        return True

    try:
        hold = asyncio.ensure_future(pool_get(pool, b"/hold"))
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        waiting = asyncio.ensure_future(pool_get(pool, b"/waiting", wanted=still_there))
        await wait_until(lambda: pool.waiting == 1, "one waiting")
        for _ in range(100):  # within one sweep interval, on this loop pass
            with pytest.raises(UpstreamError) as refused:
                await pool._acquire(wanted=lambda: True)
            assert refused.value.kind == "pool_full"
        assert asked == 1
    finally:
        release.set()
    await hold
    assert await waiting == b"ok"
    pool.close()


async def test_requests_past_max_pending_are_503_at_once_and_those_waiting_are_served(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    """Behind a stalled backend each waiting request holds its client connection and its buffered body (a
    reviewer's 1,000 waiting capture batches: +95 MiB): they piled up until the process ran out of memory."""
    release = asyncio.Event()

    upstream = await scripted(holding(release))
    client = await proxy_to(make_proxy, upstream, max_connections=1, max_pending_requests=2)
    try:
        first = asyncio.ensure_future(client.get("/hold"))
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        waiting = [asyncio.ensure_future(client.get("/capture/")) for _ in range(2)]
        pool = client.app[keys.FORWARDER].pool
        await wait_until(lambda: pool.waiting == 2, "two requests waiting")
        async with client.get("/capture/") as refused:
            assert refused.status == 503
            assert refused.headers["Content-Type"] == "application/json"
            assert await refused.read() == UPSTREAM_BUSY
        assert failures(client) == {"pool_full": 1}
        samples = await scrape(client)
        assert value(samples, "edge_proxy_upstream_errors_total", kind="pool_full") == 1
    finally:
        release.set()
    for request in (first, *waiting):
        async with await request as answer:
            assert answer.status == 200
    # The refused one never reached the backend.
    assert [head.split(b" ")[1] for head in upstream.heads] == [b"/hold", b"/capture/", b"/capture/"]
    # The places come back once those waiting are served: two may wait again.
    release.clear()
    try:
        first = asyncio.ensure_future(client.get("/hold"))
        await wait_until(lambda: len(upstream.heads) == 4, "the only connection busy again")
        assert upstream.heads[3].startswith(b"GET /hold ")
        waiting = [asyncio.ensure_future(client.get("/again")) for _ in range(2)]
        await wait_until(lambda: pool.waiting == 2, "two requests waiting again")
    finally:
        release.set()
    for request in (first, *waiting):
        async with await request as answer:
            assert answer.status == 200


async def test_a_request_no_connection_came_free_for_is_504_counted_as_the_pools_not_the_backends(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    release = asyncio.Event()

    async def slow(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /hold "):
            # A byte every 0.1 s until released: never silent for the read timeout, the connection held.
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not release.is_set():
                writer.write(b"1\r\nk\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(OK)
        await writer.drain()
        return True

    upstream = await scripted(slow)
    client = await proxy_to(make_proxy, upstream, max_connections=1, read_timeout_seconds=0.5)
    try:
        held = asyncio.ensure_future(client.get("/hold"))
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        async with client.get("/late") as late:
            assert late.status == 504
            assert await late.read() == GATEWAY_TIMEOUT
        assert failures(client) == {"pool_timeout": 1}
        samples = await scrape(client)
        assert value(samples, "edge_proxy_upstream_errors_total", kind="pool_timeout") == 1
        assert value(samples, "edge_proxy_upstream_errors_total", kind="timeout") == 0
    finally:
        release.set()
    async with await held as answer:
        assert answer.status == 200
        body = await answer.read()
    assert set(body) == {ord("k")}  # the held request ends normally


async def test_a_request_whose_client_left_while_it_waited_for_a_connection_is_never_sent_and_is_a_499(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    release = asyncio.Event()

    upstream = await scripted(holding_until(release))
    client = await proxy_to(make_proxy, upstream, max_connections=1)
    pool = client.app[keys.FORWARDER].pool
    held = asyncio.ensure_future(client.get("/hold"))
    try:
        await wait_until(lambda: len(upstream.heads) == 1, "the only connection busy")
        _, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: pool.waiting == 1, "the second request waiting for the connection")
        writer.close()  # its client leaves while it waits
        await asyncio.sleep(0.1)
    finally:
        release.set()
    async with await held as answer:
        assert answer.status == 200
    async with client.get("/after") as after:
        assert after.status == 200
    assert [head.split(b" ")[1] for head in upstream.heads] == [b"/hold", b"/after"]
    labels = {"route": "forward", "method": "GET", "answered_by": "upstream"}
    samples = await scrape(client)
    assert value(samples, "edge_proxy_request_duration_seconds_count", status_code="499", **labels) == 1
    assert failures(client) == {}  # not the upstream's failure


async def test_a_request_arriving_as_a_waiter_is_handed_a_connection_is_not_refused_pool_full() -> None:
    """A waiter handed a connection left max_pending's count only in its done callback, a loop pass later: a
    request whose handler ran in between was refused pool_full (503) though no request was waiting (a
    reviewer's; the request is stepped by hand to land in that pass)."""

    class Idle:
        client = None

        def reusable(self) -> bool:
            return True

        def alive(self) -> bool:
            return True

        def usable(self, deadline: float) -> bool:
            return True

        def close(self) -> None:
            pass

    pool = Pool("127.0.0.1", 9, tls=False, limits=Limits(max_connections=1, max_pending=1))
    pool._count = 1  # the one connection is busy
    conn: Any = Idle()  # stands in for the busy connection, handed over as it comes free
    waiting = asyncio.ensure_future(pool._acquire(False))
    await asyncio.sleep(0)
    pool.release(conn)  # handed to the waiter
    assert pool.waiting == 0
    arriving = pool._acquire(False)  # its handler's step, queued before the waiter's done callback
    try:
        arriving.send(None)  # waits (it would raise UpstreamError pool_full if refused)
    finally:
        arriving.close()
    assert (await waiting)[0] is conn


@pytest.mark.parametrize("how", ["closing", "eof"])
async def test_a_post_taken_with_a_connection_closing_unseen_goes_on_a_new_one(
    scripted: Callable[[Handler], Awaitable[Scripted]], how: str
) -> None:
    """The upstream ends an idle keep-alive connection in the loop pass a POST takes it (gunicorn's idle
    close, a backend reload): nothing was written, so even a POST goes on a new connection. It was a 502
    (15 of 20 in a reviewer's run), retried only for the methods that may be sent twice."""
    upstream = await scripted(answering(OK))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, read_timeout=5))
    try:
        assert await pool_get(pool, b"/first") == b"ok"
        [conn] = pool._idle
        assert conn._transport is not None
        if how == "eof":
            conn.eof_received()  # as the loop tells of the upstream's FIN, and then closes the transport
        conn._transport.close()  # connection_lost is still to come, a loop pass later
        answer = await pool.send(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", None)
        assert await answer.read() == b"ok"
        answer.release()
        assert [head.split(b" ")[:2] for head in upstream.heads] == [[b"GET", b"/first"], [b"POST", b"/p"]]
        assert upstream.connections == 2
        # Seen as closed before it was taken (the FIN read): no retry; closing unseen: one, never written.
        assert pool.retried == (0 if how == "eof" else 1)
    finally:
        pool.close()


@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_a_body_running_to_the_close_is_whole_only_if_the_close_is_clean(
    scripted: Callable[[Handler], Awaitable[Scripted]], ending: str
) -> None:
    """No Content-Length, no chunked: the body ends at the close (RFC 9112 §6.3). A reset cuts it short,
    which was passed off as the whole body (nginx leaves the chunked body unended: curl's exit 18)."""

    async def to_the_close(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[1,2,")
        await writer.drain()
        await asyncio.sleep(0.05)
        if ending == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed

    upstream = await scripted(to_the_close)
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(read_timeout=5))
    try:
        answer = await pool.send(b"GET /all HTTP/1.1\r\nHost: x\r\n\r\n", None)
        try:
            if ending == "close":
                assert await answer.read() == b"[1,2,"
            else:
                with pytest.raises(UpstreamError) as cut:
                    await answer.read()
                assert cut.value.kind == "disconnected"
        finally:
            answer.release()
    finally:
        pool.close()


async def test_an_http10_answer_with_transfer_encoding_closes_its_connection(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing, and the connection
    closes after it, whatever its Connection header says; it was kept and reused (nginx opens a new one)."""
    chunked_10 = (
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    upstream = await scripted(answering(chunked_10, OK))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, read_timeout=5))
    try:
        assert await pool_get(pool, b"/a") == b"ok"
        assert pool.connections() == {"idle": 0, "busy": 0}
        assert await pool_get(pool, b"/b") == b"ok"
        assert upstream.connections == 2
    finally:
        pool.close()


async def test_a_streamed_body_cut_by_aiohttp_leaves_nothing_waiting(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """aiohttp's shutdown cuts a request still running past the drain: its body raises CancelledError. The
    task waiting for the answer's head was left pending for ever on the closed connection (a reviewer's)."""

    async def silent(index: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    upstream = await scripted(silent)
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(read_timeout=30))

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await asyncio.sleep(0.05)
        raise asyncio.CancelledError  # what aiohttp's payload raises once the request is cancelled

    before = asyncio.all_tasks()
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n"
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(pool.send(head, body()))
        await asyncio.sleep(0.05)
        left = [task for task in asyncio.all_tasks() - before if not task.done()]
        assert [task for task in left if "Connection." in repr(task.get_coro())] == []
        assert pool.connections() == {"idle": 0, "busy": 0}
    finally:
        pool.close()


async def test_a_new_connection_given_back_unused_is_kept(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    """A request whose client left before it was written gives its connection back unused: a new one was
    closed (never had a clean exchange), its connect and TLS handshake wasted (a diff reviewer's)."""
    upstream = await scripted(answering(OK))
    port = int(upstream.url.rpartition(":")[2])
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits(max_connections=1, read_timeout=5))
    try:
        with pytest.raises(UpstreamError) as abandoned:
            await pool_get(pool, b"/gone", wanted=lambda: False)
        assert abandoned.value.kind == "abandoned"
        assert pool.connections() == {"idle": 1, "busy": 0}
        assert await pool_get(pool, b"/next") == b"ok"
        assert upstream.connections == 1
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/next"]
    finally:
        pool.close()


async def test_a_latin_1_header_under_a_plain_reason_reaches_the_client_unchanged(
    make_proxy: MakeProxy, scripted: Callable[[Handler], Awaitable[Scripted]]
) -> None:
    """A value's non-UTF-8 bytes alone (the reason plain ASCII) must send the answer down the byte-exact
    path; no test caught it when the check was removed (a diff reviewer's)."""
    upstream = await scripted(
        answering(b"HTTP/1.1 200 OK\r\n" + LATIN_1_FIELD + b"\r\nContent-Length: 2\r\n\r\nok")
    )
    client = await proxy_to(make_proxy, upstream)
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /export HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert LATIN_1_FIELD in answer.split(b"\r\n")
    assert answer.endswith(b"\r\n\r\nok")
