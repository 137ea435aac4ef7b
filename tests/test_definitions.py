"""The definitions endpoint against Redis filled by django-redis exactly as the backend fills it."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy import keys
from tests.backend_writer import BackendWriter
from tests.chaos import ChaosProxy
from tests.conftest import MakeProxy
from tests.rig import RedisServer, Upstream
from tests.test_forward import raw_exchange
from tests.test_reliability import eventually

TOKEN = "phc_test_project_token"
SECRET = "phs_test_secret_value"
BACKUP_SECRET = "phs_test_backup_secret"
TEAM_ID = 42
AUTH = {"Authorization": f"Bearer {SECRET}"}
URL = f"/flags/definitions?token={TOKEN}&send_cohorts"
CACHE_CONTROL = "private, must-revalidate"
PAYLOAD_KEY = f"posthog:1:cache/teams/{TEAM_ID}/feature_flags/flags_with_cohorts.json"

Client = TestClient[Any, Any]


def flags(count: int, prefix: str = "flag-") -> list[dict[str, Any]]:
    """`count` flag definitions; large counts make a payload past the 512-byte compression threshold."""
    return [
        {"id": i, "key": f"{prefix}{i}", "active": True, "filters": {"groups": [{"rollout_percentage": 50}]}}
        for i in range(count)
    ]


@pytest.fixture
def backend(redis_url: str) -> BackendWriter:
    """The test-only writer: Django's cache framework with django-redis, as the backend writes."""
    writer = BackendWriter(redis_url)
    writer.set_team(
        TOKEN,
        {
            "id": TEAM_ID,
            "api_token": TOKEN,
            "project_id": TEAM_ID,
            "name": "Test",
            "secret_api_token": SECRET,
            "secret_api_token_backup": BACKUP_SECRET,
        },
    )
    return writer


def sync_redis(url: str) -> redis.Redis:
    """A synchronous client for arranging and inspecting Redis."""
    return redis.Redis.from_url(url)


async def proxy_for(make_proxy: MakeProxy, **overrides: Any) -> Client:
    """The real app with a fast billing flush and quota poll, so tests wait little."""
    overrides.setdefault("billing", {"flush_interval_seconds": 0.05})
    overrides.setdefault("quota", {"poll_interval_seconds": 0.05})
    return await make_proxy(**overrides)


async def test_200_is_the_stored_json_byte_for_byte(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer]
) -> None:
    text, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    for _ in range(2):  # first from Redis, then from memory
        response = await client.get(URL, headers=AUTH)
        assert response.status == 200
        assert await response.read() == text.encode()
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["ETag"] == f'W/"{etag}"'
        assert response.headers["Cache-Control"] == CACHE_CONTROL
    assert upstream[0].seen == []


