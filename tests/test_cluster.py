"""Redis Cluster URLs: every Redis use of the proxy, against a real local 3-master Redis Cluster.

The cluster (redis-server from the suite's rig, joined with `redis-cli --cluster create`) starts once, the
first time a test here needs it; the failover test starts a 3-master, 3-replica one of its own. The
backend's keys have no hash tags, so each test first checks that the keys it reads or writes together really
sit in different slots (most often on different nodes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import DataError, RedisError

from proxy import keys
from proxy.billing import BillingTally
from proxy.cli import main
from proxy.cluster import RedisClient, hash_tagged
from proxy.config_loader import load_settings
from proxy.contract import RedisContract
from proxy.health import CLUSTER_NODE
from proxy.quota import QuotaSnapshot
from proxy.ratelimit import RateLimiter
from proxy.redis_client import make_client
from proxy.redis_urls import cluster_nodes
from proxy.settings import (
    BillingSettings,
    ConfigError,
    RateLimitSettings,
    RedisLayout,
    RedisSettings,
)
from tests.backend_writer import (
    ETAG_SUFFIX,
    PAYLOAD_KEY,
    PAYLOAD_TTL_SECONDS,
    TEAM_KEY,
    TEAM_TTL_SECONDS,
    BackendWriter,
    definitions_json,
    team_record,
)
from tests.conftest import MakeProxy
from tests.rig import RedisClusterServers, Upstream, free_port
from tests.standin_backend import StandInBackend
from tests.test_reliability import eventually

pytestmark = pytest.mark.slow

Client = TestClient[Any, Any]

TOKEN, TEAM_ID = "phc_cluster", 42
OTHER_TOKEN, OTHER_TEAM_ID = "phc_cluster_other", 43
SECRET = "phs_cluster_secret"
AUTH = {"Authorization": f"Bearer {SECRET}", "User-Agent": "posthog-python/7.4.0"}
FLAGS = [{"id": 1, "key": "beta", "active": True, "filters": {"groups": [{"rollout_percentage": 50}]}}]
HMAC_KEY = "cluster-verdict-hmac-key-0123456789"
GOOD_KEY, BAD_KEY = "phx_cluster_good_key", "phx_cluster_unknown_key"
CONTRACT = RedisContract(RedisLayout())
T0 = 1_700_000_040.0  # the start of a 120 s billing bucket
B0 = int(T0 // 120)


def url(token: str = TOKEN) -> str:
    """The definitions URL of a project."""
    return f"/flags/definitions?token={token}&send_cohorts"


def slot(key: str) -> int:
    """The key's hash slot."""
    return key_slot(key.encode())


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One real 3-master Redis Cluster for the session, started only when a test here runs."""
    servers = RedisClusterServers(workdir=Path(tmp_path_factory.mktemp("cluster")))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def redis_url(cluster: RedisClusterServers) -> str:
    """Overrides conftest's: `make_proxy` builds the app on the cluster, emptied before each test."""
    cluster.flush()
    return cluster.url


@pytest.fixture
def writer(cluster: RedisClusterServers) -> Iterator[BackendWriter]:
    """django-redis's codec as the backend configures it (django-redis itself cannot write to a Cluster)."""
    with BackendWriter(f"redis://127.0.0.1:{cluster.nodes[0].port}/0") as backend:
        yield backend


@pytest.fixture
async def cluster_client(cluster: RedisClusterServers, redis_url: str) -> AsyncIterator[RedisClient]:
    """The proxy's own kind of client on the cluster, with a short timeout."""
    client = make_client(RedisSettings(url=redis_url, timeout_seconds=0.2))
    yield client
    await client.aclose()


def fill(
    cluster: RedisClusterServers,
    writer: BackendWriter,
    token: str = TOKEN,
    team_id: int = TEAM_ID,
    flags: list[dict[str, Any]] = FLAGS,
) -> tuple[str, str]:
    """The team record, payload and ETag, encoded as the backend writes them; returns (json text, etag)."""
    text, etag = definitions_json(flags)
    team = json.dumps(team_record(team_id, token, secret_api_token=SECRET))
    payload_key = PAYLOAD_KEY.format(team_id=team_id)
    with cluster.client() as client:
        for key, value, ttl in (
            (TEAM_KEY.format(token=token), team, TEAM_TTL_SECONDS),
            (payload_key, text, PAYLOAD_TTL_SECONDS),
            (payload_key + ETAG_SUFFIX, etag, PAYLOAD_TTL_SECONDS),
        ):
            client.set(*writer.encoded(key, value), ex=ttl)
    return text, etag


