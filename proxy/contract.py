"""The backend's Redis contract in one place: key templates (from config) and value codecs (contract §2)."""

from __future__ import annotations

from proxy.settings import RedisLayout


class DecodeError(Exception):
    """A value in Redis is not something the backend writes (or is hostile); treat it as a miss."""


class RedisContract:
    """Keys of one backend profile; the PostHog layout is the default RedisLayout."""

    def __init__(self, layout: RedisLayout) -> None:
        self.layout = layout
        # django-redis makes keys as "<prefix>:<version>:<key>".
        self._django = f"{layout.key_prefix}:{layout.key_version}:"

    def team_key(self, token: str) -> str:
        """Team record by project token."""
        return self._django + self.layout.team_key.format(token=token)

    def payload_key(self, team_id: int) -> str:
        """Definitions payload of one team."""
        return self._django + self.layout.payload_key.format(team_id=team_id)

    def etag_key(self, team_id: int) -> str:
        """ETag of the payload, written with it."""
        return self.payload_key(team_id) + self.layout.etag_suffix

    @property
    def quota_key(self) -> str:
        """Sorted set of quota-limited project tokens (no django prefix)."""
        return self.layout.quota_key

    def billing_keys(self, team_id: int, library: str) -> tuple[str, str]:
        """The two billing hashes (raw Redis, no django prefix): per team and per team and SDK."""
        return (
            self.layout.billing_team_key.format(team_id=team_id),
            self.layout.billing_sdk_key.format(team_id=team_id, library=library),
        )

    def decode_text(self, raw: bytes | None) -> str | None:
        """The text django-redis stored; None if absent or the "missing" marker; DecodeError if hostile."""
        raise NotImplementedError  # implemented with the codec


def library_from_user_agent(user_agent: str | None) -> str:
    """The SDK library name billed for a User-Agent (`posthog-python/7.4.0` -> `posthog-python`)."""
    raise NotImplementedError  # implemented with the codec
