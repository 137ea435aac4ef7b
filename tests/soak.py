"""Soak: the real serving process at a steady rate with churn across many teams and credentials.

`python -m tests.soak --minutes 30` (or `make soak`) starts a redis-server, a recording upstream, and
`python -m tests.soak serve` (proxy.server.serve with a sampler that records RSS, asyncio task count and open
fds from /proc every second), then drives a mix of local 200s, 304s, 401s, unknown tokens, fresh personal API
keys (learned verdicts), payload rewrites and forwarded uploads. It reports RSS growth under load after
warm-up, and the task and fd counts at two idle checkpoints, one after warm-up and one at the end; exit
status 1 if a bound is broken.

Tasks and fds are compared only at idle: under load they count the connections open at that moment (one
handler task and one fd per client connection, kept alive for a while after a burst), so a hiccup of the
machine late in the run would read as growth. At a checkpoint the driver lets every request finish, closes
its connections and waits for the proxy's idle upstream connections to expire; what is left is the proxy's
own state, and a leak is what it gains between the two checkpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.backend_writer import BackendWriter
from tests.rig import RedisServer, free_port

MAX_RSS_GROWTH_PERCENT = 5.0
# Idle tasks and fds may differ by a background refresh or flush caught mid-way; a leak grows past this.
COUNT_SLACK = 4
# The proxy's idle upstream connections close after this in the soak, so a checkpoint waits only a little.
UPSTREAM_KEEPALIVE_SECONDS = 1.0
# A checkpoint waits this long after the last request and the driver's connections closing.
SETTLE_SECONDS = UPSTREAM_KEEPALIVE_SECONDS + 2.0


@dataclass
class Sample:
    """One reading of the serving process."""

    at: float
    rss_kib: int
    tasks: int
    fds: int


@dataclass
class SoakReport:
    """What the soak measured, and whether it held."""

    seconds: float
    requests: int
    statuses: dict[int, int]
    errors: dict[str, int]
    rss_after_warmup_kib: int
    rss_end_kib: int
    rss_growth_percent: float
    # Idle checkpoints: after warm-up, and at the end.
    tasks_idle_after_warmup: int
    tasks_idle_end: int
    fds_idle_after_warmup: int
    fds_idle_end: int
    # The highest readings under load, for the record (they follow the connections open).
    tasks_peak: int
    fds_peak: int
    problems: list[str] = field(default_factory=list)


# The serving side: the real serve() with a sampler added to the app.


def _read_sample() -> dict[str, Any]:
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {
        "at": time.time(),
        "rss_kib": rss,
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def _serve(stats_path: str) -> int:
    from proxy import server
    from proxy.config_loader import load_settings

    factory = server.create_app  # type: ignore[attr-defined]

    async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
        async def sample() -> None:
            with open(stats_path, "a", encoding="utf-8") as out:  # noqa: ASYNC230 - tiny appends
                while True:
                    out.write(json.dumps(_read_sample()) + "\n")
                    out.flush()
                    await asyncio.sleep(1)

        task = asyncio.create_task(sample())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def create_app(settings: Any) -> web.Application:
        app = factory(settings)
        app.cleanup_ctx.append(sampler_ctx)
        return app

    server.create_app = create_app  # type: ignore[attr-defined]
    return server.run(load_settings())


# The driving side.


@dataclass
class Team:
    """One soak team: token, secret, current ETag."""

    id: int
    token: str
    secret: str
    etag: str = ""


def _flags(team_id: int, version: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "key": f"flag-{team_id}-{i}", "active": True, "filters": {"v": version}} for i in range(20)
    ]


async def _one(session: aiohttp.ClientSession, base: str, teams: list[Team], rng: random.Random) -> int:
    team = rng.choice(teams)
    url = f"{base}/flags/definitions?token={team.token}&send_cohorts"
    roll = rng.random()
    headers = {"User-Agent": rng.choice(["posthog-python/7.4.0", "posthog-node/4.0.0", "curl/8"])}
    method, data = "GET", None
    if roll < 0.45:
        headers["Authorization"] = f"Bearer {team.secret}"
    elif roll < 0.65:
        headers["Authorization"] = f"Bearer {team.secret}"
        headers["If-None-Match"] = f'W/"{team.etag}"'
    elif roll < 0.72:
        headers["Authorization"] = f"Bearer phs_wrong_{secrets.token_hex(4)}"
    elif roll < 0.80:
        # A fresh personal API key each time: learned verdicts churn through their bounded store.
        headers["Authorization"] = f"Bearer phx_{secrets.token_hex(16)}"
    elif roll < 0.88:
        url = f"{base}/flags/definitions?token=phc_unknown_{rng.randrange(10_000)}"
        headers["Authorization"] = f"Bearer {team.secret}"
    else:
        method, url, data = (
            "POST",
            f"{base}/i/v0/e/?n={rng.randrange(10_000)}",
            b"x" * rng.randrange(1, 200_000),
        )
    async with session.request(method, url, headers=headers, data=data) as response:
        etag = response.headers.get("ETag")
        if etag and response.status == 200:
            team.etag = etag.removeprefix('W/"').removesuffix('"')
        await response.read()
        return response.status


async def run(
    minutes: float,
    rate: float = 200.0,
    teams: int = 500,
    warmup_fraction: float = 0.3,
    workdir: Path | None = None,
    decoded_budget: int | None = None,
) -> SoakReport:
    """Run the soak for `minutes` at `rate` requests/s; the report (problems empty when every bound held)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    redis_server = RedisServer(port=free_port(), workdir=workdir)
    redis_server.start()
    upstream_runner = web.AppRunner(_upstream_app())
    await upstream_runner.setup()
    upstream_port = free_port()
    await web.TCPSite(upstream_runner, "127.0.0.1", upstream_port).start()
    rng = random.Random(7)
    roster = [Team(i, f"phc_soak_{i}", f"phs_soak_{i}_{secrets.token_hex(6)}") for i in range(1, teams + 1)]
    writer = BackendWriter(redis_server.url)
    for team in roster:
        writer.set_team(team.token, {"id": team.id, "api_token": team.token, "secret_api_token": team.secret})
        _, team.etag = writer.set_definitions(team.id, _flags(team.id, 0))

    port = free_port()
    stats_path = workdir / "stats.jsonl"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY")},
        "BIND": f"127.0.0.1:{port}",
        "UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "REDIS_URL": redis_server.url,
        "LOG_LEVEL": "WARNING",
        "EDGE_PROXY__RATE_LIMITS__ENABLED": "false",
        "EDGE_PROXY__UPSTREAM__KEEPALIVE_TIMEOUT_SECONDS": str(UPSTREAM_KEEPALIVE_SECONDS),
        # Idle teams leave memory within the run, so eviction is part of what is soaked.
        "EDGE_PROXY__DEFINITIONS__IDLE_EVICT_SECONDS": "20",
        # The compact cache (payloads held compressed beyond this many decoded bytes), when asked for.
        **(
            {"EDGE_PROXY__DEFINITIONS__CACHE_DECODED_BUDGET_BYTES": str(decoded_budget)}
            if decoded_budget is not None
            else {}
        ),
    }
    log_path = workdir / "proxy.log"
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    base = f"http://127.0.0.1:{port}"
    version = 0

    async def drive(session: aiohttp.ClientSession, seconds: float) -> None:
        """Requests at `rate` for `seconds`, then until every one has finished."""
        nonlocal version
        in_flight: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                statuses[await _one(session, base, roster, rng)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1

        interval = 1 / rate
        next_at = time.monotonic()
        end = next_at + seconds
        while (now := time.monotonic()) < end:
            if now >= next_at and len(in_flight) < 256:
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                next_at += interval
                if rng.random() < 0.01:
                    # The backend rewrites a payload now and then: new ETags, refreshes, re-reads.
                    version += 1
                    team = rng.choice(roster)
                    writer.set_definitions(team.id, _flags(team.id, version))
                continue
            await asyncio.sleep(max(0.0, min(next_at - now, 0.01)))
        await asyncio.wait_for(asyncio.gather(*in_flight), 60)

    async def checkpoint() -> Sample:
        """The proxy at idle: the lowest task and fd counts over two samples after everything settled."""
        await asyncio.sleep(SETTLE_SECONDS)
        settled = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            idle = [sample for sample in _samples(stats_path) if sample.at >= settled]
            if len(idle) >= 2:
                return Sample(
                    idle[0].at,
                    min(s.rss_kib for s in idle),
                    min(s.tasks for s in idle),
                    min(s.fds for s in idle),
                )
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the proxy stopped sampling; see {log_path}")

    def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, before the load
            [sys.executable, "-m", "tests.soak", "serve", str(stats_path)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        seconds = minutes * 60
        async with session() as warmup:
            await _wait_ready(warmup, base, process)
            started = time.monotonic()
            await drive(warmup, seconds * warmup_fraction)
        after_warmup = await checkpoint()
        load_started = time.time()
        async with session() as measured:
            await drive(measured, seconds * (1 - warmup_fraction))
        load_ended = time.time()
        end = await checkpoint()
        elapsed = time.monotonic() - started
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        writer.close()
        await upstream_runner.cleanup()
        redis_server.stop()
    under_load = [s for s in _samples(stats_path) if load_started < s.at <= load_ended]
    return _report(under_load, after_warmup, end, elapsed, statuses, errors, log_path)


def _upstream_app() -> web.Application:
    """The backend for forwarded uploads: reads the body and answers, keeping nothing (the soak runs long)."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"upstream": True, "path": request.path, "bytes": len(body)})

    app = web.Application(client_max_size=1024**2)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _samples(stats_path: Path) -> list[Sample]:
    if not stats_path.exists():
        return []
    # Whole lines only: the sampler may be half-way through writing the last one.
    return [Sample(**json.loads(line)) for line in stats_path.read_text().split("\n")[:-1]]


async def _wait_ready(session: aiohttp.ClientSession, base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}")
        try:
            async with session.get(f"{base}/_readiness") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("proxy never became ready")


def _report(
    under_load: list[Sample],
    after_warmup: Sample,
    end: Sample,
    elapsed: float,
    statuses: Counter[int],
    errors: Counter[str],
    log_path: Path,
) -> SoakReport:
    if len(under_load) < 8:
        raise RuntimeError(f"only {len(under_load)} samples under load; see {log_path}")
    quarter = max(1, len(under_load) // 4)
    baseline = statistics.median(s.rss_kib for s in under_load[:quarter])
    end_rss = statistics.median(s.rss_kib for s in under_load[-quarter:])
    report = SoakReport(
        seconds=round(elapsed, 1),
        requests=sum(statuses.values()),
        statuses=dict(sorted(statuses.items())),
        errors=dict(errors),
        rss_after_warmup_kib=int(baseline),
        rss_end_kib=int(end_rss),
        rss_growth_percent=round(100 * (end_rss - baseline) / baseline, 2),
        tasks_idle_after_warmup=after_warmup.tasks,
        tasks_idle_end=end.tasks,
        fds_idle_after_warmup=after_warmup.fds,
        fds_idle_end=end.fds,
        tasks_peak=max(s.tasks for s in under_load),
        fds_peak=max(s.fds for s in under_load),
    )
    if report.rss_growth_percent >= MAX_RSS_GROWTH_PERCENT:
        report.problems.append(f"RSS grew {report.rss_growth_percent} % after warm-up")
    if report.tasks_idle_end > report.tasks_idle_after_warmup + COUNT_SLACK:
        report.problems.append("asyncio task count grew (at idle)")
    if report.fds_idle_end > report.fds_idle_after_warmup + COUNT_SLACK:
        report.problems.append("open file descriptors grew (at idle)")
    if errors:
        report.problems.append(f"client errors: {dict(errors)}")
    if any(status >= 500 for status in statuses):
        report.problems.append("5xx answers")
    return report


def main(argv: list[str] | None = None) -> int:
    """`serve STATS_PATH` (the child) or a soak run; prints the JSON report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return _serve(argv[1])
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--teams", type=int, default=500)
    parser.add_argument(
        "--decoded-budget", type=int, default=None, help="soak the compact cache: decoded bytes it keeps"
    )
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.minutes, args.rate, args.teams, decoded_budget=args.decoded_budget))
    print(json.dumps(asdict(report), indent=2))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
