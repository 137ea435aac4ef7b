"""Test-only: fill Redis exactly as PostHog's Django backend does, through Django's cache and django-redis."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from django.conf import settings  # type: ignore[import-untyped]
from django.core.cache import CacheHandler  # type: ignore[import-untyped]
from django_redis.compressors.base import BaseCompressor

# PostHog's key templates, written out here rather than taken from proxy.contract, so that the tests
# compare the proxy's keys with what django-redis really wrote.
TEAM_KEY = "team_token:{token}"
PAYLOAD_KEY = "cache/teams/{team_id}/feature_flags/flags_with_cohorts.json"
ETAG_SUFFIX = ":etag"
MISSING = "__missing__"
# posthog/models/team/team_caching.py (FIVE_DAYS) and posthog/storage/hypercache.py (miss TTL, 1 day).
TEAM_TTL_SECONDS = 5 * 24 * 3600
PAYLOAD_TTL_SECONDS = 7 * 24 * 3600
MISSING_TTL_SECONDS = 24 * 3600


class ZlibTestCompressor(BaseCompressor):  # type: ignore[misc]
    """posthog/caching/tolerant_zlib_compressor.py, the older deployments' compressor: zlib above 15 bytes."""

    min_length = 15
    preset = 6

    def compress(self, value: bytes) -> bytes:
        """zlib stream when longer than min_length, else the value unchanged."""
        if len(value) > self.min_length:
            return zlib.compress(value, self.preset)
        return value

    def decompress(self, value: bytes) -> bytes:
        """The value, decompressed when it is a zlib stream."""
        try:
            return zlib.decompress(value)
        except zlib.error:
            return value


COMPRESSORS = {
    # The reference backend's own compressor: PostHog's, zstd above 512 bytes.
    "zstd": "examples.legacy_backend.compressor.ZstdCompressor",
    "zlib": f"{__name__}.ZlibTestCompressor",
}


def cache_config(redis_url: str, compressor: Literal["zstd", "zlib"] = "zstd") -> dict[str, Any]:
    """One CACHES entry shaped like PostHog's (posthog/settings/data_stores.py), at redis_url."""
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": redis_url,
        "KEY_PREFIX": "posthog",
        "VERSION": 1,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            # PostHog does not set PICKLE_VERSION: django-redis's default protocol.
            "SERIALIZER": "django_redis.serializers.pickle.PickleSerializer",
            "COMPRESSOR": COMPRESSORS[compressor],
            # So that close() really disconnects (the suite turns unclosed sockets into errors).
            "CLOSE_CONNECTION": True,
        },
    }


def definitions_json(
    flags: Sequence[Mapping[str, Any]],
    group_type_mapping: Mapping[str, str] | None = None,
    cohorts: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """The payload text and its ETag as posthog/storage/hypercache.py computes them."""
    payload = {
        "flags": list(flags),
        "group_type_mapping": dict(group_type_mapping or {}),
        "cohorts": dict(cohorts or {}),
    }
    json_text = json.dumps(payload, sort_keys=True)
    return json_text, hashlib.sha256(json_text.encode("utf-8")).hexdigest()[:16]


def team_record(team_id: int, token: str, **fields: Any) -> dict[str, Any]:
    """A team as posthog/api/team.py's CachingTeamSerializer shapes it (the fields the proxy reads)."""
    return {
        "id": team_id,
        "project_id": team_id,
        "organization_id": "01890000-0000-0000-0000-000000000001",
        "uuid": f"01890000-0000-0000-0000-{team_id:012d}",
        "name": f"Team {team_id}",
        "api_token": token,
        "secret_api_token": None,
        "secret_api_token_backup": None,
        "autocapture_opt_out": False,
        "session_recording_opt_in": False,
        **fields,
    }


class BackendWriter:
    """Writes team records and definitions payloads with django-redis, as the backend does."""

    def __init__(self, redis_url: str, compressor: Literal["zstd", "zlib"] = "zstd") -> None:
        self.redis_url = redis_url
        config = cache_config(redis_url, compressor)
        if not settings.configured:
            settings.configure(CACHES={"default": config})
        # A handler of our own: each writer gets the backend Django would build for this CACHES entry,
        # whatever URL the process-wide settings were configured with.
        self.cache: Any = CacheHandler({"default": config}).create_connection("default")

    def set_team(self, token: str, team: Mapping[str, Any]) -> None:
        """The team record, as set_team_in_cache writes it: json.dumps of the serialized team."""
        self.cache.set(TEAM_KEY.format(token=token), json.dumps(team), TEAM_TTL_SECONDS)

    def delete_team(self, token: str) -> None:
        """Drop the team record (the backend does so when the token no longer matches a team)."""
        self.cache.delete(TEAM_KEY.format(token=token))

    def set_definitions(
        self,
        team_id: int,
        flags: Sequence[Mapping[str, Any]],
        group_type_mapping: Mapping[str, str] | None = None,
        cohorts: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Payload and ETag written together with set_many, as HyperCache does; returns (json_text, etag)."""
        json_text, etag = definitions_json(flags, group_type_mapping, cohorts)
        key = PAYLOAD_KEY.format(team_id=team_id)
        self.cache.set_many({key: json_text, key + ETAG_SUFFIX: etag}, timeout=PAYLOAD_TTL_SECONDS)
        return json_text, etag

    def set_payload_without_etag(
        self,
        team_id: int,
        flags: Sequence[Mapping[str, Any]],
        group_type_mapping: Mapping[str, str] | None = None,
        cohorts: Mapping[str, Any] | None = None,
    ) -> str:
        """Payload alone, as HyperCache writes it with ETags disabled (it deletes any stale ETag)."""
        json_text, _ = definitions_json(flags, group_type_mapping, cohorts)
        key = PAYLOAD_KEY.format(team_id=team_id)
        self.cache.set(key, json_text, timeout=PAYLOAD_TTL_SECONDS)
        self.cache.delete(key + ETAG_SUFFIX)
        return json_text

    def set_missing(self, team_id: int) -> None:
        """The "known empty" marker, and no ETag, as HyperCache writes a team with nothing to serve."""
        key = PAYLOAD_KEY.format(team_id=team_id)
        self.cache.set(key, MISSING, timeout=MISSING_TTL_SECONDS)
        self.cache.delete(key + ETAG_SUFFIX)

    def encoded(self, key: str, value: Any) -> tuple[str, bytes | int]:
        """The Redis key and value django-redis writes for `key`, for a Redis it cannot reach (a Cluster)."""
        return str(self.cache.make_key(key)), self.cache.client.encode(value)

    def close(self) -> None:
        """Disconnect the writer's Redis connections."""
        self.cache.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
