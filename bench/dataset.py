"""Bench data: realistic flag definitions of a target size, written to Redis as the backend writes them."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.backend_writer import BackendWriter

DEFINITIONS_PATH = "/flags/definitions"
USER_AGENT = "posthog-python/7.4.0"
_GROUP_TYPES = {"0": "organization", "1": "company", "2": "instance"}
_PERSON_PROPERTIES = ("email", "plan", "country", "$browser", "signup_date", "company_size", "role")
_AREAS = ("checkout", "onboarding", "pricing", "search", "billing")
_KINDS = ("new-ui", "beta", "rollout", "kill-switch", "experiment")
_OPERATORS = ("exact", "is_not", "icontains", "regex", "gt", "lt", "is_set")


@dataclass(frozen=True)
class Team:
    """One bench team: its credentials and the exact bytes and ETag the backend stored for it."""

    team_id: int
    token: str
    secret: str
    body: bytes
    etag: str

    @property
    def path(self) -> str:
        """The definitions URL an SDK polls."""
        return f"{DEFINITIONS_PATH}?token={self.token}&send_cohorts"

    def headers(self, *, conditional: bool) -> dict[str, str]:
        """What posthog-python sends (If-None-Match with the ETag as received, when `conditional`)."""
        headers = {"Authorization": f"Bearer {self.secret}", "User-Agent": USER_AGENT}
        if conditional:
            headers["If-None-Match"] = f'W/"{self.etag}"'
        return headers


# The bench fills Redis only the way the backend does (Django's cache + django-redis), never with a
# re-implementation of its codecs.
Writer = BackendWriter


def open_writer(redis_url: str) -> tuple[Writer, str]:
    """tests/backend_writer.py's BackendWriter and its description for the report."""
    return BackendWriter(redis_url), "tests/backend_writer.py BackendWriter (django-redis, zstd)"


def team_record(team_id: int, token: str, secret: str) -> dict[str, Any]:
    """A team record shaped like the backend's cached team (the fields the proxy reads, and some more)."""
    return {
        "id": team_id,
        "project_id": team_id,
        "organization_id": "01890000-0000-0000-0000-000000000001",
        "uuid": f"01890000-0000-0000-0000-{team_id:012d}",
        "name": f"Bench team {team_id}",
        "api_token": token,
        "secret_api_token": secret,
        "secret_api_token_backup": None,
        "autocapture_opt_out": False,
        "session_recording_opt_in": False,
    }


def _condition(rng: random.Random) -> dict[str, Any]:
    key = rng.choice(_PERSON_PROPERTIES)
    operator = rng.choice(_OPERATORS)
    value: Any
    if key == "email" and operator == "exact":
        # Allow-lists of emails are what make real payloads big.
        value = [
            f"user{rng.randrange(10**6)}@example{rng.randrange(50)}.com" for _ in range(rng.randrange(1, 40))
        ]
    elif operator == "is_set":
        value = "is_set"
    elif operator in ("gt", "lt"):
        value = str(rng.randrange(1, 10_000))
    else:
        value = [f"{key}-value-{rng.randrange(1000)}" for _ in range(rng.randrange(1, 4))]
    return {"key": key, "type": "person", "value": value, "operator": operator}


def _flag(rng: random.Random, index: int) -> dict[str, Any]:
    multivariate = None
    payloads: dict[str, str] = {}
    if rng.random() < 0.3:
        variants = ["control", "test", "test-b"][: rng.randrange(2, 4)]
        share = 100 // len(variants)
        multivariate = {
            "variants": [
                {
                    "key": v,
                    "name": v.title(),
                    "rollout_percentage": share + (100 % len(variants) if i == 0 else 0),
                }
                for i, v in enumerate(variants)
            ]
        }
        payloads = {
            v: json.dumps({"color": rng.choice(["blue", "red"]), "copy": f"Variant {v}"}) for v in variants
        }
    elif rng.random() < 0.2:
        payloads = {"true": json.dumps({"limit": rng.randrange(100), "enabled": True})}
    groups = [
        {
            "properties": [_condition(rng) for _ in range(rng.randrange(0, 4))],
            "rollout_percentage": rng.choice([None, 0, 10, 25, 50, 100]),
            "variant": None,
        }
        for _ in range(rng.randrange(1, 4))
    ]
    prefix = "survey-targeting-" if rng.random() < 0.05 else ""
    return {
        "id": 10_000 + index,
        "team_id": 0,  # set per team
        "name": f"Flag {index}: {rng.choice(_AREAS)} experiment",
        "key": f"{prefix}flag-{index}-{rng.choice(_KINDS)}",
        "filters": {
            "groups": groups,
            "multivariate": multivariate,
            "payloads": payloads,
            "aggregation_group_type_index": rng.choice([None, None, None, 0, 1]),
        },
        "deleted": False,
        "active": rng.random() < 0.9,
        "ensure_experience_continuity": rng.random() < 0.1,
        "has_encrypted_payloads": False,
        "version": rng.randrange(1, 20),
        "evaluation_runtime": rng.choice(["all", "server", "client"]),
        "evaluation_tags": [],
        "bucketing_identifier": "distinct_id",
    }


