"""The ceiling: a minimal aiohttp app on uvloop serving the same bytes and headers from memory, no logic.

Usage: python bench/ceiling.py --bind 127.0.0.1:PORT --manifest FILE
(the manifest maps project token -> body file and ETag; bench/run.py writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

CACHE_CONTROL = "private, must-revalidate"


@dataclass(frozen=True, slots=True)
class Entry:
    """One team's answer, headers built once."""

    body: bytes
    etag_header: str
    headers_200: dict[str, str]
    headers_304: dict[str, str]


def load(manifest_path: Path) -> tuple[str, dict[str, Entry]]:
    """The route and token -> Entry, bodies read into memory."""
    manifest = json.loads(manifest_path.read_text())
    table = {}
    for token, item in manifest["teams"].items():
        etag_header = f'W/"{item["etag"]}"'
        headers_304 = {"ETag": etag_header, "Cache-Control": CACHE_CONTROL}
        table[token] = Entry(
            body=Path(item["file"]).read_bytes(),
            etag_header=etag_header,
            headers_200={"Content-Type": "application/json", **headers_304},
            headers_304=headers_304,
        )
    return manifest["path"], table


def make_app(path: str, table: dict[str, Entry]) -> web.Application:
    """One route: the token's bytes, or 304 when If-None-Match is the ETag as sent."""

    async def definitions(request: web.Request) -> web.Response:
        entry = table.get(request.query.get("token", ""))
        if entry is None:
            return web.Response(status=404)
        if request.headers.get("If-None-Match") == entry.etag_header:
            return web.Response(status=304, headers=entry.headers_304)
        return web.Response(body=entry.body, headers=entry.headers_200)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get(path, definitions)
    app.router.add_get("/_liveness", health)
    return app


async def serve(host: str, port: int, app: web.Application) -> None:
    """Serve until SIGTERM/SIGINT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
    parser.add_argument("--manifest", required=True, type=Path)
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    path, table = load(args.manifest)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port), make_app(path, table)))


if __name__ == "__main__":
    main()
