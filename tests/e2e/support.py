"""Helpers of the end-to-end suite: the running stack, raw HTTP exchanges and the SDK's own requests."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import posthog.request
import redis

from examples.stack import AdminClient, Backend, Proxy, rollout

HEADERS_THAT_MATTER = ("Content-Type", "ETag", "Cache-Control", "Allow", "WWW-Authenticate", "Server")
VERDICT_PREFIX = "edge-proxy:verdict:v1"

# The flags every e2e project starts with: each kind of filter the SDK evaluates locally.
EMAIL_FILTER = {"key": "email", "value": "example.com", "operator": "icontains", "type": "person"}
FLAGS: dict[str, dict[str, Any]] = {
    "always-on": {"filters": rollout(100)},
    "half-rollout": {"filters": rollout(50)},
    "example-staff": {"filters": rollout(100, [EMAIL_FILTER])},
    "checkout-variant": {
        "filters": {
            "groups": [{"properties": [], "rollout_percentage": 100}],
            "multivariate": {
                "variants": [
                    {"key": "control", "rollout_percentage": 50},
                    {"key": "test", "rollout_percentage": 50},
                ]
            },
            "payloads": {"control": '{"color": "blue"}', "test": '{"color": "green"}'},
        }
    },
    "switched-off": {"filters": rollout(100), "active": False},
    "rolling-out": {"filters": rollout(0)},
}


@dataclass
class Project:
    """A team of the reference backend with its tokens and a personal API key that may read it."""

    id: int
    token: str
    secret: str
    key_id: int
    key: str


@dataclass
class Stack:
    """Redis, the reference backend and edge-proxy in front of it, all real processes."""

    redis_url: str
    backend: Backend
    proxy: Proxy

    @property
    def admin(self) -> AdminClient:
        """The backend's admin operations."""
        return self.backend.admin

    def backend_definitions(self) -> int:
        """How many definitions requests the backend has answered so far."""
        return self.admin.requests_seen()["definitions"]

    def new_project(self, name: str, flags: Mapping[str, Mapping[str, Any]] = FLAGS) -> Project:
        """A fresh team with `flags` and a personal API key without scopes."""
        team = self.admin.create_team(name)
        for key, spec in flags.items():
            self.admin.set_flag(team["id"], key, filters=spec["filters"], active=spec.get("active", True))
        key_id, key = self.admin.create_key(label=f"{name} key")
        return Project(team["id"], team["api_token"], team["secret_api_token"], key_id, key)

    def delete_verdicts(self, team_id: int) -> int:
        """Delete the proxy's learned verdicts of a team in Redis, as an operator revoking access would."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            found = list(client.scan_iter(match=f"{VERDICT_PREFIX}:{team_id}:*", count=1000))
            return int(client.delete(*found)) if found else 0
        finally:
            client.close()


def captured_events(stack: Stack, project: Project) -> list[dict[str, Any]]:
    """The events the backend's /batch/ recorded for `project`, oldest first."""
    answer = exchange(stack.backend.url, "GET", "/_captured")
    assert answer.status == 200
    events: list[dict[str, Any]] = json.loads(answer.body)
    return [event for event in events if event["api_key"] == project.token]


@dataclass(frozen=True)
class Answer:
    """What a client can tell about an HTTP answer: status, the headers that matter, body."""

    status: int
    headers: tuple[tuple[str, str | None], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """One of the headers that matter (None if absent)."""
        return dict(self.headers).get(name)


def exchange(base_url: str, method: str, target: str, headers: Mapping[str, str] | None = None) -> Answer:
    """One request with exactly these headers (plus Host), on a fresh connection."""
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=15)
    try:
        names = {name.lower() for name in headers or {}}
        connection.putrequest(method, target, skip_accept_encoding="accept-encoding" in names)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        kept = tuple((name, response.getheader(name)) for name in HEADERS_THAT_MATTER)
        return Answer(response.status, kept, body)
    finally:
        connection.close()


@dataclass(frozen=True)
class Seen:
    """One request the posthog SDK made, as it went out and came back."""

    at: float
    method: str
    url: str
    request_headers: dict[str, str]
    status: int
    etag: str | None
    seconds: float


@dataclass
class SdkRequests:
    """Every HTTP request the posthog SDK makes (through its shared requests session), in order."""

    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        """A requests response hook: record the exchange."""
        seen = Seen(
            time.monotonic(),
            str(response.request.method),
            str(response.request.url),
            dict(response.request.headers),
            response.status_code,
            response.headers.get("ETag"),
            response.elapsed.total_seconds(),
        )
        with self.lock:
            self.seen.append(seen)

    def to(self, base_url: str, token: str | None = None, since: float = 0.0) -> list[Seen]:
        """The requests to `base_url` (for project `token`) made after the monotonic time `since`."""
        with self.lock:
            return [
                s
                for s in self.seen
                if s.url.startswith(base_url)
                and s.at > since
                and (token is None or f"token={token}" in s.url)
            ]


@contextmanager
def recording_sdk_requests() -> Iterator[SdkRequests]:
    """Record the SDK's requests while the block runs (a hook on posthog.request's pooled session)."""
    recorder = SdkRequests()
    hooks = posthog.request._get_session().hooks["response"]
    hooks.append(recorder.hook)
    try:
        yield recorder
    finally:
        hooks.remove(recorder.hook)
