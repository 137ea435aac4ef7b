"""One upstream connection: an HTTP/1.1 exchange at a time, its answer parsed by llhttp.

Responses are parsed by httptools (llhttp, the parser of Node.js and of aiohttp's own C parser) in its strict
mode; what llhttp leaves to its caller is done here: a response to HEAD has no body, a response without
Content-Length or chunked framing ends at EOF, 1xx answers are skipped, and the head is bounded in size.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Hashable
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from proxy.upstream import Pool

# Reading pauses while this much of an answer waits for a slower client (aiohttp's client reads 256 KiB).
READ_HIGH_WATER = 256 * 1024
# What a reason phrase may not hold: controls other than HTAB (RFC 9112 §4).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The usual reason phrases, which hold none (a set lookup instead of the regex's search, per answer).
_PLAIN_REASONS = frozenset(
    {b"", b"OK", b"Created", b"Accepted", b"No Content", b"Moved Permanently", b"Found", b"See Other"}
    | {b"Not Modified", b"Temporary Redirect", b"Permanent Redirect", b"Bad Request", b"Unauthorized"}
    | {b"Forbidden", b"Not Found", b"Method Not Allowed", b"Too Many Requests", b"Internal Server Error"}
    | {b"Bad Gateway", b"Service Unavailable", b"Gateway Timeout"}
)
_NO_TOKENS: frozenset[str] = frozenset()
# RFC 9110 §7.6.1: connection-specific fields never cross a proxy; fields named in Connection join them.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_HOP_BY_HOP_NAMES = frozenset(name.encode() for name in HOP_BY_HOP)
# What on_headers_complete does with a header, by its lower-cased name: read the length, or note a hop-by-hop
# one (Connection and Transfer-Encoding read too); any other name is end to end and passes as it is.
_CONTENT_LENGTH, _HOP_BY_HOP, _CONNECTION, _TRANSFER_ENCODING = range(4)
_KINDS = {
    **dict.fromkeys(_HOP_BY_HOP_NAMES, _HOP_BY_HOP),
    b"content-length": _CONTENT_LENGTH,
    b"connection": _CONNECTION,
    b"transfer-encoding": _TRANSFER_ENCODING,
}
# Header names as received -> (decoded, kind or None): names repeat from one answer to the next, so each is
# decoded and classified once (a dict lookup instead of a decode, a lower() and up to four comparisons per
# header). Bounded: past the cap, and for names longer than _NAME_BYTES_CACHED, decoded every time.
_NAMES: dict[bytes, tuple[str, int | None]] = {}
_NAMES_CAP = 512
_NAME_BYTES_CACHED = 64
# A Connection header's value as received -> its lower-cased tokens: one value per backend, usually
# ("keep-alive" from gunicorn's gthread workers, "close" from its sync ones), split once rather than per
# answer (a set comprehension and a union: ~3,200 instructions a gunicorn answer, callgrind). Bounded alike.
_TOKENS: dict[bytes, frozenset[str]] = {}
_TOKENS_CAP = 64


# Why a request was refused before any byte of it was written: safe to send on another connection, whatever
# its method (a POST got a 502 when the upstream closed an idle connection in the loop pass it was taken).
NOT_WRITTEN = "connection closed before the request was written"


class UpstreamError(Exception):
    """The upstream failed this exchange. `kind` is the metrics label: refused, timeout, pool_timeout (no
    connection came free in time), pool_full (too many requests waiting for one), disconnected or malformed;
    or abandoned, which is no failure of the upstream's (the client left while the request waited for a
    connection, and it was not sent). The message never carries request data."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class Response:
    """An answer whose head has arrived. Headers are decoded as aiohttp decodes them (UTF-8, undecodable
    bytes kept as surrogates) in the order received, repeats included."""

    __slots__ = (
        "_conn",
        "connection_tokens",
        "content_length",
        "headers",
        "hop_at",
        "hop_by_hop",
        "non_utf8",
        "reason",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
        connection_tokens: frozenset[str],
        non_utf8: bool = False,
        hop_by_hop: bool = True,
        hop_at: list[int] | None = None,
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        # The lower-cased names listed in Connection: hop-by-hop for this answer.
        self.connection_tokens = connection_tokens
        # Whether the reason or a header value holds bytes that are not UTF-8 (surrogates here), such as the
        # latin-1 values a WSGI server writes: encoding them back needs `surrogateescape`.
        self.non_utf8 = non_utf8
        # Whether any header is hop by hop (HOP_BY_HOP, Connection included): without one, and so with no
        # Connection tokens, every header is end to end (the usual answer: nothing to filter out).
        self.hop_by_hop = hop_by_hop
        # Where those are in `headers`, when known (the parse notes each as it classifies it): what
        # forward_headers.end_to_end leaves out when Connection names no other header.
        self.hop_at = hop_at

    def body_if_complete(self) -> bytes | None:
        """The whole body if all of it has arrived (it often comes with the head), else None: no await."""
        conn = self._conn
        if not conn._complete:
            return None
        body = conn._body  # take_body(), inline: one call less per answer
        conn._body = []
        return body[0] if len(body) == 1 else b"".join(body)

    def read(self) -> Awaitable[bytes]:
        """The whole body (awaitable; not a coroutine itself: one frame less per answer)."""
        return self._conn.whole_body()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what has arrived since the last chunk, joined (never empty)."""
        conn = self._conn
        while True:
            data = await conn.body_data()
            if not data:
                return
            yield data

    def release(self) -> None:
        """Back to the pool (kept for reuse only if the body was read to its end). Call once."""
        conn = self._conn
        # The connection refers to its last answer until its next exchange: without this reference back,
        # a connection closed after one exchange is freed at once rather than left to the cycle collector
        # (a backend that closes every connection made that ~8 % of the proxy's CPU in gc).
        del self._conn
        conn._pool.release(conn)


class Connection(asyncio.Protocol):
    """One connection to the upstream, carrying one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._limits = pool.limits
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._lost = False
        self._broken = False  # not to be reused: an exchange ended early, or the upstream misbehaved
        self.idle_since = 0.0
        self.answered = False  # some byte of the current exchange's answer arrived
        self.client: Hashable | None = None  # whose request the exchange carries (Pool.client_left)
        # The current exchange.
        self._active = False
        self._head_only = False
        self._head_bytes = 0
        self._informational = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._response: Response | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        # As after a clean exchange: a new connection given back unused (its client left before the request
        # was written) is kept, not closed, its connect (and TLS handshake) not wasted.
        self._complete = True
        self._keep_alive = True
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._upload: asyncio.Task[None] | None = None

    # Pool side

    def usable(self, idle_deadline: float) -> bool:
        """Idle, open, and idle since after `idle_deadline`."""
        return not self._lost and not self._broken and self.idle_since > idle_deadline

    def alive(self) -> bool:
        """Open, as far as this side knows (neither lost, broken nor closing)."""
        return (
            not self._lost
            and not self._broken
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def reusable(self) -> bool:
        """The exchange ended cleanly and both sides allow another request on this connection."""
        return (
            self._complete
            and self._keep_alive
            and not self._lost
            and not self._broken
            and (self._upload is None or (self._upload.done() and not self._upload.cancelled()))
        )

    def close(self) -> None:
        """Close now (an unfinished exchange is abandoned)."""
        self._active = False
        self._cancel_timer()
        if self._upload is not None and not self._upload.done():
            self._upload.cancel()
        if self._transport is not None:
            self._transport.close()

    def abandon(self) -> None:
        """The client left: end an unfinished exchange now (the connection is not reused), "abandoned"."""
        if self._active:
            self._fail(UpstreamError("abandoned", "the client left while the upstream answered"))

    # Exchange side

    def exchange(self, data: bytes, head_only: bool) -> asyncio.Future[None]:
        """Write a whole request; the future is done when the answer's head is in or the exchange failed, and
        `answer()` then tells which.

        A future rather than a coroutine waiting for the head: that coroutine and its `_wait()` were two
        coroutines a forward, ~1 % of its instructions (`bench/callgrind.py --scenario forward`).
        """
        self._begin(head_only)
        assert self._transport is not None
        self._transport.write(data)
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def answer(self) -> Response:
        """The answer whose head `exchange` waited for, or the exchange's failure raised."""
        self._waiter = None
        if self._error is not None:
            raise self._error
        # Every wake-up comes with the head (on_headers_complete, _finish) or an error (_fail).
        assert self._response is not None
        return self._response

    async def exchange_streamed(
        self, head: bytes, body: AsyncIterator[bytes], head_only: bool, chunked: bool
    ) -> Response:
        """Write the head, stream the body from a task, and wait for the answer's head or a body failure."""
        self._begin(head_only)
        assert self._transport is not None
        self._transport.write(head)
        upload = self._upload = self._loop.create_task(self._send_body(body, chunked))
        upload.add_done_callback(self._uploaded)
        answer = self._loop.create_task(self._head())
        try:
            await asyncio.wait((upload, answer), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            answer.cancel()
            raise
        if not answer.done() and (upload.cancelled() or upload.exception() is not None):
            answer.cancel()  # never left waiting on a connection the pool is about to close
            if upload.cancelled():
                # The client's body was cut by aiohttp (its shutdown cancels a request still running).
                raise asyncio.CancelledError
            raise cast(BaseException, upload.exception())
        return await answer

    def _uploaded(self, upload: asyncio.Task[None]) -> None:
        # An upload that failed after the answer began leaves the connection unusable; its error was
        # either raised by exchange_streamed or is moot (the upstream answered without the rest).
        if upload.cancelled() or upload.exception() is not None:
            self._broken = True

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        async for chunk in body:
            # One pass of the event loop between writes (a client's body already buffered is otherwise
            # written in one go): an upstream that answers early and closes is read before the next write,
            # whose failure would tear the connection down with that answer unread.
            await asyncio.sleep(0)
            if self._lost or self._broken:
                return  # the answer (or its failure) tells the rest
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._writing_paused:
                await self._drain()  # an upstream that stops reading is bounded there
            # The upstream is taking the body: its silence (the read timeout) counts from the last of it.
            self._last_read = self._loop.time()
        if chunked and not self._lost:
            transport.write(b"0\r\n\r\n")

    def _begin(self, head_only: bool) -> None:
        self.answered = False
        transport = self._transport
        if self._lost or self._broken or transport is None or transport.is_closing():  # not alive(), inline
            # Never written to a closed transport (uvloop raises RuntimeError; asyncio drops the bytes and
            # the request would wait out the read timeout): a clean "disconnected", retried when allowed.
            # Broken, so the pool drops it (the last exchange's state would call it reusable).
            self._broken = True
            raise UpstreamError("disconnected", NOT_WRITTEN)
        if self._parser is None or not self._complete or self._head_only:
            # A new parser unless the last one stopped cleanly between two messages.
            self._parser = httptools.HttpResponseParser(self)
        self._active = True
        self._head_only = head_only
        self._head_bytes = 0
        self._informational = False
        self._reason = b""
        self._headers = []
        self._response = None
        self._body = []
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._error = None
        self._upload = None
        self._last_read = self._loop.time()
        if self._timer is None:
            # Re-armed only when it fires (see _on_timer): no timer created or cancelled per request.
            self._timer = self._loop.call_at(self._last_read + self._limits.read_timeout, self._on_timer)

    async def _head(self) -> Response:
        while self._response is None:
            await self._wait()
        return self._response

    async def whole_body(self) -> bytes:
        """The rest of the body, once all of it has arrived."""
        while not self._complete:
            await self._wait()
        return self.take_body()

    def take_body(self) -> bytes:
        """What of the body has arrived, joined (the whole of it once the answer is complete)."""
        body = self._body
        self._body = []
        return body[0] if len(body) == 1 else b"".join(body)

    async def body_data(self) -> bytes:
        """What of the body has arrived (waiting for some), or b"" at its end."""
        while not self._body:
            if self._complete:
                return b""
            await self._wait()
        data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        self._buffered = 0
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._last_read = self._loop.time()
            self._transport.resume_reading()
        return data

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._broken = True
        self._cancel_timer()
        self._wake()
        self._writable()
        if self._transport is not None:
            self._transport.close()

    def _on_timer(self) -> None:
        self._timer = None
        if not self._active or self._complete:
            return
        now = self._loop.time()
        if self._reading_paused:
            # The client is the slow side; the count starts again when reading resumes (body_data).
            self._timer = self._loop.call_at(now + self._limits.read_timeout, self._on_timer)
            return
        due = self._last_read + self._limits.read_timeout
        if due > now:  # data came meanwhile: count from the last read
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._fail(UpstreamError("timeout", "read"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _drain(self) -> None:
        self._drained = self._loop.create_future()
        try:
            async with asyncio.timeout(self._limits.read_timeout):
                await self._drained
        except TimeoutError:
            self._fail(UpstreamError("timeout", "upstream stopped reading the request body"))
        finally:
            self._drained = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already set: uvloop and asyncio both set it on every TCP transport.
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but quacks alike

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            # Bytes nobody asked for (after a HEAD answer's head, or on an idle connection): the framing
            # cannot be trusted any more.
            self._broken = True
            assert self._transport is not None
            self._transport.close()
            return
        self.answered = True
        self._last_read = self._loop.time()
        if self._response is None:
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_headers * self._limits.max_field_bytes:
                self._fail(UpstreamError("malformed", "response head too large"))
                return
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError) else UpstreamError("malformed", "callback"))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamError("malformed", type(exc).__name__))

    def eof_received(self) -> bool | None:
        if not self._active:
            self._broken = True  # closed while idle: usable() says so before connection_lost runs
        return None  # close the transport; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._active and not self._complete:
            if exc is None and self._response is not None and self._until_eof():
                # Only a clean close ends such a body: after a reset (or any error) it is cut short, and
                # passed on as complete the client could not tell (nginx leaves the chunked body unended).
                self._finish()
            else:
                self._fail(UpstreamError("disconnected", "connection closed"))
        self._cancel_timer()
        # The parser holds this protocol's callbacks: a cycle that only the collector would otherwise free.
        self._parser = None
        self._writable()

    def _writable(self) -> None:
        """Wake an upload waiting for the write buffer to drain (drained, or the connection is gone)."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writable()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            # A second answer to one request, in the same read: never taken for the next request's answer
            # (response splitting); the connection closes, the first answer stands.
            raise UpstreamError("malformed", "more than one answer")
        self._reason = b""
        self._headers = []

    def on_status(self, status: bytes) -> None:
        self._reason += status
        if len(self._reason) > self._limits.max_field_bytes:
            raise UpstreamError("malformed", "reason phrase too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        limit = self._limits.max_field_bytes
        if len(name) > limit or len(value) > limit or len(self._headers) >= self._limits.max_headers:
            raise UpstreamError("malformed", "header too large or too many")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            # llhttp reads any three digits: "099" was taken for an informational answer, and the client
            # waited for the read timeout (504) for the answer that never followed.
            raise UpstreamError("malformed", f"status {status}")
        if self._reason not in _PLAIN_REASONS and _CONTROL.search(self._reason):
            # RFC 9112 §4: HTAB, SP, VCHAR and obs-text only. aiohttp refuses to write any other in a status
            # line: the answer was lost (an empty reply, or a 500 for a streamed one).
            raise UpstreamError("malformed", "a control character in the reason phrase")
        if status < 200:
            if status == 101:  # this client never asks to switch protocols
                raise UpstreamError("malformed", "unrequested protocol switch")
            self._informational = True  # 100 or 103: the real answer follows
            return
        self._informational = False
        headers = []
        content_length = None
        connection = _NO_TOKENS
        hop_at: list[int] | None = None
        # llhttp admits only token characters in names; values and the reason may carry any byte >= 0x80.
        # ASCII, the usual, is decoded by decode() without arguments, CPython's fast path: naming the codec
        # and the error handler cost ~300 instructions more a header (callgrind), for bytes that need neither.
        raw_reason = self._reason
        if raw_reason.isascii():
            non_utf8 = False
            reason = raw_reason.decode()
        else:
            non_utf8 = not _is_utf8(raw_reason)
            reason = raw_reason.decode("utf-8", "surrogateescape")
        names = _NAMES
        for raw_name, raw_value in self._headers:
            if raw_value.isascii():  # the usual value: nothing to escape, nor to check
                value = raw_value.decode()
            else:
                value = raw_value.decode("utf-8", "surrogateescape")
                if not non_utf8:
                    non_utf8 = not _is_utf8(raw_value)
            known = names.get(raw_name)
            if known is None:
                known = (raw_name.decode("utf-8", "surrogateescape"), _KINDS.get(raw_name.lower()))
                if len(names) < _NAMES_CAP and len(raw_name) <= _NAME_BYTES_CACHED:
                    names[raw_name] = known
            name, kind = known
            headers.append((name, value))
            if kind is None:
                continue
            if kind == _CONTENT_LENGTH:
                content_length = int(raw_value)  # llhttp has checked it is one valid number
                continue
            if hop_at is None:
                hop_at = []
            hop_at.append(len(headers) - 1)
            if kind == _TRANSFER_ENCODING and self._parser.get_http_version() == "1.0":
                # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing; the
                # connection closes after it, however it says keep-alive.
                self._broken = True
            if kind == _CONNECTION:
                tokens = _TOKENS.get(raw_value)
                if tokens is None:
                    tokens = frozenset({token.strip().lower() for token in value.split(",")})
                    if len(_TOKENS) < _TOKENS_CAP and len(raw_value) <= _NAME_BYTES_CACHED:
                        _TOKENS[raw_value] = tokens
                connection = tokens if connection is _NO_TOKENS else connection | tokens
            elif kind == _TRANSFER_ENCODING and not _only_chunked(raw_value):
                # A coding other than chunked (gzip, say): only chunked is decoded here, and Transfer-Encoding
                # is hop by hop, so the client would get coded bytes it could not tell were coded (and without
                # chunked last, a body running to the close). A clean 502 now, before any byte goes out.
                raise UpstreamError("malformed", "transfer coding other than chunked")
        self._response = Response(
            self, status, reason, headers, content_length, connection, non_utf8, hop_at is not None, hop_at
        )
        if self._head_only:
            self._keep_alive = self._parser.should_keep_alive()
            self._finish()
        elif (waiter := self._waiter) is not None and not waiter.done():  # _wake(), inline
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            self._broken = True  # a body after a HEAD answer: framing lost
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        # _wake(), inline (once per read of a body).
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._head_only:
            return
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._finish()

    def _finish(self) -> None:
        self._complete = True
        self._active = False
        if self._reading_paused and self._transport is not None:
            # The read that paused it was the answer's last (nothing more is due): a connection that goes
            # back to the pool must read its next answer, and see the upstream close meanwhile.
            self._reading_paused = False
            self._transport.resume_reading()
        waiter = self._waiter  # _wake(), inline (once per answer)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _until_eof(self) -> bool:
        """The answer has no declared length: it ends when the upstream closes (RFC 9112 §6.3)."""
        response = self._response
        if response is None or response.content_length is not None:
            return False
        return not any(name.lower() == b"transfer-encoding" for name, _ in self._headers)


def _only_chunked(codings: bytes) -> bool:
    return all(coding.strip().lower() == b"chunked" for coding in codings.split(b","))


def _is_utf8(raw: bytes) -> bool:
    if raw.isascii():
        return True
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