async def test_large_compressed_payload_is_served_exactly(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    text, etag = backend.set_definitions(TEAM_ID, flags(2000))
    assert len(text) > 100_000
    raw = sync_redis(backend.redis_url).get(PAYLOAD_KEY)
    assert raw is not None
    assert raw[:4] == b"\x28\xb5\x2f\xfd"  # really zstd, as the backend writes it
    client = await proxy_for(make_proxy)
    response = await client.get(URL, headers=AUTH)
    assert response.status == 200
    assert await response.read() == text.encode()
    assert response.headers["ETag"] == f'W/"{etag}"'


@pytest.mark.parametrize(
    "if_none_match",
    ['W/"{e}"', '"{e}"', "{e}", '  W/"{e}"  ', '"other", W/"{e}"', "*", 'W/"nope",{e}'],
)
async def test_304_for_every_matching_form(
    make_proxy: MakeProxy, backend: BackendWriter, if_none_match: str
) -> None:
    _, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    response = await client.get(URL, headers={**AUTH, "If-None-Match": if_none_match.format(e=etag)})
    assert response.status == 304
    assert await response.read() == b""
    assert response.headers["ETag"] == f'W/"{etag}"'
    assert response.headers["Cache-Control"] == CACHE_CONTROL


@pytest.mark.parametrize(("tail", "status"), [(b"\xa0", 304), (b"\x85", 304), (b"\xc2\xa0", 200)])
async def test_if_none_match_is_trimmed_as_the_backend_reads_its_bytes(
    make_proxy: MakeProxy, backend: BackendWriter, tail: bytes, status: int
) -> None:
    """The backend's server reads header bytes as latin-1, where str.strip() trims a 0xA0 or 0x85 byte (a
    304 there) and leaves the 0xC2 of a UTF-8 no-break space (a 200 there). Read as UTF-8, the proxy
    answered the first two 200, billed, and the third 304."""
    text, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    request = (
        f"GET {URL} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {SECRET}\r\n".encode()
        + b"Connection: close\r\n"
        + b'If-None-Match: W/"'
        + etag.encode()
        + b'"'
        + tail
        + b"\r\n\r\n"
    )
    head, body = await raw_exchange(client, request)
    assert head[0] == f"HTTP/1.1 {status} {'Not Modified' if status == 304 else 'OK'}".encode()
    assert f'ETag: W/"{etag}"'.encode() in head
    assert body == (b"" if status == 304 else text.encode())


@pytest.mark.parametrize("lines", [('"stale"', 'W/"{e}"'), ('W/"{e}"', '"stale"')])
async def test_an_if_none_match_list_over_two_lines_is_one_list(
    make_proxy: MakeProxy, backend: BackendWriter, lines: tuple[str, str]
) -> None:
    """RFC 9110 §5.3, as the backend's server joins them: the second line was ignored (200 and billed for
    the first order, 304 for the other)."""
    _, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    headers = CIMultiDict(AUTH)
    for line in lines:
        headers.add("If-None-Match", line.format(e=etag))
    response = await client.get(URL, headers=headers)
    assert response.status == 304
    assert response.headers["ETag"] == f'W/"{etag}"'


async def test_304_does_not_read_the_payload(make_proxy: MakeProxy, backend: BackendWriter) -> None:
    _, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    # Only the ETag key answers; were the payload read, it would be a miss and go upstream.
    sync_redis(backend.redis_url).delete(PAYLOAD_KEY)
    response = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{etag}"'})
    assert response.status == 304


@pytest.mark.parametrize("if_none_match", ['W/"stale"', '""', "W/", ",", '"abc', 'W/"x", "y"'])
async def test_non_matching_etag_gets_200(
    make_proxy: MakeProxy, backend: BackendWriter, if_none_match: str
) -> None:
    text, _ = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    response = await client.get(URL, headers={**AUTH, "If-None-Match": if_none_match})
    assert response.status == 200
    assert await response.read() == text.encode()


async def test_no_stored_etag_means_no_etag_and_no_cache_control(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    text = backend.set_payload_without_etag(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    response = await client.get(URL, headers={**AUTH, "If-None-Match": "*"})
    assert response.status == 200
    assert await response.read() == text.encode()
    assert "ETag" not in response.headers
    assert "Cache-Control" not in response.headers


@pytest.mark.parametrize(
    "path", ["/api/feature_flag/local_evaluation", "/api/feature_flag/local_evaluation/"]
)
async def test_alias_routes_answer_the_same(make_proxy: MakeProxy, backend: BackendWriter, path: str) -> None:
    text, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    response = await client.get(f"{path}?token={TOKEN}&send_cohorts", headers=AUTH)
    assert response.status == 200
    assert await response.read() == text.encode()
    assert response.headers["ETag"] == f'W/"{etag}"'


async def test_methods_and_missing_token(make_proxy: MakeProxy, backend: BackendWriter) -> None:
    backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    head = await client.head(URL, headers=AUTH)
    assert head.status == 200
    assert head.headers["Content-Type"] == "application/json"
    assert head.headers["Content-Length"] == "0"  # the reference's
    assert await head.read() == b""
    options = await client.options(URL)
    assert options.status == 204
    assert options.headers["Allow"] == "GET, OPTIONS, HEAD"
    post = await client.post(URL, headers=AUTH)
    assert post.status == 405
    assert post.headers["Allow"] == "GET, OPTIONS, HEAD"
    assert await post.json() == {
        "type": "invalid_request",
        "code": "method_not_allowed",
        "detail": 'Method "POST" not allowed.',
        "attr": None,
    }
    for url in ("/flags/definitions", "/flags/definitions?token=", "/flags/definitions?send_cohorts"):
        missing = await client.get(url, headers=AUTH)
        assert missing.status == 400, url
        assert (await missing.json())["type"] == "validation_error"


async def test_auth_answers_of_contract_step_3(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer]
) -> None:
    backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    no_header = await client.get(URL)
    assert no_header.status == 401
    assert await no_header.read() == (
        b'{"type":"authentication_error","code":"not_authenticated",'
        b'"detail":"Authentication credentials were not provided.","attr":null}'
    )
    wrong = await client.get(URL, headers={"Authorization": "Bearer phs_wrong"})
    assert wrong.status == 401
    assert await wrong.json() == {
        "type": "authentication_error",
        "code": "authentication_failed",
        "detail": "Secret API token is invalid.",
        "attr": None,
    }
    for header in (f"Bearer {BACKUP_SECRET}", f"bearer   {SECRET}  ", f"BEARER {SECRET}"):
        assert (await client.get(URL, headers={"Authorization": header})).status == 200, header
    assert upstream[0].seen == []


@pytest.mark.parametrize(
    "authorization",
    ["Bearer phx_personal_api_key", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "Token phs_x"],
)
async def test_undecidable_credentials_are_forwarded(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer], authorization: str
) -> None:
    backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    response = await client.get(URL, headers={"Authorization": authorization})
    assert response.status == 200
    assert (await response.json())["upstream"] is True
    [seen] = upstream[0].seen
    assert seen.path_qs == URL
    assert seen.headers["Authorization"] == authorization


async def test_misses_are_forwarded_with_the_original_request(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer]
) -> None:
    client = await proxy_for(make_proxy)
    # No payload yet, then the "known empty" marker, then a token without a team record.
    for url in (URL, None, "/flags/definitions?token=phc_unknown&send_cohorts"):
        if url is None:
            backend.set_missing(TEAM_ID)
            url = URL
        response = await client.get(
            url, headers={**AUTH, "If-None-Match": 'W/"abc"', "User-Agent": "posthog-python/7.4.0"}
        )
        assert response.status == 200
        assert (await response.json())["upstream"] is True
        seen = upstream[0].seen[-1]
        assert seen.method == "GET"
        assert seen.path_qs == url
        assert seen.headers["Authorization"] == AUTH["Authorization"]
        assert seen.headers["If-None-Match"] == 'W/"abc"'
        assert seen.headers["User-Agent"] == "posthog-python/7.4.0"
    assert len(upstream[0].seen) == 3


