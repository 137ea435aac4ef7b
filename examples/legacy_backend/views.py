"""The definitions endpoint as the legacy backend answers it (contract §3), plus test/demo helpers.

/flags/definitions and /api/feature_flag/local_evaluation[/]  the endpoint edge-proxy answers from Redis
/api/exports/<name>                                            a CSV download (a route edge-proxy forwards)
/batch/                                                        SDK events (gzip or plain), recorded
/_requests                                                     what this backend was asked (shared counters)
/_captured                                                     the events /batch/ recorded
/_admin/...                                                    JSON operations, with X-Admin-Token only
"""

from __future__ import annotations

import hmac
import json
import logging
import zlib
from collections.abc import Callable
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_exempt  # type: ignore[import-untyped]

from examples.legacy_backend import cache, services
from examples.legacy_backend.models import PersonalAPIKey, Team, secure_value

log = logging.getLogger(__name__)

ALLOW = "GET, OPTIONS, HEAD"
CACHE_CONTROL = "private, must-revalidate"
COUNTERS_KEY = "legacy-backend:requests"
CAPTURED_KEY = "legacy-backend:captured"
MAX_BATCH_BYTES = 20 * 2**20
DEFINITIONS_PATHS = ("/flags/definitions", "/api/feature_flag/local_evaluation")


def error_body(type_: str, code: str, detail: str) -> bytes:
    """A PostHog/DRF error body: type, code, detail, attr (compact JSON)."""
    return json.dumps(
        {"type": type_, "code": code, "detail": detail, "attr": None}, separators=(",", ":")
    ).encode()


MISSING_TOKEN = error_body("validation_error", "missing_token", "API key is required.")
TOKEN_INVALID = error_body(
    "authentication_error",
    "authentication_failed",
    "The provided API key is invalid or has expired. Please check your API key and try again.",
)
NOT_AUTHENTICATED = error_body(
    "authentication_error", "not_authenticated", "Authentication credentials were not provided."
)
SECRET_INVALID = error_body("authentication_error", "authentication_failed", "Secret API token is invalid.")
KEY_INVALID = error_body("authentication_error", "authentication_failed", "Personal API key is invalid.")
SCOPE_DENIED = error_body(
    "authentication_error",
    "permission_denied",
    "Personal API key lacks required scopes (feature_flag:read or feature_flag:write).",
)
QUOTA_LIMITED = error_body(
    "quota_limited", "payment_required", "You have exceeded your feature flag request quota"
)


def _json(status: int, body: bytes, **headers: str) -> HttpResponse:
    response = HttpResponse(body, status=status, content_type="application/json")
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _bare(status: int, **headers: str) -> HttpResponse:
    """A response without a body or Content-Type (Django would otherwise add text/html)."""
    response = HttpResponse(status=status)
    del response["Content-Type"]
    for name, value in headers.items():
        response[name] = value
    return response


# The definitions endpoint ------------------------------------------------------------------------------


@csrf_exempt
def definitions(request: HttpRequest) -> HttpResponse:
    """Contract §3 in the reference order. (No rate limit: step 4 is left to the deployment.)"""
    # 1. Method, then token.
    if request.method != "GET":
        if request.method == "HEAD":
            return HttpResponse(b"", status=200, content_type="application/json")
        if request.method == "OPTIONS":
            return _bare(204, Allow=ALLOW)
        body = error_body("invalid_request", "method_not_allowed", f'Method "{request.method}" not allowed.')
        return _json(405, body, Allow=ALLOW)
    token = request.GET.get("token")  # Django's QueryDict: the last value of a repeated parameter
    if not token:
        return _json(400, MISSING_TOKEN)

    # 2. Team by token (the database; the Redis record is filled on the way, as the backend does lazily).
    team = Team.objects.filter(api_token=token).first()
    if team is None:
        return _json(401, TOKEN_INVALID)
    cache.fill_team(team)

    # 3. Authentication: `Authorization: Bearer <credential>` only.
    denied = _authenticate(request.META.get("HTTP_AUTHORIZATION"), team)
    if denied is not None:
        return denied

    # 5. Quota.
    if cache.is_quota_limited(token):
        return _json(402, QUOTA_LIMITED)

    # 6. ETag: trim, strip a leading W/, strip the quotes, compare (no lists, no `*`: as the reference).
    text, etag = cache.read_definitions(team)
    headers = {"ETag": f'W/"{etag}"', "Cache-Control": CACHE_CONTROL} if etag else {}
    presented = request.META.get("HTTP_IF_NONE_MATCH")
    if etag and presented is not None and presented.strip().removeprefix("W/").strip('"') == etag:
        return _bare(304, **headers)

    # 8. Billing, then 9. the stored JSON as it is.
    cache.bill(team, text, request.META.get("HTTP_USER_AGENT"))
    response = HttpResponse(text.encode(), status=200, content_type="application/json")
    for name, value in headers.items():
        response[name] = value
    return response