def _cohorts(rng: random.Random, count: int) -> dict[str, Any]:
    return {
        str(500 + i): {
            "type": "OR",
            "values": [{"type": "AND", "values": [dict(_condition(rng), negation=False) for _ in range(2)]}],
        }
        for i in range(count)
    }


def base_flags(target_bytes: int, seed: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Flags and cohorts whose sorted-keys JSON is about `target_bytes` long."""
    rng = random.Random(seed)
    cohorts = _cohorts(rng, max(1, target_bytes // 20_000))
    size = len(json.dumps({"cohorts": cohorts, "group_type_mapping": _GROUP_TYPES}))
    flags: list[dict[str, Any]] = []
    while size < target_bytes:
        flag = _flag(rng, len(flags))
        flags.append(flag)
        size += len(json.dumps(flag)) + 2
    return flags, cohorts


FIRST_TEAM_ID = 1000
# The miss team: the backend's database knows it as MISS_TEAM_ID (whose payload is in Redis), but its
# Redis team record says MISS_RECORD_ID, whose payload key is absent: the proxy finds the team and no
# payload, so it forwards every request, and the backend answers them in full from its own row. (Had the
# ids matched, the backend would rebuild the missing payload on the first forwarded request, and the
# next ones would be hits.)
MISS_TEAM_ID = 5000
MISS_RECORD_ID = 9_000_000


def credentials(team_id: int) -> tuple[str, str]:
    """The bench's deterministic (project token, secret token) of a team id."""
    suffix = hashlib.sha256(f"bench-{team_id}".encode()).hexdigest()[:24]
    return f"phc_{suffix}", f"phs_{suffix[::-1]}"


def backend_rows(teams: int) -> list[tuple[int, str, str]]:
    """(id, token, secret) of `teams` bench teams and of the miss team, for the backend's database."""
    ids = [*range(FIRST_TEAM_ID, FIRST_TEAM_ID + teams), MISS_TEAM_ID]
    return [(team_id, *credentials(team_id)) for team_id in ids]


def fill_miss_team(writer: Writer, target_bytes: int) -> Team:
    """The miss team's record (pointing at an id without a payload) and its payload under the backend's id."""
    token, secret = credentials(MISS_TEAM_ID)
    writer.set_team(token, team_record(MISS_RECORD_ID, token, secret))
    flags, cohorts = base_flags(target_bytes)
    text, etag = writer.set_definitions(
        MISS_TEAM_ID, [dict(flag, team_id=MISS_TEAM_ID) for flag in flags], _GROUP_TYPES, cohorts
    )
    return Team(MISS_TEAM_ID, token, secret, text.encode(), etag)


def fill(writer: Writer, redis_url: str, *, teams: int, target_bytes: int, www: Path) -> list[Team]:
    """Write `teams` teams with distinct ~`target_bytes` payloads; each body also to www/t/<token>.json."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    flags, cohorts = base_flags(target_bytes)
    (www / "t").mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(teams):
        team_id = FIRST_TEAM_ID + n
        token, secret = credentials(team_id)
        writer.set_team(token, team_record(team_id, token, secret))
        team_flags = [dict(flag, team_id=team_id) for flag in flags]
        text, etag = writer.set_definitions(team_id, team_flags, _GROUP_TYPES, cohorts)
        body = text.encode()
        (www / "t" / f"{token}.json").write_bytes(body)
        out.append(Team(team_id, token, secret, body, etag))
    return out


def write_manifest(path: Path, teams: Sequence[Team], www: Path) -> Path:
    """token -> (body file, ETag) for the ceiling app."""
    manifest = {
        "path": DEFINITIONS_PATH,
        "teams": {
            team.token: {"file": str(www / "t" / f"{team.token}.json"), "etag": team.etag} for team in teams
        },
    }
    path.write_text(json.dumps(manifest))
    return path
