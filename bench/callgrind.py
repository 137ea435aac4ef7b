"""Per-request cost that noise cannot move: instructions and simulated cache misses under callgrind.

Usage: python bench/callgrind.py [--scenario 200|304|forward|forward-django] [--teams 1] [--size 50k]
                                 [--requests 2000] [--baseline REV]
Runs the aiohttp ceiling and the proxy (and, with --baseline, the proxy of git revision REV) under
`valgrind --tool=callgrind --cache-sim=yes`, one at a time, sends the same warm-up and then `--requests`
definitions requests over 4 keep-alive connections, and counts only the measured requests (instrumentation
switched on with callgrind_control after the warm-up). Instruction counts are the same from run to run
whatever else the machine does, so a change of a few percent is visible where wrk's req/s on this shared
machine moves by ±8 %. They leave out the kernel (socket writes) and real cache latencies: read them as
"user-space work per request", next to the wrk ratios of bench/run.py, not instead of them.

`--scenario forward` asks whether a forward does more work when requests come one by one than when they
come together (bench/rate_cost.py finds its CPU per request 3-4x higher at 800 req/s than saturated). The
bench's no-op aiohttp upstream is counted answering requests one at a time, then the proxy forwarding to a
second, uninstrumented one: one at a time, one at a time with 5 ms pauses (each request wakes an idle
loop), and 32 at once (every loop wake-up finds several ready sockets, as at saturation). Equal counts
mean the extra CPU time of a low rate is each instruction costing more, not more instructions.
`--scenario forward-django` forwards bench/run.py's forwarding request (its path and headers) to the reference
Django under one gthread worker instead, as the forward-keepalive row does: gunicorn's answer (its
Connection header, a 404) takes paths of the forward that the no-op upstream's does not.

The proxy's timed background loops are slowed to once an hour, because under valgrind (~50x slower) they
would run ~50x more often per request than in real life. Needs valgrind (Debian package).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import backend, dataset, procs, upstream  # noqa: E402
from bench.dataset import Team  # noqa: E402
from bench.run import (  # noqa: E402
    FORWARD_PATH,
    HMAC_KEY,
    KEEPALIVE_THREADS,
    UNLIMITED,
    cache_budget,
    checkout_revision,
    remove_checkout,
    say,
    start_python_app,
    start_redis,
)

EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
# The simulated caches: 32 KiB L1s and a 512 KiB last level (one EPYC core's L2), 64-byte lines.
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64")
QUIET = {
    # Hourly: refresher, team refresh, rate-limit sync, billing flush, quota poll (and nothing goes stale).
    "EDGE_PROXY__DEFINITIONS__REFRESH_INTERVAL_SECONDS": "3600",
    "EDGE_PROXY__DEFINITIONS__MAX_STALENESS_SECONDS": "7200",
    "EDGE_PROXY__DEFINITIONS__TEAM_TTL_SECONDS": "7200",
    "EDGE_PROXY__RATE_LIMITS__SYNC_INTERVAL_SECONDS": "3600",
    "EDGE_PROXY__BILLING__FLUSH_INTERVAL_SECONDS": "3600",
    "EDGE_PROXY__QUOTA__POLL_INTERVAL_SECONDS": "3600",
    "EDGE_PROXY__QUOTA__MAX_STALENESS_SECONDS": "7200",
    # And the offload watch (every 0.5 s) and Redis health PING (every 1 s): at valgrind's pace they ran
    # often enough to move a count by 1-2 % from one run of the same code to the next (a reviewer).
    "EDGE_PROXY__DEFINITIONS__OFFLOAD__WATCH_INTERVAL_SECONDS": "3600",
    "EDGE_PROXY__REDIS__HEALTH_CHECK_INTERVAL_SECONDS": "3600",
}


@dataclass
class Counts:
    """One server's totals over the measured requests."""

    name: str
    requests: int
    totals: dict[str, int]

    def per_request(self, event: str) -> float:
        return self.totals.get(event, 0) / self.requests


def read_totals(path: Path) -> dict[str, int]:
    """The `summary:` or `totals:` line of a callgrind output file, by event."""
    events: list[str] = []
    totals: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            values = [int(v) for v in line.split()[1:]]
            if any(values):
                totals = dict(zip(events, values, strict=False))
    return totals


