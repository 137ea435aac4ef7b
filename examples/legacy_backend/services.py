"""The operations an operator (or a test, or the demo) performs on the backend's data.

Every write goes through the models, so the signal handlers rewrite Redis as the real backend does.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import transaction  # type: ignore[import-untyped]

from examples.legacy_backend import cache
from examples.legacy_backend.models import FeatureFlag, PersonalAPIKey, Team, secure_value

_UNSET: Any = object()


def rollout(percentage: float, *, properties: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The filters of a boolean flag released to `percentage` % of users matching `properties`."""
    return {"groups": [{"properties": list(properties), "rollout_percentage": percentage}]}


def create_team(
    name: str,
    *,
    api_token: str | None = None,
    secret_api_token: str | None = _UNSET,
    secret_api_token_backup: str | None = None,
) -> Team:
    """A team with a fresh `phc_` token and `phs_` secret unless given; its records are written to Redis."""
    with transaction.atomic():
        team = Team.objects.create(
            name=name,
            api_token=api_token or f"phc_{secrets.token_urlsafe(24)}",
            secret_api_token=(
                f"phs_{secrets.token_urlsafe(24)}" if secret_api_token is _UNSET else secret_api_token
            ),
            secret_api_token_backup=secret_api_token_backup,
        )
    cache.write_definitions(team)
    return team


def create_personal_key(
    *,
    label: str = "",
    scopes: Iterable[str] = (),
    scoped_teams: Iterable[int] = (),
    value: str | None = None,
) -> tuple[PersonalAPIKey, str]:
    """A personal API key (`phx_...` unless given); only its sha256 is stored. Returns (row, raw key)."""
    raw = value or f"phx_{secrets.token_urlsafe(32)}"
    key = PersonalAPIKey.objects.create(
        label=label, secure_value=secure_value(raw), scopes=list(scopes), scoped_teams=list(scoped_teams)
    )
    return key, raw


def delete_personal_key(key_id: int) -> bool:
    """Delete a personal API key; False if there was none with that id.

    The backend forgets the key at once; an edge-proxy that learned "allowed" for it keeps answering until
    its verdict expires or is deleted (`edge-proxy:verdict:v1:<team_id>:*`, contract §4).
    """
    deleted, _ = PersonalAPIKey.objects.filter(pk=key_id).delete()
    return bool(deleted)


def set_flag(
    team: Team,
    key: str,
    *,
    filters: Mapping[str, Any] | None = None,
    active: bool | None = None,
    name: str | None = None,
) -> FeatureFlag:
    """Create or change a flag; the save rewrites the team's definitions and ETag in Redis."""
    with transaction.atomic():
        flag, created = FeatureFlag.objects.select_for_update().get_or_create(
            team=team,
            key=key,
            defaults={
                "filters": dict(filters or rollout(100)),
                "active": active is not False,
                "name": name or key,
            },
        )
        if not created:
            if filters is not None:
                flag.filters = dict(filters)
            if active is not None:
                flag.active = active
            if name is not None:
                flag.name = name
            flag.deleted = False
            flag.version += 1
            flag.save()
    return flag


def delete_flag(team: Team, key: str) -> bool:
    """Delete a flag (its team's definitions are rewritten); False if it did not exist."""
    flag = FeatureFlag.objects.filter(team=team, key=key).first()
    if flag is None:
        return False
    flag.delete()
    return True


def set_quota_limited(team: Team, seconds: float | None) -> None:
    """Quota-limit the team's token for `seconds` from now, or lift the limit (None)."""
    cache.set_quota_limited(team.api_token, None if seconds is None else time.time() + seconds)
