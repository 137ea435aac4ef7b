"""The payload cache's memory budgets: LRU beyond the total, compressed-only beyond the decoded budget."""

from __future__ import annotations

import asyncio
import inspect
import time
import tracemalloc
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy import keys
from proxy.payloads import DefinitionsCache
from tests.backend_writer import BackendWriter
from tests.conftest import MakeProxy
from tests.test_telemetry import scrape, value

SECRET = "phs_cache_secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}
TEAMS = (1, 2, 3)

Client = TestClient[Any, Any]


def url(team_id: int) -> str:
    return f"/flags/definitions?token=phc_cache_{team_id}"


def flags(team_id: int, version: int = 1) -> list[dict[str, Any]]:
    """~30 KB of flags, distinct per team and version, compressible as real flag JSON is."""
    return [
        {
            "id": i,
            "key": f"team-{team_id}-flag-{i}-v{version}",
            "active": True,
            "filters": {"groups": [{"properties": [], "rollout_percentage": (i * 7) % 100}]},
        }
        for i in range(300)
    ]


@pytest.fixture
def payloads(redis_url: str) -> tuple[BackendWriter, dict[int, tuple[bytes, str]]]:
    """Three teams with ~30 KB payloads: team id -> (stored JSON bytes, ETag)."""
    writer = BackendWriter(redis_url)
    stored = {}
    for team_id in TEAMS:
        token = f"phc_cache_{team_id}"
        writer.set_team(token, {"id": team_id, "api_token": token, "secret_api_token": SECRET})
        text, etag = writer.set_definitions(team_id, flags(team_id))
        stored[team_id] = (text.encode(), etag)
    return writer, stored


async def served(client: Client, team_id: int, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    response = await client.get(url(team_id), headers={**AUTH, **(headers or {})})
    return response.status, await response.read()


async def test_total_budget_keeps_the_most_recently_used_payloads(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    _, stored = payloads
    size = len(stored[1][0])
    client = await make_proxy(definitions={"cache_budget_bytes": 2 * size + size // 2})
    cache = client.app[keys.DEFINITIONS].cache
    for team_id in TEAMS:
        assert await served(client, team_id) == (200, stored[team_id][0])
    assert len(cache) == 2  # team 1, least recently used, went first
    assert cache.bytes_held <= 2 * size + size // 2
    misses = cache.misses
    assert await served(client, 3) == (200, stored[3][0])
    assert cache.misses == misses  # held
    assert await served(client, 1) == (200, stored[1][0])
    assert cache.misses == misses + 1  # read from Redis again


async def test_beyond_the_decoded_budget_payloads_are_held_compressed_and_served_exactly(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    _, stored = payloads
    size = len(stored[1][0])
    client = await make_proxy(definitions={"cache_decoded_budget_bytes": size + size // 2})
    cache = client.app[keys.DEFINITIONS].cache
    for team_id in TEAMS:
        assert await served(client, team_id) == (200, stored[team_id][0])
    assert len(cache) == 3  # all held: one decoded (the last served), three compressed
    assert cache.decoded_size == size
    assert size < cache.bytes_held < size + 3 * size // 4
    misses = cache.misses

    # A 304 never needs the payload, so it never decompresses.
    status, _ = await served(client, 1, {"If-None-Match": f'W/"{stored[1][1]}"'})
    assert (status, cache.decompressions) == (304, 0)
    # A 200 from a compressed-only copy: decompressed in memory, byte for byte, no Redis read.
    for team_id in (1, 1, 2):
        assert await served(client, team_id) == (200, stored[team_id][0])
    assert cache.decompressions == 2  # team 1 once (then held decoded), team 2 once
    assert cache.misses == misses
    assert cache.decoded_size == size  # team 2 now, team 1 back to compressed only

    samples = await scrape(client)
    assert value(samples, "edge_proxy_definitions_cache_decompressions_total") == 2
    assert value(samples, "edge_proxy_definitions_cache_decoded_size_bytes") == size
    assert value(samples, "edge_proxy_definitions_cache_size_bytes") == cache.bytes_held


async def test_a_compressed_only_payload_follows_a_backend_rewrite(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    writer, stored = payloads
    client = await make_proxy(definitions={"cache_decoded_budget_bytes": 0})
    assert await served(client, 1) == (200, stored[1][0])
    assert client.app[keys.DEFINITIONS].cache.decoded_size == 0
    text, etag = writer.set_definitions(1, flags(1, version=2))
    deadline = time.monotonic() + 5
    while (answer := await served(client, 1)) != (200, text.encode()):
        assert answer == (200, stored[1][0]), "only the old or the new payload, never anything else"
        assert time.monotonic() < deadline, "the rewrite was never served"
        await asyncio.sleep(0.05)
    status, _ = await served(client, 1, {"If-None-Match": f'W/"{etag}"'})
    assert status == 304


async def test_compressed_copies_hold_only_their_own_size(
    make_proxy: MakeProxy, payloads: tuple[BackendWriter, dict[int, tuple[bytes, str]]]
) -> None:
    # python-zstandard hands back its output in a buffer sized for the input: kept as is, each ~3 KB copy
    # would hold ~30 KB of heap, and the compact cache would save almost nothing.
    client = await make_proxy(definitions={"cache_decoded_budget_bytes": 0})
    cache = client.app[keys.DEFINITIONS].cache
    tracemalloc.start()
    try:
        for team_id in TEAMS:
            assert (await served(client, team_id))[0] == 200
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert cache.decoded_size == 0
    packed = cache.bytes_held
    # What is still allocated by the line that makes the compressed copies: the copies, and nothing more.
    source, first = inspect.getsourcelines(DefinitionsCache._store)
    line = first + next(i for i, text in enumerate(source) if ".compress(" in text)
    held = sum(
        trace.size
        for trace in snapshot.filter_traces(
            [tracemalloc.Filter(True, inspect.getfile(DefinitionsCache), line)]
        ).traces
    )
    assert packed < held < packed + 3 * 64, (held, packed)  # + a bytes object's header each
