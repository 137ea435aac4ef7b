"""Gradual offload: sticky weights, runtime control across replicas, shadow comparisons, billing once."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy import keys
from proxy import offload as offload_module
from proxy.cli import main
from proxy.offload import BUCKETS, Offload, OffloadState, bucket, parse_state
from proxy.settings import OffloadSettings
from proxy.shadow import Shadow, UpstreamAnswer
from tests.backend_writer import BackendWriter
from tests.conftest import MakeProxy
from tests.rig import Upstream

SECRET = "phs_offload_secret"
CONTROL_KEY = "edge-proxy:offload:definitions"
Client = TestClient[Any, Any]


@pytest.fixture
def teams(redis_url: str) -> dict[str, tuple[int, str, str]]:
    """300 projects sharing one secret: token -> (team id, payload text, etag)."""
    writer = BackendWriter(redis_url)
    made = {}
    for team_id in range(1, 301):
        token = f"phc_offload_{team_id}"
        writer.set_team(token, {"id": team_id, "api_token": token, "secret_api_token": SECRET})
        text, etag = writer.set_definitions(team_id, [{"id": 1, "key": f"flag-{team_id}", "active": True}])
        made[token] = (team_id, text, etag)
    return made


def url(token: str) -> str:
    """The SDK's definitions URL for `token`."""
    return f"/flags/definitions?token={token}&send_cohorts"


def auth(**extra: str) -> dict[str, str]:
    """The secret-token Authorization header (plus extra headers)."""
    return {"Authorization": f"Bearer {SECRET}", "User-Agent": "posthog-python/7.4.0", **extra}


