"""Request heads bounded as a whole (aiohttp bounds only each line and their number): 431 and close.

aiohttp offers no hook for it: RequestHandler.data_received is wrapped once per process
(aiohttp_internals.wrap_data_received) and finds the HeadBound of the connection's server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader, web, web_response
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from proxy import aiohttp_internals
from proxy.aiohttp_internals import Receive, idle
from proxy.logs import Throttled

log = logging.getLogger(__name__)

# The most a request head may take as a whole (request line and headers). aiohttp bounds each line (16 KiB
# here) and their number (128), so 2 MiB passed and held ~7 MiB per request in flight (a reviewer's 64
# connections took a process from 67 to 511 MiB, and it never gave the memory back): far outside
# client_cap.CONNECTION_BYTES, and a 256 MiB pod was killed by ~30 such clients. Envoy's default is
# 60 KiB, an AWS ALB's 64 KiB, nginx's 4 x 8 KiB.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_END = b"\r\n\r\n"


class HeadBound:
    """The heads being received on one server's connections, and those refused."""

    def __init__(self) -> None:
        # Per connection receiving a head: its bytes so far, their last 3 (a head's end can span two chunks),
        # aiohttp's count of requests parsed, and the body of the last one (its bytes are no head's).
        self.heads: dict[RequestHandler, _Head] = {}
        self.too_large = 0  # connections answered 431 and closed: a head over MAX_HEAD_BYTES
        self._warn = Throttled(log)

    def install(self, server: web.Server) -> None:
        """Bound the heads of `server`'s connections."""
        server.edge_proxy_heads = self  # type: ignore[attr-defined]  # read by _bounding_heads
        aiohttp_internals.wrap_data_received(_bounding_heads)

    def forget(self, handler: RequestHandler) -> None:
        """The connection closed."""
        self.heads.pop(handler, None)

    def receive(self, handler: RequestHandler, data: bytes, receive: Receive, head: _Head) -> None:
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
                    self._refuse(handler)
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
                self.close_over_bound(handler)
                return
            body = messages[-1][1] if messages else None
            if body is not None and not body.is_eof():
                head.size, head.tail, head.requests, head.body = 0, b"", handler._request_count, body
            elif (rest := _after_last_head(before, data)) and (body is None or body is _empty_payload()):
                self.heads[handler] = _Head(handler._request_count, len(rest), rest[-3:])
            else:
                self.heads.pop(handler, None)

    def close_over_bound(self, handler: RequestHandler) -> None:
        """A head aiohttp has parsed already is past the bound: pipelined whole within one read (at most
        uvloop's 256 KiB) behind another, or reparsed from aiohttp's own buffer. The connection closes, the
        requests before it cut: no 431 can be written in its place without answering for them."""
        self.too_large += 1
        self._warn.warning("request head over %d bytes: connection closed", MAX_HEAD_BYTES)
        handler.force_close()

    def _refuse(self, handler: RequestHandler) -> None:
        self.too_large += 1
        self._warn.warning("request head over %d bytes: answered 431, connection closed", MAX_HEAD_BYTES)
        if handler._request_count and not idle(handler):
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
            server = web_response.SERVER_SOFTWARE  # type: ignore[attr-defined]  # set_server_header's
            transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n"
                b"Server: " + server.encode("latin-1", "replace") + b"\r\n\r\n"
            )
        handler.force_close()


def _bounding_heads(receive: Receive) -> Receive:
    """RequestHandler.data_received, bounding request heads on the servers a HeadBound is installed on."""
    empty = _empty_payload()

    def data_received(handler: RequestHandler, data: bytes) -> None:
        # None on other servers (a worker's metrics port), and once the connection is lost.
        bound: HeadBound | None = getattr(handler._manager, "edge_proxy_heads", None)
        if bound is None:
            receive(handler, data)
            return
        heads = bound.heads
        head = heads.get(handler)
        if head is not None or len(data) > MAX_HEAD_BYTES:
            if head is None:
                head = heads[handler] = _Head(handler._request_count)
            bound.receive(handler, data, receive, head)
            return
        # The usual chunk: no head begun before it, and it cannot pass the bound alone. Remembered only if it
        # leaves a head unfinished or a body to read.
        requests = handler._request_count
        receive(handler, data)
        if not data and handler._request_count != requests:
            # aiohttp reparsing what it held behind 32 queued requests (its resume): heads never measured.
            parsed = handler._request_count - requests
            if _over_the_bound(list(handler._messages)[-parsed:]):
                bound.close_over_bound(handler)
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
    return EMPTY_PAYLOAD


@dataclass(slots=True)
class _Head:
    """A connection's request head being received (HeadBound.receive)."""

    requests: int  # aiohttp's count of requests parsed on the connection when this head began
    size: int = 0
    tail: bytes = b""
    body: StreamReader | None = None  # the last request's body: while it is read, chunks are its bytes
