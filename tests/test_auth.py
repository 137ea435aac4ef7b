"""Auth can never disagree with the backend: every credential shape, first and learned, equals its answer."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer

from proxy import keys
from proxy.cli import main
from proxy.verdicts import Verdict, verdict_key
from tests.backend_writer import BackendWriter
from tests.chaos import ChaosProxy
from tests.conftest import MakeProxy
from tests.rig import RedisServer, Upstream, free_port
from tests.standin_backend import NOT_AUTHENTICATED, TOKEN_INVALID, StandInBackend
from tests.test_reliability import eventually
from tests.test_server import _env, proxy_process, wait_ready, wait_until
from tests.test_teams import command_calls, reset_stats
from tests.test_telemetry import scrape, value

TOKEN = "phc_auth_project"
OPEN_TOKEN = "phc_project_without_secrets"
TEAM_ID = 7
OPEN_TEAM_ID = 8
SECRET = "phs_right_secret_value"
BACKUP = "phs_backup_secret_value"
GOOD_KEY = "phx_good_personal_key"
HMAC_KEY = "test-verdict-hmac-key-0123456789"
Client = TestClient[Any, Any]

CREDENTIALS: dict[str, str | None] = {
    "none": None,
    "empty": "",
    "scheme only": "Bearer",
    "wrong scheme": "Basic dXNlcjpwYXNz",
    "three parts": "Bearer a b",
    "secret right": f"Bearer {SECRET}",
    "secret wrong": "Bearer phs_wrong_secret",
    "secret backup": f"bearer {BACKUP}",
    "key valid": f"Bearer {GOOD_KEY}",
    "key invalid": "Bearer phx_not_a_key",
    "key without scope": "Bearer phx_insights_only",
    "key star scope": "Bearer phx_star_scope",
    "key other team": "Bearer phx_other_team",
    "oversized": "Bearer phx_" + "a" * 6000,
    "non-ascii": "Bearer phx_cl\xe9",
}


@pytest.fixture
def standin(redis_url: str, upstream: tuple[Upstream, TestServer]) -> StandInBackend:
    """The stand-in backend behind the proxy, with Redis filled for the same teams by the django writer."""
    writer = BackendWriter(redis_url)
    backend = StandInBackend()
    flags = [{"id": 1, "key": "beta", "active": True}]
    for token, team_id, secrets in ((TOKEN, TEAM_ID, True), (OPEN_TOKEN, OPEN_TEAM_ID, False)):
        team: dict[str, Any] = {"id": team_id, "api_token": token, "project_id": team_id, "name": token}
        if secrets:
            team |= {"secret_api_token": SECRET, "secret_api_token_backup": BACKUP}
        writer.set_team(token, team)
        backend.teams[token] = team
        backend.payloads[team_id] = writer.set_definitions(team_id, flags)
    backend.add_key(GOOD_KEY)
    backend.add_key("phx_insights_only", scopes=("insight:read",))
    backend.add_key("phx_star_scope", scopes=("*",))
    backend.add_key("phx_other_team", scoped_teams=(999,))
    upstream[0].routes["/flags/definitions"] = backend.definitions
    return backend


async def _proxy(make_proxy: MakeProxy, **auth: Any) -> Client:
    return await make_proxy(definitions={"auth": {"hmac_key": HMAC_KEY, **auth}})


def _headers(authorization: str | None) -> dict[str, str]:
    return {} if authorization is None else {"Authorization": authorization}


async def _answer(
    session: Any, url: str, authorization: str | None
) -> tuple[int, bytes, dict[str, str | None]]:
    async with session.get(url, headers=_headers(authorization)) as response:
        body = await response.read()
        kept = {h: response.headers.get(h) for h in ("Content-Type", "ETag", "Cache-Control")}
        return response.status, body, kept


@pytest.mark.parametrize("token", [TOKEN, OPEN_TOKEN])
@pytest.mark.parametrize("shape", list(CREDENTIALS))
async def test_proxy_answers_exactly_as_the_backend(
    make_proxy: MakeProxy,
    standin: StandInBackend,
    upstream: tuple[Upstream, TestServer],
    shape: str,
    token: str,
) -> None:
    authorization = CREDENTIALS[shape]
    url = f"/flags/definitions?token={token}&send_cohorts"
    async with ClientSession() as direct:
        expected = await _answer(direct, str(upstream[1].make_url(url)), authorization)
    client = await _proxy(make_proxy)
    first = await _answer(client, url, authorization)
    learned = await _answer(client, url, authorization)
    assert first == expected
    assert learned == expected


async def test_learned_verdicts_are_answered_locally(make_proxy: MakeProxy, standin: StandInBackend) -> None:
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    for authorization in (f"Bearer {GOOD_KEY}", "Bearer phx_not_a_key", "Bearer phx_insights_only"):
        before = standin.decided
        for _ in range(5):
            await (await client.get(url, headers=_headers(authorization))).read()
        assert standin.decided == before + 1, authorization


async def test_verdicts_held_in_memory_are_bounded_by_max_verdicts(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    """Each credential the backend refuses is a verdict, so a client spraying random keys decided how many
    were held: a fixed 200,000 (~240 MiB). The oldest gives way, read back from Redis when next asked."""
    client = await _proxy(make_proxy, max_verdicts=2)
    url = f"/flags/definitions?token={TOKEN}"
    for key in ("phx_sprayed_1", "phx_sprayed_2", "phx_sprayed_3"):
        assert (await client.get(url, headers={"Authorization": f"Bearer {key}"})).status == 401
    await _wait(lambda: len(_verdict_keys(client)) == 3)  # all three shared in Redis
    assert len(client.app[keys.DEFINITIONS].verdicts) == 2
    # The first, dropped from memory, is read from Redis: refused again without asking the backend.
    assert (await client.get(url, headers={"Authorization": "Bearer phx_sprayed_1"})).status == 401
    assert standin.decided == 3


async def test_local_refusals_are_counted_by_credential_kind(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    answers = [
        (await client.get(url, headers=_headers(authorization))).status
        for authorization in [None, "Bearer phs_wrong_secret"] + ["Bearer phx_not_a_key"] * 3
    ]
    assert answers == [401] * 5
    samples = await scrape(client)
    # The first refusal of the personal key was the backend's (forwarded, then learned): not counted here.
    for kind, n in {"missing": 1, "secret_api_token": 1, "personal_api_key": 2}.items():
        assert value(samples, "edge_proxy_definitions_auth_denied_total", kind=kind) == n, kind
    assert standin.decided == 1


async def test_verdicts_are_shared_through_redis(make_proxy: MakeProxy, standin: StandInBackend) -> None:
    url = f"/flags/definitions?token={TOKEN}"
    first = await _proxy(make_proxy)
    assert (await first.get(url, headers={"Authorization": "Bearer phx_not_a_key"})).status == 401
    await _wait(lambda: _verdict_keys(first) != [])
    second = await _proxy(make_proxy)  # another replica, same Redis and HMAC key
    response = await second.get(url, headers={"Authorization": "Bearer phx_not_a_key"})
    assert response.status == 401
    assert standin.decided == 1


async def test_deleting_the_verdict_key_revokes_at_once(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy, revalidate_interval_seconds=0.05)
    url = f"/flags/definitions?token={TOKEN}"
    auth = {"Authorization": f"Bearer {GOOD_KEY}"}
    assert (await client.get(url, headers=auth)).status == 200
    await _wait(lambda: len(_verdict_keys(client)) == 1)
    standin.keys = [
        k for k in standin.keys if k.scopes or k.scoped_teams
    ]  # the key is deleted in the backend
    with _redis(client) as store:
        store.delete(*_verdict_keys(client))  # ... and the backend revokes the verdict
    await _wait_status(client, url, auth, 401)
    assert standin.decided == 2


async def test_allowed_verdicts_expire_after_their_ttl(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy, allowed_ttl_seconds=0.2)
    url = f"/flags/definitions?token={TOKEN}"
    auth = {"Authorization": f"Bearer {GOOD_KEY}"}
    assert (await client.get(url, headers=auth)).status == 200
    await asyncio.sleep(0.3)
    assert (await client.get(url, headers=auth)).status == 200
    assert standin.decided == 2


async def test_bad_credential_flood_reaches_the_backend_once(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    auth = {"Authorization": "Bearer phx_flood_key"}

    async def one() -> int:
        async with client.get(url, headers=auth) as response:
            await response.read()
            return response.status

    statuses: list[int] = []
    for _ in range(10):  # 1,000 requests, 100 at a time
        statuses += await asyncio.gather(*(one() for _ in range(100)))
    assert statuses == [401] * 1000
    assert standin.decided == 1


@pytest.mark.parametrize("status", [402, 429, 503])
async def test_a_flood_of_one_new_credential_gets_the_backends_answer_when_it_is_no_verdict(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer], status: int
) -> None:
    """The first request asks the backend, the others wait for it; its answer is not a verdict (a quota,
    a rate limit, an outage), so they all go to the backend then, and each gets the backend's answer."""
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    body = b'{"detail":"not a verdict"}'
    asked = 0

    async def no_verdict(request: web.Request, _: bytes) -> web.Response:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.2)
        return web.Response(status=status, body=body, content_type="application/json")

    upstream[0].routes["/flags/definitions"] = no_verdict
    auth = {"Authorization": "Bearer phx_undecided_key"}

    async def one() -> tuple[int, bytes]:
        async with client.get(url, headers=auth) as response:
            return response.status, await response.read()

    assert await asyncio.gather(*(one() for _ in range(5))) == [(status, body)] * 5
    assert asked == 5
    assert _verdict_keys(client) == []
    assert await one() == (status, body)  # and the next one too: nothing was left behind


