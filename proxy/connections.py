"""Client connections against the open-file limit: descriptors kept for Redis and the upstream, always.

Every client connection is a file descriptor, and so is every connection the proxy opens itself. Without a
cap, a surge of clients (thousands of SDK processes keeping their connection alive, a reconnect storm)
takes the last descriptor: libuv then accepts and drops new clients without a word, and, worse, the
upstream pool and Redis can no longer connect: forwards turn into 502s, and a Redis connection lost
meanwhile cannot be replaced. Here the process first raises its soft RLIMIT_NOFILE to the hard
limit (what Go's runtime does at start), then admits clients only up to a cap that leaves room for its own
connections. At the cap the oldest idle client connection makes room for the new one (as nginx reuses idle
keep-alive connections when `worker_connections` run out); only when they are all busy is the new one
closed at once, counted and logged (throttled), as Envoy's `global_downstream_max_connections` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.logs import Throttled, where
from proxy.settings import ConfigError, Settings

if TYPE_CHECKING:
    # Annotations only: the supervisor of --workers N calls the start-up checks here without aiohttp.
    from aiohttp import StreamReader, web
    from aiohttp.web_protocol import RequestHandler

    from proxy.aiohttp_internals import Receive

log = logging.getLogger(__name__)

# Descriptors a serving process holds besides its clients and its two pools: listening sockets (the bind
# and the worker metrics port), the event loop's epoll and signal pipes, stdio, the OTLP exporters'
# connections, shadow comparisons' threads. Generous: a descriptor kept spare costs nothing.
SPARE_DESCRIPTORS = 64
# At the limit, how many connections are looked at for an idle one to close: bounded, so a server whose
# every connection is busy does not walk them all for each new one. Those found busy go to the back, so the
# next look sees others (64 slow clients cannot hide the idle ones behind them).
IDLE_SCAN = 64
# Connections looked at per step of the send-timeout sweep, the event loop serving between steps.
SWEEP_CHUNK = 2048
# Memory an idle keep-alive client connection holds (measured by a reviewer: 8,000 of them took RSS from 65 to
# 131 MiB, 8.3 KiB each), doubled for what a busy one has in flight.
CONNECTION_BYTES = 16 * 1024
# The most a request head may take as a whole (request line and headers). aiohttp bounds each line (16 KiB
# here) and their number (128), so 2 MiB passed and held ~7 MiB per request in flight (a reviewer's 64
# connections took a process from 67 to 511 MiB, and it never gave the memory back): far outside
# CONNECTION_BYTES, and a 256 MiB pod was killed by ~30 such clients. Envoy's default is 60 KiB, an AWS ALB's
# 64 KiB, nginx's 4 x 8 KiB.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_END = b"\r\n\r\n"
# The derived cap never goes below this for memory: a container sized too small still serves clients.
MIN_MEMORY_CAP = 1024
# A serving process without clients or payloads (~70 MiB measured: interpreter, imports, pools), and margin.
BASE_BYTES = 128 * 2**20
# The container's memory limit: cgroup v2, then v1 (whose "no limit" is a number near 2**63).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as far as the kernel allows; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft  # a hard limit above the kernel's nr_open: keep what we have
        return hard
    return soft


def reserved_descriptors(settings: Settings) -> int:
    """Descriptors kept for the proxy's own connections: the upstream pool, Redis, and spares.

    Redis counts twice: on a Cluster, exact-mode rate limits keep a second client (`limits`' own) with pools
    of the same size; on one node they share the proxy's pool and the second share is spare. On a Cluster
    `redis.max_connections` is per node: with many nodes, set `client_limits.max_connections`.
    """
    return settings.upstream.max_connections + 2 * settings.redis.max_connections + SPARE_DESCRIPTORS


def container_memory() -> int | None:
    """The memory limit of this process's cgroup (a container's `resources.limits.memory`); None if none."""
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < 2**60 else None
    return None


# client_cap's default `memory`: the container's limit, read from the cgroup.
FROM_CGROUP = -1


def client_cap(settings: Settings, open_files: int | None = None, memory: int | None = FROM_CGROUP) -> int:
    """How many client connections this process admits at once (`client_limits.max_connections`).

    Unset, it is the open-file limit less the reserve (at least half the limit, so a low limit still
    serves), and no more than the container's memory holds (`memory`; None: no limit) beside the payload
    cache, CONNECTION_BYTES each: the open-file limit alone (a million in most clusters)
    let a reconnect storm grow a pod past its memory limit long before the cap refused anyone. Set above
    what the open-file limit allows, the configuration is refused, naming the key.
    """
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:  # no limit at all (not on Linux, where nr_open bounds it)
        open_files = sys.maxsize
    reserve = reserved_descriptors(settings)
    configured = settings.client_limits.max_connections
    if configured is None:
        by_files = max(open_files - reserve, open_files // 2, 1)  # see warn_if_short for the floor
        if memory == FROM_CGROUP:
            memory = container_memory()
        if memory is None:
            return by_files
        # Each worker holds its own connections and cache in the container's memory.
        room = memory // settings.workers - BASE_BYTES - settings.definitions.cache_budget_bytes
        return min(by_files, max(room // CONNECTION_BYTES, MIN_MEMORY_CAP))
    if configured + reserve > open_files:
        raise ConfigError(
            "invalid configuration (1 problem):\n"
            f"  client_limits.max_connections: {configured} client connections and {reserve} descriptors "
            f"for the proxy's own (upstream.max_connections + 2 x redis.max_connections + "
            f"{SPARE_DESCRIPTORS}) need {configured + reserve} open files; this process may open "
            f"{open_files} (RLIMIT_NOFILE, `ulimit -n`): lower it, or raise the limit"
        )
    return configured


def warn_if_short(settings: Settings) -> None:
    """Log at start when the open-file limit is too low to keep the reserve beside the derived cap.

    Below twice the reserve (~704 descriptors with the defaults), the derived cap stays at half the limit
    so the proxy still serves clients, and the reserve is no longer whole.
    """
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if settings.client_limits.max_connections is not None or open_files == resource.RLIM_INFINITY:
        return
    cap, reserve = client_cap(settings, open_files), reserved_descriptors(settings)
    if cap + reserve > open_files:
        log.warning(
            "the open-file limit (%d) is too low to keep %d descriptors for the upstream pool and Redis "
            "beside %d client connections: raise it (ulimit -n), or lower upstream.max_connections",
            open_files,
            reserve,
            cap,
        )


# How often a drain looks for connections that became idle (a kept-alive client's answer sent).
DRAIN_LOOK_SECONDS = 0.1


class ClientConnections:
    """The client connections a server admits: at most `limit` open.

    At the limit, a new connection takes the place of the oldest idle one (waiting for its next request: an
    SDK between two polls, a client that never sent one), which aiohttp closes at once, as nginx reuses idle
    keep-alive connections when its worker_connections run out: so a probe or a new SDK gets in while the
    places are held by idle connections. Only when the IDLE_SCAN connections looked at are all busy is the new
    one closed on arrival instead; those go to the back of the line, behind the ones not yet looked at.
    """

    def __init__(self, limit: int, send_timeout: float = 60.0) -> None:
        self.limit = limit
        self.send_timeout = send_timeout
        self.refused = 0  # connections closed on arrival: every place taken by a busy connection
        self.closed_idle = 0  # idle connections closed to make room for a new one
        self.send_timeouts = 0  # connections aborted: their client took none of an answer for send_timeout
        self.malformed = 0  # requests aiohttp answered 400 itself: a head it could not parse
        # Oldest first, with their transports: aiohttp forgets a handler's once it closes it, while a socket
        # with unsent bytes stays open until the client takes them (or is aborted here).
        self._open: dict[RequestHandler, asyncio.Transport] = {}
        # Connections relaying a streamed upstream answer: the relay bounds each write itself.
        self.relaying: set[RequestHandler] = set()
        # Connections seen holding unsent bytes: how many, and since when that count has not moved.
        self._stalled: dict[RequestHandler, tuple[int, float]] = {}
        self._warn = Throttled(log)
        self._all_closed: asyncio.Event | None = None  # set once the last connection closes (a drain waits)
        # Per connection receiving a head: its bytes so far, their last 3 (a head's end can span two chunks),
        # aiohttp's count of requests parsed, and the body of the last one (its bytes are no head's).
        self._heads: dict[RequestHandler, _Head] = {}
        self.heads_too_large = 0  # connections answered 431 and closed: a head over MAX_HEAD_BYTES
        # Told of each connection that closes (the upstream pool's client_left: its exchange ends).
        self.on_leave: Callable[[RequestHandler], None] | None = None

    @property
    def open(self) -> int:
        """Client connections open now."""
        return len(self._open)

    def busy(self) -> int:
        """Connections open with a request in progress or an answer not yet all sent (see _idle)."""
        return sum(1 for handler in self._open if not _idle(handler))

    async def wait_closed(self, within: float) -> None:
        """Until every client connection has closed, or `within` seconds have passed."""
        if not self._open:
            return
        self._all_closed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), within)

    async def drain(self, until: float) -> None:
        """Close idle connections (and each that becomes idle) while those with a request in progress finish,
        until none is open or the loop's time is `until`. Answers sent while draining say Connection: close,
        so aiohttp closes each busy connection after its answer; its own shutdown would instead stop reading
        every connection at once, request bodies still arriving included."""
        loop = asyncio.get_running_loop()
        while self._open:
            for handler in [h for h in self._open if _idle(h)]:
                handler.force_close()
            left = until - loop.time()
            if left <= 0 or not self._open:
                return
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), min(left, DRAIN_LOOK_SECONDS))

    def admit_on(self, server: web.Server) -> None:
        """Count `server`'s connections and keep them within the limit (call after the runner's setup).

        aiohttp's RequestHandler reports every connection to its server's `connection_made` and
        `connection_lost`, and offers no other hook: these wrap the two on this one server instance.
        tests/test_server.py runs a real process at its cap, so an aiohttp that stopped calling them fails.
        """
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)  # aiohttp's bookkeeping first, so connection_lost finds it
            if len(self._open) >= self.limit and not self._make_room():
                self.refused += 1
                self._warn.warning(
                    "client connection refused: all %d places (the client connection limit) are busy",
                    self.limit,
                )
                # Nothing is read from it (close() makes aiohttp drop whatever arrives) and nothing written:
                # a plain close, and the client may retry. The transport closes on the next loop pass,
                # after aiohttp has set the connection up; closed right here, the handler's task would
                # find its connection already torn down.
                handler.close()
                asyncio.get_running_loop().call_soon(handler.force_close)
                return
            self._open[handler] = transport

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self._open.pop(handler, None)
            self._heads.pop(handler, None)
            self._stalled.pop(handler, None)
            lost(handler, exc)
            if self.on_leave is not None:
                self.on_leave(handler)
            if not self._open and self._all_closed is not None:
                self._all_closed.set()

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        from proxy import aiohttp_internals  # serving processes only (the module's imports)

        aiohttp_internals.on_malformed_request(server, self._malformed)
        server.edge_proxy_clients = self  # type: ignore[attr-defined]  # read by _bounding_heads
        aiohttp_internals.wrap_data_received(_bounding_heads)

    def _receive(self, handler: RequestHandler, data: bytes, receive: Receive, head: _Head) -> None:
        """Pass `data` on to aiohttp unless it takes the head being received past MAX_HEAD_BYTES: then 431
        and close, unparsed. Bytes of a body are not counted."""
        if handler._close or handler._force_close:
            return  # refused already (aiohttp reads nothing more from a connection closing)
        before = head.tail if head.body is None else b""
        if head.body is None or head.body.is_eof():
            size = head.size + len(data)
            if size > MAX_HEAD_BYTES:
                end = (head.tail + data).find(_HEAD_END)
                if end < 0 or head.size - len(head.tail) + end + len(_HEAD_END) > MAX_HEAD_BYTES:
                    self._refuse_head(handler)
                    return
            head.size, head.tail = size, (head.tail + data)[-3:]
        receive(handler, data)
        if handler._request_count != head.requests:
            # A head was parsed: the next one is counted afresh, past the body of the last, from the bytes of
            # this chunk after the last head's end when that had no body (pipelined requests).
            messages = handler._messages
            parsed = handler._request_count - head.requests
            # Unmeasured: the heads after the first in one read, and every head aiohttp parsed from its own
            # buffer (data b"": it keeps what follows 32 queued requests unparsed, then reparses it).
            unmeasured = parsed if not data else parsed - 1
            if (
                unmeasured
                and (len(data) > MAX_HEAD_BYTES or not data)
                and _over_the_bound(list(messages)[-unmeasured:])
            ):
                self._close_over_bound(handler)
                return
            body = messages[-1][1] if messages else None
            if body is not None and not body.is_eof():
                head.size, head.tail, head.requests, head.body = 0, b"", handler._request_count, body
            elif (rest := _after_last_head(before, data)) and (body is None or body is _empty_payload()):
                self._heads[handler] = _Head(handler._request_count, len(rest), rest[-3:])
            else:
                self._heads.pop(handler, None)

    def _close_over_bound(self, handler: RequestHandler) -> None:
        """A head aiohttp has parsed already is past the bound: pipelined whole within one read (at most
        uvloop's 256 KiB) behind another, or reparsed from aiohttp's own buffer. The connection closes, the
        requests before it cut: no 431 can be written in its place without answering for them."""
        self.heads_too_large += 1
        self._warn.warning("request head over %d bytes: connection closed", MAX_HEAD_BYTES)
        handler.force_close()

    def _refuse_head(self, handler: RequestHandler) -> None:
        self.heads_too_large += 1
        self._warn.warning("request head over %d bytes: answered 431, connection closed", MAX_HEAD_BYTES)
        if handler._request_count and not _idle(handler):
            # An earlier request on the connection (pipelined) is still being answered: a 431 written now
            # would reach its client as that request's answer. Its answer goes out, then the connection
            # closes, the oversized request unanswered (a client may send it again, elsewhere). Not when no
            # request was ever parsed here: a handler whose task has not run yet (the first read met in the
            # loop pass after the accept) is not idle either, and close() then left it waiting for a request
            # until the keep-alive timeout, unanswered.
            handler.close()
            return
        transport = handler.transport
        if transport is not None:
            from aiohttp import web_response

            server = web_response.SERVER_SOFTWARE  # type: ignore[attr-defined]  # set_server_header's
            transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n"
                b"Server: " + server.encode("latin-1", "replace") + b"\r\n\r\n"
            )
        handler.force_close()

    def _malformed(self) -> None:
        self.malformed += 1

    def sweep(self, now: float, handlers: Iterable[RequestHandler] | None = None) -> None:
        """Abort the connections whose client has taken none of an answer's bytes for send_timeout.

        aiohttp has no send deadline: a whole answer waits in its drain, and a connection closed with bytes
        unsent (its keep-alive timeout, a drain) waits for the client to take them, for as long as the client
        keeps the connection open without reading (the kernel probes a zero window for ever). Each holds a
        descriptor, a place under the cap, and the answer's buffered bytes: a few such clients asking for a
        large payload locked every newcomer out. nginx's send_timeout (60 s) is the same rule. Progress is
        any change in the bytes unsent since the last look: more can be a client that read its last answer
        and asked again, whose progress a look cannot see (the buffer emptied in between). A client that asks
        and never reads queues answers until the transport passes its high-water mark (64 KiB); its handler
        then waits, nothing more is queued, and the timeout applies. Streamed relays, which refill their
        buffer, are left to the relay's own bound. A reader slower than the kernel hands bytes back (a few
        hundred bytes a second at 60 s) is taken for a stalled one, as by nginx.
        """
        stalled = self._stalled
        for handler in self._open if handlers is None else handlers:
            transport = self._open.get(handler)
            if transport is None:
                continue  # gone since the sweep began
            size = transport.get_write_buffer_size()
            if size == 0 or handler in self.relaying:
                stalled.pop(handler, None)
                continue
            seen = stalled.get(handler)
            if seen is None or size != seen[0]:
                stalled[handler] = (size, now)
            elif now - seen[1] >= self.send_timeout:
                del stalled[handler]
                self.send_timeouts += 1
                self._warn.warning(
                    "client connection aborted: its client took none of %d bytes for %gs",
                    size,
                    self.send_timeout,
                )
                transport.abort()

    async def run_sweeper(self) -> None:
        """Sweep four times per send_timeout, for as long as the server runs; SWEEP_CHUNK connections at a
        time, the loop serving in between (100,000 connections took ~0.1-0.2 s in one go)."""
        while True:
            await asyncio.sleep(self.send_timeout / 4)
            handlers = list(self._open)
            now = time.monotonic()
            for start in range(0, len(handlers), SWEEP_CHUNK):
                try:
                    self.sweep(now, handlers[start : start + SWEEP_CHUNK])
                except Exception as exc:  # a bug must not end send timeouts for the process's life
                    # Its type and place, not its message (as every background loop logs).
                    log.error(  # noqa: TRY400
                        "client send-timeout sweep failed: %s at %s", type(exc).__name__, where(exc)
                    )
                await asyncio.sleep(0)

    def _make_room(self) -> bool:
        """Close the oldest idle connection among the first IDLE_SCAN; whether one was. Busy ones seen go to
        the back."""
        busy = []
        closed = False
        for handler in islice(self._open, IDLE_SCAN):
            if _idle(handler):
                del self._open[handler]
                self.closed_idle += 1
                handler.force_close()
                closed = True
                break
            busy.append(handler)
        for handler in busy:
            self._open[handler] = self._open.pop(handler)
        return closed


def _bounding_heads(receive: Receive) -> Receive:
    """RequestHandler.data_received, bounding request heads on the servers a ClientConnections admits on."""
    empty = _empty_payload()

    def data_received(handler: RequestHandler, data: bytes) -> None:
        # None on other servers (a worker's metrics port), and once the connection is lost.
        clients: ClientConnections | None = getattr(handler._manager, "edge_proxy_clients", None)
        if clients is None:
            receive(handler, data)
            return
        heads = clients._heads
        head = heads.get(handler)
        if head is not None or len(data) > MAX_HEAD_BYTES:
            if head is None:
                head = heads[handler] = _Head(handler._request_count)
            clients._receive(handler, data, receive, head)
            return
        # The usual chunk: no head begun before it, and it cannot pass the bound alone. Remembered only if it
        # leaves a head unfinished or a body to read.
        requests = handler._request_count
        receive(handler, data)
        if not data and handler._request_count != requests:
            # aiohttp reparsing what it held behind 32 queued requests (its resume): heads never measured.
            parsed = handler._request_count - requests
            if _over_the_bound(list(handler._messages)[-parsed:]):
                clients._close_over_bound(handler)
                return
        if handler._request_count == requests:
            heads[handler] = _Head(requests, len(data), data[-3:])
        elif (messages := handler._messages) and (body := messages[-1][1]) is not empty:
            if not body.is_eof():
                heads[handler] = _Head(handler._request_count, body=body)
        elif not data.endswith(_HEAD_END) and (rest := _after_last_head(b"", data)):
            # Pipelined: the next head began in this chunk, after the last one parsed (the usual chunk ends
            # with its head: one C call).
            heads[handler] = _Head(handler._request_count, len(rest), rest[-3:])

    return data_received


def _over_the_bound(messages: list[tuple[Any, Any]]) -> bool:
    """Whether the head of any of aiohttp's parsed `messages` took more than MAX_HEAD_BYTES (as sent, give or
    take the spaces around each header's colon)."""
    return any(
        len(message.method)
        + len(message.path)
        + 13
        + sum(len(n) + len(v) + 4 for n, v in message.raw_headers)
        > MAX_HEAD_BYTES
        for message, _ in messages
        if hasattr(message, "raw_headers")  # not aiohttp's _ErrInfo for one it could not parse
    )