async def test_hostile_pickle_is_a_miss_and_never_runs(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer], tmp_path: Any
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    sync_redis(backend.redis_url).set(PAYLOAD_KEY, pickle.dumps(Exploit()))
    client = await proxy_for(make_proxy)
    response = await client.get(URL, headers=AUTH)
    assert response.status == 200
    assert (await response.json())["upstream"] is True
    assert not marker.exists()


@pytest.mark.parametrize(("mode", "local"), [("all", True), ("DEFINITIONS", True), ("Flags", False)])
async def test_service_mode_decides_who_answers(
    make_proxy: MakeProxy,
    backend: BackendWriter,
    upstream: tuple[Upstream, TestServer],
    mode: str,
    local: bool,
) -> None:
    text, _ = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy, service_mode=mode)
    response = await client.get(URL, headers=AUTH)
    assert response.status == 200
    assert (await response.read() == text.encode()) is local
    assert len(upstream[0].seen) == (0 if local else 1)
    health = await client.get("/_liveness")
    assert health.status == 200


async def test_a_new_payload_is_served_once_the_refresher_reads_it(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    """The refresher (not a request: a client on the ETag held gets a 304 until then) brings a change in."""
    _, old = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 0.05})
    assert (await client.get(URL, headers=AUTH)).headers["ETag"] == f'W/"{old}"'
    text, new = backend.set_definitions(TEAM_ID, flags(4))
    cache = client.app[keys.DEFINITIONS].cache
    await eventually(lambda: (entry := cache.get(TEAM_ID)) is not None and entry.etag == new, "a refresh")
    response = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{old}"'})
    assert response.status == 200
    assert await response.read() == text.encode()
    assert response.headers["ETag"] == f'W/"{new}"'


