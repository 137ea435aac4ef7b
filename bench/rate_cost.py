"""CPU per request against the request rate: nginx, a no-op aiohttp server and the proxy forwarding to it.

Usage: python bench/rate_cost.py [--rates 4000,1750,800] [--rounds 3] [--seconds 4]

Every server's CPU per request rises as its load falls: at saturation one wake-up of the event loop serves
many ready sockets; paced below it, each request pays its own wake-ups (on a virtual machine, each one a
halted vCPU woken by an interrupt). A forward costs two of them (the client's socket, then the upstream's),
so its CPU per request at the rate a Django backend sustains says more about the machine than about the
forwarder. This measures that in one run, side by side: each server saturated, then paced at each rate
(wrk with bench/wrk.py's pacing script, pinned to core 1; the servers on core 0, the upstream on core 1 as in
`make bench`'s forward-fast scenario), rounds interleaved, medians printed. The proxy row's last columns are
its upstream's CPU per request in the same runs, and the ratio: what a forward costs in units of what the
no-op server spends answering one, at the same rate. A second table splits each figure into user and system
time: which side of the system call line the extra cost of a low rate lands on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import nginx, procs, run, wrk  # noqa: E402
from bench.report import Sample  # noqa: E402

SATURATED = 0.0  # a rate of 0: wrk's closed loop, as fast as the server answers


def median(samples: list[Sample], field: str) -> float:
    """The median of one Sample field over rounds."""
    return float(statistics.median(getattr(sample, field) for sample in samples))


def label(rate: float) -> str:
    """How a rate is printed."""
    return f"{rate:,.0f}/s" if rate else "saturated"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="4000,1750,800", help="paced rates, req/s (saturation is added)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    rates = [SATURATED, *(float(rate) for rate in args.rates.split(","))]
    workdir = Path(tempfile.mkdtemp(prefix="rate-cost-"))
    config = run.Config.for_tool(workdir, seconds=args.seconds, half_seconds=args.seconds)
    forward = run.forward_load()
    # (server name, rate) -> one sample per round.
    samples: dict[tuple[str, float], list[Sample]] = {}
    # (server name, rate) -> (user, system) CPU us per request, one per round.
    split: dict[tuple[str, float], list[tuple[float, float]]] = {}
    with procs.Supervisor(workdir) as sup:
        redis_url, client = run.start_redis(sup, workdir)
        upstream = run.start_python_app(sup, "upstream", "upstream.py", core=procs.LOAD_CORE)
        proxy = run.start_proxy(sup, config, redis_url, f"http://127.0.0.1:{upstream.port}")
        servers: list[tuple[str, run.Server, wrk.Load]] = [
            (
                "proxy -> no-op aiohttp",
                run.Server("proxy", proxy.port, proxy.pid, upstream_pid=upstream.pid),
                forward,
            )
        ]
        noop = run.start_python_app(sup, "noop", "upstream.py", core=procs.SERVER_CORE)
        servers.append(("no-op aiohttp", noop, forward))
        if nginx.binary():
            ngx = run.start_nginx(sup, workdir, workdir, [])
            servers.append(("nginx (return 200)", ngx, wrk.Load("/_liveness", {})))
        else:
            print("nginx is not installed: its row is skipped", file=sys.stderr)
        for _, server, load in servers:
            run.drive(server, load, config, 1)
        for round_ in range(args.rounds):
            for rate in rates:
                for name, server, load in servers if round_ % 2 == 0 else list(reversed(servers)):
                    user, system = procs.cpu_split(server.pid)
                    sample = run.measure(
                        server, load, config, client, None, seconds=args.seconds, rate=rate or None
                    )
                    after = procs.cpu_split(server.pid)
                    requests = max(sample.requests, 1)
                    split.setdefault((name, rate), []).append(
                        ((after[0] - user) * 1e6 / requests, (after[1] - system) * 1e6 / requests)
                    )
                    samples.setdefault((name, rate), []).append(sample)
                    run.say(
                        f"round {round_ + 1} {name:24s} {label(rate):>10s}: "
                        f"{sample.rps:8.0f} req/s  cpu {sample.cpu_us_per_req:6.1f} us/req"
                    )
        client.close()
    names = [name for name, _, _ in servers]
    print(f"\nCPU us per request (median of {args.rounds} rounds); req/s reached in brackets\n")
    print("| rate | " + " | ".join(names) + " | upstream behind the proxy | proxy / its upstream |")
    print("|---|" + "---:|" * (len(names) + 2))
    for rate in rates:
        cells = [
            f"{median(samples[name, rate], 'cpu_us_per_req'):.0f} ({median(samples[name, rate], 'rps'):,.0f})"
            for name in names
        ]
        # Only the proxy's server names an upstream, whose CPU its samples carry.
        forwards = samples[names[0], rate]
        behind = median(forwards, "backend_cpu_us_per_req")
        cells.append(f"{behind:.0f}")
        cells.append(f"{median(forwards, 'cpu_us_per_req') / behind:.2f}")
        print(f"| {label(rate)} | " + " | ".join(cells) + " |")
    # Which side of the system call line the extra CPU per request falls on, as the load falls.
    print(f"\nThe same, user / system CPU us per request (median of {args.rounds} rounds)\n")
    print("| rate | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for rate in rates:
        cells = [
            " / ".join(f"{statistics.median(part):.0f}" for part in zip(*split[name, rate], strict=True))
            for name in names
        ]
        print(f"| {label(rate)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
