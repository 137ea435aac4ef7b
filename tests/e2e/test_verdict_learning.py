"""A bad credential reaches the backend once, whatever framing the backend answers with."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from examples.stack import start_backend, start_proxy
from tests.e2e.conftest import HMAC_KEY, PROXY_ENV
from tests.e2e.support import Stack, exchange
from tests.rig import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chunked_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second backend that answers without Content-Length (chunked), and a proxy before it.

    It uses Redis database 1, so its teams cannot collide with the package stack's (database 0).
    """
    redis_url = redis_server.url.rpartition("/")[0] + "/1"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    workdir = Path(tmp_path_factory.mktemp("chunked"))
    backend = start_backend(workdir, redis_url, workers=1, env={"LEGACY_BACKEND_CONTENT_LENGTH": "0"})
    try:
        proxy = start_proxy(workdir, redis_url, backend.url, hmac_key=HMAC_KEY, env=PROXY_ENV)
    except BaseException:
        backend.stop()
        raise
    try:
        yield Stack(redis_url, backend, proxy)
    finally:
        proxy.stop()
        backend.stop()


def _flood_reaches_backend(stack: Stack, kind: str) -> int:
    """Send 20 requests with one bad credential; check each answer; return how many reached the backend."""
    team = stack.admin.create_team(f"flood {kind}", secret_api_token="phs_flood_secret_0123456789")
    credential = {
        "invalid key": f"phx_{secrets.token_urlsafe(24)}",
        "unscoped key": stack.admin.create_key(scopes=("insight:read",))[1],
    }[kind]
    target = f"/flags/definitions?token={team['api_token']}&send_cohorts"
    headers = {"Authorization": f"Bearer {credential}"}
    expected = exchange(stack.backend.url, "GET", target, headers)
    assert expected.status in (401, 403)
    before = stack.backend_definitions()
    answers = [exchange(stack.proxy.url, "GET", target, headers) for _ in range(20)]
    assert answers == [expected] * 20
    return stack.backend_definitions() - before


@pytest.mark.parametrize("kind", ["invalid key", "unscoped key"])
def test_a_denial_is_learned_from_a_backend_sending_content_length(stack: Stack, kind: str) -> None:
    assert _flood_reaches_backend(stack, kind) == 1


@pytest.mark.parametrize("kind", ["invalid key", "unscoped key"])
def test_a_denial_is_learned_from_a_backend_answering_chunked(chunked_stack: Stack, kind: str) -> None:
    assert _flood_reaches_backend(chunked_stack, kind) == 1
