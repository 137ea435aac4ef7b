"""A small reference of the legacy Django backend that edge-proxy sits in front of.

It is what the end-to-end tests, the benchmarks and the demo put behind the proxy, and nothing more: teams,
hashed personal API keys and feature flags in SQLite; the team records, definitions payloads and ETags
written into Redis through Django's cache framework with django-redis exactly as
shared/spec/posthog-contract.md §2 describes; and the definitions endpoint answered by Django itself with
the contract's §3 order, status codes and bodies.

Run it:  python -m examples.legacy_backend migrate && python -m examples.legacy_backend serve
(environment: LEGACY_BACKEND_DB, LEGACY_BACKEND_REDIS_URL, LEGACY_BACKEND_ADMIN_TOKEN; see settings.py).
"""
