"""A stand-in legacy backend for auth tests: decides the definitions request the way contract §3 says."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CACHE_CONTROL = "private, must-revalidate"


def drf_error(type_: str, code: str, detail: str) -> bytes:
    """A PostHog/DRF error body, compact JSON as the proxy's contract bodies are."""
    return json.dumps(
        {"type": type_, "code": code, "detail": detail, "attr": None}, separators=(",", ":")
    ).encode()


TOKEN_INVALID = drf_error(
    "authentication_error",
    "authentication_failed",
    "The provided API key is invalid or has expired. Please check your API key and try again.",
)
NOT_AUTHENTICATED = drf_error(
    "authentication_error", "not_authenticated", "Authentication credentials were not provided."
)
SECRET_INVALID = drf_error("authentication_error", "authentication_failed", "Secret API token is invalid.")
KEY_INVALID = drf_error("authentication_error", "authentication_failed", "Personal API key is invalid.")
SCOPE_DENIED = drf_error(
    "authentication_error",
    "permission_denied",
    "Personal API key lacks required scopes (feature_flag:read or feature_flag:write).",
)
ALLOWED_SCOPES = {"*", "feature_flag:read", "feature_flag:write"}


@dataclass
class PersonalKey:
    """A personal API key row: only its hash is stored, as the backend does."""

    secure_value: str
    scopes: tuple[str, ...] = ()
    scoped_teams: tuple[int, ...] = ()


@dataclass
class StandInBackend:
    """Teams, hashed personal keys and payloads; answers /flags/definitions and counts what it decided."""

    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: list[PersonalKey] = field(default_factory=list)
    payloads: dict[int, tuple[str, str]] = field(default_factory=dict)  # team id -> (json text, etag)
    decided: int = 0

    def add_key(self, raw_key: str, scopes: tuple[str, ...] = (), scoped_teams: tuple[int, ...] = ()) -> None:
        """Store a personal API key the modern way: `sha256$<hex>`."""
        digest = hashlib.sha256(raw_key.encode()).hexdigest()
        self.keys.append(PersonalKey(f"sha256${digest}", scopes, scoped_teams))

    async def definitions(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """Contract §3, steps 1-3 and 6-9, as the legacy backend answers them."""
        self.decided += 1
        token = request.query.get("token")
        if not token:
            return _json(400, drf_error("validation_error", "missing_token", "API key is required."))
        team = self.teams.get(token)
        if team is None:
            return _json(401, TOKEN_INVALID)
        header = request.headers.get("Authorization")
        if header is None:
            return _json(401, NOT_AUTHENTICATED)
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            return _json(401, NOT_AUTHENTICATED)
        credential = parts[1]
        if credential.startswith("phs_"):
            secrets = {team.get("secret_api_token"), team.get("secret_api_token_backup")} - {None}
            if credential not in secrets:
                return _json(401, SECRET_INVALID)
        else:
            digest = "sha256$" + hashlib.sha256(credential.encode()).hexdigest()
            key = next((k for k in self.keys if k.secure_value == digest), None)
            if key is None:
                return _json(401, KEY_INVALID)
            if key.scopes and not set(key.scopes) & ALLOWED_SCOPES:
                return _json(403, SCOPE_DENIED)
            if key.scoped_teams and team["id"] not in key.scoped_teams:
                return _json(403, SCOPE_DENIED)
        text, etag = self.payloads[team["id"]]
        headers = {"ETag": f'W/"{etag}"', "Cache-Control": CACHE_CONTROL}
        match = request.headers.get("If-None-Match", "").strip().removeprefix("W/").strip('"')
        if match == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(status=200, body=text.encode(), content_type="application/json", headers=headers)


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")