# How the measured requests are sent: over 4 connections in turn, one at a time; the same with a pause
# after each answer; or over 32 connections at once (one thread each).
ONE_AT_A_TIME = "one at a time"
PAUSED = "one at a time, 5 ms apart"
TOGETHER = "32 at once"
PAUSE_SECONDS = 0.005
TOGETHER_CONNECTIONS = 32
# What bench/run.py's forward_load sends besides Host.
FORWARD_HEADERS = {"User-Agent": "bench/1.0", "Accept": "application/json"}


def exchange(
    connections: list[http.client.HTTPConnection], teams: Sequence[Team], i: int, scenario: str
) -> None:
    """Request i: team i mod n (or, forwarding, route i mod 7) on connection i mod n; the answer must be
    the expected one."""
    connection = connections[i % len(connections)]
    if scenario == "forward-django":
        connection.request("GET", FORWARD_PATH, headers=FORWARD_HEADERS)
        response = connection.getresponse()
        response.read()
        if response.status not in (404, 200):  # Django's answer to the unknown route; the no-op row's
            raise AssertionError(f"request {i}: {response.status}")
        return
    if scenario == "forward":
        connection.request("GET", f"/api/unknown/{i % 7}")
        expected_status, expected_body = 200, upstream.BODY.encode()
    else:
        team = teams[i % len(teams)]
        connection.request("GET", team.path, headers=team.headers(conditional=scenario == "304"))
        expected_status, expected_body = (304, b"") if scenario == "304" else (200, team.body)
    response = connection.getresponse()
    body = response.read()
    if response.status != expected_status or body != expected_body:
        raise AssertionError(f"request {i}: {response.status}, {len(body)} bytes")


def send(
    connections: list[http.client.HTTPConnection],
    teams: Sequence[Team],
    requests: int,
    scenario: str,
    pace: str,
) -> None:
    """`requests` exchanges over `connections`, sent as `pace` says."""
    if pace == TOGETHER:
        count = len(connections)

        # Thread k sends requests k, k + count, ...: all on connection k.
        def run(k: int) -> None:
            for i in range(k, requests, count):
                exchange(connections, teams, i, scenario)

        with ThreadPoolExecutor(count) as pool:
            for done in [pool.submit(run, k) for k in range(count)]:
                done.result()
        return
    for i in range(requests):
        exchange(connections, teams, i, scenario)
        if pace == PAUSED:
            time.sleep(PAUSE_SECONDS)