def test_buckets_spread_evenly_and_are_stable() -> None:
    clients = [(f"phx_key_{i}", f"phc_project_{i % 37}") for i in range(20_000)]
    first = [bucket(credential, token) for credential, token in clients]
    assert first == [bucket(credential, token) for credential, token in clients]  # sticky
    for weight in (10, 50, 90):
        share = sum(b < weight * BUCKETS // 100 for b in first) / len(first)
        bound = 4 * math.sqrt(weight / 100 * (1 - weight / 100) / len(first))  # 4 sigma, binomial
        assert abs(share - weight / 100) < bound, weight


@pytest.mark.parametrize("weight", [0, 10, 50, 100])
async def test_weight_decides_the_local_share_sticky_per_client(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    weight: int,
) -> None:
    client = await make_proxy(definitions={"offload": {"weight_percent": weight}})
    answered: dict[str, set[bool]] = {}
    for _ in range(2):
        for token in teams:
            seen = len(upstream[0].seen)
            response = await client.get(url(token), headers=auth())
            assert response.status == 200
            await response.read()
            answered.setdefault(token, set()).add(len(upstream[0].seen) == seen)
    assert all(len(choices) == 1 for choices in answered.values())  # no client flip-flops
    local = sum(choices == {True} for choices in answered.values()) / len(teams)
    expected = sum(bucket(f"Bearer {SECRET}", t) < weight * BUCKETS // 100 for t in teams) / len(teams)
    assert local == expected
    bound = 4 * math.sqrt(max(weight / 100 * (1 - weight / 100), 1e-9) / len(teams))
    assert abs(local - weight / 100) <= bound + 1e-9


async def test_every_replica_follows_the_control_key_within_two_seconds(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replicas = [await make_proxy(), await make_proxy()]
    token = next(iter(teams))
    for replica in replicas:
        assert (await replica.get(url(token), headers=auth())).status == 200
    assert upstream[0].seen == []
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["offload", "kill", "on"]) == 0
    changed = time.monotonic()
    for replica in replicas:
        await _until(lambda r=replica: _forwarded(r, token, upstream), deadline=changed + 2.0)
    assert main(["offload", "kill", "off"]) == 0
    assert main(["offload", "set", "0"]) == 0
    with redis.Redis.from_url(redis_url) as store:
        assert store.hgetall(CONTROL_KEY) == {b"kill": b"0", b"weight_percent": b"0"}
    assert main(["offload", "reset"]) == 0
    for replica in replicas:
        await _until(lambda r=replica: _local(r, token, upstream), deadline=time.monotonic() + 2.0)


async def test_a_control_hash_that_vanishes_is_written_back_not_taken_for_a_reset(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis restarted empty or flushed took the hash away, and every replica went back to the file: the
    kill switch undone in the middle of the incident it was pulled for."""
    client = await make_proxy(definitions={"offload": {"watch_interval_seconds": 0.05}})
    assert client.app is not None
    offload = client.app[keys.DEFINITIONS].offload
    token = next(iter(teams))
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["offload", "kill", "on"]) == 0
    await _until(lambda: _forwarded(client, token, upstream), deadline=time.monotonic() + 2.0)
    with redis.Redis.from_url(redis_url) as store:
        store.delete(CONTROL_KEY)  # what a flush or an empty restart does to it
        await _until(lambda: _hash_back(store), deadline=time.monotonic() + 2.0)
        restored = store.hgetall(CONTROL_KEY)
        assert restored.pop(b"restored_from")  # when this replica last read it
        assert restored == {b"kill": b"1"}
    assert offload.state.kill
    assert offload.restored == 1
    assert await _forwarded(client, token, upstream)
    assert "offload control hash edge-proxy:offload:definitions vanished" in caplog.text
    # The way back to the file is a reset: a hash that says so, which is not written back either.
    assert main(["offload", "reset"]) == 0
    await _until(lambda: _local(client, token, upstream), deadline=time.monotonic() + 2.0)
    with redis.Redis.from_url(redis_url) as store:
        assert list(store.hgetall(CONTROL_KEY)) == [b"reset"]
    assert offload.restored == 1


async def test_of_two_copies_written_back_the_fresher_read_wins(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica cut off while the operator reset the kill switch, then a flush, and that replica polls first:
    it writes back the kill switch it last saw. The replica that saw the reset puts its copy in place."""
    settings = OffloadSettings()
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    stale, fresh = (Offload(client, settings) for client in clients)
    try:
        with redis.Redis.from_url(redis_url) as store:
            store.hset(CONTROL_KEY, "kill", "1")
            for replica in (stale, fresh):
                await replica.poll()
                assert replica.state.kill
            store.delete(CONTROL_KEY)
            store.hset(CONTROL_KEY, "reset", "1")  # what `offload reset` writes
            await fresh.poll()  # the stale one is cut off meanwhile
            assert not fresh.state.kill
            store.flushall()
            await stale.poll()  # first after the flush: its old copy goes back
            assert store.hget(CONTROL_KEY, "kill") == b"1"
            await fresh.poll()  # a later read, and another: replaced
            replaced = store.hgetall(CONTROL_KEY)
            assert replaced.pop(b"restored_from")
            assert replaced == {b"reset": b"1"}
            await stale.poll()
            assert not stale.state.kill
            assert not fresh.state.kill
            assert (stale.restored, fresh.restored) == (1, 1)
            # The operator's next write makes the hash theirs again, no copy for a replica to replace.
            monkeypatch.setenv("REDIS_URL", redis_url)
            assert main(["offload", "kill", "on"]) == 0
            assert store.hgetall(CONTROL_KEY) == {b"reset": b"1", b"kill": b"1"}
            await stale.poll()
            await fresh.poll()
            assert stale.state.kill
            assert fresh.state.kill
            assert store.hgetall(CONTROL_KEY) == {b"reset": b"1", b"kill": b"1"}
    finally:
        for client in clients:
            await client.aclose()


async def test_a_copy_of_the_same_hash_from_an_older_read_does_not_age_a_fresher_replicas_read(
    redis_url: str,
) -> None:
    """The operator sets 10 %, then 50 %, then 10 % again; three replicas each read one of those. After a
    flush the oldest writes back its 10 %, and the newest, reading that same copy, keeps its own later read
    time: when it writes back after the next flush, the replica that read 50 % in between takes the newest's
    10 %. Had the newest taken the copy's older time, its write-back would have looked older than the 50 %
    read, and the operator's last word undone."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    oldest, middle, newest = (Offload(client, OffloadSettings()) for client in clients)
    try:
        with redis.Redis.from_url(redis_url) as store:
            for replica, weight in ((oldest, "10"), (middle, "50"), (newest, "10")):
                store.hset(CONTROL_KEY, "weight_percent", weight)
                await replica.poll()
            store.flushall()
            await oldest.poll()  # writes back 10 %, as read first
            await newest.poll()  # the same fields, from an older read
            store.flushall()
            await newest.poll()  # writes back 10 %, as read last
            await middle.poll()  # cut off until now, with the 50 % read in between
            assert store.hget(CONTROL_KEY, "weight_percent") == b"10"
            assert middle.state.weight_percent == newest.state.weight_percent == 10
    finally:
        for client in clients:
            await client.aclose()


async def test_a_copy_written_back_then_edited_by_hand_is_the_operators(redis_url: str) -> None:
    """`redis-cli HSET` keeps the write-back's marker: the copy then said "replace me" to a fresher replica,
    which put back its own and lost the operator's edit; HDEL of every field left a hash none followed."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    stale, fresh = (Offload(client, OffloadSettings()) for client in clients)
    try:
        with redis.Redis.from_url(redis_url) as store:
            store.hset(CONTROL_KEY, "weight_percent", "10")
            await stale.poll()
            store.hset(CONTROL_KEY, "weight_percent", "50")  # while the stale one is cut off
            await fresh.poll()
            store.flushall()
            await stale.poll()  # writes back 10 %
            assert store.hget(CONTROL_KEY, "weight_percent") == b"10"
            store.hset(CONTROL_KEY, "kill", "1")  # the operator, by hand, on the copy
            for _ in range(2):
                await fresh.poll()
                await stale.poll()
            assert store.hget(CONTROL_KEY, "kill") == b"1"  # not replaced
            assert fresh.state.kill
            assert stale.state.kill
            store.hdel(CONTROL_KEY, "kill")  # undone by hand: the copy's own values again, and they stay
            for _ in range(2):
                await fresh.poll()
                await stale.poll()
            assert store.hgetall(CONTROL_KEY) == {b"weight_percent": b"10"}
            assert not fresh.state.kill
            assert not stale.state.kill
            # A fresh copy written back, its every field but the marker deleted by hand before anyone looked:
            # that is the operator's too (the file, as `offload status` says), for every replica.
            store.flushall()
            await stale.poll()
            assert store.hexists(CONTROL_KEY, "restored_from")
            store.hdel(CONTROL_KEY, "weight_percent")
            for _ in range(3):
                await fresh.poll()
                await stale.poll()
            assert fresh.state == stale.state == fresh.configured
    finally:
        for client in clients:
            await client.aclose()


async def _hash_back(store: redis.Redis) -> bool:
    return bool(store.exists(CONTROL_KEY))


async def test_a_replica_that_never_saw_the_hash_follows_its_file(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], upstream: tuple[Upstream, TestServer]
) -> None:
    client = await make_proxy(definitions={"offload": {"weight_percent": 0, "watch_interval_seconds": 0.05}})
    assert client.app is not None
    await asyncio.sleep(0.2)
    assert await _forwarded(client, next(iter(teams)), upstream)
    assert client.app[keys.DEFINITIONS].offload.restored == 0


@pytest.mark.parametrize(
    ("fields", "state", "problems"),
    [
        ({"kill": "ON"}, OffloadState(50.0, kill=True, shadow=False), {}),
        ({"kill": "Yes", "shadow": "no"}, OffloadState(50.0, kill=True, shadow=False), {}),
        (
            {"kill": "maybe"},
            OffloadState(50.0, kill=True, shadow=False),
            {"kill": "kill 'maybe' is neither on nor off"},
        ),
        (
            {"weight_percent": "1O"},
            OffloadState(10.0, kill=False, shadow=False),
            {"weight_percent": "weight_percent '1O' is not a number"},
        ),
        (
            {"weight_percent": "nan"},
            OffloadState(10.0, kill=False, shadow=False),
            {"weight_percent": "weight_percent 'nan' is not a number"},
        ),
        ({"weight_percent": "250"}, OffloadState(100.0, kill=False, shadow=False), {}),
        ({}, OffloadState(50.0, kill=False, shadow=False), {}),
    ],
)
def test_control_values_typed_by_hand_are_read_leniently_and_a_typo_keeps_the_state_in_force(
    fields: dict[str, str], state: OffloadState, problems: dict[str, str]
) -> None:
    """An operator under pressure types `HSET ... kill ON` or `weight_percent 1O`: the first is on, the second
    keeps the weight in force (10 %), not the file's (50 %)."""
    configured = OffloadState(50.0, kill=False, shadow=False)
    in_force = OffloadState(10.0, kill=True, shadow=False)
    raw = {name.encode(): value.encode() for name, value in fields.items()}
    assert parse_state(raw, configured, in_force) == (state, problems)


async def test_no_request_is_dropped_while_the_weight_flips(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], redis_url: str
) -> None:
    client = await make_proxy(definitions={"offload": {"watch_interval_seconds": 0.05}})
    tokens = list(teams)[:20]
    statuses: list[int] = []

    async def poll() -> None:
        for _ in range(15):
            for token in tokens:
                async with client.get(url(token), headers=auth()) as response:
                    await response.read()
                    statuses.append(response.status)

    with redis.Redis.from_url(redis_url) as store:
        task = asyncio.create_task(poll())
        for weight in ("0", "100", "50", "0", "100"):
            store.hset(CONTROL_KEY, "weight_percent", weight)
            await asyncio.sleep(0.05)
        await task
    assert statuses == [200] * len(statuses)


async def test_kill_switch_and_weight_from_the_cli_are_reported(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["offload", "set", "10"]) == 0
    assert main(["offload", "status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "definitions offload 10% (kill switch off, shadow off)"
    )
    assert main(["offload", "set", "101"]) == 2
    assert main(["offload", "kill", "on"]) == 0
    assert "kill switch ON: everything forwarded" in capsys.readouterr().out


async def test_status_shows_a_field_typed_wrong_by_hand_as_unreadable_not_the_files_value(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a reviewer: mid-incident `HSET ... kill of` (a typo of off) leaves every running replica's
    kill switch on, and `offload status` printed "kill switch off" (the file's value)."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["offload", "kill", "on"]) == 0
    capsys.readouterr()
    with redis.Redis.from_url(redis_url) as store:
        store.hset(CONTROL_KEY, mapping={"kill": "of", "weight_percent": "1O"})
    assert main(["offload", "status"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["definitions offload unreadable (kill switch unreadable, shadow off)"]
    assert "kill 'of' is neither on nor off: running replicas keep the value they had" in err
    assert "weight_percent '1O' is not a number" in err


async def _forwarded(client: Client, token: str, upstream: tuple[Upstream, TestServer]) -> bool:
    before = len(upstream[0].seen)
    await (await client.get(url(token), headers=auth())).read()
    return len(upstream[0].seen) > before


async def _local(client: Client, token: str, upstream: tuple[Upstream, TestServer]) -> bool:
    return not await _forwarded(client, token, upstream)


async def _until(check: Any, deadline: float) -> None:
    while not await check():
        assert time.monotonic() < deadline, "not followed within 2 s"
        await asyncio.sleep(0.05)


# --- shadow mode -------------------------------------------------------------------------------------------


def _backend(
    teams: dict[str, tuple[int, str, str]],
    *,
    status: int = 200,
    etag: str | None = None,
    body: bytes | None = None,
    cache_control: str = "private, must-revalidate",
) -> Any:
    """An upstream answering definitions like the backend, optionally disagreeing in one respect."""

    async def answer(request: web.Request, _body: bytes) -> web.StreamResponse:
        _, text, real_etag = teams[request.query["token"]]
        headers = {"ETag": f'W/"{etag or real_etag}"', "Cache-Control": cache_control}
        return web.Response(
            status=status,
            body=text.encode() if body is None else body,
            content_type="application/json",
            headers=headers,
        )

    return answer


def _reordered(text: str) -> bytes:
    """The same JSON with keys in another order: equal as canonical JSON, not byte-equal."""
    import json

    return json.dumps(dict(reversed(list(json.loads(text).items())))).encode()


@pytest.mark.parametrize(
    ("disagreement", "kind"),
    [
        ({}, "match"),
        ({"status": 201}, "status"),
        ({"etag": "0000000000000000"}, "header_etag"),
        ({"cache_control": "no-store"}, "header_cache_control"),
        ({"body": "one byte"}, "body"),
        ({"body": "key order"}, "match_json"),
    ],
)
async def test_shadow_detects_and_classifies_each_disagreement(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    disagreement: dict[str, Any],
    kind: str,
) -> None:
    token = next(iter(teams))
    _, text, _ = teams[token]
    if disagreement.get("body") == "one byte":
        disagreement["body"] = text.encode()[:-2] + b"]}"
    elif disagreement.get("body") == "key order":
        disagreement["body"] = _reordered(text)
    upstream[0].routes["/flags/definitions"] = _backend(teams, **disagreement)
    client = await make_proxy(definitions={"offload": {"weight_percent": 0, "shadow": True}})
    assert client.app is not None
    shadow = client.app[keys.DEFINITIONS].shadow
    for _ in range(3):
        response = await client.get(url(token), headers=auth())
        assert response.status == disagreement.get("status", 200)
        await response.read()
    await _settle(shadow)
    assert dict(shadow.outcomes) == {kind: 3}
    # The backend answered every request: the local answers it was compared with are not counted as served.
    assert client.app[keys.TELEMETRY].etag == {"hit": 0, "miss": 0, "none": 0}


@pytest.mark.parametrize("conditional", [False, True])
async def test_a_flag_change_the_proxy_has_not_refreshed_yet_is_local_stale_not_a_mismatch(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    conditional: bool,
) -> None:
    """Found by a reviewer: the backend reads a flag change at once, the proxy within a refresh interval, and
    shadow mode counted (and logged) every change as a status, ETag, Content-Type and body mismatch."""
    token = next(iter(teams))
    team_id, _, old_etag = teams[token]
    full = _backend(teams)

    async def backend(request: web.Request, body: bytes) -> web.StreamResponse:
        etag = f'W/"{teams[request.query["token"]][2]}"'
        if request.headers.get("If-None-Match") == etag:
            cache_control = "private, must-revalidate"
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": cache_control})
        return cast(web.StreamResponse, await full(request, body))

    upstream[0].routes["/flags/definitions"] = backend
    client = await make_proxy(
        definitions={"refresh_interval_seconds": 3600, "offload": {"weight_percent": 0, "shadow": True}}
    )
    assert client.app is not None
    shadow = client.app[keys.DEFINITIONS].shadow
    headers = auth(**({"If-None-Match": f'W/"{old_etag}"'} if conditional else {}))
    await (await client.get(url(token), headers=headers)).read()
    await _settle(shadow)
    assert dict(shadow.outcomes) == {"match": 1}
    with BackendWriter(redis_url) as writer:  # the flag change
        text, etag = writer.set_definitions(team_id, [{"id": 2, "key": "changed", "active": True}])
    teams[token] = (team_id, text, etag)
    for _ in range(2):
        async with client.get(url(token), headers=headers) as response:
            assert response.status == 200
            assert response.headers["ETag"] == f'W/"{etag}"'
        await _settle(shadow)  # one comparison at a time: the second finds the change read already
    assert dict(shadow.outcomes) == {"match": 3, "local_stale": 1}


def _denying(status: int, body: bytes, **headers: str) -> Any:
    """An upstream refusing every request as the backend refuses a credential."""

    async def answer(request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    return answer


@pytest.mark.parametrize(
    ("backend", "outcomes", "learned"),
    [
        ("allows", {"match": 3}, True),
        ("refuses", {"learned_refusal": 1, "match": 2}, True),  # the first learns: nothing to compare
        ("refuses gzipped", {"local_forwards": 3}, False),
    ],
)
async def test_shadow_compares_personal_api_key_clients_by_learning_from_the_backend(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    backend: str,
    outcomes: dict[str, int],
    learned: bool,
) -> None:
    """posthog-python's local evaluation sends a personal API key: with offload at 0 % no local request ever
    learned its verdict, so every comparison was "local_forwards" (nothing compared, no mismatch shown)."""
    refusal = b'{"type":"authentication_error","code":"authentication_failed","detail":"Invalid"}'
    if backend == "allows":
        upstream[0].routes["/flags/definitions"] = _backend(teams)
    elif backend == "refuses":
        upstream[0].routes["/flags/definitions"] = _denying(401, refusal, **{"WWW-Authenticate": "Bearer"})
    else:
        # Compressed by an ingress: a verdict learned from it would be sent again without its coding.
        upstream[0].routes["/flags/definitions"] = _denying(
            401, gzip.compress(refusal), **{"Content-Encoding": "gzip"}
        )
    client = await make_proxy(
        definitions={
            "offload": {"weight_percent": 0, "shadow": True},
            "auth": {"hmac_key": "offload-test-verdict-hmac-key-0123456789"},  # shared: visible in Redis
        }
    )
    assert client.app is not None
    shadow = client.app[keys.DEFINITIONS].shadow
    token = next(iter(teams))
    for _ in range(3):
        response = await client.get(
            url(token), headers={"Authorization": "Bearer phx_shadowed_key", "User-Agent": "posthog-python/7"}
        )
        assert response.status == (200 if backend == "allows" else 401)
        await response.read()
        await _settle(shadow)
    assert dict(shadow.outcomes) == outcomes
    with redis.Redis.from_url(redis_url) as store:
        assert bool(store.keys("edge-proxy:verdict:*")) is learned
    # Every request still went to the backend: learning changes what is compared, not who answers.
    assert sum(seen.path_qs.startswith("/flags/definitions") for seen in upstream[0].seen) == 3


async def test_with_learning_off_shadow_comparisons_learn_nothing_and_refuse_nothing_here(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
) -> None:
    """`learn_verdicts: false`: nothing is remembered, shadow comparisons included; and the backend's
    refusals at 0 % are not counted as the proxy's own (`edge_proxy_definitions_auth_denied_total`). Both
    found unguarded by mutation testing."""
    refusal = b'{"type":"authentication_error","code":"authentication_failed","detail":"Invalid"}'
    upstream[0].routes["/flags/definitions"] = _denying(401, refusal)
    client = await make_proxy(
        definitions={
            "offload": {"weight_percent": 0, "shadow": True},
            "auth": {"hmac_key": "offload-test-verdict-hmac-key-0123456789", "learn_verdicts": False},
        }
    )
    assert client.app is not None
    shadow = client.app[keys.DEFINITIONS].shadow
    token = next(iter(teams))
    for _ in range(3):
        async with client.get(url(token), headers={"Authorization": "Bearer phx_shadowed_key"}) as response:
            assert response.status == 401
        await _settle(shadow)
    assert len(client.app[keys.DEFINITIONS].verdicts) == 0
    with redis.Redis.from_url(redis_url) as store:
        assert store.keys("edge-proxy:verdict:*") == []
    learning = await make_proxy(
        definitions={
            "offload": {"weight_percent": 0, "shadow": True},
            "auth": {"hmac_key": "offload-test-verdict-hmac-key-0123456789"},
        }
    )
    assert learning.app is not None
    for _ in range(3):
        async with learning.get(url(token), headers={"Authorization": "Bearer phx_shadowed_key"}) as response:
            assert response.status == 401
        await _settle(learning.app[keys.DEFINITIONS].shadow)
    assert sum(learning.app[keys.TELEMETRY].auth_denied.values()) == 0  # all three were the backend's


@pytest.mark.parametrize(("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_shadow_compares_a_compressed_answer_as_the_client_reads_it(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    coding: str,
    compress: Any,
) -> None:
    token = next(iter(teams))
    _, text, etag = teams[token]

    async def compressed(request: web.Request, _body: bytes) -> web.StreamResponse:
        headers = {
            "ETag": f'W/"{etag}"',
            "Cache-Control": "private, must-revalidate",
            "Content-Encoding": coding,
        }
        return web.Response(body=compress(text.encode()), content_type="application/json", headers=headers)

    upstream[0].routes["/flags/definitions"] = compressed
    client = await make_proxy(definitions={"offload": {"weight_percent": 0, "shadow": True}})
    assert client.app is not None
    shadow = client.app[keys.DEFINITIONS].shadow
    response = await client.get(url(token), headers=auth())
    assert response.status == 200
    assert await response.read() == text.encode()  # aiohttp's client undoes the coding, as SDKs do
    await _settle(shadow)
    assert dict(shadow.outcomes) == {"match": 1}


async def test_a_backend_rate_limit_is_counted_as_such_not_as_mismatches(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], upstream: tuple[Upstream, TestServer]
) -> None:
    """A comparison spends no local rate-limit budget, so the backend's 429s can never be agreed with."""
    limited = b'{"type":"throttled_error","code":"throttled","detail":"Request was throttled."}'
    upstream[0].routes["/flags/definitions"] = _denying(429, limited, **{"Retry-After": "30"})
    client = await make_proxy(definitions={"offload": {"weight_percent": 0, "shadow": True}})
    assert client.app is not None
    shadow = client.app[keys.DEFINITIONS].shadow
    for _ in range(2):
        assert (await client.get(url(next(iter(teams))), headers=auth())).status == 429
    await _settle(shadow)
    assert dict(shadow.outcomes) == {"upstream_rate_limited": 2}


def test_a_shadow_body_past_the_limit_or_in_a_coding_not_undone_is_not_compared() -> None:
    from proxy.shadow import UpstreamAnswer, decoded

    text = b'{"flags": []}' * 100
    packed = gzip.compress(text)
    whole = decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, packed), len(text))
    assert whole.body == text
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, packed), len(text) - 1).body is None
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, packed[:-20]), len(text)).body is None
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "br"}, b"\x0b\x02\x80"), 1000).body is None
    plain = UpstreamAnswer(200, {"Content-Encoding": "identity"}, text)
    assert decoded(plain, 10) is plain


