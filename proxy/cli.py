"""The `edge-proxy` command: serve, check-config, offload, revoke."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from redis.exceptions import RedisClusterException, RedisError

from proxy import __version__, client_cap, logs
from proxy.config_loader import load_settings
from proxy.settings import ConfigError, Settings

# The config file when --config is not given: the image sets it to the file it serves with, so a command
# run in the container (`edge-proxy offload status`) reads the same defaults as the proxy it controls.
CONFIG_ENV = "EDGE_PROXY_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = f"YAML config file (environment overrides it; default ${CONFIG_ENV}, if set)"
    serve = commands.add_parser("serve", help="serve until SIGTERM, then drain")
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    for sub in (serve, check):
        sub.add_argument("--config", metavar="FILE", help=config_help)
    serve.add_argument("--workers", type=int, metavar="N", help="processes sharing the port (default 1)")
    # Set by the supervisor of --workers N on each worker it starts (telemetry.worker_metrics_port): the
    # process serves as one of N (its share of the container's memory), not as their supervisor.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    # And the write end of the worker's heartbeat pipe (supervisor.supervise).
    serve.add_argument("--heartbeat-fd", type=int, default=None, help=argparse.SUPPRESS)

    offload = commands.add_parser(
        "offload", help="the definitions offload weight, kill switch and shadow mode"
    )
    offload.add_argument("--config", metavar="FILE", help=config_help)
    # Also after the action (`offload status --config F`); unset there, the one before it (or none) stands.
    config_after = argparse.ArgumentParser(add_help=False)
    config_after.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
    actions = offload.add_subparsers(dest="action", required=True)
    actions.add_parser("status", parents=[config_after], help="what every replica follows now")
    weight = actions.add_parser(
        "set", parents=[config_after], help="share of requests answered locally, 0-100"
    )
    weight.add_argument("percent", type=float)
    for name, text in (("kill", "forward everything at once (rollback)"), ("shadow", "compare answers")):
        toggle = actions.add_parser(name, parents=[config_after], help=text)
        toggle.add_argument("state", choices=("on", "off"))
    actions.add_parser(
        "reset", parents=[config_after], help="forget runtime changes: back to the config file"
    )

    revoke = commands.add_parser("revoke", help="delete learned auth verdicts")
    revoke.add_argument("--config", metavar="FILE", help=config_help)
    scope = revoke.add_mutually_exclusive_group(required=True)
    scope.add_argument("--team", type=int, metavar="ID", help="every verdict of this team")
    scope.add_argument("--all", action="store_true", help="every verdict of every team")
    revoke.add_argument(
        "--credential-stdin", action="store_true", help="with --team: only the credential read from stdin"
    )
    return parser


def _operate(args: argparse.Namespace, settings: Settings) -> int:
    # Only these commands talk to Redis synchronously: `serve` does not carry the module (0.2 MiB).
    from proxy import control

    if args.command == "revoke":
        credential = control.read_credential() if args.credential_stdin else None
        if credential is not None and args.team is None:
            print("edge-proxy: --credential-stdin needs --team", file=sys.stderr)
            return 2
        if credential == "":
            # An empty pipe would revoke the verdict of "" and report success.
            print("edge-proxy: --credential-stdin read no credential", file=sys.stderr)
            return 2
        deleted = control.revoke(settings, args.team, credential)
        print(f"revoked {deleted} verdict{'s' * (deleted != 1)}")
        return 0
    if args.action == "set":
        if not 0 <= args.percent <= 100:
            print("edge-proxy: the offload weight is a percentage, 0 to 100", file=sys.stderr)
            return 2
        state = control.offload_update(settings, weight_percent=f"{args.percent:g}")
    elif args.action in ("kill", "shadow"):
        state = control.offload_update(settings, **{args.action: "1" if args.state == "on" else "0"})
    elif args.action == "reset":
        state = control.offload_reset(settings)
    else:
        state = control.offload_status(settings)
    print(control.describe(state))
    return 0


def _load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config or os.environ.get(CONFIG_ENV) or None)
    if getattr(args, "workers", None) is not None:
        # Validated like the file and environment values (model_copy alone would skip the 1..64 bound).
        try:
            settings = Settings.model_validate({**settings.model_dump(), "workers": args.workers})
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ConfigError(
                f"invalid configuration (1 problem):\n  workers (from --workers): {problem}"
            ) from exc
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a configuration that cannot be used)."""
    args = _parser().parse_args(argv)
    try:
        settings = _load(args)
    except ConfigError as exc:
        print(f"edge-proxy: {exc}", file=sys.stderr)
        return 2
    if args.command in ("serve", "check-config"):
        # Before the check and before any worker starts (they inherit it); check-config sees what serve would.
        client_cap.raise_open_file_limit()
        try:
            clients = client_cap.client_cap(settings)
        except ConfigError as exc:
            print(f"edge-proxy: {exc}", file=sys.stderr)
            return 2
    if args.command == "check-config":
        print(
            f"configuration OK: bind {settings.bind}, mode {settings.service_mode.value}, "
            f"upstream {settings.upstream.base}, workers {settings.workers}, "
            f"up to {clients} client connections"
        )
        return 0
    if args.command in ("offload", "revoke"):
        try:
            return _operate(args, settings)
        # RedisClusterException: no node of a Cluster answered (redis-py does not make it a RedisError).
        except (RedisError, RedisClusterException, ValueError) as exc:
            print(f"edge-proxy: {args.command} failed: {exc}", file=sys.stderr)
            return 1
    logs.configure(settings.logging)
    client_cap.warn_if_short(settings)
    # Each imported only by the process that runs it: the supervisor of --workers N never serves, and
    # leaving the app (aiohttp, uvloop, OpenTelemetry, prometheus_client, the handlers) to its workers saves
    # it ~20 MiB (bench/README.md "Where a process's memory goes").
    if settings.workers > 1 and args.worker_index is None:
        from proxy import supervisor

        return supervisor.supervise(settings, ["serve", *(["--config", args.config] if args.config else [])])
    from proxy import server

    return server.run(settings, args.worker_index or 0, args.heartbeat_fd)