def scan(cluster: RedisClusterServers, pattern: str) -> list[str]:
    """Every key matching `pattern`, on every node."""
    with cluster.client() as client:
        return sorted(key.decode() for key in client.scan_iter(pattern))


def billing_hashes(cluster: RedisClusterServers, team_id: int, library: str) -> list[dict[int, int]]:
    """The team hash and the team+SDK hash, as {bucket: requests}."""
    with cluster.client() as client:
        return [
            {int(k): int(v) for k, v in client.hgetall(key).items()}
            for key in CONTRACT.billing_keys(team_id, library)
        ]


async def status(client: Client, path: str, headers: dict[str, str]) -> int:
    """The status of one GET, its body read."""
    async with client.get(path, headers=headers) as response:
        await response.read()
        return response.status


async def test_definitions_200_and_304_are_served_from_the_cluster_and_kept_fresh(
    make_proxy: MakeProxy,
    cluster: RedisClusterServers,
    writer: BackendWriter,
    upstream: tuple[Upstream, TestServer],
) -> None:
    text, etag = fill(cluster, writer)
    assert cluster.node_of(CONTRACT.payload_key(TEAM_ID)) is not cluster.node_of(CONTRACT.etag_key(TEAM_ID))
    client = await make_proxy(definitions={"refresh_interval_seconds": 0.05})

    response = await client.get(url(), headers=AUTH)
    assert response.status == 200
    assert await response.read() == text.encode()
    assert response.headers["ETag"] == f'W/"{etag}"'
    response = await client.get(url(), headers={**AUTH, "If-None-Match": f'W/"{etag}"'})
    assert response.status == 304
    assert await response.read() == b""

    # The backend rewrites the payload: the refresher's ETag MGET (split per slot) sees it.
    new_text, new_etag = fill(cluster, writer, flags=[{"id": 2, "key": "gamma", "active": True}])

    async def new_payload_served() -> bool:
        async with client.get(url(), headers=AUTH) as response:
            return (
                await response.read() == new_text.encode() and response.headers["ETag"] == f'W/"{new_etag}"'
            )

    await eventually(new_payload_served, "the rewritten payload served")
    assert upstream[0].seen == []
    observed = client.app[keys.TELEMETRY].redis.latency.counts()
    assert {("GET",), ("PIPELINE",)} <= set(observed)


