"""The forwarder: misses and unknown routes go to the configured upstream, streamed both ways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy import keys
from proxy.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, json_response
from proxy.settings import UpstreamSettings

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1: connection-specific fields never cross a proxy; fields named in Connection join them.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)


class Forwarder:
    """Sends a request to the upstream as it came and streams the answer back."""

    def __init__(self, session: aiohttp.ClientSession, settings: UpstreamSettings) -> None:
        self._session = session
        self._settings = settings
        self._base = settings.base

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Forward `request` (origin-form path and query only) and stream the upstream's answer."""
        url = self._base + request.rel_url.raw_path_qs if hasattr(request.rel_url, "raw_path_qs") else ""
        try:
            async with self._session.request(
                request.method,
                url,
                headers=self._request_headers(request),
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                auto_decompress=False,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                response.headers.extend(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
                )
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except TimeoutError:
            return json_response(504, GATEWAY_TIMEOUT)
        except aiohttp.ClientError:
            return json_response(502, BAD_GATEWAY)

    def _request_headers(self, request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


async def forward_handler(request: web.Request) -> web.StreamResponse:
    """Route handler for everything the proxy does not answer itself."""
    return await request.app[keys.FORWARDER].forward(request)


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession to the upstream, with keep-alive and explicit timeouts."""
    settings = app[keys.SETTINGS].upstream
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=settings.max_connections, keepalive_timeout=settings.keepalive_timeout_seconds
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_seconds, sock_read=settings.read_timeout_seconds
        ),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
    app[keys.FORWARDER] = Forwarder(session, settings)
    yield
    await session.close()
    await asyncio.sleep(0)