def test_a_shadow_body_is_decoded_as_the_sdks_http_stack_decodes_it() -> None:
    """Found by a reviewer: raw deflate (urllib3 accepts it) was not compared, and a gzip body of two members
    (concatenated by an ingress) was read to its first member's end: a false `body` mismatch."""
    from proxy.shadow import UpstreamAnswer, decoded

    text = b'{"flags": []}' * 100
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = raw.compress(text) + raw.flush()
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "deflate"}, deflated), len(text)).body == text
    wrapped = zlib.compress(text)  # the zlib format, as RFC 9110 means deflate
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "deflate"}, wrapped), len(text)).body == text
    members = gzip.compress(text[:600]) + gzip.compress(text[600:])
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, members), len(text)).body == text
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, members), len(text) - 1).body is None
    cut = members[:-20]  # the second member cut short: the first is the body (urllib3 adds what it can)
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, cut), 10**6).body == text[:600]
    # After a whole member, what is not one ends the body, as urllib3 reads it: padding, junk, a header cut
    # short, a member cut short or corrupt.
    for tail in (b"\0" * 16, b"not gzip", b"\x1f\x8b", b"\x1f\x8b\x08", gzip.compress(text)[:30]):
        padded = gzip.compress(text) + tail
        assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, padded), 10**6).body == text
    empty_then_junk = gzip.compress(b"") + b"junk"
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, empty_then_junk), 100).body == b""
    assert decoded(UpstreamAnswer(200, {"Content-Encoding": "gzip"}, b"not gzip"), 100).body is None


