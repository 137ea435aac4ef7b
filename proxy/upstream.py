"""The upstream client: HTTP/1.1 over a bounded pool of keep-alive connections, responses parsed by llhttp.

The forwarder needs one thing from a client: send these request bytes, hand back the status, the headers
and the body as it arrives. aiohttp's ClientSession does much more per request (a URL, a request and a
response object, a StreamReader, cookie, redirect, trace and timeout machinery); this pool costs a third
of its CPU per request on the same exchanges (`python bench/client_cost.py`). One exchange on one
connection, and the parsing of its answer, is proxy/upstream_conn.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass

from proxy.upstream_conn import NOT_WRITTEN, Connection, Response, UpstreamError

__all__ = ["Connection", "Limits", "Pool", "Response", "UpstreamError"]

# Name resolutions are reused this long (aiohttp's default DNS cache TTL); IP literals are never resolved.
RESOLVE_TTL_SECONDS = 10.0
# At max_pending_requests, how often at most the waiters are walked for requests whose client left.
ABANDONED_SWEEP_SECONDS = 0.1
# A reused connection that fails before any byte of its answer was probably closed by the upstream while
# idle (a keep-alive race): requests that can be sent again are, once, on a new connection.
RETRIED_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True, slots=True)
class Limits:
    """How the pool connects, waits and bounds what it reads (defaults: upstream settings' defaults)."""

    max_connections: int = 256
    keepalive_timeout: float = 15.0
    connect_timeout: float = 2.0
    # Longest silence while waiting for the answer's next bytes.
    read_timeout: float = 30.0
    # Requests waiting for a connection at most; one more is refused at once (UpstreamError "pool_full").
    max_pending: int = 1024
    # Per header name or value, and the reason phrase; and the number of header fields.
    max_field_bytes: int = 16384
    max_headers: int = 128


class Pool:
    """Connections to one upstream (host, port, TLS or not), at most `limits.max_connections` at a time.

    `send` takes a connection (an idle one, or a new one while under the limit, else waits for one at
    most `limits.read_timeout`, then raises UpstreamError "pool_timeout"), writes the request and returns
    once the answer's head has arrived. The caller reads the body from the `Response` and must `release()`
    it; only a connection whose answer was read to its end and that may be kept alive goes back to the pool.
    """

    def __init__(self, host: str, port: int, *, tls: bool, limits: Limits) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl.create_default_context() if tls else None
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        self._idle: deque[Connection] = deque()
        self._count = 0  # open connections, idle or in use
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        # Each waiter's `wanted` (its client still there?): at max_pending, those whose client left give way.
        self._wanted: dict[asyncio.Future[Connection | None], Callable[[], bool]] = {}
        self._pending = 0  # waiters not done yet (counted as they end, not by walking them at each request)
        self._swept_at = -ABANDONED_SWEEP_SECONDS  # when the waiters whose client left were last looked for
        self._expiry: asyncio.TimerHandle | None = None
        self._addresses: list[tuple[str, int]] = []
        self._addresses_until = 0.0
        self._closed = False
        # The connection each client's request is on, by client: its leaving ends the exchange (client_left).
        self._by_client: dict[Hashable, Connection] = {}
        # For metrics: connections opened, and requests sent again after a reused connection failed.
        self.opened = 0
        self.retried = 0

    async def send(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        head_only: bool = False,
        chunked: bool = False,
        wanted: Callable[[], bool] | None = None,
        client: Hashable | None = None,
    ) -> Response:
        """Send `head` (request line and headers, blank line included) and `body`; the answer once its head
        is in. `head_only`: the request was HEAD (its answer has no body whatever it declares). `chunked`:
        frame a streamed body in chunks (the head says Transfer-Encoding: chunked). `client`: whose request
        it is, for client_left, until the answer is released.

        A streamed body is written by a task of its own, so an upstream that answers before reading it
        all (a 413, say) is heard; whatever the body's iterator raises is raised here when it comes first.
        """
        streamed = body is not None and type(body) is not bytes
        retry = True  # once, and only for a method that may be sent again (decided on a failure, below)
        fresh = False
        while True:
            # An idle connection without a coroutine (the usual case); else _acquire connects or waits.
            conn = None if fresh else self._idle_connection()
            if conn is not None:
                reused = True
            else:
                conn, reused = await self._acquire(fresh, wanted)
            if client is not None:
                conn.client = client
                self._by_client[client] = conn
            if wanted is not None and not wanted():
                # Its client left before a byte was written (while the handler awaited Redis, a flood's leader
                # or a connect): client_left has come and gone, and the exchange would run to its end.
                self.release(conn)
                raise UpstreamError("abandoned", "the client left before the request was sent")
            try:
                if streamed:
                    return await conn.exchange_streamed(head, body, head_only, chunked)  # type: ignore[arg-type]
                await conn.exchange(head + body if body else head, head_only)  # type: ignore[operator]
                return conn.answer()
            except UpstreamError as exc:
                self.release(conn)
                if not (
                    retry
                    and (
                        exc.reason is NOT_WRITTEN  # nothing sent, nothing of a streamed body read: any method
                        or (
                            reused
                            and exc.kind == "disconnected"
                            and not conn.answered
                            and not streamed
                            and head[: head.find(b" ")] in RETRIED_METHODS
                        )
                    )
                ):
                    raise
                retry = False
                fresh = True  # once more on a new connection: the next idle one may have been closed too
                self.retried += 1
            except BaseException:
                self.release(conn)
                raise

    def _idle_connection(self) -> Connection | None:
        """The most recently used idle connection still usable (the least likely to have been closed
        meanwhile); those past the keep-alive timeout, or closed, are dropped on the way."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable(self._loop.time() - self.limits.keepalive_timeout):
                return conn
            self._discard(conn)
        return None

    async def _acquire(
        self, fresh: bool = False, wanted: Callable[[], bool] | None = None
    ) -> tuple[Connection, bool]:
        """A connection and whether it was reused; `fresh`: a new one, whatever is idle. After waiting for
        one, `wanted()` says whether the request is still worth sending (its client is still there)."""
        idle = self._idle
        if not fresh and (conn := self._idle_connection()) is not None:
            return conn, True
        if fresh and idle and self._count >= self.limits.max_connections:
            self._discard(idle.popleft())  # the longest idle gives its place to the new connection
        if self._count >= self.limits.max_connections:
            if self._pending >= self.limits.max_pending and not self._drop_abandoned():
                raise UpstreamError("pool_full", "too many requests waiting for an upstream connection")
            waiter: asyncio.Future[Connection | None] = self._loop.create_future()
            self._waiters.append(waiter)
            self._pending += 1
            if wanted is not None:
                self._wanted[waiter] = wanted
            waiter.add_done_callback(self._waited)
            try:
                # Bounded: behind a backend too slow to free a connection, waiting longer than an answer may
                # take only piles requests up (their clients long gone): 504 instead.
                async with asyncio.timeout(self.limits.read_timeout):
                    try:
                        handed = await waiter
                    except asyncio.CancelledError:
                        if waiter.done() and not waiter.cancelled():
                            # Handed a slot or a connection just as this request was cancelled: pass it on.
                            self._pass_on(waiter.result())
                        else:
                            with contextlib.suppress(ValueError):  # already popped and skipped as done
                                self._waiters.remove(waiter)
                        raise
            except TimeoutError:
                raise UpstreamError("pool_timeout", "no upstream connection came free in time") from None
            if wanted is not None and not wanted():
                # Its client left while it waited: not sent, the connection (or slot) goes to the next.
                self._pass_on(handed)
                raise UpstreamError("abandoned", "the client left while the request waited")
            if handed is not None:
                if handed.alive():
                    return handed, True
                # Closed after it was handed over and before this request ran (the upstream ended the idle
                # connection in the same loop pass that freed it): nothing was written on it, so any request
                # goes on a new connection, in the place the dead one held.
                handed.close()
        else:
            self._count += 1  # reserved before the connect, so concurrent connects respect the limit
        try:
            return await self._connect(), False
        except BaseException:
            self._count -= 1
            self._wake_one()
            raise

    async def _connect(self) -> Connection:
        if self._closed:
            raise UpstreamError("refused", "pool closed")
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                addresses = await self._resolve()
                failure: OSError | None = None
                for address, port in addresses:
                    try:
                        _, conn = await self._loop.create_connection(
                            lambda: Connection(self),
                            address,
                            port,
                            ssl=self._ssl,
                            server_hostname=self._host if self._ssl is not None else None,
                        )
                    except OSError as exc:  # refused, unreachable, TLS failure: try the next address
                        failure = exc
                    else:
                        self.opened += 1
                        return conn
                raise UpstreamError("refused", type(failure).__name__)
        except TimeoutError:
            raise UpstreamError("timeout", "connect") from None
        except OSError as exc:  # resolution failed
            raise UpstreamError("refused", type(exc).__name__) from None

    async def _resolve(self) -> list[tuple[str, int]]:
        now = self._loop.time()
        if now < self._addresses_until:
            return self._addresses
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self._host else socket.AF_INET, self._host)
        except OSError:
            infos = await self._loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            self._addresses = list(dict.fromkeys((str(info[4][0]), self._port) for info in infos))
            self._addresses_until = now + RESOLVE_TTL_SECONDS
        else:
            self._addresses = [(self._host, self._port)]
            self._addresses_until = float("inf")
        return self._addresses

    def connections(self) -> dict[str, int]:
        """Open connections by state, for metrics: idle in the pool, or busy with a request."""
        idle = len(self._idle)
        return {"idle": idle, "busy": self._count - idle}

    def _waited(self, waiter: asyncio.Future[Connection | None]) -> None:
        self._pending -= 1
        self._wanted.pop(waiter, None)

    def _drop_abandoned(self) -> bool:
        """End the waits of requests whose client left (aiohttp does not cancel their handlers), so they hold
        no place under max_pending; whether any was ended. A walk of every waiter, so at most one per
        ABANDONED_SWEEP_SECONDS: at the limit each refused request walked 1,024 (88 against 34 µs a refusal,
        a reviewer's), in a flood behind a stalled backend, when the loop can least spare it."""
        now = self._loop.time()
        if now - self._swept_at < ABANDONED_SWEEP_SECONDS:
            return False
        self._swept_at = now
        gone = [waiter for waiter, wanted in self._wanted.items() if not waiter.done() and not wanted()]
        for waiter in gone:
            waiter.set_exception(UpstreamError("abandoned", "the client left while the request waited"))
            self._counted_out(waiter)
        return bool(gone)

    def _counted_out(self, waiter: asyncio.Future[Connection | None]) -> None:
        """`waiter` was just ended here: its place under max_pending is free now, not after its done callback
        (one loop pass later: a request in between was refused pool_full with no one waiting)."""
        if waiter.remove_done_callback(self._waited):
            self._waited(waiter)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (the pool is at max_connections)."""
        # list() first, in one C call: the OTLP export thread reads this while the loop changes the deque.
        return sum(not waiter.done() for waiter in list(self._waiters))

    def client_left(self, client: Hashable) -> None:
        """`client` left (its connection closed): its request's exchange, if one is under way, ends now.

        Waiting for the answer of a client that has gone held a pooled connection, and a backend worker, for
        as long as the backend took (up to the read timeout), as nginx does not (proxy_ignore_client_abort
        off): aiohttp does not cancel the handler of a client that left."""
        conn = self._by_client.pop(client, None)
        if conn is not None:
            conn.client = None
            conn.abandon()

    def release(self, conn: Connection) -> None:
        """Give `conn` back: to a waiter or the idle set if it can carry another request, else close."""
        if conn.client is not None:
            del self._by_client[conn.client]
            conn.client = None
        if not conn.reusable() or self._closed:
            self._discard(conn)
            return
        waiter = self._next_waiter() if self._waiters else None  # none waiting, usually: no call
        if waiter is not None:
            waiter.set_result(conn)
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._expiry is None:
            self._expiry = self._loop.call_later(self.limits.keepalive_timeout, self._expire)

    def _pass_on(self, handed: Connection | None) -> None:
        """Give back what a waiter was handed and will not use: a connection, or (None) a slot."""
        if handed is not None:
            self.release(handed)
        else:
            self._count -= 1
            self._wake_one()

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """A slot came free: the first live waiter may open a connection in it."""
        waiter = self._next_waiter()
        if waiter is not None:
            self._count += 1
            waiter.set_result(None)

    def _next_waiter(self) -> asyncio.Future[Connection | None] | None:
        """The longest-waiting request still waiting (cancelled ones are dropped on the way)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._counted_out(waiter)  # resolved by the caller, now
                return waiter
        return None

    def _expire(self) -> None:
        """Close connections idle longer than the keep-alive timeout; come back for the rest."""
        self._expiry = None
        deadline = self._loop.time() - self.limits.keepalive_timeout
        keep: deque[Connection] = deque()
        for conn in self._idle:
            if conn.usable(deadline):
                keep.append(conn)
            else:
                self._discard(conn)
        self._idle = keep
        if keep:
            delay = keep[0].idle_since + self.limits.keepalive_timeout - self._loop.time()
            self._expiry = self._loop.call_later(max(delay, 0.01), self._expire)

    def close(self) -> None:
        """Close idle connections; those in use close when released."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._idle:
            self._discard(self._idle.pop())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("refused", "pool closed"))
        self._waiters.clear()
