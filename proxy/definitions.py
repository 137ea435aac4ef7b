"""The definitions endpoint: contract §3 in order, answered from process memory, or forwarded."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from aiohttp import web

from proxy import keys
from proxy.conditional import bearer, none_match
from proxy.contract import RedisContract, library_from_user_agent
from proxy.errors import error_body, json_response
from proxy.payloads import DefinitionsCache
from proxy.settings import ServiceMode
from proxy.tasks import background
from proxy.teams import TeamStore

ALLOW = {"Allow": "GET, OPTIONS, HEAD"}

MISSING_TOKEN = error_body("validation_error", "missing_token", "API key is required (token parameter).")
NOT_AUTHENTICATED = error_body(
    "authentication_error", "not_authenticated", "Authentication credentials were not provided."
)
SECRET_INVALID = error_body("authentication_error", "authentication_failed", "Secret API token is invalid.")
QUOTA_LIMITED = error_body(
    "quota_limited", "payment_required", "You have exceeded your feature flag request quota"
)


class DefinitionsService:
    """What the definitions path reads: teams, payloads, quota snapshot, billing tally, forwarder."""

    def __init__(self, app: web.Application, teams: TeamStore, cache: DefinitionsCache) -> None:
        self.teams = teams
        self.cache = cache
        self._quota = app[keys.QUOTA]
        self._billing = app[keys.BILLING]
        self._forwarder = app[keys.FORWARDER]
        self._libraries: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The request path, top to bottom; anything not decidable from memory goes to the backend."""
        # 1. Method, then token.
        method = request.method
        if method != "GET":
            if method == "HEAD":
                return web.Response(status=200, content_type="application/json")
            if method == "OPTIONS":
                return web.Response(status=204, headers=ALLOW)
            return json_response(405, _method_not_allowed(method), headers=ALLOW)
        tokens = request.query.getall("token", ())
        if not tokens or not tokens[0]:
            return json_response(400, MISSING_TOKEN)
        if len(tokens) > 1:
            # Which one would the backend pick? Ask it rather than guess.
            return await self._forwarder.forward(request)
        token = tokens[0]

        # 2. Team by token. No record in Redis (the backend fills it lazily): the backend decides.
        team = await self.teams.get(token)
        if team is None:
            return await self._forwarder.forward(request)

        # 3. Authentication: Bearer only.
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return json_response(401, NOT_AUTHENTICATED)
        credential = bearer(authorization)
        if credential is None or not credential.startswith("phs_") or not team.secrets:
            # Malformed, a personal API key, or a secret we cannot check from Redis: the backend decides.
            return await self._forwarder.forward(request)
        presented = credential.encode()
        # Compare with every secret, so the time taken does not tell which one (or whether any) matched.
        if not sum(hmac.compare_digest(presented, secret) for secret in team.secrets):
            return json_response(401, SECRET_INVALID)

        # 4. Rate limits slot in here (contract §3.4).

        # 5. Quota, from the background snapshot.
        if self._quota.is_limited(token):
            return json_response(402, QUOTA_LIMITED)

        # 6. ETag: a 304 never reads the payload.
        if_none_match = request.headers.get("If-None-Match")
        entry = self.cache.get(team.id) or await self.cache.load(team.id, with_body=if_none_match is None)
        if entry is None:
            return await self._forwarder.forward(request)
        if if_none_match is not None and entry.etag is not None and none_match(if_none_match, entry.etag):
            return web.Response(status=304, headers=entry.headers_304)

        # 7. Payload; missing is a miss (the backend can rebuild it), never a 503.
        if entry.body is None:
            entry = await self.cache.load(team.id, with_body=True)
            if entry is None or entry.body is None:
                return await self._forwarder.forward(request)

        # 8. Billing, tallied in memory and flushed in the background.
        if entry.billable:
            self._billing.count(team.id, self._library(request.headers.get("User-Agent")))

        # 9. The stored JSON, byte for byte.
        return web.Response(status=200, body=entry.body, headers=entry.headers_200)

    def _library(self, user_agent: str | None) -> str:
        if user_agent is None:
            return library_from_user_agent(None)
        library = self._libraries.get(user_agent)
        if library is None:
            library = library_from_user_agent(user_agent)
            if len(self._libraries) < 1024:  # User-Agents are client-chosen: bound the memo
                self._libraries[user_agent] = library
        return library


def _method_not_allowed(method: str) -> bytes:
    # DRF's wording for 405, with the method quoted as DRF does.
    return error_body("invalid_request", "method_not_allowed", f'Method "{method}" not allowed.')


async def definitions_ctx(app: web.Application) -> AsyncIterator[None]:
    """Team store, payload cache and its refresher for the app's lifetime."""
    settings = app[keys.SETTINGS]
    client = app[keys.REDIS]
    contract = RedisContract(settings.layout)
    teams = TeamStore(
        client,
        contract,
        ttl_seconds=settings.definitions.team_ttl_seconds,
        miss_ttl_seconds=settings.definitions.team_miss_ttl_seconds,
    )
    cache = DefinitionsCache(client, contract, settings.definitions)
    app[keys.DEFINITIONS] = DefinitionsService(app, teams, cache)
    async with background(cache.run_refresher(), name="definitions-refresher"):
        yield
    await teams.close()
    await cache.close()


def serves_definitions(mode: ServiceMode) -> bool:
    """Contract §1: definitions are answered in `all` and `definitions` modes, forwarded in `flags` mode."""
    return mode in (ServiceMode.ALL, ServiceMode.DEFINITIONS)


async def handle(request: web.Request) -> web.StreamResponse:
    """Route handler for the definitions path and its aliases."""
    return await request.app[keys.DEFINITIONS].handle(request)


def add_routes(app: web.Application) -> None:
    """The definitions path and every configured alias (the old SDK URLs), when the mode serves them."""
    settings = app[keys.SETTINGS]
    if not serves_definitions(settings.service_mode):
        return
    for path in dict.fromkeys((settings.definitions.path, *settings.definitions.aliases)):
        app.router.add_route("*", path, handle)
