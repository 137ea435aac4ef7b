"""Typed keys for everything the application holds, declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.billing import BillingTally
    from proxy.cluster import RedisClient
    from proxy.connections import ClientConnections
    from proxy.definitions import DefinitionsService
    from proxy.forward import Forwarder
    from proxy.health import Health
    from proxy.quota import QuotaSnapshot
    from proxy.ratelimit import RateLimiter
    from proxy.settings import Settings
    from proxy.telemetry import Telemetry

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
HEALTH: web.AppKey[Health] = web.AppKey("health")
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder")
QUOTA: web.AppKey[QuotaSnapshot] = web.AppKey("quota")
RATE_LIMITS: web.AppKey[RateLimiter] = web.AppKey("rate_limits")
BILLING: web.AppKey[BillingTally] = web.AppKey("billing")
DEFINITIONS: web.AppKey[DefinitionsService] = web.AppKey("definitions")
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")
CONNECTIONS: web.AppKey[ClientConnections] = web.AppKey("connections")

# Set on a request the forwarder sent upstream: its answer is the upstream's (telemetry's answered_by).
FORWARDED: web.RequestKey[bool] = web.RequestKey("forwarded")