@pytest.mark.parametrize("credential", [GOOD_KEY, SECRET])
async def test_a_repeated_authorization_header_is_forwarded_and_teaches_nothing(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer], credential: str
) -> None:
    """gunicorn joins repeated headers ("Bearer k,Bearer k": refused); a proxy reading the first would answer
    otherwise, and, learning the backend's 401, refuse the key itself for denied_ttl_seconds."""
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    twice = [("Authorization", f"Bearer {credential}"), ("Authorization", f"Bearer {credential}")]

    async with client.get(url, headers=twice) as response:
        await response.read()
    assert [seen.headers.getall("Authorization") for seen in upstream[0].seen] == [
        [f"Bearer {credential}"] * 2
    ]
    assert _verdict_keys(client) == []
    async with client.get(url, headers={"Authorization": f"Bearer {credential}"}) as response:
        assert response.status == 200


async def test_a_credential_the_client_marks_hop_by_hop_teaches_nothing(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer]
) -> None:
    """Found by a reviewer: `Connection: Authorization` keeps the header from the backend, which then accepts
    what else the request carries (PostHog reads a personal_api_key in the query), and that 200 was learned
    for the junk key in the header: it then got the team's definitions, answered here, for 300 s."""
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}&personal_api_key={GOOD_KEY}"
    seen_auth = []

    async def reads_the_query_key(request: web.Request, _: bytes) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        return web.Response(status=200, body=b'{"flags":[]}', content_type="application/json")

    upstream[0].routes["/flags/definitions"] = reads_the_query_key
    junk = {"Authorization": "Bearer phx_junk_never_issued"}
    async with client.get(url, headers={**junk, "Connection": "Authorization"}) as response:
        assert response.status == 200
    assert seen_auth == [None]
    assert _verdict_keys(client) == []
    async with client.get(f"/flags/definitions?token={TOKEN}", headers=junk) as response:
        await response.read()
    assert seen_auth == [None, "Bearer phx_junk_never_issued"]  # asked again, not answered from a verdict


