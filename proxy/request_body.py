"""A forwarded request's body, as the client sends it: framing checked, bounded in size and time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import HttpVersion11, hdrs, web

from proxy.errors import error_body, json_response
from proxy.settings import ClientLimitsSettings

BODY_TIMEOUT = error_body("invalid_request", "request_timeout", "The request body did not arrive in time.")
BODY_TOO_LARGE = error_body("invalid_request", "payload_too_large", "The request body is too large.")
BODY_INCOMPLETE = error_body("invalid_request", "incomplete_body", "The request body ended early.")
UNSUPPORTED_CODING = error_body(
    "invalid_request", "unsupported_transfer_coding", "The request's transfer coding is not supported."
)
TRANSFER_ENCODING_ON_HTTP10 = error_body(
    "invalid_request", "invalid_framing", "HTTP/1.0 requests may not carry Transfer-Encoding."
)
# Codings a request may carry before chunked (gunicorn's list; it answers 501 to any other): aiohttp removes
# the chunked framing only, so these go on named, for the upstream to decode as it would have.
PASSED_CODINGS = frozenset({"gzip", "deflate", "compress", "identity"})


class ClientBodyError(Exception):
    """The client's body, not the upstream, ended the request: too slow, too large, or cut off."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body

    def response(self) -> web.Response:
        """The answer; the connection closes, since the rest of the body will never be read."""
        answer = json_response(self.status, self.body)
        answer.force_close()
        return answer


def codings(request: web.Request) -> str:
    """The Transfer-Encoding to send with a streamed body: the client's codings, chunked last (aiohttp's
    parser has refused any other order), normalised; plain chunked without one."""
    names = [
        coding.strip().lower()
        for value in request.headers.getall(hdrs.TRANSFER_ENCODING, ())
        for coding in value.split(",")
    ]
    return ", ".join(names) if names else "chunked"


class RequestBody:
    """Reads request bodies within client_limits: refused (413, 408, 400, 501) as ClientBodyError."""

    def __init__(self, limits: ClientLimitsSettings, buffer_bytes: int) -> None:
        self._body_timeout = limits.body_read_timeout_seconds
        self._body_total_timeout = limits.body_total_timeout_seconds
        self._max_body_bytes = limits.max_body_bytes
        self._buffer_bytes = buffer_bytes

    async def read(self, request: web.Request) -> bytes | AsyncIterator[bytes] | None:
        """The body to forward: None, read whole (small, of a declared length), or an iterator of chunks."""
        if hdrs.TRANSFER_ENCODING in request.headers:
            if request.version < HttpVersion11:
                # RFC 9112 §6.1: faulty framing from an HTTP/1.0 client, which a server in front may frame
                # otherwise (gunicorn answers 400): refused, and the connection closes.
                raise ClientBodyError(400, TRANSFER_ENCODING_ON_HTTP10)
            if not PASSED_CODINGS.issuperset(codings(request).split(", ")[:-1]):
                raise ClientBodyError(501, UNSUPPORTED_CODING)  # RFC 9112 §6.1, and gunicorn's answer
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            raise ClientBodyError(413, BODY_TOO_LARGE)
        chunks = self._chunks(request.content)
        if length is not None and length <= self._buffer_bytes:
            # One write upstream for the common small body; read from the stream directly so this does not
            # depend on the app's client_max_size.
            return b"".join([chunk async for chunk in chunks])
        return chunks

    async def _chunks(self, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        # aiohttp's server has no body read timeout: without this a client that stalls mid-body (or trickles
        # it) would hold an upstream connection (and the pool is bounded) for as long as it likes.
        size = 0
        loop = asyncio.get_running_loop()
        # The total counts time spent waiting for the client only: while the upstream is slow to take a
        # chunk, the client is held back by the proxy, and a 408 would blame it for the backend.
        waited = 0.0
        while True:
            started = loop.time()
            try:
                async with asyncio.timeout(min(self._body_timeout, self._body_total_timeout - waited)):
                    chunk = await content.readany()
            except TimeoutError:
                raise ClientBodyError(408, BODY_TIMEOUT) from None
            except (OSError, aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError):
                # The client went away or sent less than its Content-Length.
                raise ClientBodyError(400, BODY_INCOMPLETE) from None
            waited += loop.time() - started
            if not chunk:
                return
            size += len(chunk)
            if size > self._max_body_bytes:
                raise ClientBodyError(413, BODY_TOO_LARGE)
            yield chunk