async def test_a_payload_read_with_another_writes_etag_is_a_miss_never_served(
    make_proxy: MakeProxy,
    cluster: RedisClusterServers,
    writer: BackendWriter,
    upstream: tuple[Upstream, TestServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pair lives in two slots, so a read can fall between the two halves of the backend's write. Served,
    the old payload would go out under the new ETag, and SDKs would then get 304s for the new flags."""
    old_text, _ = fill(cluster, writer)
    _, new_etag = definitions_json([{"id": 2, "key": "gamma", "active": True}])
    with cluster.client() as raw:  # the new write's ETag has landed, its payload not yet
        raw.set(*writer.encoded(PAYLOAD_KEY.format(team_id=TEAM_ID) + ETAG_SUFFIX, new_etag))
    client = await make_proxy()

    response = await client.get(url(), headers=AUTH)
    assert response.status == 200
    assert (await response.json())["upstream"] is True  # the backend's answer
    assert "do not match their ETag" in caplog.text

    text, etag = fill(cluster, writer, flags=[{"id": 2, "key": "gamma", "active": True}])  # the write ends
    assert etag == new_etag
    response = await client.get(url(), headers=AUTH)
    assert await response.read() == text.encode()
    assert response.headers["ETag"] == f'W/"{etag}"'
    assert len(upstream[0].seen) == 1
    assert old_text != text


async def test_a_cold_burst_of_more_teams_than_connections_per_node_is_answered_locally(
    make_proxy: MakeProxy,
    cluster: RedisClusterServers,
    writer: BackendWriter,
    upstream: tuple[Upstream, TestServer],
) -> None:
    # After a deploy every team is cold at once. With 2 connections per node and 60 distinct teams asking
    # together, calls wait for a connection (up to redis.timeout_seconds) instead of failing over to the
    # backend: redis-py's per-node pools raise MaxConnectionsError at once.
    burst = range(2001, 2061)
    for team_id in burst:
        fill(cluster, writer, token=f"phc_burst_{team_id}", team_id=team_id)
    assert len({cluster.node_of(CONTRACT.payload_key(team_id)).port for team_id in burst}) == 3
    client = await make_proxy(redis={"max_connections": 2})

    answers = await asyncio.gather(
        *(client.get(url(f"phc_burst_{team_id}"), headers=AUTH) for team_id in burst)
    )

    assert [answer.status for answer in answers] == [200] * len(burst)
    for answer in answers:
        assert (await answer.json())["flags"] == FLAGS
    assert upstream[0].seen == []
    assert client.app[keys.TELEMETRY].redis.errors == {}


async def test_verdicts_are_learned_in_the_cluster_and_revoked_by_the_cli(
    make_proxy: MakeProxy,
    cluster: RedisClusterServers,
    writer: BackendWriter,
    upstream: tuple[Upstream, TestServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text, etag = fill(cluster, writer)
    backend = StandInBackend()
    backend.teams[TOKEN] = team_record(TEAM_ID, TOKEN, secret_api_token=SECRET)
    backend.payloads[TEAM_ID] = (text, etag)
    backend.add_key(GOOD_KEY)
    upstream[0].routes["/flags/definitions"] = backend.definitions
    client = await make_proxy(
        definitions={"auth": {"hmac_key": HMAC_KEY, "revalidate_interval_seconds": 0.05}}
    )
    good, bad = ({"Authorization": f"Bearer {key}"} for key in (GOOD_KEY, BAD_KEY))

    assert (await status(client, url(), good), await status(client, url(), bad)) == (200, 401)
    await eventually(lambda: len(scan(cluster, "edge-proxy:verdict:v1:*")) == 2, "both verdicts shared")
    verdict_keys = scan(cluster, "edge-proxy:verdict:v1:*")
    assert slot(verdict_keys[0]) != slot(verdict_keys[1])  # revalidation's MGET is split per slot
    # Learned: answered locally, the backend is not asked again.
    assert (await status(client, url(), good), await status(client, url(), bad)) == (200, 401)
    assert backend.decided == 2

    backend.keys = []  # the personal key is deleted in the backend, and its verdicts revoked
    monkeypatch.setenv("REDIS_URL", cluster.url)
    monkeypatch.setenv("VERDICT_HMAC_KEY", HMAC_KEY)
    assert main(["revoke", "--team", str(TEAM_ID)]) == 0
    assert capsys.readouterr().out == "revoked 2 verdicts\n"
    assert scan(cluster, "edge-proxy:verdict:v1:*") == []

    async def denied() -> bool:
        return await status(client, url(), good) == 401

    await eventually(denied, "the revoked verdict dropped from memory")
    assert backend.decided == 3


async def test_billing_is_flushed_exactly_once_into_the_right_hashes(
    make_proxy: MakeProxy, cluster: RedisClusterServers, writer: BackendWriter
) -> None:
    text, _ = fill(cluster, writer)
    team_key, sdk_key = CONTRACT.billing_keys(TEAM_ID, "posthog-python")
    assert slot(team_key) != slot(sdk_key)
    client = await make_proxy(billing={"flush_interval_seconds": 0.05})
    for _ in range(7):
        async with client.get(url(), headers=AUTH) as response:
            assert (response.status, await response.read()) == (200, text.encode())
    tally = client.app[keys.BILLING]
    await eventually(lambda: tally.unflushed_requests == 0, "billing flushed")
    team, sdk = billing_hashes(cluster, TEAM_ID, "posthog-python")
    assert sum(team.values()) == 7
    assert team == sdk
    # However many flushes: one mark per slot group, in the slot of the hash it guards.
    assert tally.flushes >= 1
    marks = scan(cluster, "edge-proxy:billing-batch:*")
    assert sorted(slot(mark) for mark in marks) == sorted((slot(team_key), slot(sdk_key)))


async def test_a_flush_cut_off_from_one_node_counts_exactly_once_when_retried(
    cluster: RedisClusterServers, cluster_client: RedisClient
) -> None:
    # A team whose two billing hashes live on different nodes: one node applies its part, the other hangs.
    team_id = next(
        t
        for t in range(1, 1000)
        if len({cluster.node_of(key).port for key in CONTRACT.billing_keys(t, "posthog-ruby")}) == 2
    )
    sdk_key = CONTRACT.billing_keys(team_id, "posthog-ruby")[1]
    billing = BillingTally(CONTRACT, BillingSettings())
    for _ in range(5):
        billing.count(team_id, "posthog-ruby", now=T0)
    await cluster_client.ping()  # the slot map is known before the node hangs
    frozen = cluster.node_of(sdk_key)
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        assert not await billing.flush(cluster_client)
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    assert billing.pending_batches == 1  # the outcome is unknown: the batch is kept, with its id
    team, _ = billing_hashes(cluster, team_id, "posthog-ruby")
    assert team == {B0: 5}  # the answering node applied its slot group

    # The retry skips what was applied (and what the resumed node may have applied late), writes the rest.
    assert await billing.flush(cluster_client)
    assert billing_hashes(cluster, team_id, "posthog-ruby") == [{B0: 5}, {B0: 5}]
    assert billing.pending_batches == 0
    assert await billing.flush(cluster_client)
    assert billing_hashes(cluster, team_id, "posthog-ruby") == [{B0: 5}, {B0: 5}]


@pytest.mark.parametrize(("mode", "counted"), [("fast", 3), ("exact", 4)])
async def test_rate_limits_are_shared_through_the_cluster(
    make_proxy: MakeProxy, cluster: RedisClusterServers, writer: BackendWriter, mode: str, counted: int
) -> None:
    teams = ((TOKEN, TEAM_ID), (OTHER_TOKEN, OTHER_TEAM_ID))
    for token, team_id in teams:
        fill(cluster, writer, token, team_id)
    client = await make_proxy(
        rate_limits={"mode": mode, "default": "3/minute", "sync_interval_seconds": 0.05}
    )
    limiter = client.app[keys.RATE_LIMITS]
    counters = [limiter.key(team_id, "full") for _, team_id in teams]
    assert slot(counters[0]) != slot(counters[1])  # one sync covers both: the script runs per slot
    for token, _ in teams:
        assert [await status(client, url(token), AUTH) for _ in range(4)] == [200, 200, 200, 429]

    def shared() -> list[int]:
        with cluster.client() as sync:
            return [int(sync.get(key) or 0) for key in counters]

    # Every admission is in the shared counters (exact mode also counts the refused hit, as `limits` does).
    await eventually(lambda: shared() == [counted, counted], "the counters in the cluster")
    assert limiter.fail_open == 0


async def test_rate_limits_stay_failing_while_a_node_is_hung_though_the_default_node_answers(
    cluster: RedisClusterServers, cluster_client: RedisClient
) -> None:
    """Found by a reviewer: with nothing to push, recovery was probed with a PING that redis-py sends to one
    node, so limits came back on while the node holding a team's counter still hung (then failed again on
    its next push, a burst request waiting out the timeout each time)."""
    assert isinstance(cluster_client, RedisCluster)
    await cluster_client.initialize()
    default = cluster_client.get_default_node()
    now = [1000.0]
    limiter = RateLimiter(RateLimitSettings(default="100/minute"), cluster_client, clock=lambda: now[0])

    def port_of(team_id: int) -> int:
        node = cluster_client.get_node_from_key(limiter.key(team_id, "full"))
        assert node is not None
        return int(node.port)

    team = next(t for t in range(1, 10_000) if port_of(t) != default.port)
    port = port_of(team)
    hung = next(node for node in cluster.nodes if node.port == port)
    assert hung.process is not None
    hung.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(5):
            assert limiter.check(team, False) is None  # half a lump: pushed to the hung node
        await limiter.sync()
        assert limiter.failing
        now[0] += 70  # the window over and idle: forgotten, nothing left to push
        await limiter.sync()
        assert limiter._full == {}
        assert limiter.failing  # the hung node did not answer the probe
    finally:
        hung.process.send_signal(signal.SIGCONT)
    await limiter.sync()
    assert not limiter.failing


async def test_offload_control_hash_is_followed_and_the_cli_reports_it(
    make_proxy: MakeProxy,
    cluster: RedisClusterServers,
    writer: BackendWriter,
    upstream: tuple[Upstream, TestServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(cluster, writer)
    client = await make_proxy(definitions={"offload": {"watch_interval_seconds": 0.05}})
    seen = upstream[0].seen

    async def forwarded() -> bool:
        before = len(seen)
        assert await status(client, url(), AUTH) == 200
        return len(seen) > before

    assert not await forwarded()
    monkeypatch.setenv("REDIS_URL", cluster.url)
    assert main(["offload", "kill", "on"]) == 0
    assert main(["offload", "status"]) == 0
    assert capsys.readouterr().out.splitlines() == 2 * [
        "definitions offload 100% (kill switch ON: everything forwarded, shadow off)"
    ]
    await eventually(forwarded, "the kill switch followed")
    assert main(["offload", "reset"]) == 0
    assert capsys.readouterr().out == "definitions offload 100% (kill switch off, shadow off)\n"

    async def local() -> bool:
        return not await forwarded()

    await eventually(local, "the reset followed")


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A 3-master, 3-replica cluster of its own (a test kills a master), promoting a replica within ~1-2 s."""
    servers = RedisClusterServers(workdir=tmp_path, replicas=1, node_timeout_ms=500)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


async def test_slots_left_uncovered_fail_as_redis_errors_that_every_loop_survives(tmp_path: Path) -> None:
    """While a slot has no owner (a cluster re-forming), redis-py raises its RedisClusterException, which is
    no RedisError: the quota poller once died of it. Each loop's Redis policy must see a RedisError."""
    servers = RedisClusterServers(workdir=tmp_path)
    servers.start()
    client = make_client(RedisSettings(url=servers.url, timeout_seconds=0.2))
    try:
        quota = QuotaSnapshot(CONTRACT.quota_key, max_staleness_seconds=60)
        billing = BillingTally(CONTRACT, BillingSettings())
        await quota.refresh(client)
        keys = {CONTRACT.quota_key, *CONTRACT.billing_keys(TEAM_ID, "posthog-python")}
        for node in servers.nodes:
            with node.client() as raw:
                for key in keys:
                    raw.execute_command("CLUSTER", "DELSLOTS", slot(key))

        with pytest.raises(RedisError):
            await client.zrangebyscore(CONTRACT.quota_key, 0, "+inf")
        await quota.poll(client)  # kept its snapshot, failing open later as documented
        assert quota.failing
        billing.count(TEAM_ID, "posthog-python")
        assert await billing.flush(client) is False  # kept, to be written once Redis answers
        assert billing.unflushed_requests == 1
    finally:
        await client.aclose()
        servers.stop()


async def test_a_master_killed_with_billing_in_flight_is_followed_to_its_promoted_replica(
    make_proxy: MakeProxy,
    replicated_cluster: RedisClusterServers,
    writer: BackendWriter,
    upstream: tuple[Upstream, TestServer],
) -> None:
    cluster = replicated_cluster
    text, etag = fill(cluster, writer)
    etag_key = CONTRACT.etag_key(TEAM_ID)
    billing_keys = CONTRACT.billing_keys(TEAM_ID, "posthog-python")
    doomed = cluster.node_of(etag_key)
    # The master to be killed serves the ETag and both billing hashes; the payload is on another one.
    assert [cluster.node_of(key) for key in billing_keys] == [doomed, doomed]
    assert cluster.node_of(CONTRACT.payload_key(TEAM_ID)) is not doomed
    [replica] = cluster.replicas_of(doomed)
    client = await make_proxy(
        redis={"url": cluster.url, "timeout_seconds": 0.2},
        definitions={"refresh_interval_seconds": 0.05},
        billing={"flush_interval_seconds": 0.05},
    )
    tally = client.app[keys.BILLING]
    served = {"local 200": 0, "304": 0, "forwarded": 0}
    current = {"text": text, "etag": etag}

    async def ask(conditional: bool) -> bytes:
        headers = {**AUTH, "If-None-Match": f'W/"{current["etag"]}"'} if conditional else AUTH
        forwarded = len(upstream[0].seen)
        async with client.get(url(), headers=headers) as response:
            body = await response.read()
            assert response.status in (200, 304), (response.status, body)  # never a 5xx
        if len(upstream[0].seen) > forwarded:
            served["forwarded"] += 1
        elif response.status == 304:
            served["304"] += 1
        else:
            # Only the proxy's own 200s are billed by it (a forwarded one is the backend's to bill).
            assert body in (text.encode(), current["text"].encode())
            served["local 200"] += 1
        return body

    def billed() -> list[int]:
        return [sum(counts.values()) for counts in billing_hashes(cluster, TEAM_ID, "posthog-python")]

    for conditional in 5 * [False, True]:
        await ask(conditional)
    assert served == {"local 200": 5, "304": 5, "forwarded": 0}
    await eventually(lambda: tally.unflushed_requests == 0, "billing flushed")
    assert billed() == [5, 5]
    with doomed.client() as master:  # what was acknowledged is on the replica too (replication is async)
        assert master.execute_command("WAIT", 1, 5000) == 1

    # Billing in flight: the master hangs, so a flush is sent but never applied and its outcome is unknown;
    # then it is killed, and the requests that follow keep being answered while the cluster fails over.
    assert doomed.process is not None
    doomed.process.send_signal(signal.SIGSTOP)
    failed = tally.failed_flushes
    for conditional in 3 * [False, True]:
        await ask(conditional)
    await eventually(lambda: tally.failed_flushes > failed, "a flush to the hung master failed")
    doomed.stop()  # SIGKILL
    promotion = asyncio.create_task(asyncio.to_thread(cluster.promoted, etag_key, doomed))
    during = 0
    while not promotion.done():
        await ask(conditional=during % 2 == 1)
        during += 1
        await asyncio.sleep(0.01)
    assert await promotion is replica
    assert during > 0

    # The refresher follows the ETag slot to its new owner: a rewrite is served without a restart.
    new_text, new_etag = fill(cluster, writer, flags=[{"id": 2, "key": "gamma", "active": True}])
    current.update(text=new_text, etag=new_etag)

    async def new_payload_served() -> bool:
        return await ask(conditional=False) == new_text.encode()

    await eventually(new_payload_served, "the rewritten payload served")
    async with client.get(url(), headers={**AUTH, "If-None-Match": f'W/"{new_etag}"'}) as response:
        assert response.status == 304
    for conditional in 2 * [False, True]:
        await ask(conditional)

    # Every local 200 is in both hashes exactly once: nothing lost with the dead master, nothing doubled.
    await eventually(lambda: tally.unflushed_requests == 0, "billing flushed after the failover")
    assert billed() == [served["local 200"]] * 2
    assert tally.dropped_counts == 0
    assert served["local 200"] >= 5 + 3 + 1 + 2


async def test_readiness_needs_every_node_to_answer(
    make_proxy: MakeProxy, cluster: RedisClusterServers
) -> None:
    client = await make_proxy(redis={"timeout_seconds": 0.2, "health_check_interval_seconds": 0.05})
    await eventually(lambda: _readiness_is(client, 200), "ready")
    node = cluster.nodes[1]
    assert node.process is not None
    node.process.send_signal(signal.SIGSTOP)  # hung, well within the cluster's own 15 s node timeout
    try:
        await eventually(lambda: _readiness_is(client, 503), "not ready while one node hangs")
    finally:
        node.process.send_signal(signal.SIGCONT)
    await eventually(lambda: _readiness_is(client, 200), "ready again")


async def _readiness_is(client: Client, expected: int) -> bool:
    return await status(client, "/_readiness", {}) == expected


async def test_a_redis_url_naming_one_cluster_node_is_not_ready_and_says_why(
    make_proxy: MakeProxy, cluster: RedisClusterServers, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a reviewer: such a node answers PING, so readiness said 200 while redis:// (which does not
    follow MOVED) missed every key on the other nodes, and every definitions request was forwarded."""
    one_node = f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
    client = await make_proxy(redis={"url": one_node, "health_check_interval_seconds": 0.05})
    async with client.get("/_readiness") as response:
        assert response.status == 503
        assert await response.json() == {"status": "unavailable", "reasons": [CLUSTER_NODE]}
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{CLUSTER_NODE} (every key on another node is a miss, forwarded): not ready"
    ]


async def test_an_unreachable_cluster_is_not_ready_and_definitions_are_forwarded(
    make_proxy: MakeProxy,
    upstream: tuple[Upstream, TestServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    client = await make_proxy(
        redis={"url": dead, "timeout_seconds": 0.2, "health_check_interval_seconds": 0.05}
    )
    async with client.get("/_readiness") as response:
        assert response.status == 503
        assert await response.json() == {"status": "unavailable", "reasons": ["redis unreachable"]}
    async with client.get(url(), headers=AUTH) as response:
        assert response.status == 200
        assert (await response.json())["upstream"] is True
    assert len(upstream[0].seen) == 1
    monkeypatch.setenv("REDIS_URL", dead)
    assert main(["offload", "status"]) == 1
    assert capsys.readouterr().err.startswith("edge-proxy: offload failed: ")


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:x",
        "redis+cluster://127.0.0.1:0",
        "redis+cluster://127.0.0.1:70000",
        "redis+cluster://127.0.0.1:7000,",
        "redis+cluster://127.0.0.1:7000,:7001",
        "redis+cluster://127.0.0.1:7000/0",
        "redis+cluster://127.0.0.1:7000?ssl=true",
    ],
)
def test_malformed_cluster_urls_are_refused_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"REDIS_URL": url})
    assert str(refused.value) == (
        "invalid configuration (1 problem):\n  redis.url (from $REDIS_URL): Value error, must be "
        "redis+cluster://[user:password@]host:port[,host:port...] (ports 1-65535, no path)"
    )


def test_cluster_urls_give_nodes_and_credentials() -> None:
    assert cluster_nodes("redis+cluster://127.0.0.1:7000") == ([("127.0.0.1", 7000)], None, None)
    assert cluster_nodes("redis+cluster://edge:p%40ss@redis-a:7000,[::1]:7001/") == (
        [("redis-a", 7000), ("::1", 7001)],
        "edge",
        "p@ss",
    )


def test_a_billing_marker_template_with_a_brace_is_refused_on_a_cluster() -> None:
    environ = {"EDGE_PROXY__LAYOUT__BILLING_DEDUPE_KEY": "{{edge}}:billing-batch:{batch_id}"}
    assert load_settings(environ={**environ, "REDIS_URL": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match=r"layout\.billing_dedupe_key may hold no brace besides"):
        load_settings(environ={**environ, "REDIS_URL": "redis+cluster://127.0.0.1:7000"})


def test_a_rate_limit_key_prefix_with_a_brace_is_refused_on_a_cluster() -> None:
    environ = {"EDGE_PROXY__RATE_LIMITS__KEY_PREFIX": "rl}"}
    assert load_settings(environ={**environ, "REDIS_URL": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match=r"rate_limits\.key_prefix may hold no brace"):
        load_settings(environ={**environ, "REDIS_URL": "redis+cluster://127.0.0.1:7000"})


def test_a_marker_takes_the_slot_of_the_key_it_guards() -> None:
    for key in ("posthog:local_evaluation_requests:42", "{team42}:hash", "a{b"):
        assert slot(hash_tagged("edge-proxy:billing-batch:abc", key)) == slot(key)
    for key in ("a}b", "a{}b"):  # a "}" outside a hash tag of its own cannot be wrapped in one
        with pytest.raises(DataError):
            hash_tagged("marker", key)


async def test_a_dropped_batch_names_the_marks_a_cluster_holds(
    cluster: RedisClusterServers, cluster_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    # On a Cluster the marks are <mark>:{<hash>}, one per slot group: "GET <mark>" found nothing, and an
    # operator following the log re-applied by hand what Redis already held.
    billing = BillingTally(CONTRACT, BillingSettings(max_pending_batches=1))
    billing.count(TEAM_ID, "posthog-python", now=T0)
    assert await billing.flush(cluster_client)
    with cluster.client() as client:
        assert client.get(billing._mark) is None
        assert len(list(client.scan_iter(f"{billing._mark}:*"))) == 2
    billing.count(TEAM_ID, "posthog-python", now=T0 + 1)
    billing._seal()
    billing.count(TEAM_ID, "posthog-python", now=T0 + 2)
    with caplog.at_level(logging.ERROR, logger="proxy.billing"):
        billing._seal()
    [error] = [r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert "SCAN MATCH <mark>:*" in error