async def test_a_refusal_of_the_project_token_teaches_nothing_about_the_credential(
    make_proxy: MakeProxy, standin: StandInBackend, redis_url: str
) -> None:
    """Found by a reviewer: after a project token rotation, one poll with the old token (its team record still
    held here) went to the backend with a personal key not learned yet, and the backend's 401 for the token
    was learned as the key's verdict for the team: SDKs on the new token got 401 (and cleared their flags)
    for denied_ttl_seconds, on every replica."""
    new_token = "phc_rotated_project"
    team = dict(standin.teams[TOKEN], api_token=new_token)
    client = await _proxy(make_proxy)
    old = f"/flags/definitions?token={TOKEN}"
    assert (await client.get(old, headers={"Authorization": f"Bearer {SECRET}"})).status == 200  # record held
    with BackendWriter(redis_url) as writer:  # the rotation: the old token names no team from now on
        writer.set_team(new_token, team)
        writer.delete_team(TOKEN)
    standin.teams[new_token] = standin.teams.pop(TOKEN) | team
    async with client.get(old, headers={"Authorization": f"Bearer {GOOD_KEY}"}) as response:
        assert response.status == 401
        assert await response.read() == TOKEN_INVALID  # the backend's answer, passed on
    assert _verdict_keys(client) == []
    new = f"/flags/definitions?token={new_token}"
    async with client.get(new, headers={"Authorization": f"Bearer {GOOD_KEY}"}) as response:
        assert response.status == 200
    assert standin.decided == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, NOT_AUTHENTICATED),
        (403, b"<html><body>Forbidden by the ingress</body></html>"),
        (401, b'{"detail":"Authentication credentials were not provided."}'),
        (403, b'{"type":"authentication_error","code":"permission_denied","detail":"x","attr":null}'[:40]),
        # The right refusal, in UTF-16: stored as text it could not be.
        (401, '{"type":"authentication_error","code":"authentication_failed"}'.encode("utf-16")),
    ],
)
async def test_a_refusal_that_is_not_the_backends_refusal_of_the_credential_teaches_nothing(
    make_proxy: MakeProxy,
    upstream: tuple[Upstream, TestServer],
    standin: StandInBackend,
    status: int,
    body: bytes,
) -> None:
    async def refuses(request: web.Request, _: bytes) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    upstream[0].routes["/flags/definitions"] = refuses
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    for _ in range(2):
        async with client.get(url, headers={"Authorization": f"Bearer {GOOD_KEY}"}) as response:
            assert response.status == status
            assert await response.read() == body
    assert _verdict_keys(client) == []
    assert len(upstream[0].seen) == 2  # both went to the backend


async def test_an_authorization_header_with_a_unicode_space_is_forwarded_and_teaches_nothing(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer]
) -> None:
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    async with client.get(url, headers={"Authorization": f"Bearer\xa0{GOOD_KEY}"}) as response:
        await response.read()
    assert len(upstream[0].seen) == 1  # the backend's to read, however it reads it
    assert _verdict_keys(client) == []