async def test_quota_limited_project_gets_402_until_the_limit_ends(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    _, etag = backend.set_definitions(TEAM_ID, flags(3))
    store = sync_redis(backend.redis_url)
    store.zadd("@posthog/quota-limits/feature_flag_requests", {TOKEN: time.time() + 3600})
    client = await proxy_for(make_proxy)
    response = await _wait_for_status(client, 402)
    limited = (
        b'{"type":"quota_limited","code":"payment_required",'
        b'"detail":"You have exceeded your feature flag request quota","attr":null}'
    )
    assert await response.read() == limited
    # An SDK polling with the current ETag is limited too (the quota comes before the 304), and clears
    # its flags (found unguarded by mutation testing outside the SDK tests).
    conditional = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{etag}"'})
    assert (conditional.status, await conditional.read()) == (402, limited)
    store.zrem("@posthog/quota-limits/feature_flag_requests", TOKEN)
    await _wait_for_status(client, 200)


async def test_a_team_over_its_rate_limit_and_its_quota_gets_the_429(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    """Contract §3: the rate limit (step 4) before the quota (step 5). An SDK keeps its flags on a 429 and
    clears them on a 402 (found unguarded by mutation testing: the two steps swapped, no test failed)."""
    backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy, rate_limits={"default": "2/minute"})
    for _ in range(2):
        assert (await client.get(URL, headers=AUTH)).status == 200
    sync_redis(backend.redis_url).zadd(
        "@posthog/quota-limits/feature_flag_requests", {TOKEN: time.time() + 3600}
    )
    quota = client.app[keys.QUOTA]
    deadline = time.monotonic() + 5
    while not quota.is_limited(TOKEN):
        assert time.monotonic() < deadline, "the quota snapshot"
        await asyncio.sleep(0.01)
    assert (await client.get(URL, headers=AUTH)).status == 429


async def test_billing_counts_equal_billed_requests(make_proxy: MakeProxy, backend: BackendWriter) -> None:
    _, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy)
    agents = {"posthog-python/7.4.0": 5, "posthog-node/5.1.0": 3, "curl/8.0": 2}
    for agent, count in agents.items():
        for _ in range(count):
            assert (await client.get(URL, headers={**AUTH, "User-Agent": agent})).status == 200
    for _ in range(4):  # 304s are not billed
        not_modified = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{etag}"'})
        assert not_modified.status == 304
    bucket = str(int(time.time() // 120)).encode()
    store = sync_redis(backend.redis_url)
    expected_sdk = {"posthog-python": 5, "posthog-node": 3, "other": 2}
    await _wait_for(lambda: store.hgetall(f"posthog:local_evaluation_requests:{TEAM_ID}") == {bucket: b"10"})
    for library, count in expected_sdk.items():
        counts = store.hgetall(f"posthog:local_evaluation_requests:sdk:{TEAM_ID}:{library}")
        assert counts == {bucket: str(count).encode()}, library


@pytest.mark.parametrize(
    "definitions",
    [
        flags(2, "survey-targeting-") + flags(1, "product-tour-targeting-"),
        [],  # no flag at all: "every flag key" is unbilled (PostHog bills only len(flag_keys) > 0)
    ],
)
async def test_survey_only_payloads_are_not_billed(
    make_proxy: MakeProxy, backend: BackendWriter, definitions: list[dict[str, Any]]
) -> None:
    backend.set_definitions(TEAM_ID, definitions)
    client = await proxy_for(make_proxy)
    for _ in range(3):
        assert (await client.get(URL, headers=AUTH)).status == 200
    await asyncio.sleep(0.2)  # several flush intervals
    assert sync_redis(backend.redis_url).keys("posthog:local_evaluation_requests*") == []


async def test_steady_state_costs_almost_no_redis_commands(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    """Steady state: SDK fleets polling, teams far below their rate limits. One team sends the 1,000 requests
    here in well under a second, 100x its default 600/minute: with that limit it would be synced with Redis
    like a team at its limit (a push every half lump of 30, about five commands each; which test_ratelimit
    prices), so it gets a limit it is far below, as a steady-state team is."""
    _, etag = backend.set_definitions(TEAM_ID, flags(50))
    client = await proxy_for(
        make_proxy,
        billing={"flush_interval_seconds": 2.0},
        quota={"poll_interval_seconds": 2.0},
        rate_limits={"default": "600000/minute", "etag": "6000000/minute"},
    )
    assert (await client.get(URL, headers=AUTH)).status == 200
    store = sync_redis(backend.redis_url)
    before = _commands(store)
    requests = 1000
    for i in range(requests):
        headers = {**AUTH, "If-None-Match": f'W/"{etag}"'} if i % 2 else AUTH
        assert (await client.get(URL, headers=headers)).status in (200, 304)
    spent = _commands(store) - before - 1  # the INFO call itself
    assert spent / requests <= 0.05, f"{spent} Redis commands for {requests} requests"


def _commands(store: redis.Redis) -> int:
    stats = store.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def _wait_for_status(client: Client, status: int) -> Any:
    for _ in range(200):
        response = await client.get(URL, headers=AUTH)
        if response.status == status:
            return response
        await asyncio.sleep(0.02)
    raise AssertionError(f"never answered {status}")


async def _wait_for(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def test_rate_limits_answer_429_per_team_and_budget(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer]
) -> None:
    _, etag = backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy, rate_limits={"default": "3/minute", "etag": "5/minute"})
    fresh = {**AUTH, "If-None-Match": f'W/"{etag}"'}
    for _ in range(3):
        async with client.get(URL, headers=AUTH) as response:
            assert response.status == 200
    async with client.get(URL, headers=AUTH) as response:
        assert response.status == 429
        assert 0 < int(response.headers["Retry-After"]) <= 60
        assert await response.read() == (
            b'{"type":"validation_error","code":"rate_limit_exceeded",'
            b'"detail":"Rate limit exceeded","attr":null}'
        )
    # Revalidations have their own budget: 304s still flow while full answers are limited...
    for _ in range(4):
        async with client.get(URL, headers=fresh) as response:
            assert response.status == 304
    # ...but a stale ETag gets a full answer, so it spends the full budget too (as the reference does).
    async with client.get(URL, headers={**AUTH, "If-None-Match": 'W/"stale"'}) as response:
        assert response.status == 429
    async with client.get(URL, headers=fresh) as response:
        assert response.status == 429  # the conditional budget (5) is now spent as well
    assert upstream[0].seen == []


async def test_allowlisted_team_is_not_rate_limited(make_proxy: MakeProxy, backend: BackendWriter) -> None:
    backend.set_definitions(TEAM_ID, flags(3))
    client = await proxy_for(make_proxy, rate_limits={"default": "1/minute", "allowlist": [str(TEAM_ID)]})
    for _ in range(5):
        async with client.get(URL, headers=AUTH) as response:
            assert response.status == 200


async def test_an_internal_bug_is_a_logged_500_without_secrets(
    make_proxy: MakeProxy, backend: BackendWriter, caplog: pytest.LogCaptureFixture
) -> None:
    client = await proxy_for(make_proxy)
    assert client.app is not None
    service = client.app[keys.DEFINITIONS]

    async def broken(token: str) -> None:
        raise RuntimeError(f"a bug, with data in its message: {token}")

    service.teams.get = broken
    response = await client.get(URL, headers=AUTH)
    assert response.status == 500
    assert await response.json() == {
        "type": "server_error",
        "code": "internal_error",
        "detail": "The proxy failed to handle this request.",
        "attr": None,
    }
    assert "unhandled error on GET /flags/definitions: RuntimeError" in caplog.text
    assert "in broken" in caplog.text  # the stack (its code), without the message (its data)
    assert TOKEN not in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("mode", ["exact", "fast"])
async def test_two_replicas_enforce_one_limit(
    make_proxy: MakeProxy, backend: BackendWriter, mode: str
) -> None:
    backend.set_definitions(TEAM_ID, flags(3))
    limits = {"default": "10/minute", "mode": mode, "sync_interval_seconds": 0.05}
    replicas = [await proxy_for(make_proxy, rate_limits=limits) for _ in range(2)]
    admitted = 0
    for _ in range(3):  # bursts alternate between replicas, with syncs in between (fast mode)
        for replica in replicas:
            for _ in range(4):
                async with replica.get(URL, headers=AUTH) as response:
                    assert response.status in (200, 429)
                    admitted += response.status == 200
            await asyncio.sleep(0.2)
    assert admitted == 10


async def test_a_replica_behind_a_change_never_answers_a_newer_etag_with_older_flags(
    make_proxy: MakeProxy, backend: BackendWriter, upstream: tuple[Upstream, TestServer]
) -> None:
    """Found by a reviewer with both SDKs and two replicas behind one Service: a client that got a change
    from the replica that read it first, then polled the other before its refresher had, was answered 200
    with the older flags, and installed them (billed too). An If-None-Match this replica does not hold sends
    it to Redis (the ETag alone) before it answers."""
    recorder, _ = upstream
    _, old_etag = backend.set_definitions(TEAM_ID, flags(1))
    # Two replicas on one Redis; neither refreshes on its own during the test.
    behind = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    ahead = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    for replica in (behind, ahead):
        assert (await replica.get(URL, headers=AUTH)).headers["ETag"] == f'W/"{old_etag}"'
    new_text, new_etag = backend.set_definitions(TEAM_ID, flags(2))
    await ahead.app[keys.DEFINITIONS].cache.refresh()  # one refresher cycle: this replica reads the change
    first = await ahead.get(URL, headers={**AUTH, "If-None-Match": f'W/"{old_etag}"'})
    assert first.status == 200
    assert first.headers["ETag"] == f'W/"{new_etag}"'

    # The client now holds the new ETag and polls the replica that has not refreshed.
    again = await behind.get(URL, headers={**AUTH, "If-None-Match": f'W/"{new_etag}"'})
    assert again.status == 304
    assert again.headers["ETag"] == f'W/"{new_etag}"'
    # Read, that replica answers a client still on the old ETag with the new flags.
    late = await behind.get(URL, headers={**AUTH, "If-None-Match": f'W/"{old_etag}"'})
    assert (late.status, await late.read()) == (200, new_text.encode())
    assert recorder.seen == []


async def test_a_client_on_an_etag_this_replica_replaced_is_answered_from_memory_without_a_read(
    make_proxy: MakeProxy, backend: BackendWriter, redis_url: str
) -> None:
    """After a change the replica has read, every client still on the old ETag polls once more: known older,
    so answered from memory (found by a reviewer: checked against Redis, a change cost one read per client,
    and while Redis was down such clients went to the backend)."""
    _, old_etag = backend.set_definitions(TEAM_ID, flags(1))
    client = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    assert (await client.get(URL, headers=AUTH)).status == 200
    new_text, new_etag = backend.set_definitions(TEAM_ID, flags(2))
    await client.app[keys.DEFINITIONS].cache.refresh()
    with sync_redis(redis_url) as raw:
        raw.config_resetstat()
    for _ in range(20):
        stale = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{old_etag}"'})
        assert (stale.status, await stale.read()) == (200, new_text.encode())
        assert stale.headers["ETag"] == f'W/"{new_etag}"'
    with sync_redis(redis_url) as raw:
        stats = raw.info("commandstats")
    assert "cmdstat_get" not in stats
    assert "cmdstat_mget" not in stats


async def test_a_change_back_to_an_etag_replaced_before_is_no_older_one(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    """A flag turned off and on again: the ETag held first, replaced, is the newest once more (a 304); the one
    in between is then the older one (the newest flags, from memory)."""
    first_text, first = backend.set_definitions(TEAM_ID, flags(1))
    client = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    cache = client.app[keys.DEFINITIONS].cache
    assert (await client.get(URL, headers=AUTH)).status == 200
    _, between = backend.set_definitions(TEAM_ID, flags(2))
    await cache.refresh()
    assert cache.replaced(TEAM_ID) == (f'W/"{first}"',)
    backend.set_definitions(TEAM_ID, flags(1))
    await cache.refresh()
    assert f'W/"{between}"' in cache.replaced(TEAM_ID)
    back = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{first}"'})
    assert back.status == 304
    older = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{between}"'})
    assert (older.status, await older.read()) == (200, first_text.encode())


async def test_a_client_with_an_etag_where_the_replica_holds_none_is_checked_against_redis(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    """The replica holds a payload stored without an ETag; the backend has since written one with an ETag,
    which a client got from another replica: a 304, not the older flags (found by a reviewer)."""
    old_text = backend.set_payload_without_etag(TEAM_ID, flags(1))
    client = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    held = await client.get(URL, headers=AUTH)
    assert (held.status, await held.read(), "ETag" in held.headers) == (200, old_text.encode(), False)
    _, etag = backend.set_definitions(TEAM_ID, flags(2))
    newer = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{etag}"'})
    assert newer.status == 304


async def test_an_unknown_etag_while_redis_cannot_be_read_goes_to_the_backend(
    make_proxy: MakeProxy,
    backend: BackendWriter,
    upstream: tuple[Upstream, TestServer],
    redis_server: RedisServer,
) -> None:
    """While Redis is down memory still answers the ETag it holds, and a client on an older one it replaced;
    an ETag it does not know may be newer (a replica cut off from Redis kept serving what it had): the
    backend decides."""
    recorder, _ = upstream
    _, older = backend.set_definitions(TEAM_ID, flags(2))
    client = await proxy_for(
        make_proxy,
        definitions={"refresh_interval_seconds": 3600},
        redis={"health_check_interval_seconds": 0.05},
    )
    assert (await client.get(URL, headers=AUTH)).status == 200
    text, etag = backend.set_definitions(TEAM_ID, flags(1))
    await client.app[keys.DEFINITIONS].cache.refresh()
    redis_server.stop()
    try:
        health = client.app[keys.HEALTH]
        await eventually(lambda: not health.redis_reads, "the health monitor to stop reads")
        held = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{etag}"'})
        assert held.status == 304
        replaced = await client.get(URL, headers={**AUTH, "If-None-Match": f'W/"{older}"'})
        assert (replaced.status, await replaced.read()) == (200, text.encode())
        assert recorder.seen == []
        newer = await client.get(URL, headers={**AUTH, "If-None-Match": 'W/"0123456789abcdef"'})
        assert newer.status == 200
        assert (await newer.json())["upstream"] is True
        assert [seen.path_qs for seen in recorder.seen] == [URL]
    finally:
        redis_server.start()


async def test_a_newer_etag_is_checked_in_a_read_of_its_own_not_one_begun_before_the_change(
    make_proxy: MakeProxy, backend: BackendWriter, chaos: ChaosProxy
) -> None:
    """Found by a reviewer: the check joined a read of the ETag already under way on the lagging replica,
    which Redis had answered before the change, and a client on the newer ETag was given the older flags.
    Here that replica's Redis replies arrive late (the commands run at once)."""
    _, first = backend.set_definitions(TEAM_ID, flags(1))
    ahead = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    behind = await proxy_for(
        make_proxy,
        definitions={"refresh_interval_seconds": 3600},
        redis={"url": chaos.url, "timeout_seconds": 2.0},
    )
    for replica in (ahead, behind):
        assert (await replica.get(URL, headers=AUTH)).headers["ETag"] == f'W/"{first}"'
    chaos.reply_delay = 0.5
    # A client with an ETag the lagging replica does not know starts a read of the ETag there...
    earlier = asyncio.create_task(behind.get(URL, headers={**AUTH, "If-None-Match": 'W/"00000000deadbeef"'}))
    # ... which Redis has answered (the reply is on its way) when the change lands.
    await asyncio.sleep(0.1)
    _, second = backend.set_definitions(TEAM_ID, flags(2))
    await ahead.app[keys.DEFINITIONS].cache.refresh()
    assert (await ahead.get(URL, headers=AUTH)).headers["ETag"] == f'W/"{second}"'
    late = await behind.get(URL, headers={**AUTH, "If-None-Match": f'W/"{second}"'})
    assert late.status == 304
    assert late.headers["ETag"] == f'W/"{second}"'
    assert (await earlier).status == 200


async def test_the_body_for_a_client_on_a_newer_etag_is_not_a_read_begun_before_it_asked(
    make_proxy: MakeProxy, backend: BackendWriter
) -> None:
    """Found by a reviewer: after the ETag check, the payload was loaded through the shared read, which could
    be one Redis had answered before two changes landed: a client on the middle one got the first's flags."""
    first_text, _ = backend.set_definitions(TEAM_ID, flags(1))
    behind = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    redis = behind.app[keys.DEFINITIONS].cache._client
    real_mget = redis.mget
    answered, release = asyncio.Event(), asyncio.Event()
    held_back = True

    async def late_mget(*args: Any, **kwargs: Any) -> Any:
        nonlocal held_back
        values = await real_mget(*args, **kwargs)  # Redis answers now...
        if held_back:
            held_back = False
            answered.set()
            await release.wait()  # ... and the reply is read late
        return values

    redis.mget = late_mget
    unconditional = asyncio.create_task(behind.get(URL, headers=AUTH))  # a 200's read of the first version
    await answered.wait()
    _, middle = backend.set_definitions(TEAM_ID, flags(2))
    last_text, last = backend.set_definitions(TEAM_ID, flags(3))
    # Answered with reads of its own: it does not wait for the read held back (nor take its answer).
    newer = await asyncio.wait_for(behind.get(URL, headers={**AUTH, "If-None-Match": f'W/"{middle}"'}), 5)
    release.set()
    assert (newer.status, await newer.read()) == (200, last_text.encode())
    assert newer.headers["ETag"] == f'W/"{last}"'
    first = await unconditional
    assert (first.status, await first.read()) == (200, first_text.encode())  # it had no flags before


async def test_a_burst_of_unknown_etags_shares_two_reads_of_its_own(
    make_proxy: MakeProxy, backend: BackendWriter, redis_url: str
) -> None:
    """Each check is a read begun after its request, but not one each (found by a reviewer: 40 requests at
    once made 40 reads, and a burst with Redis slow took the pool from other teams): those asking while one
    is out share the next."""
    _, etag = backend.set_definitions(TEAM_ID, flags(1))
    client = await proxy_for(make_proxy, definitions={"refresh_interval_seconds": 3600})
    assert (await client.get(URL, headers=AUTH)).status == 200
    # The first read is held until all 40 requests are in (they reach the proxy over time, not at once:
    # unheld, a slow machine saw reads end while requests still arrived, and three or four reads).
    cache = client.app[keys.DEFINITIONS].cache
    read, released, reads = cache._read, asyncio.Event(), []

    async def held(team_id: int, with_body: bool) -> Any:
        reads.append((team_id, with_body))
        await released.wait()
        return await read(team_id, with_body)

    cache._read = held
    with sync_redis(redis_url) as raw:
        raw.config_resetstat()
    answers = asyncio.gather(
        *(client.get(URL, headers={**AUTH, "If-None-Match": 'W/"00000000deadbeef"'}) for _ in range(40))
    )
    await eventually(lambda: client.app[keys.TELEMETRY].in_flight == 40, "all 40 requests in the proxy")
    released.set()
    assert [answer.status for answer in await answers] == [200] * 40
    assert {answer.headers["ETag"] for answer in await answers} == {f'W/"{etag}"'}
    with sync_redis(redis_url) as raw:
        stats = raw.info("commandstats")
    # The one begun for the first request, and the one those asking while it was out share: the ETag only.
    # (Counted here, not in Redis's GETs: a team record read again in the meantime is a GET too.)
    assert reads == [(TEAM_ID, False)] * 2
    assert "cmdstat_mget" not in stats
