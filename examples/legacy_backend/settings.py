"""Django settings of the reference backend, read from the environment.

LEGACY_BACKEND_DB           SQLite file (default: legacy_backend.sqlite3 in the system temp directory)
LEGACY_BACKEND_REDIS_URL    the Redis that edge-proxy reads (default redis://127.0.0.1:6379/0)
LEGACY_BACKEND_ADMIN_TOKEN  enables the /_admin/ JSON endpoints for callers presenting it in
                            X-Admin-Token (unset: those endpoints answer 404)
LEGACY_BACKEND_CONTENT_LENGTH
                            "1" (default): answers carry Content-Length, as PostHog's CommonMiddleware
                            adds it; "0": none, so gunicorn sends them chunked
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

REDIS_URL = os.environ.get("LEGACY_BACKEND_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = os.environ.get("LEGACY_BACKEND_ADMIN_TOKEN") or None
CONTENT_LENGTH = os.environ.get("LEGACY_BACKEND_CONTENT_LENGTH", "1") != "0"

# Nothing here signs anything (no sessions, no CSRF); Django only insists that the setting exists.
SECRET_KEY = os.environ.get("LEGACY_BACKEND_SECRET_KEY") or secrets.token_urlsafe(32)
DEBUG = False
ALLOWED_HOSTS = ["*"]  # the proxy forwards the client's Host header
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = ["examples.legacy_backend"]
# No middleware but the request counter (which also sets Content-Length, the one thing PostHog's
# CommonMiddleware adds to these answers): nothing adds headers the contract does not name, and the
# trailing-slash alias is routed explicitly instead of redirected by CommonMiddleware.
MIDDLEWARE = ["examples.legacy_backend.views.count_requests"]
ROOT_URLCONF = "examples.legacy_backend.urls"
WSGI_APPLICATION = "examples.legacy_backend.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get(
            "LEGACY_BACKEND_DB", str(Path(tempfile.gettempdir()) / "legacy_backend.sqlite3")
        ),
        # Two gunicorn workers may write at once (admin calls); wait for the lock rather than fail.
        "OPTIONS": {"timeout": 20},
    }
}

# PostHog's cache entry (posthog/settings/data_stores.py): django-redis, key prefix "posthog", version 1,
# pickled values, zstd above 512 bytes. Everything edge-proxy reads is written through this cache.
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "posthog",
        "VERSION": 1,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SERIALIZER": "django_redis.serializers.pickle.PickleSerializer",
            "COMPRESSOR": "examples.legacy_backend.compressor.ZstdCompressor",
            "SOCKET_TIMEOUT": 2,
            "SOCKET_CONNECT_TIMEOUT": 2,
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    # Every 4xx is the contract at work, not a problem worth a log line.
    "loggers": {"django.request": {"level": "ERROR"}},
}