async def test_a_verdict_learned_while_another_request_reads_redis_is_used_not_asked_again(
    make_proxy: MakeProxy,
    standin: StandInBackend,
    upstream: tuple[Upstream, TestServer],
    chaos: ChaosProxy,
) -> None:
    """A asks the backend; B, arriving meanwhile, reads Redis slowly and finds nothing there (A's write is
    still on its way), but A has learned the verdict by then: B answers from it instead of asking again."""
    client = await make_proxy(
        redis={"url": chaos.url, "timeout_seconds": 5.0},
        definitions={"auth": {"hmac_key": HMAC_KEY}},
    )
    url = f"/flags/definitions?token={TOKEN}"
    assert (await client.get(url)).status == 401  # the team record is in memory from here on
    recorder, _ = upstream
    answer = recorder.routes["/flags/definitions"]

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        response: web.StreamResponse = await answer(request, body)
        return response

    recorder.routes["/flags/definitions"] = slow
    chaos.reply_delay = 0.4  # every Redis read takes 0.4 s from here on
    auth = {"Authorization": "Bearer phx_learned_meanwhile"}

    async def one() -> int:
        async with client.get(url, headers=auth) as response:
            await response.read()
            return response.status

    first = asyncio.create_task(one())
    deadline = asyncio.get_running_loop().time() + 5
    while not any(seen.path_qs == url for seen in recorder.seen):  # A is at the backend (0.3 s)
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    # B reads Redis for 0.4 s, while A learns; then finds A's verdict in memory.
    assert await one() == 401
    assert await first == 401
    assert standin.decided == 1


async def test_learning_off_forwards_every_undecided_request(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy, learn_verdicts=False)
    url = f"/flags/definitions?token={TOKEN}"
    for _ in range(3):
        assert (await client.get(url, headers={"Authorization": f"Bearer {GOOD_KEY}"})).status == 200
    assert standin.decided == 3
    assert _verdict_keys(client) == []


async def test_credential_kinds_not_local_are_always_forwarded(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy, local_credentials=["personal_api_key"])
    url = f"/flags/definitions?token={TOKEN}"
    for _ in range(3):
        assert (await client.get(url, headers={"Authorization": f"Bearer {SECRET}"})).status == 200
    assert standin.decided == 3