def _authenticate(header: str | None, team: Team) -> HttpResponse | None:
    """None when the credential may read this team's definitions, else the exact 401/403 answer."""
    if header is None:
        return _json(401, NOT_AUTHENTICATED)
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return _json(401, NOT_AUTHENTICATED)
    credential = parts[1]
    if credential.startswith("phs_"):
        presented = credential.encode()
        # Compare with every secret, so the time taken does not tell which one matched.
        if not sum(hmac.compare_digest(presented, s.encode()) for s in team.secrets):
            return _json(401, SECRET_INVALID)
        return None
    key = PersonalAPIKey.objects.filter(secure_value=secure_value(credential)).first()
    if key is None:
        return _json(401, KEY_INVALID)
    if not key.may_read_definitions_of(team):
        return _json(403, SCOPE_DENIED)
    return None


def export_download(request: HttpRequest, name: str) -> HttpResponse:
    """A CSV download named after the URL, as an export's content route answers: a route edge-proxy never
    answers itself. Django writes header values as latin-1, so `résumé.csv` leaves as bytes that are not
    UTF-8 (a name outside latin-1 would be MIME-encoded instead)."""
    response = HttpResponse(b"key,value\r\nflag,on\r\n", content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# Request counters (shared by the gunicorn workers through Redis) -----------------------------------------


def count_requests(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[[HttpRequest], HttpResponse]:
    """Middleware: count every request but the helpers' own, by kind, in one Redis hash."""

    def middleware(request: HttpRequest) -> HttpResponse:
        path = request.path
        if not path.startswith(("/_requests", "/_admin/")):
            kind = "definitions" if path.startswith(DEFINITIONS_PATHS) else "other"
            try:
                pipe = cache.redis().pipeline(transaction=False)
                pipe.hincrby(COUNTERS_KEY, "total", 1)
                pipe.hincrby(COUNTERS_KEY, kind, 1)
                pipe.execute()
            except Exception:  # counting is for the tests and the demo; never fail a request on it
                log.warning("could not count a request", exc_info=True)
        response = get_response(request)
        if settings.CONTENT_LENGTH and not response.streaming and not response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        return response

    return middleware


@csrf_exempt
def capture(request: HttpRequest) -> HttpResponse:
    """POST /batch/: an SDK's batch of events, gzip-compressed (posthog-node always, posthog-python with
    gzip=True) or plain JSON, as PostHog's capture reads it; each event is recorded for /_captured."""
    if request.method != "POST":
        return _json(
            405, error_body("invalid_request", "method_not_allowed", "Method not allowed."), Allow="POST"
        )
    coding = request.headers.get("Content-Encoding", "")
    try:
        data = json.loads(_decoded(request.body, coding))
        events = data["batch"] if isinstance(data, dict) and "batch" in data else [data]
        records = [
            json.dumps(
                {
                    "api_key": data.get("api_key") or event.get("api_key"),
                    "event": event["event"],
                    "distinct_id": event.get("distinct_id"),
                    "content_encoding": coding,
                }
            )
            for event in events
        ]
    except (ValueError, KeyError, TypeError, AttributeError, zlib.error):
        return _json(400, error_body("validation_error", "invalid_payload", "Malformed request data."))
    if records:
        cache.redis().rpush(CAPTURED_KEY, *records)
    return _json(200, b'{"status":"Ok"}')


def _decoded(body: bytes, coding: str) -> bytes:
    """`body` without its Content-Encoding (gzip or none); ValueError for anything else."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding != "gzip":
        raise ValueError(f"unsupported Content-Encoding {coding!r}")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    plain = inflate.decompress(body, MAX_BATCH_BYTES)
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError("not one whole gzip member within the limit")
    return plain


def captured(request: HttpRequest) -> HttpResponse:
    """GET: the events /batch/ recorded, oldest first, as a JSON list."""
    events = [json.loads(raw) for raw in cache.redis().lrange(CAPTURED_KEY, 0, -1)]
    return HttpResponse(json.dumps(events), content_type="application/json")


def requests_seen(request: HttpRequest) -> HttpResponse:
    """GET: the counters as JSON `{"total": n, "definitions": n, "other": n}`."""
    raw = cache.redis().hgetall(COUNTERS_KEY)
    counts = {"total": 0, "definitions": 0, "other": 0} | {k.decode(): int(v) for k, v in raw.items()}
    return HttpResponse(json.dumps(counts), content_type="application/json")


# Admin JSON endpoints ----------------------------------------------------------------------------------

View = Callable[..., HttpResponse]


def admin(view: Callable[..., Any]) -> View:
    """Only with the configured X-Admin-Token (else 404); JSON in, JSON out."""

    @csrf_exempt
    def wrapped(request: HttpRequest, **kwargs: Any) -> HttpResponse:
        token = settings.ADMIN_TOKEN
        presented = request.headers.get("X-Admin-Token", "")
        if token is None or not hmac.compare_digest(presented.encode(), token.encode()):
            return _json(404, error_body("invalid_request", "not_found", "Not found."))
        try:
            data = json.loads(request.body or b"{}")
        except ValueError:
            return _json(400, error_body("validation_error", "invalid_json", "Body is not JSON."))
        result = view(request.method, data, **kwargs)
        if isinstance(result, HttpResponse):
            return result
        return HttpResponse(json.dumps(result), content_type="application/json")

    return wrapped


def _team(team_id: int) -> Team:
    return Team.objects.get(pk=team_id)


def _team_json(team: Team) -> dict[str, Any]:
    return {**team.serialize(), "secret_api_token": team.secret_api_token}


@admin
def admin_teams(method: str, data: dict[str, Any]) -> Any:
    """POST {name, api_token?, secret_api_token?, secret_api_token_backup?} -> the team with its tokens."""
    kwargs = {k: data[k] for k in ("api_token", "secret_api_token", "secret_api_token_backup") if k in data}
    return _team_json(services.create_team(str(data.get("name", "team")), **kwargs))


@admin
def admin_keys(method: str, data: dict[str, Any]) -> Any:
    """POST {label?, scopes?, scoped_teams?, value?} -> {id, value}: the raw key, shown once."""
    key, raw = services.create_personal_key(
        label=str(data.get("label", "")),
        scopes=data.get("scopes") or (),
        scoped_teams=data.get("scoped_teams") or (),
        value=data.get("value"),
    )
    return {"id": key.id, "value": raw}


@admin
def admin_key(method: str, data: dict[str, Any], key_id: int) -> Any:
    """DELETE: revoke the key in the database."""
    return {"deleted": services.delete_personal_key(key_id)}


@admin
def admin_flag(method: str, data: dict[str, Any], team_id: int, key: str) -> Any:
    """PUT {filters?, active?, name?}: create or change the flag; DELETE: delete it. -> the new ETag."""
    team = _team(team_id)
    if method == "DELETE":
        services.delete_flag(team, key)
    else:
        services.set_flag(
            team, key, filters=data.get("filters"), active=data.get("active"), name=data.get("name")
        )
    _, etag = cache.read_definitions(team)
    return {"etag": etag}


@admin
def admin_quota(method: str, data: dict[str, Any], team_id: int) -> Any:
    """PUT {seconds: n | null}: quota-limit the team's token for n seconds, or lift the limit."""
    seconds = data.get("seconds")
    services.set_quota_limited(_team(team_id), None if seconds is None else float(seconds))
    return {"limited": seconds is not None}
