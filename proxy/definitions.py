"""The definitions endpoint: contract §3 in order, answered from process memory, or forwarded."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from functools import partial

from aiohttp import web

from proxy import keys
from proxy.conditional import bearer, connection_options, none_match
from proxy.contract import RedisContract, library_from_user_agent
from proxy.errors import error_body, json_response, method_not_allowed_body
from proxy.learning import VerdictLearner
from proxy.offload import BUCKETS, Offload
from proxy.payload import Definitions
from proxy.payload_cache import DefinitionsCache
from proxy.ratelimit import SYNC_FIRST, too_many_requests
from proxy.settings import ServiceMode
from proxy.shadow import Shadow, UpstreamAnswer
from proxy.tasks import background
from proxy.teams import TeamStore
from proxy.telemetry import DEFINITIONS, expect_continue, observed
from proxy.verdicts import VerdictStore

log = logging.getLogger(__name__)

ALLOW = {"Allow": "GET, OPTIONS, HEAD"}
# The reference's HEAD (contract §1): an empty JSON answer, its length said.
HEAD_HEADERS = {"Content-Type": "application/json", "Content-Length": "0"}
# The `token` parameters of recent query strings. yarl keeps the last 128 URLs it parsed (with their parsed
# queries); with more teams than that polling, every request would parse its query string again (~2 µs).
# Bounded: only short query strings (what SDKs send), and all forgotten at once when full.
_TOKEN_MEMO_ENTRIES = 10_000
_TOKEN_MEMO_MAX_QUERY = 256


@dataclass(frozen=True, slots=True)
class Forward:
    """Only the backend can answer; with a verdict key, its answer is learned."""

    learn_key: str | None = None


FORWARD = Forward()

MISSING_TOKEN = error_body("validation_error", "missing_token", "API key is required.")
NOT_AUTHENTICATED = error_body(
    "authentication_error", "not_authenticated", "Authentication credentials were not provided."
)
SECRET_INVALID = error_body("authentication_error", "authentication_failed", "Secret API token is invalid.")
QUOTA_LIMITED = error_body(
    "quota_limited", "payment_required", "You have exceeded your feature flag request quota"
)


def _not_modified(request: web.Request, entry: Definitions) -> bool:
    """Whether the request's If-None-Match, parsed (lists, `*`, no W/, spaces; a list over several lines as
    one, RFC 9110 §5.3, as the backend's server joins them), names the entry's ETag."""
    etag = entry.etag
    return etag is not None and none_match(", ".join(request.headers.getall("If-None-Match")), etag)


class DefinitionsService:
    """What the definitions path reads: teams, payloads, quota snapshot, billing tally, forwarder."""

    def __init__(
        self,
        app: web.Application,
        teams: TeamStore,
        cache: DefinitionsCache,
        verdicts: VerdictStore,
        offload: Offload,
        shadow: Shadow,
    ) -> None:
        self.teams = teams
        self.cache = cache
        self.verdicts = verdicts
        self.offload = offload
        self.shadow = shadow
        auth = app[keys.SETTINGS].definitions.auth
        self._local_credentials = frozenset(auth.local_credentials)
        self._max_staleness = app[keys.SETTINGS].definitions.max_staleness_seconds
        # A secret refused by a record not re-read this recently may be one rotated since: see decide().
        self._recheck_after = max(1.0, 2 * app[keys.SETTINGS].definitions.refresh_interval_seconds)
        self._quota = app[keys.QUOTA]
        self._rate_limits = app[keys.RATE_LIMITS]
        self._billing = app[keys.BILLING]
        self._forwarder = app[keys.FORWARDER]
        # Counted here, where the answer is decided (the route wrapper would have to re-read the headers).
        telemetry = app[keys.TELEMETRY]
        self._etag_counts = telemetry.etag
        self._auth_denied = telemetry.auth_denied
        self.learner = VerdictLearner(verdicts, self._forwarder, enabled=auth.learn_verdicts)
        self._token_memo: dict[str, tuple[str, ...]] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Offload choice (sticky per client), then the contract path or the backend."""
        offload = self.offload
        if offload.threshold < BUCKETS and not offload.local(
            request.headers.get("Authorization", ""), request.query.get("token", "")
        ):
            state = offload.state
            if state.shadow and not state.kill:  # the kill switch stops every local answer, compared ones too
                return await self.shadow.forward(request, self._forwarder, self._compare)
            return await self._forwarder.forward(request)
        answer = await self.decide(request)
        if isinstance(answer, Forward):
            if answer.learn_key is not None:
                return await self.learner.forward(request, answer.learn_key)
            return await self._forwarder.forward(request)
        return answer

    async def decide(self, request: web.Request, *, live: bool = True) -> web.Response | Forward:
        """Contract §3 top to bottom from memory; Forward where only the backend can answer.

        `live=False` is a shadow comparison: nothing is billed or counted against a rate limit.
        """
        # 1. Method, then token.
        method = request.method
        if method != "GET":
            if method == "HEAD":
                return web.Response(status=200, headers=HEAD_HEADERS)
            if method == "OPTIONS":
                return web.Response(status=204, headers=ALLOW)
            return json_response(405, method_not_allowed_body(method), headers=ALLOW)
        tokens = self._tokens(request)
        if len(tokens) > 1:
            # Which one would the backend pick (Django takes the last)? Ask it rather than guess.
            return FORWARD
        if not tokens or not tokens[0]:
            return json_response(400, MISSING_TOKEN)
        token = tokens[0]

        # 2. Team by token. No record in Redis (the backend fills it lazily): the backend decides.
        team = self.teams.fresh(token) or await self.teams.get(token)
        if team is None:
            return FORWARD

        # 3. Authentication: Bearer only; what Redis cannot decide, the backend's learned verdict does.
        authorization = request.headers.get("Authorization")
        if authorization is None:
            if live:
                self._auth_denied["missing"] += 1
            return json_response(401, NOT_AUTHENTICATED)
        if len(request.headers.getall("Authorization")) > 1:
            # Repeated: the backend's server joins them ("Bearer a,Bearer a": malformed) where this reads the
            # first. Its answer goes back as it is, and teaches nothing: learned, its 401 would refuse the
            # credential itself for denied_ttl_seconds, on every replica.
            return FORWARD
        credential = bearer(authorization)
        if credential is None:
            # Malformed: however the backend reads it, its answer is the one to give.
            return FORWARD
        if credential.startswith("phs_") and team.secrets:
            if "secret_api_token" not in self._local_credentials:
                return FORWARD
            presented = credential.encode()
            # Compare with every secret, so the time taken does not tell which one (or whether any) matched.
            matched = False
            for secret in team.secrets:
                matched |= hmac.compare_digest(presented, secret)
            if not matched:
                # The secrets may have been rotated since the record was read (the backend accepts the new
                # one at once). Past a second, the record is re-read in the background and this request,
                # the first such, goes to the backend; the others meanwhile are refused here (a flood of
                # wrong secrets reaches the backend about once a second per team). Past max staleness
                # (Redis down), every such request goes to the backend, as a payload that old does.
                teams = self.teams
                queued = not teams.confirmed_since(token, self._recheck_after) and teams.recheck(token)
                if queued or not teams.confirmed_since(token, self._max_staleness):
                    return FORWARD
                if live:
                    self._auth_denied["secret_api_token"] += 1
                return json_response(401, SECRET_INVALID)
        else:
            kind = "secret_api_token" if credential.startswith("phs_") else "personal_api_key"
            if kind not in self._local_credentials:
                return FORWARD
            verdict_key = self.verdicts.key(team.id, credential)
            verdict = self.verdicts.cached(verdict_key) or await self.learner.verdict(verdict_key)
            if verdict is None:
                if "Connection" in request.headers and "authorization" in connection_options(request.headers):
                    # The header goes no further than this hop: the backend answers without it (PostHog then
                    # reads a personal_api_key from the query), and that answer would be learned for it.
                    return FORWARD
                return Forward(verdict_key)
            if not verdict.allowed:
                if live and verdict.status in (401, 403):
                    self._auth_denied[kind] += 1
                return web.Response(status=verdict.status, body=verdict.body, headers=verdict.headers)

        # 4. Rate limit per team: requests with If-None-Match spend the conditional budget instead of the full
        # one (the reference's two per-team limiters).
        if_none_match = request.headers.get("If-None-Match")
        conditional = if_none_match is not None
        limiter = self._rate_limits
        if live:
            # From memory in fast mode, unless this replica holds all it may unpushed (a burst).
            retry_after = limiter.check(team.id, conditional) if limiter.fast else SYNC_FIRST
            if retry_after == SYNC_FIRST:
                retry_after = await limiter.acheck(team.id, conditional)
            if retry_after is not None:
                return too_many_requests(retry_after)

        # 5. Quota, from the background snapshot.
        if self._quota.is_limited(token):
            return json_response(402, QUOTA_LIMITED)

        # 6. ETag: a 304 never reads the payload.
        entry = self.cache.get(team.id) or await self.cache.load(team.id, with_body=if_none_match is None)
        if entry is None:
            return FORWARD
        if if_none_match is not None:
            # First what SDKs send, the header as received (no call on the hot path); then anything else.
            if if_none_match == entry.etag_header or _not_modified(request, entry):
                if live:
                    self._etag_counts["hit"] += 1
                return web.Response(status=304, headers=entry.headers_304)
            if if_none_match not in self.cache.replaced(team.id):
                # Neither the ETag held here nor one it replaced: the client may have a newer one, from
                # another replica (or the backend) that read a change this one has not refreshed yet, and
                # answered 200 it would take these older flags after newer (found by a reviewer, with two
                # replicas behind one Service). Redis decides, in a read of the ETag begun after this
                # request (one already under way may predate the change; those asking meanwhile share the
                # next); while Redis cannot be read, the backend decides. A client on an ETag this replica
                # replaced holds older flags: answered from memory, no read.
                entry = await self.cache.recheck(team.id)
                if entry is None:
                    return FORWARD
                if if_none_match == entry.etag_header or _not_modified(request, entry):
                    if live:
                        self._etag_counts["hit"] += 1
                    return web.Response(status=304, headers=entry.headers_304)

        # A stale ETag gets a full answer, so the reference charges it to the full budget too.
        if conditional and live:
            retry_after = limiter.check(team.id, False) if limiter.fast else SYNC_FIRST
            if retry_after == SYNC_FIRST:
                retry_after = await limiter.acheck(team.id, False)
            if retry_after is not None:
                return too_many_requests(retry_after)

        # 7. Payload; missing is a miss (the backend can rebuild it), never a 503.
        body = self.cache.body(entry)
        if body is None:
            # For a client that holds an ETag, a read begun after its request, as in step 6: a shared one may
            # have been answered before a change the client already knows (found by a reviewer).
            cache = self.cache
            loaded = await (
                cache.recheck(team.id, with_body=True) if conditional else cache.load(team.id, with_body=True)
            )
            body = None if loaded is None else self.cache.body(loaded)
            if loaded is None or body is None:
                return FORWARD
            entry = loaded

        # 8. Billing, tallied in memory and flushed in the background.
        if live:
            self._etag_counts["miss" if conditional else "none"] += 1
            if entry.billable:
                self._billing.count(team.id, library_from_user_agent(request.headers.get("User-Agent")))

        # 9. The stored JSON, byte for byte.
        return web.Response(status=200, body=body, headers=entry.headers_200)

    def _tokens(self, request: web.Request) -> tuple[str, ...]:
        """The query's `token` parameters, parsed once per distinct (short) query string."""
        raw = request.rel_url.raw_query_string
        tokens = self._token_memo.get(raw)
        if tokens is None:
            tokens = tuple(request.query.getall("token", ()))
            if len(raw) <= _TOKEN_MEMO_MAX_QUERY:
                if len(self._token_memo) >= _TOKEN_MEMO_ENTRIES:
                    self._token_memo.clear()
                self._token_memo[raw] = tokens
        return tokens

    async def _compare(self, request: web.Request, upstream: UpstreamAnswer) -> None:
        """The shadow side: the local answer to a request the backend answered, counted by difference."""
        local = await self.decide(request, live=False)
        if (
            isinstance(local, Forward)
            and local.learn_key is not None
            and self.learner.teach(local.learn_key, upstream.status, upstream.headers, upstream.body)
        ):
            # A credential the proxy had no verdict for, which the backend has just answered: learned from
            # that answer (as a local request's forward would be), and then compared like any other; but a
            # refusal learned from this very answer would be compared with itself.
            if upstream.status in (401, 403):
                self.shadow.outcomes["learned_refusal"] += 1
                return
            local = await self.decide(request, live=False)
        team = await self.teams.get(request.query.get("token", ""))
        if (
            team is not None
            and isinstance(local, web.Response)
            and local.status in (200, 304)
            and upstream.status in (200, 304)
            and "ETag" in local.headers
            and "ETag" in upstream.headers
            and local.headers["ETag"] != upstream.headers["ETag"]
            and await self.cache.load(team.id, with_body=True) is not None
        ):
            # The backend may have read a flag change this proxy has not refreshed yet (it re-reads every
            # refresh_interval_seconds): read the team's entry again and answer again, so a change is not
            # counted a mismatch (a reviewer found every flag change logged as four), but `local_stale`.
            again = await self.decide(request, live=False)
            if isinstance(again, web.Response) and again.headers.get("ETag") != local.headers.get("ETag"):
                self.shadow.outcomes["local_stale"] += 1
                local = again
        await self.shadow.record(
            local if isinstance(local, web.Response) else None,
            upstream,
            route=request.path,
            team_id=team.id if team else None,
        )