async def test_client_never_waits_for_the_shadow_comparison(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], upstream: tuple[Upstream, TestServer]
) -> None:
    upstream[0].routes["/flags/definitions"] = _backend(teams)
    client = await make_proxy(definitions={"offload": {"weight_percent": 0, "shadow": True}})
    assert client.app is not None
    service = client.app[keys.DEFINITIONS]
    release = asyncio.Event()
    real_decide = service.decide

    async def slow_decide(request: web.Request, *, live: bool = True) -> Any:
        await release.wait()  # the local (shadow) path is stuck until the client has its answer
        return await real_decide(request, live=live)

    service.decide = slow_decide
    token = next(iter(teams))
    response = await asyncio.wait_for(client.get(url(token), headers=auth()), timeout=5)
    assert response.status == 200
    assert await response.read() == teams[token][1].encode()
    assert service.shadow.running == 1  # still comparing after the client is done
    release.set()
    await _settle(service.shadow)
    assert dict(service.shadow.outcomes) == {"match": 1}


async def test_shadow_work_is_bounded(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], upstream: tuple[Upstream, TestServer]
) -> None:
    upstream[0].routes["/flags/definitions"] = _backend(teams)
    client = await make_proxy(
        definitions={"offload": {"weight_percent": 0, "shadow": True, "shadow_max_concurrency": 1}}
    )
    assert client.app is not None
    service = client.app[keys.DEFINITIONS]
    release = asyncio.Event()
    real_decide = service.decide

    async def slow_decide(request: web.Request, *, live: bool = True) -> Any:
        await release.wait()
        return await real_decide(request, live=live)

    service.decide = slow_decide
    for token in list(teams)[:5]:
        assert (await client.get(url(token), headers=auth())).status == 200
    release.set()
    await _settle(service.shadow)
    assert dict(service.shadow.outcomes) == {"match": 1, "skipped_busy": 4}