async def test_no_credential_is_stored_or_logged(
    make_proxy: MakeProxy, standin: StandInBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await _proxy(make_proxy)
    with _redis(client) as store:
        backends = set(store.scan_iter())  # the backend's own entries (its team record holds the secret)
    url = f"/flags/definitions?token={TOKEN}"
    for authorization in CREDENTIALS.values():
        await (await client.get(url, headers=_headers(authorization))).read()
    await _wait(lambda: len(_verdict_keys(client)) >= 4)
    with _redis(client) as store:
        # DUMP uncompressed: by default it LZF-compresses values over 20 bytes, which splits a credential
        # stored in one (the grep never found it).
        store.config_set("rdbcompression", "no")
        try:
            written = [key for key in store.scan_iter() if key not in backends]
            dump = b"".join(key + (store.dump(key) or b"") for key in written)
        finally:
            store.config_set("rdbcompression", "yes")
    assert written  # the proxy's verdicts, at least
    secrets = [
        c.split()[-1] for c in CREDENTIALS.values() if c and c.split()[-1].startswith(("phx_", "phs_"))
    ]
    metrics = await (await client.get("/metrics")).text()
    assert "edge_proxy_definitions_auth_denied_total" in metrics  # the scrape is real, not empty
    for secret in secrets:
        assert secret.encode() not in dump
        assert secret not in caplog.text
        assert secret not in metrics
    assert TOKEN not in metrics  # not even the project token is a label


def _redis(client: Client) -> redis.Redis:
    app = client.app
    assert app is not None
    return redis.Redis.from_url(app[keys.SETTINGS].redis.url)


def _verdict_keys(client: Client) -> list[bytes]:
    with _redis(client) as store:
        return list(store.scan_iter("edge-proxy:verdict:v1:*"))


async def _wait(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def _wait_status(client: Client, url: str, headers: dict[str, str], status: int) -> None:
    for _ in range(200):
        response = await client.get(url, headers=headers)
        await response.read()
        if response.status == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never answered {status}")


@pytest.mark.parametrize("scope", ["credential", "team", "all"])
async def test_revoke_command_deletes_verdicts(
    make_proxy: MakeProxy,
    standin: StandInBackend,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    scope: str,
) -> None:
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    for key in (GOOD_KEY, "phx_not_a_key"):
        await (await client.get(url, headers={"Authorization": f"Bearer {key}"})).read()
    await _wait(lambda: len(_verdict_keys(client)) == 2)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VERDICT_HMAC_KEY", HMAC_KEY)
    argv = {"credential": ["--team", str(TEAM_ID), "--credential-stdin"], "team": ["--team", str(TEAM_ID)]}
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{GOOD_KEY}\n"))
    assert main(["revoke", *argv.get(scope, ["--all"])]) == 0
    assert len(_verdict_keys(client)) == (1 if scope == "credential" else 0)


async def test_revoke_refuses_an_empty_credential_from_stdin(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty pipe would revoke the verdict of "" and report success: the operator's credential revoked
    nothing, unnoticed."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VERDICT_HMAC_KEY", HMAC_KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["revoke", "--team", str(TEAM_ID), "--credential-stdin"]) == 2
    assert capsys.readouterr().err == "edge-proxy: --credential-stdin read no credential\n"


@pytest.mark.parametrize("scope", [["--all"], ["--team", str(TEAM_ID)]])
async def test_revoke_without_an_hmac_key_refuses_rather_than_report_a_revocation_that_cannot_happen(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], scope: list[str]
) -> None:
    """Without the key, verdicts live in each proxy's memory only: "revoked 0 verdicts", exit 0, told the
    operator a leaked key was dealt with while every replica kept answering it."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("VERDICT_HMAC_KEY", raising=False)
    assert main(["revoke", *scope]) == 1
    err = capsys.readouterr().err
    assert "definitions.auth.hmac_key is not set" in err
    assert "cannot be revoked from here; they expire after 300 s" in err


async def test_a_secret_refused_by_a_team_record_older_than_max_staleness_is_the_backends_to_refuse(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer], redis_url: str, redis_server: RedisServer
) -> None:
    """Redis is down: the record in memory may predate a rotation. Past max_staleness_seconds the proxy
    no longer refuses a secret it does not know; the backend, which may know it, answers."""
    recorder, _ = upstream
    writer = BackendWriter(redis_url)
    writer.set_team("phc_rotating", {"id": 70, "api_token": "phc_rotating", "secret_api_token": "phs_v1"})
    writer.set_definitions(70, [{"id": 1, "key": "beta", "active": True}])
    client = await make_proxy(
        definitions={"team_ttl_seconds": 0.2, "max_staleness_seconds": 0.5}, redis={"timeout_seconds": 0.2}
    )
    url = "/flags/definitions?token=phc_rotating"
    assert (await client.get(url, headers={"Authorization": "Bearer phs_v2"})).status == 401  # fresh: local
    assert recorder.seen == []
    redis_server.stop()
    try:
        await asyncio.sleep(0.7)
        response = await client.get(url, headers={"Authorization": "Bearer phs_v2"})
        assert response.status == 200  # the rig's upstream answered
        assert [seen.path_qs for seen in recorder.seen] == [url]
    finally:
        redis_server.start()


async def test_a_rotated_secret_is_accepted_at_once_and_a_flood_of_wrong_ones_stays_local(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """The backend accepts a new secret the moment it is rotated in; a record read a while ago does not
    know it. Such a refusal goes to the backend (once per team at a time) and the record is re-read, so the
    new secret is then accepted here, and a flood of wrong secrets is refused here, not forwarded."""
    recorder, _ = upstream
    writer = BackendWriter(redis_url)
    team = {"id": 71, "api_token": "phc_rotation", "secret_api_token": "phs_v1"}
    writer.set_team("phc_rotation", team)
    writer.set_definitions(71, [{"id": 1, "key": "beta", "active": True}])
    client = await make_proxy(definitions={"refresh_interval_seconds": 0.05})
    url = "/flags/definitions?token=phc_rotation"

    async def status(secret: str) -> int:
        async with client.get(url, headers={"Authorization": f"Bearer {secret}"}) as response:
            await response.read()
            return response.status

    assert await status("phs_v1") == 200
    writer.set_team(
        "phc_rotation", {**team, "secret_api_token": "phs_v2", "secret_api_token_backup": "phs_v1"}
    )
    await asyncio.sleep(1.2)  # the record in memory is older than the recheck delay

    assert await status("phs_v2") == 200  # the backend's answer (the rig's upstream)
    assert [seen.path_qs for seen in recorder.seen] == [url]
    await asyncio.sleep(0.3)  # the refresher re-read the record
    assert await status("phs_v2") == 200  # now answered here
    assert [await status(f"phs_wrong_{n}") for n in range(20)] == [401] * 20
    assert len(recorder.seen) == 1


async def test_an_allowed_key_decides_at_the_answers_head_not_after_the_first_clients_download(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer]
) -> None:
    """The first request of a new key is forwarded and its answer streamed (here 16 MB to a client that reads
    its head and stops); the same key's next request is answered from memory meanwhile. Learned only at the
    end of the relay, every later request of the key waited for the slowest first downloader."""
    big = b'{"flags":[],"pad":"' + b"x" * (16 * 2**20) + b'"}'  # more than socket buffers hold
    asked = 0

    async def definitions(request: web.Request, body: bytes) -> web.StreamResponse:
        nonlocal asked
        asked += 1
        return web.Response(body=big, content_type="application/json")

    upstream[0].routes["/flags/definitions"] = definitions
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"
    request = f"GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GOOD_KEY}\r\n\r\n".encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        # The first client reads no more; the second is answered while the first still holds its stream.
        async with client.get(url, headers={"Authorization": f"Bearer {GOOD_KEY}"}) as response:
            second = response.status, await response.read()
        assert second == (200, standin.payloads[TEAM_ID][0].encode())  # the payload in Redis, from memory
        assert asked == 1
    finally:
        writer.close()


# Behaviour a mutation-testing reviewer changed with no test failing (each test here fails with its mutant).


async def test_a_secret_the_team_record_does_not_hold_is_the_backends_to_decide(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    """Contract §2: the secrets in the team record are unverified. A record without them (the backend has
    them) must not make the proxy refuse a project secret itself; a 401 clears an SDK's flags."""
    client = await _proxy(make_proxy)
    standin.teams[OPEN_TOKEN] = {
        **standin.teams[OPEN_TOKEN],
        "secret_api_token": "phs_only_the_backend_knows",
    }
    url = f"/flags/definitions?token={OPEN_TOKEN}"
    for _ in range(3):
        async with client.get(
            url, headers={"Authorization": "Bearer phs_only_the_backend_knows"}
        ) as response:
            assert response.status == 200
    assert standin.decided == 1  # then learned, as for a personal key


async def test_personal_keys_not_local_are_always_forwarded(
    make_proxy: MakeProxy, standin: StandInBackend
) -> None:
    client = await _proxy(make_proxy, local_credentials=["secret_api_token"])
    for _ in range(3):
        async with client.get(
            f"/flags/definitions?token={TOKEN}", headers=_headers(f"Bearer {GOOD_KEY}")
        ) as r:
            assert r.status == 200
    assert standin.decided == 3
    assert _verdict_keys(client) == []


async def test_a_learned_refusal_keeps_the_backends_www_authenticate(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer]
) -> None:
    refusal = b'{"type":"authentication_error","code":"authentication_failed","detail":"Invalid","attr":null}'

    async def refuse(request: web.Request, body: bytes) -> web.Response:
        standin.decided += 1
        headers = {"WWW-Authenticate": 'Bearer realm="api"'}
        return web.Response(status=401, body=refusal, content_type="application/json", headers=headers)

    upstream[0].routes["/flags/definitions"] = refuse
    client = await _proxy(make_proxy)
    answers = []
    for _ in range(2):
        async with client.get(f"/flags/definitions?token={TOKEN}", headers=_headers("Bearer phx_bad")) as r:
            answers.append((r.status, r.headers.get("WWW-Authenticate"), await r.read()))
    assert answers == [(401, 'Bearer realm="api"', refusal)] * 2
    assert standin.decided == 1  # the second, from the learned verdict


