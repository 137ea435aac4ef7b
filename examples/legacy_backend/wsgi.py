"""The WSGI application (gunicorn examples.legacy_backend.wsgi:application)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.legacy_backend.settings")
application = get_wsgi_application()