@pytest.mark.parametrize(
    ("offload", "billed_by_proxy"),
    [({"weight_percent": 100}, 4), ({"weight_percent": 0}, 0), ({"weight_percent": 0, "shadow": True}, 0)],
)
async def test_billing_counts_each_request_once_in_every_mode(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
    offload: dict[str, Any],
    billed_by_proxy: int,
) -> None:
    upstream[0].routes["/flags/definitions"] = _backend(teams)
    client = await make_proxy(definitions={"offload": offload}, billing={"flush_interval_seconds": 0.05})
    assert client.app is not None
    token = next(iter(teams))
    team_id = teams[token][0]
    for _ in range(4):
        assert (await client.get(url(token), headers=auth())).status == 200
    await _settle(client.app[keys.DEFINITIONS].shadow)
    forwarded = sum(seen.path_qs.startswith("/flags/definitions") for seen in upstream[0].seen)
    assert forwarded == 4 - billed_by_proxy  # the backend bills these itself
    key = f"posthog:local_evaluation_requests:{team_id}"
    with redis.Redis.from_url(redis_url) as store:
        for _ in range(100):
            if billed_by_proxy == 0 or store.hgetall(key):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.15)  # several flushes: nothing more arrives
        counts = store.hgetall(key)
    assert sum(int(v) for v in counts.values()) == billed_by_proxy


