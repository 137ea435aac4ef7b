"""The client connections a server admits: up to the cap client_cap.py derives, idle ones making room.

Every client connection is a file descriptor, and so is every connection the proxy opens itself: the cap
(client_cap.py) leaves room for the upstream pool and Redis. At the cap the oldest idle client connection
makes room for the new one (as nginx reuses idle keep-alive connections when `worker_connections` run out);
only when they are all busy is the new one closed at once, counted and logged (throttled), as Envoy's
`global_downstream_max_connections` does. Also here: the drain, the send-timeout sweep, and the hook that
tells the upstream pool a client left (on_leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from itertools import islice

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy import aiohttp_internals
from proxy.aiohttp_internals import idle
from proxy.head_bound import HeadBound
from proxy.logs import Throttled, where

log = logging.getLogger(__name__)

# At the limit, how many connections are looked at for an idle one to close: bounded, so a server whose
# every connection is busy does not walk them all for each new one. Those found busy go to the back, so the
# next look sees others (64 slow clients cannot hide the idle ones behind them).
IDLE_SCAN = 64
# Connections looked at per step of the send-timeout sweep, the event loop serving between steps.
SWEEP_CHUNK = 2048

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
        self.heads = HeadBound()
        # Told of each connection that closes (the upstream pool's client_left: its exchange ends).
        self.on_leave: Callable[[RequestHandler], None] | None = None

    @property
    def open(self) -> int:
        """Client connections open now."""
        return len(self._open)

    def busy(self) -> int:
        """Connections open with a request in progress or an answer not yet all sent (see `idle`)."""
        return sum(1 for handler in self._open if not idle(handler))

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
            for handler in [h for h in self._open if idle(h)]:
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
            self.heads.forget(handler)
            self._stalled.pop(handler, None)
            lost(handler, exc)
            if self.on_leave is not None:
                self.on_leave(handler)
            if not self._open and self._all_closed is not None:
                self._all_closed.set()

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        aiohttp_internals.on_malformed_request(server, self._malformed)
        self.heads.install(server)

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
            if idle(handler):
                del self._open[handler]
                self.closed_idle += 1
                handler.force_close()
                closed = True
                break
            busy.append(handler)
        for handler in busy:
            self._open[handler] = self._open.pop(handler)
        return closed
