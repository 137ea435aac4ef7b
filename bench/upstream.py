"""A simple upstream for the bench: answers every route with a small JSON body and counts what it saw.

Usage: python bench/upstream.py --bind 127.0.0.1:PORT
GET /__bench/stats (never forwarded by the bench) returns the counts; /__bench/close answers and closes the
connection (as gunicorn's sync workers do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop
from aiohttp import web

BODY = json.dumps(
    {"status": 1, "upstream": "bench", "items": [{"id": i, "name": f"item {i}"} for i in range(5)]}
)


def make_app() -> web.Application:
    """A catch-all that answers BODY, and the stats route."""
    counts = {"total": 0, "definitions": 0}

    async def anything(request: web.Request) -> web.Response:
        counts["total"] += 1
        if request.path.startswith(("/flags/definitions", "/api/feature_flag/local_evaluation")):
            counts["definitions"] += 1
        response = web.Response(text=BODY, content_type="application/json")
        if request.path == "/__bench/close":
            response.force_close()  # like gunicorn's sync workers: one request per connection
        return response

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_get("/__bench/stats", stats)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT."""
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True, help="host:port")
    host, _, port = parser.parse_args().bind.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