async def _settle(shadow: Any) -> None:
    for _ in range(250):
        if shadow.running == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("shadow comparisons did not finish")


async def test_a_replica_starting_during_a_rollback_forwards_from_its_first_request(
    make_proxy: MakeProxy,
    teams: dict[str, tuple[int, str, str]],
    upstream: tuple[Upstream, TestServer],
    redis_url: str,
) -> None:
    with redis.Redis.from_url(redis_url) as store:
        store.hset(CONTROL_KEY, "kill", "1")
    client = await make_proxy(definitions={"offload": {"watch_interval_seconds": 30}})
    token = next(iter(teams))
    assert await _forwarded(client, token, upstream)


async def test_the_kill_switch_stops_shadow_comparisons_too(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], upstream: tuple[Upstream, TestServer]
) -> None:
    """An operator pulling the kill switch on a misbehaving local path expects no local work at all."""
    upstream[0].routes["/flags/definitions"] = _backend(teams)
    client = await make_proxy(definitions={"offload": {"weight_percent": 0, "shadow": True}})
    service = client.app[keys.DEFINITIONS]
    service.offload.apply(OffloadState(0.0, kill=True, shadow=True))
    token = next(iter(teams))
    for _ in range(3):
        response = await client.get(url(token), headers=auth())
        assert response.status == 200
        await response.read()
    await _settle(service.shadow)
    assert dict(service.shadow.outcomes) == {}
    assert len(upstream[0].seen) == 3


