"""Where edge-proxy reaches into aiohttp's internals; each names the test that fails if aiohttp moves them."""

from __future__ import annotations

import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import http_writer, web, web_protocol, web_response, web_urldispatcher
from multidict import CIMultiDict

# Per server (one per serving process; tests start many in one process): what a malformed request calls.
_on_malformed: weakref.WeakKeyDictionary[web.Server, Callable[[], None]] = weakref.WeakKeyDictionary()


class ExactHeadStreamResponse(web.StreamResponse):
    """A forwarded answer whose head holds bytes that are not UTF-8, sent back as they came.

    WSGI header values are latin-1: Django under gunicorn writes `filename="résumé.csv"` with a single 0xE9
    byte. The upstream client keeps such bytes as surrogates (decoded with `surrogateescape`), and aiohttp's
    head serializer, which encodes UTF-8, silently drops them. Here aiohttp serializes the head's bytes one
    character each (latin-1), which keeps its checks (control characters refused) and its bookkeeping, and
    the head it buffered is replaced by those bytes themselves. Only answers that need it take this path
    (`Response.non_utf8`); tests/test_upstream.py checks the bytes on the wire, so an aiohttp that moved
    these internals fails there, not silently.
    """

    async def _write_headers(self) -> None:
        request, writer = self._req, self._payload_writer
        assert request is not None
        assert isinstance(writer, http_writer.StreamWriter)
        version = request.version
        status_line = _one_char_per_byte(f"HTTP/{version[0]}.{version[1]} {self.status} {self.reason}")
        fields = CIMultiDict((k, _one_char_per_byte(v)) for k, v in self.headers.items())
        await writer.write_headers(status_line, fields)
        writer._headers_buf = "".join(
            [f"{status_line}\r\n", *[f"{k}: {v}\r\n" for k, v in fields.items()], "\r\n"]
        ).encode("latin-1")
        if self._send_headers_immediately:
            writer.send_headers()


class ExactHeadResponse(ExactHeadStreamResponse, web.Response):
    """The same for an answer read whole (head and body leave in one write)."""


