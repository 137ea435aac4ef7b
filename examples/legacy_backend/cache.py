"""What the backend writes into Redis (contract §2), through Django's cache framework with django-redis.

Cached values go through `django.core.cache.cache` (so they are pickled, zstd-compressed above 512 bytes and
named `posthog:1:<key>`); the quota sorted set and the billing hashes are raw Redis structures, as in PostHog.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from django.core.cache import cache  # type: ignore[import-untyped]
from django_redis import get_redis_connection

from examples.legacy_backend.models import FeatureFlag, Team

TEAM_KEY = "team_token:{token}"
PAYLOAD_KEY = "cache/teams/{team_id}/feature_flags/flags_with_cohorts.json"
ETAG_SUFFIX = ":etag"
MISSING = "__missing__"
QUOTA_KEY = "@posthog/quota-limits/feature_flag_requests"
BILLING_TEAM_KEY = "posthog:local_evaluation_requests:{team_id}"
BILLING_SDK_KEY = "posthog:local_evaluation_requests:sdk:{team_id}:{library}"
BILLING_BUCKET_SECONDS = 120
UNBILLED_PREFIXES = ("survey-targeting-", "product-tour-targeting-")
# posthog/models/team/team_caching.py (five days) and posthog/storage/hypercache.py (seven days).
TEAM_TTL_SECONDS = 5 * 24 * 3600
PAYLOAD_TTL_SECONDS = 7 * 24 * 3600

_LIBRARY = re.compile(r"^(posthog-[a-z]+)/")


def redis() -> Any:
    """The raw Redis client behind the default cache (for the sorted set and hashes)."""
    return get_redis_connection("default")


# Team records -----------------------------------------------------------------------------------------


def write_team(team: Team) -> None:
    """The team record under its token: json.dumps of the serialized team, as set_team_in_cache does."""
    cache.set(TEAM_KEY.format(token=team.api_token), json.dumps(team.serialize()), TEAM_TTL_SECONDS)


def fill_team(team: Team) -> None:
    """Write the record only if absent: the lazy fill of a request that found the team in the database."""
    cache.add(TEAM_KEY.format(token=team.api_token), json.dumps(team.serialize()), TEAM_TTL_SECONDS)


def forget_team(token: str) -> None:
    """Drop the record of a token that no longer names a team."""
    cache.delete(TEAM_KEY.format(token=token))


# Definitions payload and ETag --------------------------------------------------------------------------


def build_definitions(team: Team) -> tuple[str, str]:
    """The payload JSON (sorted keys) and its ETag (16 hex of its sha256), as HyperCache computes them."""
    flags = FeatureFlag.objects.filter(team=team, deleted=False).order_by("id")
    payload = {"flags": [flag.serialize() for flag in flags], "group_type_mapping": {}, "cohorts": {}}
    text = json.dumps(payload, sort_keys=True)
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def write_definitions(team: Team) -> tuple[str, str]:
    """Rebuild the team's payload from the database and write it with its ETag in one set_many."""
    text, etag = build_definitions(team)
    key = PAYLOAD_KEY.format(team_id=team.id)
    cache.set_many({key: text, key + ETAG_SUFFIX: etag}, timeout=PAYLOAD_TTL_SECONDS)
    return text, etag


def read_definitions(team: Team) -> tuple[str, str | None]:
    """The payload and ETag as stored; rebuilt and written when missing (the backend owns the data)."""
    key = PAYLOAD_KEY.format(team_id=team.id)
    found = cache.get_many([key, key + ETAG_SUFFIX])
    text = found.get(key)
    if not isinstance(text, str) or text == MISSING:
        return write_definitions(team)
    etag = found.get(key + ETAG_SUFFIX)
    return text, etag if isinstance(etag, str) else None


# Quota ------------------------------------------------------------------------------------------------


def is_quota_limited(token: str) -> bool:
    """Contract §3 step 5: the token is in the sorted set with a score >= now. Fails open."""
    try:
        limited = redis().zrangebyscore(QUOTA_KEY, time.time(), "+inf")
    except Exception:  # the reference lets the request through when Redis cannot be read
        return False
    return token.encode() in limited


def set_quota_limited(token: str, until: float | None) -> None:
    """Limit the token until the unix time `until`, or lift its limit (None)."""
    if until is None:
        redis().zrem(QUOTA_KEY, token)
    else:
        redis().zadd(QUOTA_KEY, {token: until})


# Billing ----------------------------------------------------------------------------------------------


def library_of(user_agent: str | None) -> str:
    """The SDK name of a User-Agent (`posthog-python/7.4.0` -> `posthog-python`), else `other`."""
    match = _LIBRARY.match(user_agent or "")
    return match.group(1) if match else "other"


def bill(team: Team, payload_text: str, user_agent: str | None) -> None:
    """Contract §3 step 8: HINCRBY both hashes, unless every flag is a survey/product-tour one (no flag at all
    included: PostHog bills only `len(flag_keys) > 0`)."""
    keys = [flag.get("key", "") for flag in json.loads(payload_text).get("flags", [])]
    if all(str(k).startswith(UNBILLED_PREFIXES) for k in keys):
        return
    bucket = str(int(time.time() // BILLING_BUCKET_SECONDS))
    try:
        pipe = redis().pipeline(transaction=False)
        pipe.hincrby(BILLING_TEAM_KEY.format(team_id=team.id), bucket, 1)
        pipe.hincrby(BILLING_SDK_KEY.format(team_id=team.id, library=library_of(user_agent)), bucket, 1)
        pipe.execute()
    except Exception:  # a failed increment must not fail the request
        return
