"""The Django app config: connects the cache-writing signal handlers."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class LegacyBackendConfig(AppConfig):
    """The reference backend's only app."""

    name = "examples.legacy_backend"
    label = "legacy_backend"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the signal handlers that keep Redis in step with the database."""
        from examples.legacy_backend import signals

        signals.connect()
