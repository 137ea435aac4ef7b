"""Fixtures shared by every test: real Redis, real upstream, the real app from create_app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.app import create_app
from proxy.settings import Settings
from tests.chaos import ChaosProxy, Mode
from tests.rig import RedisServer, Upstream, free_port

MakeProxy = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session, started on a free port."""
    server = RedisServer(port=free_port(), workdir=Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def chaos(redis_server: RedisServer, redis_url: str) -> AsyncIterator[ChaosProxy]:
    """A TCP proxy in front of the real Redis, passing bytes until a test says otherwise (holds them,
    swallows or slows replies); back to passing, then closed, after the test."""
    proxy = ChaosProxy(redis_server.port)
    await proxy.start()
    yield proxy
    proxy.mode, proxy.reply_delay = Mode.PASS, 0.0
    await proxy.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL, emptied before each test (and restarted if a test killed it)."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> tuple[Upstream, TestServer]:
    """A recording upstream served by a real aiohttp server on loopback."""
    recorder = Upstream()
    server = await aiohttp_server(recorder.app())
    return recorder, server


def settings_for(upstream_url: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings pointing at the rig, with nested overrides as plain dicts."""
    tree: dict[str, Any] = {
        "upstream": {"url": upstream_url},
        "redis": {"url": redis_url},
        # Scrapes right after what they count: fresh every time (the default's once a second has its test).
        "telemetry": {"metrics_min_interval_seconds": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return Settings.model_validate(tree)


@pytest.fixture
def make_proxy(
    aiohttp_client: AiohttpClient, upstream: tuple[Upstream, TestServer], redis_url: str
) -> MakeProxy:
    """Start the real app (create_app) against the rig; keyword arguments override settings sections."""

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        _, server = upstream
        settings = settings_for(str(server.make_url("/")), redis_url, **overrides)
        return await aiohttp_client(create_app(settings))

    return make
