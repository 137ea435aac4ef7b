"""Routes edge-proxy forwards come back from the real backend as the backend wrote them, byte for byte."""

from __future__ import annotations

import socket
import urllib.parse

import pytest

from tests.e2e.support import Stack

pytestmark = pytest.mark.slow


def raw_get(base_url: str, target: str) -> tuple[list[bytes], bytes]:
    """GET `target` on a fresh connection: the head's lines as bytes (Date dropped) and the body."""
    url = urllib.parse.urlsplit(base_url)
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=15) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")], body


def test_a_latin_1_header_value_from_django_reaches_the_client_byte_for_byte(stack: Stack) -> None:
    # Django and gunicorn write `filename="résumé.csv"` with 0xE9 bytes; aiohttp's writer drops bytes that
    # are not UTF-8, so the proxy must put them back.
    target = "/api/exports/r%C3%A9sum%C3%A9.csv"
    direct_head, direct_body = raw_get(stack.backend.url, target)
    proxied_head, proxied_body = raw_get(stack.proxy.url, target)

    assert direct_head[0] == b"HTTP/1.1 200 OK"
    disposition = b'Content-Disposition: attachment; filename="r\xe9sum\xe9.csv"'
    assert disposition in direct_head
    assert disposition in proxied_head
    assert proxied_head[0] == direct_head[0]
    assert proxied_body == direct_body == b"key,value\r\nflag,on\r\n"
