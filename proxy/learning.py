"""Learning auth verdicts from the backend: ask once per (credential, team), remember, answer the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web

from proxy.forward import Forwarder
from proxy.telemetry import CLIENT_CLOSED
from proxy.verdicts import MAX_DENIAL_BODY_BYTES, Verdict, VerdictStore, verdict_of


class VerdictLearner:
    """Undecided requests go to the backend; a flood of one credential waits for the first answer."""

    def __init__(self, verdicts: VerdictStore, forwarder: Forwarder, *, enabled: bool) -> None:
        self._verdicts = verdicts
        self._forwarder = forwarder
        self._enabled = enabled
        # The answer being learned per key; its result: whether the leader's client left before an answer.
        self._learning: dict[str, asyncio.Future[bool]] = {}

    async def verdict(self, key: str) -> Verdict | None:
        """Memory, then Redis (shared by replicas), then the verdict another request is learning now."""
        verdict = self._verdicts.cached(key)
        if verdict is None:
            # Memory again after the read: a request that was asking the backend may have learned the
            # verdict while this one waited for Redis (its write may not have reached Redis yet).
            verdict = await self._verdicts.lookup(key) or self._verdicts.cached(key)
        while verdict is None and (learning := self._learning.get(key)) is not None:
            # A flood of one credential reaches the backend once: the rest wait for that answer. Its leader's
            # client gone (its forward dropped, no answer), the first waiter to run leads in its place: they
            # all went to the backend (a reviewer's: 21 requests for one credential).
            abandoned = await asyncio.shield(learning)
            verdict = self._verdicts.cached(key)
            if not abandoned:
                break
        return verdict

    def teach(self, key: str, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        """Learn what an answer the backend gave this credential says of it; whether it said anything.

        For answers forwarded on another path (shadow comparisons): without this, a personal API key
        forwarded with offload at 0 % would never be known locally, and never compared.
        """
        if not self._enabled or (verdict := verdict_of(status, headers, body)) is None:
            return False
        self._verdicts.learn(key, verdict)
        return True

    async def forward(self, request: web.Request, key: str) -> web.StreamResponse:
        """Forward an undecided request; the backend's answer, if it is a verdict, decides later ones."""
        if not self._enabled:
            return await self._forwarder.forward(request)
        learning: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._learning[key] = learning

        def done(abandoned: bool = False) -> None:
            # Its own entry only: when the answer was no verdict, the requests that waited for it forward
            # together, and each one's entry replaces the one before (later arrivals wait on the newest).
            if self._learning.get(key) is learning:
                del self._learning[key]
            if not learning.done():
                learning.set_result(abandoned)

        def on_status(status: int) -> None:
            # An allowed answer decides at its head: the rest of the flood is answered while this client
            # still downloads (a slow SDK reading a large payload held every other request of its key).
            if (verdict := verdict_of(status, {}, None)) is not None and verdict.allowed:
                self._verdicts.learn(key, verdict)
                done()

        def observe(status: int, headers: Mapping[str, str], body: bytes | None) -> None:
            # A refusal decides with its body (the exact answer to give again), at the end.
            verdict = verdict_of(status, headers, body)
            if verdict is not None and not verdict.allowed:
                self._verdicts.learn(key, verdict)

        abandoned = True  # unless an answer comes (a forward that raises has none)
        try:
            # Captured even when streamed: a refusal sent chunked (no Content-Length) is still learned.
            response = await self._forwarder.forward(
                request, observe=observe, capture_bytes=MAX_DENIAL_BODY_BYTES, on_status=on_status
            )
            abandoned = response.status == CLIENT_CLOSED and not response.prepared
            return response
        finally:
            done(abandoned)
