"""Log configuration: a malformed request costs one quiet line, not an ERROR traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.logs import ClientErrorFilter
from tests.conftest import MakeProxy


async def test_malformed_requests_do_not_log_tracebacks(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy()
    server_logger = logging.getLogger("aiohttp.server")
    server_logger.addFilter(ClientErrorFilter())  # what logs.configure installs
    try:
        caplog.set_level(logging.INFO)
        assert client.server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
    finally:
        server_logger.filters.clear()
    assert status_line.split()[1] == b"400"
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.INFO]