def _after_last_head(tail: bytes, data: bytes) -> bytes:
    """The bytes of `data` after the last head end in `tail + data` (`tail`: the 3 bytes before `data`)."""
    end = (tail + data).rfind(_HEAD_END)
    return data[max(0, end + len(_HEAD_END) - len(tail)) :] if end >= 0 else b""


def _empty_payload() -> object:
    from aiohttp.streams import EMPTY_PAYLOAD  # serving processes only (the module's imports)

    return EMPTY_PAYLOAD


@dataclass(slots=True)
class _Head:
    """A connection's request head being received (ClientConnections._receive)."""

    requests: int  # aiohttp's count of requests parsed on the connection when this head began
    size: int = 0
    tail: bytes = b""
    body: StreamReader | None = None  # the last request's body: while it is read, chunks are its bytes


def _idle(handler: RequestHandler) -> bool:
    """Whether closing `handler` loses nothing: it waits for the next request, all of its last answer sent.

    aiohttp's own idle test (its keep-alive timer's): the handler waits for the next request and none is
    queued. Not "no request in progress": a request taken off the queue is not in progress until its task
    first runs, and closing then would run it and send the answer nowhere. Nor a handler that has not
    started, or one reading the rest of a body after an early answer. And the transport has sent everything:
    closed with bytes still to send, a socket stays open until a reader that stopped reading takes them (for
    ever), uncounted. A client partway through sending a request head counts as idle, as for aiohttp's
    keep-alive timeout: nothing of that request has been handled. (Read only at the limit, never per request.)
    """
    waiter = handler._waiter
    if waiter is None or waiter.done() or handler._messages:
        return False
    transport = handler.transport
    return transport is None or transport.get_write_buffer_size() == 0
