"""The `edge-proxy` command: serve, check-config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from proxy import __version__, logs, server
from proxy.settings import ConfigError, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until SIGTERM, then drain")
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    for sub in (serve, check):
        sub.add_argument("--config", metavar="FILE", help="YAML config file (environment overrides it)")
    serve.add_argument("--workers", type=int, metavar="N", help="processes sharing the port (default 1)")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
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
    if args.command == "check-config":
        print(
            f"configuration OK: bind {settings.bind}, mode {settings.service_mode.value}, "
            f"upstream {settings.upstream.base}, workers {settings.workers}"
        )
        return 0
    logs.configure(settings.logging)
    if settings.workers > 1:
        return server.supervise(settings, ["serve", *(["--config", args.config] if args.config else [])])
    return server.run(settings)
