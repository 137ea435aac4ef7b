"""Shadow comparisons: the backend answers, the local answer is computed aside and the two are diffed."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.forward import Forwarder
from proxy.logs import where
from proxy.settings import OffloadSettings
from proxy.tasks import cancelled
from proxy.verdicts import DENIAL_HEADERS

log = logging.getLogger(__name__)

# The headers an SDK acts on; everything else (Date, Server, Vary, ...) legitimately differs.
COMPARED_HEADERS = ("ETag", "Cache-Control", "Content-Type")
# Kept from the backend's answer besides: what a verdict is learned from, and how the body is coded.
KEPT_HEADERS = tuple(dict.fromkeys((*COMPARED_HEADERS, *DENIAL_HEADERS, "Content-Encoding")))
# zlib's window bits per content coding it can undo: gzip's header and trailer, deflate's zlib wrapper.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# How long the mismatches logged per kind are counted before the sample starts again.
_LOG_WINDOW_SECONDS = 3600.0


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
    if upstream.status == 429 and local.status != 429:
        # The backend's own rate limit: a comparison spends none of the local budget, so the two cannot agree.
        return ["upstream_rate_limited"]
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
        # Bodies past the cap are not parsed: one json.loads of a few MB holds the event loop (and the GIL, in
        # a thread too) for a third of a second; a byte difference there counts as "body".
        json_only = max(len(local_body), len(upstream.body)) <= _JSON_COMPARE_MAX_BYTES and _same_json(
            local_body, upstream.body
        )
        if not json_only:
            kinds.append("body")
    if kinds:
        return kinds
    return ["match_json" if json_only else "match"]


def _same_json(a: bytes, b: bytes) -> bool:
    # The same two bodies come back request after request (one payload, one backend serialization): their
    # verdict is remembered by the bodies' hashes (a C pass over the bytes, ~50x cheaper than parsing).
    key = (len(a), hash(a), len(b), hash(b))
    same = _JSON_VERDICTS.get(key)
    if same is None:
        try:
            same = bool(json.loads(a) == json.loads(b))
        except (ValueError, RecursionError):
            same = False
        if len(_JSON_VERDICTS) >= _JSON_VERDICTS_HELD:
            _JSON_VERDICTS.clear()
        _JSON_VERDICTS[key] = same
    return same


_JSON_VERDICTS: dict[tuple[int, int, int, int], bool] = {}
_JSON_VERDICTS_HELD = 1024


def decoded(upstream: UpstreamAnswer, limit: int) -> UpstreamAnswer:
    """The answer with its body as the client reads it: gzip and deflate undone (an ingress may compress
    what the backend sends), up to `limit` bytes; a coding this cannot undo leaves no body to compare."""
    coding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
    if coding == "identity" or upstream.body is None:
        return upstream
    body: bytes | None = None
    if (wbits := _DECODERS.get(coding)) is not None:
        body = _inflated(upstream.body, wbits, limit)
        if body is None and coding == "deflate":
            body = _inflated(upstream.body, -zlib.MAX_WBITS, limit)  # raw, as urllib3 also accepts
    return UpstreamAnswer(upstream.status, upstream.headers, body)


def _inflated(data: bytes, wbits: int, limit: int) -> bytes | None:
    """`data` decompressed, every gzip member of it (as urllib3 reads them all); None if it cannot be, is cut
    short, or passes `limit`. (Found by a reviewer: a second member, or raw deflate, was a false mismatch.)"""
    out = bytearray()
    whole = -1  # the length of what the members decoded whole gave; -1 before the first
    while True:
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(data, limit + 1 - len(out))
            ended = decoder.eof
        except zlib.error:
            ended = False
        if len(out) > limit:
            return None
        if not ended:
            # Undecodable or cut short: no body, unless whole members came first; then what follows them
            # (NUL padding, junk, a member cut short) ends the body, as for urllib3.
            return bytes(out[:whole]) if whole >= 0 else None
        whole = len(out)
        data = decoder.unused_data
        if not data or wbits != _DECODERS["gzip"]:
            return bytes(out)


def body_diff(local: bytes, upstream: bytes | None) -> str:
    """A short, secret-free summary of how two bodies differ: lengths and the first differing offset."""
    if upstream is None:
        return f"local {len(local)} bytes, upstream not captured"
    offset = _first_difference(local, upstream)
    return f"local {len(local)} bytes, upstream {len(upstream)} bytes, first difference at byte {offset}"


def _first_difference(a: bytes, b: bytes) -> int:
    """The first offset where `a` and `b` differ (the shorter's length if one is a prefix of the other):
    blocks compared in C, then bytes within the first block that differs."""
    end = min(len(a), len(b))
    start = 0
    view_a, view_b = memoryview(a), memoryview(b)
    while start < end and view_a[start : start + _BLOCK] == view_b[start : start + _BLOCK]:
        start += _BLOCK
    return next((i for i in range(start, min(start + _BLOCK, end)) if a[i] != b[i]), end)


# Comparison blocks (first difference), and the body size from which a comparison leaves the event loop.
_BLOCK = 4096
_OFF_LOOP_BYTES = 64 * 1024
# The largest bodies compared as JSON when their bytes differ.
_JSON_COMPARE_MAX_BYTES = 1024 * 1024


class Shadow:
    """Bounded background comparisons: sampled, capped in concurrency, never queued behind the client."""

    def __init__(self, settings: OffloadSettings) -> None:
        self._rate = settings.shadow_sample_rate
        self._max_running = settings.shadow_max_concurrency
        self._log_samples = settings.shadow_log_samples
        self.max_body_bytes = settings.shadow_max_body_bytes
        self.outcomes: Counter[str] = Counter()
        self._logged: Counter[str] = Counter()
        self._logged_since = time.monotonic()
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
            kept = {name: headers[name] for name in KEPT_HEADERS if name in headers}
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

    async def record(
        self, local: web.Response | None, upstream: UpstreamAnswer, *, route: str, team_id: int | None
    ) -> None:
        """Count the outcome by kind; log a sample of mismatches (`shadow_log_samples` per kind an hour)
        with enough to reproduce them. "local_forwards": the local side would have forwarded (not compared).

        Two large bodies that differ are compared as JSON (up to 1 MiB) and scanned for their first
        difference in a thread, so requests on the loop are held as little as may be behind a comparison
        (a 4 MB payload took ~0.7 s on the loop, and with shadow on every request waited: 25x fewer served).
        """
        if local is None:
            self.outcomes["local_forwards"] += 1
            return
        if "Content-Encoding" in upstream.headers:
            upstream = await asyncio.to_thread(decoded, upstream, self.max_body_bytes)
        if time.monotonic() - self._logged_since > _LOG_WINDOW_SECONDS:
            self._logged.clear()
            self._logged_since = time.monotonic()
        local_body = local.body if isinstance(local.body, bytes) else b""
        big = max(len(local_body), len(upstream.body or b"")) >= _OFF_LOOP_BYTES
        if big and upstream.body is not None and local_body != upstream.body:
            kinds = await asyncio.to_thread(compare, local, upstream)
        else:
            kinds = compare(local, upstream)
        diff: str | None = None
        for kind in kinds:
            self.outcomes[kind] += 1
            if kind in ("match", "match_json") or self._logged[kind] >= self._log_samples:
                continue
            self._logged[kind] += 1
            if diff is None:  # once per comparison, however many kinds are logged
                diff = await asyncio.to_thread(body_diff, local_body, upstream.body)
            log.warning(
                "shadow mismatch %s on %s team %s: status %s/%s (local/upstream), etag %s/%s, %s",
                kind,
                route,
                team_id,
                local.status,
                upstream.status,
                local.headers.get("ETag"),
                upstream.headers.get("ETag"),
                diff,
            )

    async def close(self) -> None:
        """Cancel comparisons still running."""
        for task in list(self._tasks):
            await cancelled(task)  # its local answer reads Redis: redis-py can swallow a first cancellation