def measure(
    sup: procs.Supervisor,
    name: str,
    command: Callable[[int], list[str]],
    env: dict[str, str],
    cwd: Path | None,
    ready_path: str,
    teams: Sequence[Team],
    args: argparse.Namespace,
    out_dir: Path,
    pace: str = ONE_AT_A_TIME,
) -> Counts:
    """Start `command(port)` under callgrind, warm it, count `args.requests` requests, stop it."""
    port = procs.free_port()
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out_file = out_dir / f"callgrind.{slug}.out"
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--cache-sim=yes",
        *CACHES,
        "--instr-atstart=no",
        f"--callgrind-out-file={out_file}",
    ]
    process = sup.start(name, [*valgrind, *command(port)], {**env, "BIND": f"127.0.0.1:{port}"}, cwd)
    procs.wait_http(port, ready_path, process, timeout=300)
    count = TOGETHER_CONNECTIONS if pace == TOGETHER else 4
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(count)]
    # Warm-up, sent as measured: every team seen twice (all in memory), every connection open.
    send(connections, teams, max(2 * len(teams), 400), args.scenario, pace)
    subprocess.run(["callgrind_control", "--instr=on", str(process.pid)], check=True, capture_output=True)
    send(connections, teams, args.requests, args.scenario, pace)
    subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
    for connection in connections:
        connection.close()
    sup.stop(process)
    # The dump asked for above is part 1 (what the process writes at exit is the part after it).
    first_dump = out_file.with_name(out_file.name + ".1")
    totals = read_totals(first_dump) if first_dump.exists() else {}
    if not totals:
        raise RuntimeError(f"{name}: callgrind wrote no counts ({sup.log_tail(name)})")
    return Counts(name, args.requests, totals)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=("200", "304", "forward", "forward-django"), default="200")
    parser.add_argument("--teams", type=int, default=1)
    parser.add_argument("--size", default="50k")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--baseline", metavar="REV", help="also count the proxy of git revision REV")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="copy the callgrind files to DIR (callgrind_annotate)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("callgrind: valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    size = int(float(args.size.lower().rstrip("k")) * (1000 if args.size.lower().endswith("k") else 1))
    workdir = Path(tempfile.mkdtemp(prefix="edge-proxy-callgrind-"))
    baseline_dir = None
    results: list[Counts] = []
    try:
        if args.baseline:
            baseline_dir = checkout_revision(args.baseline, workdir / "baseline")
        with procs.Supervisor(workdir) as sup:
            redis_url, client = start_redis(sup, workdir)
            client.close()
            writer, _ = dataset.open_writer(redis_url)
            try:
                teams = dataset.fill(
                    writer, redis_url, teams=args.teams, target_bytes=size, www=workdir / "www"
                )
            finally:
                writer.close()
            manifest = dataset.write_manifest(workdir / "manifest.json", teams, workdir / "www")
            base_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY")}
            proxy_env = {
                **base_env,
                **QUIET,
                "REDIS_URL": redis_url,
                "UPSTREAM_URL": "http://127.0.0.1:9",
                "LOG_LEVEL": "WARNING",
                "VERDICT_HMAC_KEY": HMAC_KEY,
                "EDGE_PROXY__RATE_LIMITS__DEFAULT": UNLIMITED,
                "EDGE_PROXY__RATE_LIMITS__ETAG": UNLIMITED,
                "EDGE_PROXY__DEFINITIONS__CACHE_BUDGET_BYTES": str(cache_budget(args.teams, size)),
            }

            def proxy(port: int) -> list[str]:
                return [sys.executable, "-m", "proxy", "serve"]  # BIND comes from the environment

            def ceiling(port: int) -> list[str]:
                script = str(ROOT / "bench" / "ceiling.py")
                return [sys.executable, script, "--bind", f"127.0.0.1:{port}", "--manifest", str(manifest)]

            def noop(port: int) -> list[str]:
                return [sys.executable, str(ROOT / "bench" / "upstream.py"), "--bind", f"127.0.0.1:{port}"]

            Run = tuple[str, Callable[[int], list[str]], dict[str, str], Path | None, str, str]
            runs: list[Run]
            if args.scenario in ("forward", "forward-django"):
                # The upstream forwarded to runs without valgrind, on the other core.
                if args.scenario == "forward":
                    target_name = "no-op aiohttp"
                    port = start_python_app(sup, "upstream", "upstream.py", core=procs.LOAD_CORE).port
                else:
                    target_name = "Django"
                    port = backend.start(
                        sup, workdir, redis_url, workers=1, threads=KEEPALIVE_THREADS, core=procs.LOAD_CORE
                    ).port
                proxy_env["UPSTREAM_URL"] = f"http://127.0.0.1:{port}"
                runs = [("no-op aiohttp", noop, base_env, None, "/__bench/stats", ONE_AT_A_TIME)]
                runs += [
                    (f"proxy -> {target_name}, {pace}", proxy, proxy_env, ROOT, "/_startup", pace)
                    for pace in (ONE_AT_A_TIME, PAUSED, TOGETHER)
                ]
            else:
                runs = [
                    ("aiohttp ceiling", ceiling, base_env, None, "/_liveness", ONE_AT_A_TIME),
                    ("proxy", proxy, proxy_env, ROOT, "/_startup", ONE_AT_A_TIME),
                ]
            if baseline_dir is not None:
                name = f"proxy @{args.baseline}"
                runs.append((name, proxy, proxy_env, baseline_dir, "/_startup", ONE_AT_A_TIME))
            for name, command, env, cwd, ready, pace in runs:
                say(f"{name}: under callgrind, {args.requests} requests")
                results.append(measure(sup, name, command, env, cwd, ready, teams, args, workdir, pace))
    finally:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in workdir.glob("callgrind.*.out.1"):
                shutil.copy(dump, args.keep / dump.name)
        if baseline_dir is not None:
            remove_checkout(baseline_dir)
        shutil.rmtree(workdir, ignore_errors=True)
    ceiling_ir = results[0].per_request("Ir")
    print(f"{args.scenario}, {args.teams} team(s) x {args.size}, {args.requests} requests; per request:")
    print(f"| server | {' | '.join(EVENTS)} | Ir x {results[0].name} |")
    print(f"|---|{'---:|' * len(EVENTS)}---:|")
    for counts in results:
        cells = " | ".join(f"{counts.per_request(e):,.0f}" for e in EVENTS)
        print(f"| {counts.name} | {cells} | {counts.per_request('Ir') / ceiling_ir:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