def _one_char_per_byte(text: str) -> str:
    """`text`'s bytes on the wire (surrogates back to the bytes they stand for), one character per byte."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def write_without_joining() -> None:
    """Let aiohttp hand a response's head and body to the transport as two buffers (one writev).

    On Python < 3.12.9 aiohttp joins them into a new bytes first, a malloc and a copy of every body, because
    asyncio's own selector transport lacked flow control in writelines() on 3.12.0-3.12.8 and 3.13.0-3.13.1
    (CVE-2024-12254). uvloop's transport is not that code: its writelines() takes the same buffered,
    flow-controlled path as write(). Measured on 50 KB 200s: 276k -> 222k instructions per request
    (`bench/callgrind.py --baseline`), +4 % req/s over 9 interleaved wrk runs (`bench/run.py --baseline`).
    Only for uvloop, whose loop every serving process runs on; tests/test_server.py checks the flag is still
    read where this expects it.
    """
    http_writer.SKIP_WRITELINES = False


def set_server_header(value: str) -> None:
    """The Server header aiohttp gives every answer that has none (settings.server_header).

    aiohttp adds `Python/3.x aiohttp/3.y` with `setdefault` when a response is prepared, reading the module's
    SERVER_SOFTWARE at that moment, and has no setting for it. An answer's own header (a forwarded upstream's)
    is left alone. Set once per serving process, like SKIP_WRITELINES above, so it also reaches the 400s
    aiohttp writes for malformed requests, which no handler or signal sees, and costs no request anything
    (an on_response_prepare signal would cost every answer ~1 µs). tests/test_server.py checks the answers of
    a real process, so an aiohttp that moved the name fails there.
    """
    web_response.SERVER_SOFTWARE = value  # type: ignore[attr-defined]  # imported there from aiohttp.http


# The whole body of aiohttp's own answer to a request it could not parse: nothing of the request in it.
MALFORMED_BODY = "400 Bad Request"


def on_malformed_request(server: web.Server, count: Callable[[], None]) -> None:
    """Call `count` for each request `server` answers 400 itself, unhandled: a head it could not parse.

    aiohttp answers those (a line with no colon, a method its parser does not know, control characters, a
    framing it refuses) before any handler or middleware runs, so no request metric saw them: a flood of
    them, or a load balancer speaking TLS to the plain port, left nothing to alert on. The error handler
    aiohttp makes for each such request is the one place all of them pass, and only they: wrapped once per
    process (its class, which has __slots__), it looks up the connection's server here, so the request path
    pays nothing. tests/test_server.py counts a real process's, so an aiohttp that moved it fails there.
    """
    if not getattr(web_protocol.RequestHandler._make_error_handler, "_counted", False):
        make = web_protocol.RequestHandler._make_error_handler

        def _make_error_handler(
            handler: web_protocol.RequestHandler, err_info: Any
        ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
            server = handler._manager  # None once the connection is lost
            hook = None if server is None else _on_malformed.get(server)
            if hook is not None:
                hook()
            # aiohttp's body is the parser's message, which quotes the bytes it refused: the offending header
            # line (a Cookie with the HttpOnly session cookie, an Authorization), or the first 100 bytes of
            # one over 16 KiB. A page's script that can make the browser send such a request (a few large
            # cookies) would read HttpOnly cookies from the 400 (CVE-2012-0053's shape). The status only.
            if err_info.status < 500:
                err_info = web_protocol._ErrInfo(
                    status=err_info.status, exc=err_info.exc, message=MALFORMED_BODY
                )
            return make(handler, err_info)

        _make_error_handler._counted = True  # type: ignore[attr-defined]
        web_protocol.RequestHandler._make_error_handler = _make_error_handler  # type: ignore[method-assign,assignment]
    _on_malformed[server] = count


# RequestHandler.data_received, as a function of the handler and the chunk received.
Receive = Callable[[web_protocol.RequestHandler, bytes], None]


def wrap_data_received(wrap: Callable[[Receive], Receive]) -> None:
    """Replace RequestHandler.data_received, once per process, by `wrap` of aiohttp's own.

    Where HeadBound (proxy/head_bound.py) bounds a request head as a whole (aiohttp bounds only each header
    line and their number). The class has __slots__, so no hook per connection: the wrapper finds what it
    needs on the connection's server. tests/test_head_bound.py sends heads on a real socket, so an aiohttp
    that moved data_received fails there.
    """
    if not getattr(web_protocol.RequestHandler.data_received, "_wrapped", False):
        wrapped = wrap(web_protocol.RequestHandler.data_received)
        wrapped._wrapped = True  # type: ignore[attr-defined]
        web_protocol.RequestHandler.data_received = wrapped  # type: ignore[method-assign,assignment]


# What aiohttp compiles forward.CATCH_ALL ("/{tail:[\s\S]*}") to; resolve_catch_all_directly stands in for
# it only when it is this.
_CATCH_ALL_PATTERN = r"/(?P<tail>[\s\S]*)"


def resolve_catch_all_directly(router: web.UrlDispatcher, catch_all: web.AbstractRoute) -> None:
    """Resolve a path no other route can match straight to `catch_all` (any path, any method, at "/").

    aiohttp's router walks each of a path's prefixes ("/api/x/1", "/api/x", "/api", "/") for candidate
    resources and only then reaches the catch-all, whose regex and match dict come after: ~4.5 % of a
    forward's instructions (`bench/callgrind.py --scenario forward`). When every other resource is a plain
    path, which matches that one path only (candidates met at a path's prefixes never match it), a path
    that is not, trailing slashes stripped, some plain resource's key can only be the catch-all's: its match
    is made here as aiohttp makes it (the whole path after "/", line feeds included; "%2F" and "%25" in the
    tail unquoted by aiohttp's own helper). Anything else (a plain route's path, a router holding any other
    kind of resource, a pattern other than the expected one) takes aiohttp's walk, unchanged.
    tests/test_server.py resolves paths both ways and compares, so an aiohttp that moved these internals
    fails there.
    """
    resolve = router.resolve
    index = router._resource_index
    resource = catch_all.resource
    direct: bool | None = None  # decided on the first request, once the router is frozen

    def only_plain_besides_catch_all() -> bool:
        pattern = getattr(resource, "_pattern", None)
        return (
            type(resource) is web_urldispatcher.DynamicResource
            and pattern is not None
            and pattern.pattern == _CATCH_ALL_PATTERN
            and pattern.flags == re.UNICODE
            and getattr(resource, "_any_route", None) is catch_all
            and list(resource) == [catch_all]
            and not router._matched_sub_app_resources
            and all(
                candidates == [resource]
                if key == "/"
                else all(type(candidate) is web_urldispatcher.PlainResource for candidate in candidates)
                for key, candidates in index.items()
            )
        )

    async def resolve_directly(request: web.Request) -> web_urldispatcher.UrlMappingMatchInfo:
        nonlocal direct
        if direct is None:
            direct = only_plain_besides_catch_all()
        path = request.rel_url.path_safe
        if direct:
            key = path.rstrip("/") or "/"
            candidates = index.get(key)
            if candidates is None:
                if path[:1] == "/":
                    tail = path[1:] if "%" not in path else web_urldispatcher._unquote_path_safe(path[1:])
                    return web_urldispatcher.UrlMappingMatchInfo({"tail": tail}, catch_all)
            elif key != "/":
                # A plain route's path (the definitions, the probes): its route for the method, as the walk's
                # first candidate to match finds it.
                for candidate in candidates:
                    if candidate._path == path:  # type: ignore[attr-defined]  # a PlainResource (checked)
                        method = request.method
                        route = candidate._routes.get(method, candidate._any_route)  # type: ignore[attr-defined]
                        if route is not None:
                            return web_urldispatcher.UrlMappingMatchInfo({}, route)
                        break
        return await resolve(request)

    router.resolve = resolve_directly  # type: ignore[method-assign]


def idle(handler: web_protocol.RequestHandler) -> bool:
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
