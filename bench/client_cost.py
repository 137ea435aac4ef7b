"""What an upstream request costs the client side: aiohttp's ClientSession against proxy/upstream.py's Pool.

Usage: python bench/client_cost.py [--requests 20000] [--concurrency 16] [--rounds 3]

Starts the bench's aiohttp upstream (bench/upstream.py) pinned to core 1, then, in this process on core 0,
sends the same GET (the headers the forwarder sends) through each client in turn, round after round, and
prints this process's CPU time per request: the client's own cost (plus the loop's), side by side in one run.
A third row sends through the pool to a route that closes every connection (as gunicorn's sync workers do):
what a TCP connect and close per request cost on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import procs  # noqa: E402
from proxy.upstream import Limits, Pool  # noqa: E402

HEADERS = {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "127.0.0.1"}


async def with_aiohttp(port: int, requests: int, concurrency: int) -> None:
    """The forwarder's former client, configured as it was."""
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def worker(count: int) -> None:
            for _ in range(count):
                async with session.request(
                    "GET", f"http://127.0.0.1:{port}/api/thing?x=1", headers=HEADERS, allow_redirects=False
                ) as response:
                    await response.read()

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))


async def with_pool(port: int, requests: int, concurrency: int, path: str = "/api/thing?x=1") -> None:
    """proxy/upstream.py, sending what the forwarder sends."""
    pool = Pool("127.0.0.1", port, tls=False, limits=Limits())  # the forwarder's defaults
    head = "".join(
        [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"]
        + [f"{k}: {v}\r\n" for k, v in HEADERS.items()]
        + ["\r\n"]
    ).encode()

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await pool.send(head, None)
            try:
                await response.read()
            finally:
                response.release()

    try:
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    finally:
        pool.close()


async def main(args: argparse.Namespace) -> None:
    port = procs.free_port()
    with tempfile.TemporaryDirectory() as logs, procs.Supervisor(Path(logs)) as supervisor:
        command = [sys.executable, str(ROOT / "bench" / "upstream.py"), "--bind", f"127.0.0.1:{port}"]
        upstream = supervisor.start("upstream", procs.pinned(command, 1))
        procs.wait_http(port, "/__bench/stats", upstream)
        clients: dict[str, Callable[[int, int, int], Awaitable[None]]] = {
            "aiohttp ClientSession": with_aiohttp,
            "proxy.upstream.Pool": with_pool,
            # The same, to an upstream closing every connection: what a connect per request adds.
            "proxy.upstream.Pool, a new connection per request": partial(with_pool, path="/__bench/close"),
        }
        cost: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.rounds):
            for name, client in clients.items():
                start = time.process_time()
                await client(port, args.requests, args.concurrency)
                cost[name].append((time.process_time() - start) / args.requests * 1e6)
        baseline = statistics.median(cost["aiohttp ClientSession"])
        print(f"{args.requests} GETs x {args.rounds} rounds, {args.concurrency} at a time, CPU here:")
        print("| client | µs per request (median) | rounds | x aiohttp |")
        print("|---|---:|---|---:|")
        for name, values in cost.items():
            rounds = ", ".join(f"{value:.1f}" for value in values)
            median = statistics.median(values)
            print(f"| {name} | {median:.1f} | {rounds} | {median / baseline:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    uvloop.run(main(parser.parse_args()))
