"""posthog-node from npm (the second real client): same flags through the proxy, 304 on later polls."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import Project, Stack, captured_events
from tests.e2e.test_python_sdk import USERS, evaluate, load, sdk_client

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).parent / "node"
POLLS = 3


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with posthog-node installed from the committed lockfile on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("posthog-node needs node and npm on PATH, and they are not installed here")
    if not (NODE_DIR / "node_modules" / "posthog-node").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True, timeout=300
        )
    return node


def run_node_client(node: str, host: str, project: Project) -> dict[str, Any]:
    """Run poll.mjs against `host`; its JSON report (evaluations and definitions requests)."""
    config = {"host": host, "token": project.token, "key": project.key, "users": USERS, "polls": POLLS}
    done = subprocess.run(
        [node, "poll.mjs", json.dumps(config)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_posthog_node_polls_through_the_proxy(stack: Stack, node: str) -> None:
    project = stack.new_project("posthog-node")
    direct = run_node_client(node, stack.backend.url, project)
    before = stack.backend_definitions()
    proxied = run_node_client(node, stack.proxy.url, project)
    reached_backend = stack.backend_definitions() - before

    assert proxied["evaluations"] == direct["evaluations"]
    with sdk_client(stack.backend.url, project) as python_client:
        load(python_client)
        python_flags = {user: answer["featureFlags"] for user, answer in evaluate(python_client).items()}
    # Both SDKs hash users alike: the Node client sees exactly what the Python client sees.
    assert {user: answer["featureFlags"] for user, answer in proxied["evaluations"].items()} == python_flags
    flags = [answer["featureFlags"] for answer in proxied["evaluations"].values()]
    assert all(f["always-on"] is True and f["switched-off"] is False for f in flags)
    assert {f["checkout-variant"] for f in flags} == {"control", "test"}

    requests = proxied["requests"]
    assert [r["status"] for r in requests][: POLLS + 1] == [200] + [304] * POLLS
    assert {r["ifNoneMatch"] for r in requests[1:]} == {requests[0]["etag"]}
    # Only the first request, with a key the proxy had not seen, reached the backend.
    assert reached_backend == 1


def test_posthog_node_capture_batches_reach_the_backend_through_the_proxy(stack: Stack, node: str) -> None:
    """posthog-node gzips every batch: the proxy decompressed it and sent it on still labelled gzip, and the
    backend could read none of it (found by a reviewer)."""
    project = stack.new_project("posthog-node capture")
    events = [f"node-event-{i}" for i in range(5)]
    config = {"host": stack.proxy.url, "token": project.token, "events": events, "distinctId": "node-user"}
    done = subprocess.run(
        [node, "capture.mjs", json.dumps(config)], cwd=NODE_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

    seen = captured_events(stack, project)
    assert sorted(event["event"] for event in seen) == events
    assert {(event["distinct_id"], event["content_encoding"]) for event in seen} == {("node-user", "gzip")}