def test_large_bodies_that_differ_are_compared_within_bounds() -> None:
    """A comparison runs beside the requests: JSON equality up to 1 MiB (remembered for the same two bodies),
    a byte difference above it counts as "body" without parsing; the first difference is found exactly."""
    from proxy import shadow

    flags = {"flags": [{"key": f"flag-{i}", "active": True} for i in range(25_000)]}
    local_text = json.dumps(flags)
    spaced = json.dumps(flags, indent=1).encode()
    local = web.Response(body=local_text.encode(), content_type="application/json")

    assert len(local_text) < 1024 * 1024 < len(spaced)
    assert shadow.compare(
        local, shadow.UpstreamAnswer(200, {"Content-Type": "application/json"}, spaced)
    ) == ["body"]
    compact = json.dumps(flags, separators=(",", ":")).encode()
    answer = shadow.UpstreamAnswer(200, {"Content-Type": "application/json"}, compact)
    assert shadow.compare(local, answer) == ["match_json"]
    assert (len(local_text), hash(local_text.encode()), len(compact), hash(compact)) in shadow._JSON_VERDICTS
    assert shadow.compare(local, answer) == ["match_json"]  # from the remembered verdict

    a = b"x" * 10_000 + b"a" + b"y" * 10
    b = b"x" * 10_000 + b"b" + b"y" * 10
    assert shadow.body_diff(a, b) == "local 10011 bytes, upstream 10011 bytes, first difference at byte 10000"
    assert (
        shadow.body_diff(a, a[:5000])
        == "local 10011 bytes, upstream 5000 bytes, first difference at byte 5000"
    )


