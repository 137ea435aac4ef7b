"""Teams, personal API keys and feature flags: the rows the definitions endpoint is decided from."""

from __future__ import annotations

import hashlib
from typing import Any

from django.db import models  # type: ignore[import-untyped]

# The scopes that may read flag definitions (contract §3 step 3); an empty list means "all scopes".
DEFINITIONS_SCOPES = frozenset({"*", "feature_flag:read", "feature_flag:write"})


class Team(models.Model):
    """A project: its public token, its secret tokens and its name."""

    name = models.CharField(max_length=200)
    api_token = models.CharField(max_length=200, unique=True)
    secret_api_token = models.CharField(max_length=200, null=True, blank=True)
    secret_api_token_backup = models.CharField(max_length=200, null=True, blank=True)

    class Meta:
        app_label = "legacy_backend"

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    def serialize(self) -> dict[str, Any]:
        """The record PostHog's CachingTeamSerializer caches under team_token:{token} (the fields it has)."""
        return {
            "id": self.id,
            "project_id": self.id,
            "uuid": f"01890000-0000-0000-0000-{self.id:012d}",
            "name": self.name,
            "api_token": self.api_token,
            "secret_api_token": self.secret_api_token,
            "secret_api_token_backup": self.secret_api_token_backup,
            "autocapture_opt_out": False,
            "session_recording_opt_in": False,
        }

    @property
    def secrets(self) -> tuple[str, ...]:
        """The project secret tokens currently accepted (primary and backup)."""
        return tuple(s for s in (self.secret_api_token, self.secret_api_token_backup) if s)


def secure_value(raw_key: str) -> str:
    """How a personal API key is stored: `sha256$<hex sha256(key)>` (never the key itself)."""
    return "sha256$" + hashlib.sha256(raw_key.encode()).hexdigest()


class PersonalAPIKey(models.Model):
    """A user's personal API key, stored hashed, with scopes and an optional list of teams it may read."""

    label = models.CharField(max_length=200, default="")
    secure_value = models.CharField(max_length=300, unique=True)
    scopes = models.JSONField(default=list)  # [] = every scope
    scoped_teams = models.JSONField(default=list)  # [] = every team

    class Meta:
        app_label = "legacy_backend"

    def __str__(self) -> str:
        return self.label or f"key {self.id}"

    def may_read_definitions_of(self, team: Team) -> bool:
        """Scope check of contract §3 step 3: a definitions scope, and the team among the scoped ones."""
        scopes = set(self.scopes or ())
        if scopes and not scopes & DEFINITIONS_SCOPES:
            return False
        return not self.scoped_teams or team.id in self.scoped_teams


class FeatureFlag(models.Model):
    """A feature flag of a team; `filters` is PostHog's filter document (groups, multivariate, payloads)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="flags")
    key = models.CharField(max_length=400)
    name = models.CharField(max_length=400, default="", blank=True)
    filters = models.JSONField(default=dict)
    active = models.BooleanField(default=True)
    deleted = models.BooleanField(default=False)
    ensure_experience_continuity = models.BooleanField(default=False)
    version = models.IntegerField(default=1)

    class Meta:
        app_label = "legacy_backend"
        constraints = [models.UniqueConstraint(fields=["team", "key"], name="unique_flag_key_per_team")]

    def __str__(self) -> str:
        return self.key

    def serialize(self) -> dict[str, Any]:
        """A flag as PostHog's MinimalFeatureFlagSerializer shapes it for local evaluation."""
        return {
            "id": self.id,
            "team_id": self.team_id,
            "name": self.name,
            "key": self.key,
            "filters": self.filters,
            "deleted": self.deleted,
            "active": self.active,
            "ensure_experience_continuity": self.ensure_experience_continuity,
            "version": self.version,
        }
