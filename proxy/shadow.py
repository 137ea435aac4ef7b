"""Shadow comparisons: the backend answers, the local answer is computed aside and the two are diffed."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.forward import Forwarder
from proxy.logs import where
from proxy.settings import OffloadSettings

log = logging.getLogger(__name__)

# The headers an SDK acts on; everything else (Date, Server, Vary, ...) legitimately differs.
COMPARED_HEADERS = ("ETag", "Cache-Control", "Content-Type")


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """What the backend answered, as the forwarder observed it (body None when too large to keep)."""

    status: int
    headers: Mapping[str, str]
    body: bytes | None


def compare(local: web.Response, upstream: UpstreamAnswer) -> list[str]:
    """Kinds of difference between the local and the backend's answer; ["match"] or ["match_json"] if none.

    "match" means byte-equal bodies; "match_json" equal only as canonical JSON (key order, spacing).
    """
    kinds = []
    if local.status != upstream.status:
        kinds.append("status")
    for name in COMPARED_HEADERS:
        if local.headers.get(name) != upstream.headers.get(name):
            kinds.append(f"header_{name.lower().replace('-', '_')}")
    local_body = local.body if isinstance(local.body, bytes) else b""
    json_only = False
    if upstream.body is None:
        kinds.append("body_not_captured")
    elif local_body != upstream.body:
        json_only = _same_json(local_body, upstream.body)
        if not json_only:
            kinds.append("body")
    if kinds:
        return kinds
    return ["match_json" if json_only else "match"]


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return bool(json.loads(a) == json.loads(b))
    except (ValueError, RecursionError):
        return False


def body_diff(local: bytes, upstream: bytes | None) -> str:
    """A short, secret-free summary of how two bodies differ: lengths and the first differing offset."""
    if upstream is None:
        return f"local {len(local)} bytes, upstream not captured"
    offset = next((i for i, (a, b) in enumerate(zip(local, upstream, strict=False)) if a != b), None)
    if offset is None:
        offset = min(len(local), len(upstream))
    return f"local {len(local)} bytes, upstream {len(upstream)} bytes, first difference at byte {offset}"


class Shadow:
    """Bounded background comparisons: sampled, capped in concurrency, never queued behind the client."""

    def __init__(self, settings: OffloadSettings) -> None:
        self._rate = settings.shadow_sample_rate
        self._max_running = settings.shadow_max_concurrency
        self._log_samples = settings.shadow_log_samples
        self.max_body_bytes = settings.shadow_max_body_bytes
        self.outcomes: Counter[str] = Counter()
        self._logged: Counter[str] = Counter()
        self.running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def admit(self) -> bool:
        """Take a comparison slot for this request, or say no (sampled out, or too many running)."""
        if self._rate < 1.0 and random.random() >= self._rate:
            return False
        if self.running >= self._max_running:
            self.outcomes["skipped_busy"] += 1
            return False
        self.running += 1
        return True

    async def forward(
        self,
        request: web.Request,
        forwarder: Forwarder,
        compare_with: Callable[[web.Request, UpstreamAnswer], Coroutine[Any, Any, None]],
    ) -> web.StreamResponse:
        """Forward; if admitted, compare the local answer afterwards, in the background."""
        if not self.admit():
            return await forwarder.forward(request)
        answers: list[UpstreamAnswer] = []

        def observe(status: int, headers: Mapping[str, str], body: bytes | None) -> None:
            kept = {name: headers[name] for name in COMPARED_HEADERS if name in headers}
            answers.append(UpstreamAnswer(status, kept, body))

        try:
            return await forwarder.forward(request, observe=observe, capture_bytes=self.max_body_bytes)
        finally:
            if answers:
                self.spawn(compare_with(request, answers[0]))
            else:
                self.release()

    def release(self) -> None:
        """Give back a slot that was not used (the upstream failed before answering)."""
        self.running -= 1

    def spawn(self, comparison: Coroutine[Any, Any, None]) -> None:
        """Run a comparison in the background; its slot is released when it ends."""
        task = asyncio.create_task(comparison)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.running -= 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.outcomes["error"] += 1
            # Its type and place, not its message (which can quote a key, and so a token).
            log.error("shadow comparison failed: %s at %s", type(exc).__name__, where(exc))

    def record(
        self, local: web.Response | None, upstream: UpstreamAnswer, *, route: str, team_id: int | None
    ) -> None:
        """Count the outcome by kind; log a bounded sample of mismatches with enough to reproduce them."""
        if local is None:
            self.outcomes["local_forwards"] += 1
            return
        for kind in compare(local, upstream):
            self.outcomes[kind] += 1
            if kind in ("match", "match_json") or self._logged[kind] >= self._log_samples:
                continue
            self._logged[kind] += 1
            log.warning(
                "shadow mismatch %s on %s team %s: status %s/%s (local/upstream), etag %s/%s, %s",
                kind,
                route,
                team_id,
                local.status,
                upstream.status,
                local.headers.get("ETag"),
                upstream.headers.get("ETag"),
                body_diff(local.body if isinstance(local.body, bytes) else b"", upstream.body),
            )

    async def close(self) -> None:
        """Cancel comparisons still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