async def test_revoking_one_teams_verdicts_keeps_the_other_teams(
    make_proxy: MakeProxy, standin: StandInBackend, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await _proxy(make_proxy)
    for token in (TOKEN, OPEN_TOKEN):
        async with client.get(
            f"/flags/definitions?token={token}", headers=_headers(f"Bearer {GOOD_KEY}")
        ) as r:
            assert r.status == 200
    await _wait(lambda: len(_verdict_keys(client)) == 2)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VERDICT_HMAC_KEY", HMAC_KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["revoke", "--team", str(TEAM_ID)]) == 0
    [left] = _verdict_keys(client)
    assert f":{OPEN_TEAM_ID}:".encode() in left


async def test_a_verdict_read_from_redis_is_held_no_longer_than_its_key_lives(
    make_proxy: MakeProxy, standin: StandInBackend, redis_url: str
) -> None:
    """Learned by another replica with 0.7 s left: held here for allowed_ttl_seconds (300 s) instead, a
    revocation by expiry would not have reached this replica."""
    client = await _proxy(make_proxy, revalidate_interval_seconds=30)
    key = client.app[keys.DEFINITIONS].verdicts.key(TEAM_ID, GOOD_KEY)
    with redis.Redis.from_url(redis_url) as store:
        store.set(key, Verdict(200).encode(), px=700)
    url = f"/flags/definitions?token={TOKEN}"
    async with client.get(url, headers=_headers(f"Bearer {GOOD_KEY}")) as r:
        assert r.status == 200
    assert standin.decided == 0  # answered from the shared verdict
    await asyncio.sleep(1.0)  # the key is gone from Redis
    async with client.get(url, headers=_headers(f"Bearer {GOOD_KEY}")) as r:
        assert r.status == 200
    assert standin.decided == 1


async def test_a_request_waiting_for_a_key_being_learned_is_answered_at_the_backends_head(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """A second request of a new key, arriving while the first is at the backend, waits for what the first
    learns: it is answered once the backend's head says allowed, not after the first client's whole
    download (found by mutation testing: the wait ended only with the relay)."""
    head, rest = asyncio.Event(), asyncio.Event()
    text = standin.payloads[TEAM_ID][0].encode()

    async def streamed(request: web.Request, _: bytes) -> web.StreamResponse:
        standin.decided += 1
        await head.wait()  # the backend takes its time deciding ...
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(text[:10])
        await rest.wait()  # ... and the first client's download is slow
        await response.write(text[10:])
        await response.write_eof()
        return response

    upstream[0].routes["/flags/definitions"] = streamed
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"

    async def one() -> tuple[int, bytes]:
        async with client.get(url, headers=_headers(f"Bearer {GOOD_KEY}")) as response:
            return response.status, await response.read()

    first = asyncio.create_task(one())
    try:
        await eventually(lambda: standin.decided == 1, "the first request at the backend")
        reset_stats(redis_url)
        second = asyncio.create_task(one())
        await eventually(lambda: command_calls(redis_url).get("pttl", 0) == 1, "the second's verdict read")
        await asyncio.sleep(0.05)  # found nothing in Redis: it waits for what the first learns
        head.set()
        assert await asyncio.wait_for(second, 5) == (200, text)  # from memory, the payload in Redis
        assert not first.done()  # the first client is still downloading
    finally:
        rest.set()
    assert await asyncio.wait_for(first, 5) == (200, text)
    assert standin.decided == 1


async def test_revoke_all_with_a_credential_from_stdin_is_refused_and_deletes_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`revoke --all --credential-stdin` names a credential but no team: refused, exit 2, every verdict kept
    (found by mutation testing: it went on to revoke every verdict of every team)."""
    with redis.Redis.from_url(redis_url) as store:
        for team_id in (TEAM_ID, OPEN_TEAM_ID):
            store.set(f"edge-proxy:verdict:v1:{team_id}:{'ab' * 32}", Verdict(200).encode(), px=60_000)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VERDICT_HMAC_KEY", HMAC_KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{GOOD_KEY}\n"))
    assert main(["revoke", "--all", "--credential-stdin"]) == 2
    assert capsys.readouterr().err == "edge-proxy: --credential-stdin needs --team\n"
    with redis.Redis.from_url(redis_url) as store:
        assert len(list(store.scan_iter("edge-proxy:verdict:v1:*"))) == 2


async def test_a_request_that_ends_first_leaves_the_newest_wait_in_place(
    make_proxy: MakeProxy, standin: StandInBackend, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """After an answer that is no verdict (a 502), the requests that waited for it go to the backend
    together, each replacing the last one's wait. One of them ending (another 502) must not remove the wait
    of the one still at the backend: a request arriving then waits for that one's refusal instead of asking
    again (found by mutation testing: each ending removed whichever wait was there)."""
    first_answer, slow_answer = asyncio.Event(), asyncio.Event()
    asked: list[str | None] = []

    async def flaky(request: web.Request, body: bytes) -> web.StreamResponse:
        role = request.headers.get("X-Test-Role")
        asked.append(role)
        if role in ("first", "quick"):
            if role == "first":
                await first_answer.wait()
            return web.Response(status=502, body=b"bad gateway")
        if role == "slow":
            await slow_answer.wait()
        return await standin.definitions(request, body)  # the key is unknown: a refusal, learned

    upstream[0].routes["/flags/definitions"] = flaky
    client = await _proxy(make_proxy)
    url = f"/flags/definitions?token={TOKEN}"

    async def one(role: str | None) -> int:
        headers = {"Authorization": "Bearer phx_flaky_key", **({"X-Test-Role": role} if role else {})}
        async with client.get(url, headers=headers) as response:
            await response.read()
            return response.status

    async def waiting(reads: int) -> None:
        # Its verdict read from Redis found nothing: it waits for the request at the backend.
        await eventually(lambda: command_calls(redis_url).get("pttl", 0) == reads, "a verdict read")
        await asyncio.sleep(0.05)

    first = asyncio.create_task(one("first"))
    tasks = [first]
    try:
        await eventually(lambda: asked == ["first"], "the first request at the backend")
        reset_stats(redis_url)
        quick = asyncio.create_task(one("quick"))
        tasks.append(quick)
        await waiting(1)
        slow = asyncio.create_task(one("slow"))  # waits after `quick`: its wait replaces quick's
        tasks.append(slow)
        await waiting(2)
        first_answer.set()
        assert await asyncio.wait_for(first, 5) == 502
        assert await asyncio.wait_for(quick, 5) == 502  # ended while `slow` is still at the backend
        await eventually(lambda: "slow" in asked, "`slow` at the backend")
        reset_stats(redis_url)
        late = asyncio.create_task(one(None))
        tasks.append(late)
        await waiting(1)
        slow_answer.set()
        assert await asyncio.wait_for(slow, 5) == 401
        assert await asyncio.wait_for(late, 5) == 401  # the refusal `slow` learned
        assert len(asked) == 3
    finally:
        first_answer.set()
        slow_answer.set()
        await asyncio.wait(tasks, timeout=5)


async def test_revoke_reads_a_credential_piped_with_a_windows_line_ending(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A credential pasted from a Windows file ends in CR LF: both are trimmed, and its verdict is the one
    revoked (found by mutation testing: with the CR kept, another credential's verdict was looked for, and
    "revoked 0 verdicts" reported)."""
    key = verdict_key(HMAC_KEY.encode(), "edge-proxy:verdict:v1", TEAM_ID, GOOD_KEY)
    with redis.Redis.from_url(redis_url) as store:
        store.set(key, Verdict(200).encode(), px=60_000)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VERDICT_HMAC_KEY", HMAC_KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{GOOD_KEY}\r\n"))
    assert main(["revoke", "--team", str(TEAM_ID), "--credential-stdin"]) == 0
    assert capsys.readouterr().out == "revoked 1 verdict\n"
    with redis.Redis.from_url(redis_url) as store:
        assert store.exists(key) == 0


LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def _reset(writer: asyncio.StreamWriter) -> None:
    """The client gives up: its connection closed with a reset, as an SDK's timeout does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    writer.close()


def _slow_definitions(
    upstream: tuple[Upstream, TestServer], standin: StandInBackend, seconds: float
) -> Counter[str]:
    """The backend answers definitions `seconds` late; how many it was asked, and answered."""
    recorder, _ = upstream
    counts: Counter[str] = Counter()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        counts["asked"] += 1
        await asyncio.sleep(seconds)
        counts["answered"] += 1
        return await standin.definitions(request, body)

    recorder.routes["/flags/definitions"] = slow
    return counts


async def test_a_flood_whose_first_client_leaves_still_reaches_the_backend_once_more_at_most(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str, standin: StandInBackend
) -> None:
    """The request asking the backend is dropped when its client leaves (an SDK timeout before a slow
    backend): the first waiter to run asks in its place and the rest wait for that answer. They all went to
    the backend (a reviewer's: 21 requests for one credential). A real process: the test server cancels
    the handler of a client that left, which production's aiohttp does not."""
    _, server = upstream
    backend = _slow_definitions(upstream, standin, 1.5)
    port = free_port()
    env = _env(port, server, redis_url, EDGE_PROXY__DEFINITIONS__AUTH__HMAC_KEY=HMAC_KEY)
    url = f"http://127.0.0.1:{port}/flags/definitions?token={TOKEN}"
    credential = {"Authorization": "Bearer phx_flood_leader_leaves"}
    with proxy_process(tmp_path, env) as (process, log_path):
        await wait_ready(port, process, log_path)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        path = f"/flags/definitions?token={TOKEN}"
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: {credential['Authorization']}\r\n\r\n".encode()
        )
        await wait_until(lambda: backend["asked"] == 1, "the first request upstream")
        async with ClientSession() as session:

            async def one() -> int:
                async with session.get(url, headers=credential) as answer:
                    await answer.read()
                    return answer.status

            waiters = [asyncio.create_task(one()) for _ in range(20)]
            await asyncio.sleep(0.3)  # all 20 wait for the first one's answer
            _reset(writer)  # its client gives up
            statuses = await asyncio.gather(*waiters)
    assert statuses == [401] * 20
    assert backend["asked"] == 2  # the dropped one, and the waiter that asked in its place


