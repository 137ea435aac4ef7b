"""System calls per forwarded request: the proxy's, and the same upstream's when asked directly.

Usage: python bench/syscalls.py [--requests 2000] [--baseline REV] [--pace one|wrk]
                                [--upstream aiohttp|django]
Starts Redis, the bench's no-op aiohttp upstream (or the reference Django under one gthread worker, as
bench/run.py's forward-keepalive does) and the proxy (and, with --baseline, the proxy of git
revision REV), then counts each server's system calls by name with `strace -c -f` attached over the
measured requests only: sent one at a time over 4 kept-alive connections (`--pace one`, deterministic), or
by wrk over 32 connections for 3 s (`--pace wrk`; the count per request then depends on how many requests
each loop wake-up finds). wrk's CPU figure includes system time, so a call saved per forward is CPU saved.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import backend, procs  # noqa: E402
from bench.run import (  # noqa: E402
    FORWARD_PATH,
    HMAC_KEY,
    KEEPALIVE_THREADS,
    UNLIMITED,
    checkout_revision,
    remove_checkout,
    say,
    start_python_app,
    start_redis,
)

HEADERS = {"User-Agent": "bench/1.0", "Accept": "application/json"}


def send(port: int, requests: int) -> None:
    """`requests` GETs of the forwarding path, one at a time, over 4 kept-alive connections."""
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(4)]
    for i in range(requests):
        connection = connections[i % 4]
        connection.request("GET", FORWARD_PATH, headers=HEADERS)
        response = connection.getresponse()
        response.read()
        if response.status >= 500:
            raise AssertionError(f"request {i}: {response.status}")
    for connection in connections:
        connection.close()


def wrk(port: int, seconds: int) -> int:
    """wrk's count of requests sent over 32 connections for `seconds`."""
    command = ["wrk", "-t1", "-c32", f"-d{seconds}s"]
    command += [arg for k, v in HEADERS.items() for arg in ("-H", f"{k}: {v}")]
    out = subprocess.run(
        [*procs.pinned(command, procs.LOAD_CORE), f"http://127.0.0.1:{port}{FORWARD_PATH}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(out)
    return int(match.group(1))


def count(pid: int, port: int, requests: int, pace: str, out: Path) -> tuple[int, dict[str, int]]:
    """The requests sent and the system calls `pid` made meanwhile, by name."""
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached to every thread
    sent = requests
    if pace == "one":
        send(port, requests)
    else:
        sent = wrk(port, 3)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return sent, calls


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--baseline", metavar="REV")
    parser.add_argument("--pace", choices=("one", "wrk"), default="one")
    parser.add_argument("--upstream", choices=("aiohttp", "django"), default="aiohttp")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edge-proxy-syscalls-"))
    baseline_dir = checkout_revision(args.baseline, workdir / "baseline") if args.baseline else None
    results: dict[str, tuple[int, dict[str, int]]] = {}
    try:
        with procs.Supervisor(workdir) as sup:
            redis_url, client = start_redis(sup, workdir)
            client.close()
            if args.upstream == "django":
                django = backend.start(
                    sup, workdir, redis_url, workers=1, threads=KEEPALIVE_THREADS, core=procs.LOAD_CORE
                )
                # Its worker, which serves (the master only watches it).
                upstream_pid, upstream_port = procs.descendants(django.pid)[-1], django.port
            else:
                upstream = start_python_app(sup, "upstream", "upstream.py", core=procs.LOAD_CORE)
                upstream_pid, upstream_port = upstream.pid, upstream.port
            targets = [(f"direct to {args.upstream}", upstream_pid, upstream_port)]
            for name, cwd in (("proxy", ROOT), (f"proxy @{args.baseline}", baseline_dir)):
                if cwd is None:
                    continue
                port = procs.free_port()
                env = {
                    **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY")},
                    "BIND": f"127.0.0.1:{port}",
                    "REDIS_URL": redis_url,
                    "UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
                    "LOG_LEVEL": "WARNING",
                    "VERDICT_HMAC_KEY": HMAC_KEY,
                    "EDGE_PROXY__RATE_LIMITS__DEFAULT": UNLIMITED,
                    "EDGE_PROXY__RATE_LIMITS__ETAG": UNLIMITED,
                }
                process = sup.start(name, procs.pinned([sys.executable, "-m", "proxy", "serve"], 0), env, cwd)
                procs.wait_http(port, "/_startup", process)
                targets.append((name, process.pid, port))
            for name, pid, port in targets:
                send(port, 400)  # warm: every connection open, the pool's too
                say(f"{name}: strace over {args.requests if args.pace == 'one' else '3 s of wrk'}")
                results[name] = count(pid, port, args.requests, args.pace, workdir / f"strace.{pid}")
    finally:
        if baseline_dir is not None:
            remove_checkout(baseline_dir)
    names = sorted({call for _, calls in results.values() for call in calls})
    print(f"system calls per request ({args.pace}):")
    print(f"| call | {' | '.join(results)} |")
    print(f"|---|{'---:|' * len(results)}")
    for call in names:
        cells = " | ".join(f"{calls.get(call, 0) / sent:.3f}" for sent, calls in results.values())
        print(f"| {call} | {cells} |")
    totals = " | ".join(f"{sum(calls.values()) / sent:.3f}" for sent, calls in results.values())
    print(f"| total | {totals} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
