"""Health endpoints: never forwarded, readiness follows Redis."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestServer

from tests.conftest import MakeProxy
from tests.rig import RedisServer, Upstream


async def test_liveness_and_startup_answer_locally(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer]
) -> None:
    client = await make_proxy()
    for path in ("/_liveness", "/_startup"):
        response = await client.get(path)
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    assert upstream[0].seen == []


async def test_readiness_follows_redis(make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    client = await make_proxy(redis={"health_check_interval_seconds": 0.05})
    await _wait_status(client, 200)
    redis_server.stop()
    body = await _wait_status(client, 503)
    assert body == {"status": "unavailable", "reasons": ["redis unreachable"]}
    redis_server.start()
    await _wait_status(client, 200)


async def _wait_status(client: object, status: int) -> object:
    for _ in range(200):
        response = await client.get("/_readiness")  # type: ignore[attr-defined]
        if response.status == status:
            return await response.json()
        await asyncio.sleep(0.025)
    raise AssertionError(f"readiness never became {status}")
