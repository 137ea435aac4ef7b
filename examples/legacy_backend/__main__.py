"""`python -m examples.legacy_backend <command>`: the reference backend's management helper.

migrate                                   create the SQLite schema (LEGACY_BACKEND_DB)
serve [--bind H:P] [--workers N] [--threads T]
                                          serve with gunicorn: sync workers, one request per
                                          connection; with --threads, gthread workers of T threads
                                          that keep connections alive
create-team NAME                          a team with fresh phc_/phs_ tokens (printed as JSON)
create-key [--scope S]... [--team ID]...  a personal API key (the raw key is printed once)
set-flag TEAM_ID KEY [--rollout P] [--inactive]
                                          create or change a flag; Redis is rewritten
delete-key KEY_ID                         revoke a personal API key in the database
quota TEAM_ID SECONDS|off                 quota-limit a team's token, or lift the limit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

SETTINGS_MODULE = "examples.legacy_backend.settings"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.legacy_backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate")
    serve = commands.add_parser("serve")
    serve.add_argument("--bind", default="127.0.0.1:8000")
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=0, help="gthread workers with keep-alive (0: sync)")
    team = commands.add_parser("create-team")
    team.add_argument("name")
    key = commands.add_parser("create-key")
    key.add_argument("--scope", action="append", default=[])
    key.add_argument("--team", type=int, action="append", default=[])
    flag = commands.add_parser("set-flag")
    flag.add_argument("team_id", type=int)
    flag.add_argument("key")
    flag.add_argument("--rollout", type=float, default=100.0)
    flag.add_argument("--inactive", action="store_true")
    delete = commands.add_parser("delete-key")
    delete.add_argument("key_id", type=int)
    quota = commands.add_parser("quota")
    quota.add_argument("team_id", type=int)
    quota.add_argument("seconds")
    return parser


def gunicorn_argv(bind: str, workers: int, threads: int = 0) -> list[str]:
    """The gunicorn command line serving the backend, logs to stderr: sync workers (each connection closed
    after its answer), or with `threads` gthread workers keeping connections alive 20 s (longer than the
    proxy's default upstream keep-alive, 15 s, so the proxy is the side that closes idle ones)."""
    worker_class = ["--worker-class", "sync"]
    if threads > 0:
        worker_class = ["--worker-class", "gthread", "--threads", str(threads), "--keep-alive", "20"]
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        bind,
        "--workers",
        str(workers),
        *worker_class,
        "--graceful-timeout",
        "5",
        "--error-logfile",
        "-",
        "examples.legacy_backend.wsgi:application",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    if args.command == "serve":
        command = gunicorn_argv(args.bind, args.workers, args.threads)
        os.execv(command[0], command)  # noqa: S606 - our own interpreter and arguments

    import django  # type: ignore[import-untyped]
    from django.core.management import call_command  # type: ignore[import-untyped]

    django.setup()
    from examples.legacy_backend import services
    from examples.legacy_backend.models import Team

    if args.command == "migrate":
        call_command("migrate", interactive=False, verbosity=0)
    elif args.command == "create-team":
        team = services.create_team(args.name)
        print(
            json.dumps(
                {"id": team.id, "api_token": team.api_token, "secret_api_token": team.secret_api_token}
            )
        )
    elif args.command == "create-key":
        key, raw = services.create_personal_key(scopes=args.scope, scoped_teams=args.team)
        print(json.dumps({"id": key.id, "value": raw}))
    elif args.command == "set-flag":
        team = Team.objects.get(pk=args.team_id)
        flag = services.set_flag(
            team, args.key, filters=services.rollout(args.rollout), active=not args.inactive
        )
        print(json.dumps(flag.serialize()))
    elif args.command == "delete-key":
        return 0 if services.delete_personal_key(args.key_id) else 1
    elif args.command == "quota":
        team = Team.objects.get(pk=args.team_id)
        services.set_quota_limited(team, None if args.seconds == "off" else float(args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
