"""The `edge-proxy` command: serve, check-config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
        if args.workers < 1:
            raise ConfigError("invalid configuration (1 problem):\n  workers (from --workers): must be >= 1")
        settings = settings.model_copy(update={"workers": args.workers})
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
        print(f"configuration OK: mode {settings.service_mode.value}, upstream {settings.upstream.base}")
        return 0
    logs.configure(settings.logging)
    if settings.workers > 1:
        return server.supervise(settings, ["serve", *(["--config", args.config] if args.config else [])])
    return server.run(settings)