async def definitions_ctx(app: web.Application) -> AsyncIterator[None]:
    """Team store, payload cache and its refresher for the app's lifetime."""
    settings = app[keys.SETTINGS]
    client = app[keys.REDIS]
    contract = RedisContract(settings.layout)
    health = app[keys.HEALTH]

    def redis_up() -> bool:
        # While the monitor's PINGs fail, requests read nothing from Redis: what memory cannot answer is
        # forwarded at once instead of waiting out the timeout (up to ~5x it, measured, before forwarding).
        return health.redis_reads

    teams = TeamStore(
        client,
        contract,
        ttl_seconds=settings.definitions.team_ttl_seconds,
        miss_ttl_seconds=settings.definitions.team_miss_ttl_seconds,
        redis_up=redis_up,
    )
    cache = DefinitionsCache(client, contract, settings.definitions, redis_up=redis_up)
    auth = settings.definitions.auth
    if auth.learn_verdicts and auth.hmac_key is None:
        log.warning(
            "definitions.auth.hmac_key is not set: verdicts are kept per process, not shared, and cannot be "
            "revoked (by the backend or edge-proxy revoke) before they expire"
        )
    verdicts = VerdictStore(
        client,
        hmac_key=auth.hmac_key.get_secret_value().encode() if auth.hmac_key else None,
        key_prefix=auth.key_prefix,
        allowed_ttl_seconds=auth.allowed_ttl_seconds,
        denied_ttl_seconds=auth.denied_ttl_seconds,
        max_entries=auth.max_verdicts,
        redis_up=redis_up,
    )
    offload = Offload(client, settings.definitions.offload)
    await offload.start(settings.redis.timeout_seconds)
    shadow = Shadow(settings.definitions.offload)
    app[keys.DEFINITIONS] = DefinitionsService(app, teams, cache, verdicts, offload, shadow)
    async with (
        background(cache.run_refresher, name="definitions-refresher"),
        background(
            partial(teams.run_refresher, settings.definitions.refresh_interval_seconds), name="team-refresher"
        ),
        background(
            partial(verdicts.run_revalidation, auth.revalidate_interval_seconds), name="verdict-revalidation"
        ),
        background(offload.watch, name="offload-watch"),
    ):
        yield
    await shadow.close()
    await teams.close()
    await cache.close()
    await verdicts.close()


def serves_definitions(mode: ServiceMode) -> bool:
    """Contract §1: definitions are answered in `all` and `definitions` modes, forwarded in `flags` mode."""
    return mode in (ServiceMode.ALL, ServiceMode.DEFINITIONS)


def add_routes(app: web.Application) -> None:
    """The definitions path and every configured alias (the old SDK URLs), when the mode serves them."""
    settings = app[keys.SETTINGS]
    if not serves_definitions(settings.service_mode):
        return

    bound: list[DefinitionsService] = []

    def handle(request: web.Request) -> Awaitable[web.StreamResponse]:
        # Not a coroutine itself: the service's is awaited by the route wrapper, one frame less per request.
        # The service exists once the app has started (definitions_ctx); looked up at the first request only.
        if not bound:
            bound.append(app[keys.DEFINITIONS])
        return bound[0].handle(request)

    handler = observed(app, DEFINITIONS, handle)
    for path in dict.fromkeys((settings.definitions.path, *settings.definitions.aliases)):
        app.router.add_route("*", path, handler, expect_handler=expect_continue)
