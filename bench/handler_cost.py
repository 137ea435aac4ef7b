"""What the definitions handler costs per call, against the ceiling's handler, in one process.

Usage: python bench/handler_cost.py [--calls 100000] [--rounds 5] [--teams 1]

The wrk benchmark (bench/run.py) measures whole requests; this isolates the part the proxy adds. Both
handlers run in this process on uvloop, interleaved round by round, called directly with a request built
by aiohttp's test utilities (no socket, no HTTP parsing, no response write: those cost the same in both).
The proxy's handler is the real route handler of an app built by create_app, its cleanup contexts open
against a real redis-server filled the way the backend fills it; the ceiling's is bench/ceiling.py's.
Prints median µs per call for 304 and 200 answers and the difference, which is what each request pays for
the contract checks, telemetry and billing on top of serving bytes from memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import ceiling, dataset  # noqa: E402
from examples.stack import free_port  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.config_loader import load_settings  # noqa: E402
from tests.rig import RedisServer  # noqa: E402

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _handler(app: web.Application, path: str) -> Handler:
    for resource in app.router.resources():
        if resource.canonical == path:
            for route in resource:
                return route.handler
    raise LookupError(path)


async def _per_call(handler: Handler, requests: list[web.Request], calls: int, status: int) -> float:
    """µs per call, cycling through `requests` (one per team)."""
    for request in requests:
        response = await handler(request)
        if response.status != status:
            raise RuntimeError(f"expected {status}, got {response.status}")
    rounds = max(calls // len(requests), 1)
    start = time.perf_counter()
    for _ in range(rounds):
        for request in requests:
            await handler(request)
    return (time.perf_counter() - start) / (rounds * len(requests)) * 1e6


async def measure(redis_url: str, teams: list[dataset.Team], calls: int, rounds: int, workdir: Path) -> None:
    """Both handlers, interleaved, for 304 and 200; medians printed."""
    settings = load_settings(
        None,
        {
            "REDIS_URL": redis_url,
            "UPSTREAM_URL": "http://127.0.0.1:9",
            "LOG_LEVEL": "WARNING",
            "EDGE_PROXY__RATE_LIMITS__DEFAULT": "100000000/second",
            "EDGE_PROXY__RATE_LIMITS__ETAG": "100000000/second",
        },
    )
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        manifest = dataset.write_manifest(workdir / "manifest.json", teams, workdir)
        path, table = ceiling.load(manifest)
        ceiling_handler = _handler(ceiling.make_app(path, table), path)
        proxy_handler = _handler(app, path)
        requests = {
            status: [
                make_mocked_request("GET", team.path, headers=team.headers(conditional=cond), app=app)
                for team in teams
            ]
            for status, cond in ((304, True), (200, False))
        }
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for status, request in requests.items():
                for name, handler in (("ceiling", ceiling_handler), ("proxy", proxy_handler)):
                    cost = await _per_call(handler, request, calls, status)
                    results.setdefault((name, status), []).append(cost)
        for status in requests:
            ceiling_us = statistics.median(results["ceiling", status])
            proxy_us = statistics.median(results["proxy", status])
            print(
                f"{status}: ceiling handler {ceiling_us:.2f} µs, proxy handler {proxy_us:.2f} µs, "
                f"the proxy adds {proxy_us - ceiling_us:.2f} µs per request"
            )
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--teams", type=int, default=1, help="requests cycle through this many teams")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-proxy-handler-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(port=free_port(), workdir=workdir)
        server.start()
        try:
            writer, _ = dataset.open_writer(server.url)
            teams = dataset.fill(writer, server.url, teams=args.teams, target_bytes=50_000, www=workdir)
            uvloop.run(measure(server.url, teams, args.calls, args.rounds, workdir))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
