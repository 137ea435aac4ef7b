"""Telemetry's cost on the 304 path: the real proxy under wrk, telemetry off vs on, interleaved rounds.

    .venv/bin/python -m bench.telemetry_overhead            # wrk: off / metrics / +access log / +tracing
    .venv/bin/python -m bench.telemetry_overhead --micro    # per-call costs of the recording choices

The proxy runs as `python -m proxy serve` pinned to core 0, wrk on core 1 (bench/procs.py), Redis holds one
team as the backend writes it, rate limits are unlimited, and every request is a conditional GET that
matches (a 304 from memory: the cheapest, so the most telemetry-sensitive, path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import dataset, procs, wrk
from bench.run import UNLIMITED, start_redis

VARIANTS: dict[str, dict[str, str]] = {
    "off": {"EDGE_PROXY__TELEMETRY__METRICS_ENABLED": "false"},
    "metrics": {},  # the defaults: metrics on, tracing off, access log off
    "metrics+access_log": {"EDGE_PROXY__LOGGING__ACCESS_LOG": "true"},
    "metrics+tracing_1.0": {"EDGE_PROXY__TELEMETRY__TRACE_SAMPLING_RATIO": "1.0"},
}


def micro() -> None:
    """µs per call of each way to record a request, measured in this process."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from proxy.histogram import InMemoryHistogram

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    meter = provider.get_meter("bench")
    counter = meter.create_counter("c")
    histogram = meter.create_histogram("h", unit="s")
    attributes: dict[str, str | int] = {
        "route": "definitions",
        "method": "GET",
        "status_code": 304,
        "answered_by": "local",
    }
    ours = InMemoryHistogram("h", "", "s", tuple(attributes), 1000)
    key: tuple[str | int, ...] = tuple(attributes.values())
    ints = {"hit": 0}
    cases: dict[str, Callable[[], object]] = {
        "OTel SDK Counter.add(1, attributes)": lambda: counter.add(1, attributes),
        "OTel SDK Histogram.record(v, attributes)": lambda: histogram.record(0.0003, attributes),
        "InMemoryHistogram.observe(key, v)": lambda: ours.observe(key, 0.0003),
        "int counter += 1 (dict)": lambda: ints.__setitem__("hit", ints["hit"] + 1),
    }
    n = 200_000
    for name, call in cases.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(n):
                call()
            best = min(best, (time.perf_counter() - start) / n)
        print(f"{best * 1e6:8.3f} µs  {name}")
    provider.shutdown()


def start_proxy(sup: procs.Supervisor, redis_url: str, extra: dict[str, str]) -> tuple[int, int]:
    port = procs.free_port()
    env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "REDIS_URL": redis_url,
        "UPSTREAM_URL": "http://127.0.0.1:9",
        "LOG_LEVEL": "INFO",
        "EDGE_PROXY__RATE_LIMITS__DEFAULT": UNLIMITED,
        "EDGE_PROXY__RATE_LIMITS__ETAG": UNLIMITED,
        **extra,
    }
    command = procs.pinned([sys.executable, "-m", "proxy", "serve"], procs.SERVER_CORE)
    # The access log goes to the child's log file, as a pod's stderr would.
    process = sup.start("proxy", command, env)
    procs.wait_http(port, "/_startup", process)
    return port, process.pid


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--micro", action="store_true", help="per-call costs only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args.micro:
        micro()
        return 0
    variants = args.variants.split(",")
    results: dict[str, list[float]] = {name: [] for name in variants}
    # CPU time of the proxy process per request: steadier than req/s on a machine shared with others.
    cpu_us: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp, procs.Supervisor(Path(tmp)) as sup:
        redis_url, _client = start_redis(sup, Path(tmp))
        writer, _ = dataset.open_writer(redis_url)
        (team,) = dataset.fill(writer, redis_url, teams=1, target_bytes=20_000, www=Path(tmp))
        load = wrk.Load(team.path, team.headers(conditional=True))
        for round_ in range(1, args.rounds + 1):
            for name in variants:
                with sup.scope():
                    port, pid = start_proxy(sup, redis_url, VARIANTS[name])
                    # Warm-up.
                    wrk.run(
                        port, load, seconds=1, connections=args.connections, threads=1, script_dir=Path(tmp)
                    )
                    cpu = procs.cpu_seconds(pid)
                    result = wrk.run(
                        port,
                        load,
                        seconds=args.seconds,
                        connections=args.connections,
                        threads=1,
                        script_dir=Path(tmp),
                    )
                    cpu_us[name].append((procs.cpu_seconds(pid) - cpu) / result.requests * 1e6)
                if result.non_2xx_3xx or result.socket_errors:
                    print(f"{name}: {result.non_2xx_3xx} non-2xx/3xx, {result.socket_errors} socket errors")
                results[name].append(result.rps)
                print(
                    f"round {round_} {name:22s} {result.rps:9.0f} req/s  p50 {result.p50_ms:.3f} ms  "
                    f"{cpu_us[name][-1]:.1f} µs CPU/req"
                )
    base = statistics.median(results[variants[0]])
    base_cpu = statistics.median(cpu_us[variants[0]])
    print(f"\nmedians of {args.rounds} rounds, 304 path, one worker ({variants[0]} = 100 %):")
    for name in variants:
        rps, cpu = statistics.median(results[name]), statistics.median(cpu_us[name])
        print(
            f"  {name:22s} {rps:9.0f} req/s ({rps / base * 100:5.1f} %)   {cpu:6.1f} µs CPU/req "
            f"({cpu - base_cpu:+5.1f} µs, capacity {base_cpu / cpu * 100:5.1f} %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
