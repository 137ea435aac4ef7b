"""posthog-python from PyPI, in local-evaluation mode, through edge-proxy and straight to the backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from posthog import Posthog

from examples.stack import rollout, wait_until
from tests.e2e.support import Project, SdkRequests, Seen, Stack, captured_events, exchange

pytestmark = pytest.mark.slow

USERS = [
    (f"user-{i}", {"email": f"user{i}@{'example.com' if i % 3 == 0 else 'elsewhere.org'}"}) for i in range(40)
]
ALIASES = ("/api/feature_flag/local_evaluation", "/api/feature_flag/local_evaluation/")


@contextmanager
def sdk_client(host: str, project: Project, poll_interval: float = 600.0) -> Iterator[Posthog]:
    """A server-side SDK client with local evaluation (the poller starts at the first load)."""
    client = Posthog(
        project.token,
        host=host,
        secret_key=project.key,
        poll_interval=poll_interval,
        send=False,  # flags only: no event is sent anywhere
        feature_flags_request_timeout_seconds=5,
    )
    try:
        yield client
    finally:
        client.shutdown()


def load(client: Posthog) -> None:
    """One poll, now (what the SDK's poller does every poll_interval; it also starts the poller)."""
    client.load_feature_flags()  # type: ignore[no-untyped-call]


def evaluate(client: Posthog) -> dict[str, Any]:
    """Every user's flags and payloads, evaluated locally from the definitions the client holds."""
    return {
        distinct_id: client.get_all_flags_and_payloads(
            distinct_id, person_properties=properties, only_evaluate_locally=True
        )
        for distinct_id, properties in USERS
    }


def statuses(seen: list[Seen]) -> list[int]:
    return [s.status for s in seen]


def test_flags_evaluate_the_same_through_the_proxy(stack: Stack, sdk_requests: SdkRequests) -> None:
    project = stack.new_project("same values")
    with sdk_client(stack.backend.url, project) as direct, sdk_client(stack.proxy.url, project) as proxied:
        load(direct)
        load(proxied)
        expected, got = evaluate(direct), evaluate(proxied)

    assert statuses(sdk_requests.to(stack.proxy.url, project.token)) == [200]
    assert got == expected
    flags = [answer["featureFlags"] for answer in got.values()]
    # The values are real evaluations, not empty dicts that happen to agree.
    assert all(f["always-on"] is True and f["switched-off"] is False for f in flags)
    assert {f["half-rollout"] for f in flags} == {True, False}
    assert {f["checkout-variant"] for f in flags} == {"control", "test"}
    assert [f["example-staff"] for f in flags] == [i % 3 == 0 for i in range(len(USERS))]
    payloads = {answer["featureFlagPayloads"]["checkout-variant"] for answer in got.values()}
    assert payloads == {'{"color": "blue"}', '{"color": "green"}'}


def test_later_polls_are_answered_304_by_the_proxy_alone(stack: Stack, sdk_requests: SdkRequests) -> None:
    project = stack.new_project("polls")
    with sdk_client(stack.proxy.url, project, poll_interval=0.5) as client:
        load(client)  # the first request with this key: the backend decides it
        after_first = stack.backend_definitions()
        wait_until(lambda: len(sdk_requests.to(stack.proxy.url, project.token)) >= 5, 10, "four polls")
        seen = sdk_requests.to(stack.proxy.url, project.token)

    assert statuses(seen)[0] == 200
    assert set(statuses(seen[1:])) == {304}
    # The SDK sent back the ETag exactly as received, and the backend was not asked again.
    assert {s.request_headers["If-None-Match"] for s in seen[1:]} == {seen[0].etag}
    assert stack.backend_definitions() == after_first


def test_a_flag_change_is_picked_up_on_the_next_poll(stack: Stack, sdk_requests: SdkRequests) -> None:
    project = stack.new_project("flag change")
    with sdk_client(stack.proxy.url, project, poll_interval=0.5) as client:
        load(client)
        assert not any(answer["featureFlags"]["rolling-out"] for answer in evaluate(client).values())
        before = stack.backend_definitions()
        changed_at = time.monotonic()
        etag = stack.admin.set_flag(project.id, "rolling-out", filters=rollout(100))

        wait_until(
            lambda: all(answer["featureFlags"]["rolling-out"] for answer in evaluate(client).values()),
            10,
            "the SDK to see the flag released",
        )
        seen = sdk_requests.to(stack.proxy.url, project.token, since=changed_at)

    assert seen[-1].status == 200
    assert seen[-1].etag == f'W/"{etag}"'
    assert set(statuses(seen[:-1])) <= {304}
    # The proxy read the new definitions from Redis: the backend only wrote them.
    assert stack.backend_definitions() == before


def test_a_quota_limited_project_makes_the_sdk_clear_its_flags(
    stack: Stack, sdk_requests: SdkRequests
) -> None:
    project = stack.new_project("quota")
    with sdk_client(stack.proxy.url, project) as proxied, sdk_client(stack.backend.url, project) as direct:
        load(proxied)
        load(direct)
        assert proxied.feature_flags
        assert direct.feature_flags
        before = stack.backend_definitions()
        stack.admin.set_quota_limited(project.id, 3600)

        def limited() -> bool:
            load(proxied)
            return sdk_requests.to(stack.proxy.url, project.token)[-1].status == 402

        wait_until(limited, 5, "the proxy to answer 402", interval=0.1)
        answered_locally = stack.backend_definitions() == before
        load(direct)

        assert proxied.feature_flags == []
        assert direct.feature_flags == []
        assert sdk_requests.to(stack.backend.url, project.token)[-1].status == 402
        assert all(answer["featureFlags"] == {} for answer in evaluate(proxied).values())
    assert answered_locally


def test_a_revoked_key_makes_the_sdk_clear_its_flags(stack: Stack, sdk_requests: SdkRequests) -> None:
    project = stack.new_project("revocation")
    with sdk_client(stack.proxy.url, project) as client:
        load(client)
        assert client.feature_flags

        # Deleting the key in the backend alone: the proxy's learned "allowed" verdict still answers,
        # until its TTL (contract §4). This is the documented window, shown here on purpose.
        stack.admin.delete_key(project.key_id)
        load(client)
        assert sdk_requests.to(stack.proxy.url, project.token)[-1].status == 304

        # The operator also deletes the team's verdicts: the next poll is decided by the backend again.
        assert stack.delete_verdicts(project.id) == 1

        def revoked() -> bool:
            load(client)
            return sdk_requests.to(stack.proxy.url, project.token)[-1].status == 401

        wait_until(revoked, 5, "the proxy to answer 401", interval=0.1)
        assert client.feature_flags == []
        assert all(answer["featureFlags"] == {} for answer in evaluate(client).values())


def test_the_old_alias_url_answers_like_the_backend(stack: Stack, sdk_requests: SdkRequests) -> None:
    project = stack.new_project("alias")
    with sdk_client(stack.proxy.url, project) as client:
        load(client)
    sdk_request = sdk_requests.to(stack.proxy.url, project.token)[0]
    headers = {k: v for k, v in sdk_request.request_headers.items() if k.lower() != "if-none-match"}
    assert headers["User-Agent"].startswith("posthog-python/")
    query = sdk_request.url.partition("?")[2]

    for path in ALIASES:
        target = f"{path}?{query}"
        direct = exchange(stack.backend.url, "GET", target, headers)
        via_proxy = exchange(stack.proxy.url, "GET", target, headers)
        assert via_proxy == direct
        assert direct.status == 200
        assert direct.body == evaluate_body(stack, project)

        conditional = {**headers, "If-None-Match": str(direct.header("ETag"))}
        before = stack.backend_definitions()
        via_proxy = exchange(stack.proxy.url, "GET", target, conditional)
        assert stack.backend_definitions() == before  # answered by the proxy alone
        direct = exchange(stack.backend.url, "GET", target, conditional)
        assert via_proxy == direct
        assert direct.status == 304


def evaluate_body(stack: Stack, project: Project) -> bytes:
    """The definitions as the current URL serves them (the alias must serve the same bytes)."""
    answer = exchange(
        stack.backend.url,
        "GET",
        f"/flags/definitions?token={project.token}",
        {"Authorization": f"Bearer {project.key}"},
    )
    assert answer.status == 200
    return answer.body


def test_events_captured_through_the_proxy_reach_the_backend_compressed_or_not(stack: Stack) -> None:
    """posthog-python sends its batches gzip-compressed with gzip=True: the proxy decompressed them and sent
    them on still labelled gzip, and the backend could read none of them (found by a reviewer)."""
    project = stack.new_project("capture")
    for compressed in (True, False):
        client = Posthog(project.token, host=stack.proxy.url, gzip=compressed, sync_mode=True, max_retries=0)
        try:
            for i in range(3):
                client.capture(f"python-event-{compressed}-{i}", distinct_id="python-user")
        finally:
            client.shutdown()

    seen = captured_events(stack, project)
    assert sorted(event["event"] for event in seen) == sorted(
        f"python-event-{compressed}-{i}" for compressed in (True, False) for i in range(3)
    )
    for event in seen:
        assert event["distinct_id"] == "python-user"
        assert event["content_encoding"] == ("gzip" if event["event"].startswith("python-event-True") else "")
