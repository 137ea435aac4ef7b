"""The end-to-end stack, started once for the package: real Redis, the Django backend, edge-proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.stack import start_backend, start_proxy
from tests.e2e.support import SdkRequests, Stack, recording_sdk_requests
from tests.rig import RedisServer

HMAC_KEY = "e2e-verdict-hmac-key-0123456789"
# Fast background loops so the tests wait for fractions of a second, not the production defaults.
PROXY_ENV = {
    "EDGE_PROXY__QUOTA__POLL_INTERVAL_SECONDS": "0.2",
    "EDGE_PROXY__DEFINITIONS__REFRESH_INTERVAL_SECONDS": "0.2",
    "EDGE_PROXY__DEFINITIONS__AUTH__REVALIDATE_INTERVAL_SECONDS": "0.2",
    "EDGE_PROXY__BILLING__FLUSH_INTERVAL_SECONDS": "0.5",
}


@pytest.fixture(scope="package")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis (the session's), a migrated backend under gunicorn, and `python -m proxy serve` before it."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    client.close()
    workdir = Path(tmp_path_factory.mktemp("e2e"))
    backend = start_backend(workdir, redis_server.url, workers=2)
    try:
        proxy = start_proxy(workdir, redis_server.url, backend.url, hmac_key=HMAC_KEY, env=PROXY_ENV)
    except BaseException:
        backend.stop()
        raise
    try:
        yield Stack(redis_server.url, backend, proxy)
    finally:
        proxy.stop()
        backend.stop()


@pytest.fixture
def sdk_requests() -> Iterator[SdkRequests]:
    """The posthog SDK's HTTP requests made during the test."""
    with recording_sdk_requests() as recorder:
        yield recorder
