"""Every write of a team or flag rewrites what edge-proxy reads, as PostHog's signal handlers do."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save, pre_save  # type: ignore[import-untyped]

from examples.legacy_backend import cache
from examples.legacy_backend.models import FeatureFlag, Team


def _team_saved(sender: type[Team], instance: Team, **kwargs: Any) -> None:
    cache.write_team(instance)


def _team_token_changing(sender: type[Team], instance: Team, **kwargs: Any) -> None:
    # A rotated project token must stop naming the team at once.
    if instance.pk is None:
        return
    old = Team.objects.filter(pk=instance.pk).values_list("api_token", flat=True).first()
    if old is not None and old != instance.api_token:
        cache.forget_team(old)


def _team_deleted(sender: type[Team], instance: Team, **kwargs: Any) -> None:
    cache.forget_team(instance.api_token)


def _flag_changed(sender: type[FeatureFlag], instance: FeatureFlag, **kwargs: Any) -> None:
    cache.write_definitions(instance.team)


def connect() -> None:
    """Connect the handlers (called once from the app config's ready())."""
    pre_save.connect(_team_token_changing, sender=Team, dispatch_uid="legacy_backend.team_token")
    post_save.connect(_team_saved, sender=Team, dispatch_uid="legacy_backend.team_saved")
    post_delete.connect(_team_deleted, sender=Team, dispatch_uid="legacy_backend.team_deleted")
    post_save.connect(_flag_changed, sender=FeatureFlag, dispatch_uid="legacy_backend.flag_saved")
    post_delete.connect(_flag_changed, sender=FeatureFlag, dispatch_uid="legacy_backend.flag_deleted")