async def test_requests_whose_clients_left_before_they_were_sent_are_never_sent(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str, standin: StandInBackend
) -> None:
    """Requests waiting for a flood's first answer whose clients left meanwhile: each was sent when its turn
    came (client_left had come and gone) and held a backend worker to the end (a reviewer's)."""
    _, server = upstream
    backend = _slow_definitions(upstream, standin, 1.5)
    port = free_port()
    env = _env(port, server, redis_url, EDGE_PROXY__DEFINITIONS__AUTH__HMAC_KEY=HMAC_KEY)
    request = (
        f"GET /flags/definitions?token={TOKEN} HTTP/1.1\r\nHost: p\r\n"
        "Authorization: Bearer phx_everyone_gives_up\r\n\r\n"
    ).encode()
    with proxy_process(tmp_path, env) as (process, log_path):
        await wait_ready(port, process, log_path)
        clients = []
        for _ in range(6):  # the first asks the backend, five wait for its answer
            clients.append(await asyncio.open_connection("127.0.0.1", port))
            clients[-1][1].write(request)
            await wait_until(lambda: backend["asked"] == 1, "the first request upstream")
        await asyncio.sleep(0.3)
        for _, writer in reversed(clients):  # every client gives up, the first last
            _reset(writer)
        await asyncio.sleep(2.0)  # past the first one's answer, had it not been dropped
    assert (backend["asked"], backend["answered"]) == (1, 0)


async def test_a_flood_whose_first_request_raises_hands_the_asking_on(
    make_proxy: MakeProxy, upstream: tuple[Upstream, TestServer], standin: StandInBackend
) -> None:
    """The first request's forward raises instead of answering (here the test server cancels the handler of a
    client that left): as for a dropped one, the first waiter asks in its place, not all of them (untested,
    a diff reviewer's)."""
    backend = _slow_definitions(upstream, standin, 1.0)
    client = await make_proxy(definitions={"auth": {"hmac_key": HMAC_KEY}})
    assert client.server.port is not None
    path = f"/flags/definitions?token={TOKEN}"
    credential = "Bearer phx_flood_leader_raises"
    _, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: {credential}\r\n\r\n".encode())
    await eventually(lambda: backend["asked"] == 1, "the first request upstream")

    async def one() -> int:
        async with client.get(path, headers={"Authorization": credential}) as answer:
            await answer.read()
            return answer.status

    waiters = [asyncio.create_task(one()) for _ in range(10)]
    await asyncio.sleep(0.3)
    _reset(writer)
    assert await asyncio.gather(*waiters) == [401] * 10
    assert backend["asked"] == 2