async def test_offload_status_reads_the_config_file_given_before_or_after_the_action_or_by_environment(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The configured weight is what every replica follows until a runtime change: a status that ignored
    the file reported 100 % while replicas served 10 % (`offload status --config F` was refused)."""
    config = tmp_path / "edge-proxy.yaml"
    config.write_text("definitions: {offload: {weight_percent: 10}}\n")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("EDGE_PROXY_CONFIG", raising=False)
    for argv in (
        ["offload", "--config", str(config), "status"],
        ["offload", "status", "--config", str(config)],
    ):
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("definitions offload 10% ")
    monkeypatch.setenv("EDGE_PROXY_CONFIG", str(config))  # what the image sets
    assert main(["offload", "status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("definitions offload 10% ")
    monkeypatch.delenv("EDGE_PROXY_CONFIG")
    assert main(["offload", "status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("definitions offload 100% ")


async def test_an_upstream_failure_gives_back_its_comparison_slot(
    make_proxy: MakeProxy, teams: dict[str, tuple[int, str, str]], upstream: tuple[Upstream, TestServer]
) -> None:
    """A forwarded request whose upstream fails before answering has nothing to compare: its slot is given
    back, and comparisons go on once the backend answers again (found by mutation testing: each failure
    kept its slot, and after shadow_max_concurrency of them nothing was ever compared again)."""
    answer = _backend(teams)
    failing = True

    async def flaky(request: web.Request, body: bytes) -> web.StreamResponse:
        if not failing:
            response: web.StreamResponse = await answer(request, body)
            return response
        cut = web.StreamResponse()
        cut.content_length = 1000
        await cut.prepare(request)
        await cut.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()  # dies before its answer is complete: a 502, nothing observed
        return cut

    upstream[0].routes["/flags/definitions"] = flaky
    client = await make_proxy(
        definitions={"offload": {"weight_percent": 0, "shadow": True, "shadow_max_concurrency": 2}}
    )
    shadow = client.app[keys.DEFINITIONS].shadow
    token = next(iter(teams))
    for _ in range(3):
        assert (await client.get(url(token), headers=auth())).status == 502
    assert shadow.running == 0
    failing = False
    response = await client.get(url(token), headers=auth())
    assert response.status == 200
    await response.read()
    await _settle(shadow)
    assert dict(shadow.outcomes) == {"match": 1}


def test_a_rate_limit_both_sides_agree_on_is_compared_as_any_answer() -> None:
    """Only the backend's 429 alone is "upstream_rate_limited"; a 429 from both sides is compared as usual
    (found by mutation testing: both were counted as the backend's rate limit, never as a match)."""
    from proxy.shadow import UpstreamAnswer, compare

    body = b'{"type":"throttled_error","code":"throttled","detail":"Request was throttled."}'
    headers = {"Content-Type": "application/json"}
    local = web.Response(status=429, body=body, headers=headers)
    assert compare(local, UpstreamAnswer(429, headers, body)) == ["match"]
    assert compare(
        web.Response(status=200, body=body, headers=headers), UpstreamAnswer(429, headers, body)
    ) == ["upstream_rate_limited"]


async def test_a_typo_in_the_control_hash_is_logged_once_not_at_every_poll(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas poll every 0.5 s: the same problem is logged when it appears, not twice a second for as
    long as it stands (found by mutation testing); a new one is logged again."""
    store = aioredis.Redis.from_url(redis_url)
    offload = Offload(store, OffloadSettings())
    key = OffloadSettings().control_key
    try:
        await store.hset(key, mapping={"weight_percent": "1O"})
        for _ in range(3):
            await offload.poll()
        await store.hset(key, mapping={"weight_percent": "2O"})
        await offload.poll()
    finally:
        await store.delete(key)
        await store.aclose()
    logged = [r.getMessage() for r in caplog.records if r.name == "proxy.offload"]
    assert logged == [
        "offload control: weight_percent '1O' is not a number; that field keeps the value in force",
        "offload control: weight_percent '2O' is not a number; that field keeps the value in force",
    ]


async def test_shadow_logs_a_sample_of_each_mismatch_an_hour_and_never_a_match(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`shadow_log_samples` lines per kind of mismatch, counted all the same; a new hour logs again; a match
    is never logged (each found unguarded by mutation testing)."""
    shadow = Shadow(OffloadSettings(shadow_log_samples=2))
    local = web.Response(status=200, body=b'{"flags": []}', headers={"ETag": 'W/"a"'})
    differs = UpstreamAnswer(401, {"ETag": 'W/"a"'}, b'{"flags": []}')
    same = UpstreamAnswer(200, {"ETag": 'W/"a"'}, b'{"flags": []}')

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "proxy.shadow"]

    for _ in range(5):
        await shadow.record(local, differs, route="/flags/definitions", team_id=1)
        await shadow.record(local, same, route="/flags/definitions", team_id=1)
    assert shadow.outcomes["match"] == 5
    assert sum(count for kind, count in shadow.outcomes.items() if kind != "match") >= 5
    assert len(logged()) == 2
    assert all(line.startswith("shadow mismatch ") and "match " not in line.split()[2] for line in logged())
    shadow._logged_since -= 3601  # an hour later
    await shadow.record(local, differs, route="/flags/definitions", team_id=1)
    assert len(logged()) == 3


def test_a_garbled_write_back_marker_reads_as_no_time() -> None:
    """A marker's time is when the copy was read: a garbled or non-finite one counts as never, so a real
    read always replaces that copy (found unguarded by mutation testing: "inf" made it unbeatable)."""
    assert offload_module._marker(None) == (0.0, None)
    assert offload_module._marker(b"12.5 abc") == (12.5, "abc")
    assert offload_module._marker(b"soon abc") == (0.0, None)
    assert offload_module._marker(b"inf abc") == (0.0, "abc")
    assert offload_module._marker(b"nan abc") == (0.0, "abc")
