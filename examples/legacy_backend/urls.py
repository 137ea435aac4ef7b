"""Routes: the definitions endpoint and its old alias, an export download, SDK event batches, the request
counters and the events recorded, the admin operations."""

from __future__ import annotations

from django.urls import path, re_path  # type: ignore[import-untyped]

from examples.legacy_backend import views

urlpatterns = [
    path("flags/definitions", views.definitions),
    # The old SDK URL, with or without its trailing slash (no redirect: the reference answers both).
    re_path(r"^api/feature_flag/local_evaluation/?$", views.definitions),
    path("api/exports/<str:name>", views.export_download),
    path("batch/", views.capture),
    path("_requests", views.requests_seen),
    path("_captured", views.captured),
    path("_admin/teams", views.admin_teams),
    path("_admin/teams/<int:team_id>/flags/<str:key>", views.admin_flag),
    path("_admin/teams/<int:team_id>/quota", views.admin_quota),
    path("_admin/keys", views.admin_keys),
    path("_admin/keys/<int:key_id>", views.admin_key),
]
