"""edge-proxy in one command (`make run`): real SDK clients polling flag definitions through the proxy.

It starts redis-server, the reference Django backend (examples/legacy_backend, under gunicorn) and edge-proxy
in front of it, then runs several posthog-python clients in local-evaluation mode that poll the proxy for
their flag definitions. Every couple of seconds it prints what the clients saw: how many requests, how many
edge-proxy answered without the backend, how many were 304s, latency measured by the clients, and the proxy's
memory. Halfway through, the backend releases a flag; the clients pick it up on their next poll. Everything
it started is stopped at the end, or on Ctrl-C.

    python -m examples.demo [--seconds 20] [--clients 12] [--poll-interval 0.25]
"""

from __future__ import annotations

import argparse
import logging
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import posthog.request
from posthog import Posthog

from examples.stack import Backend, Proxy, rollout, start_backend, start_proxy, start_redis

PROJECTS = ("storefront", "mobile-api", "billing-jobs")
CHANGED_PROJECT = "storefront"
CHANGED_FLAG = "new-checkout"
EMAIL_FILTER = {"key": "email", "value": "@example.com", "operator": "icontains", "type": "person"}
FLAGS: dict[str, dict[str, Any]] = {
    CHANGED_FLAG: rollout(0),
    "dark-mode": rollout(50),
    "staff-tools": rollout(100, [EMAIL_FILTER]),
    "pricing-test": {
        "groups": [{"properties": [], "rollout_percentage": 100}],
        "multivariate": {
            "variants": [
                {"key": "control", "rollout_percentage": 50},
                {"key": "cheaper", "rollout_percentage": 50},
            ]
        },
    },
}
HEADER = (
    "  time  requests  req/s   answered   304s   backend  backend   client   client   proxy\n"
    "                         locally           asked    spared    p50      p99      RSS"
)
BOLD, DIM, GREEN, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[0m") if sys.stdout.isatty() else ("",) * 4


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, 0.0 when empty."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


@dataclass
class Traffic:
    """The definitions requests the SDK clients made to one host, as the clients saw them."""

    host: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        """A requests response hook on the SDK's session: record status and client-side latency."""
        if response.request.url.startswith(self.host) and "/flags/definitions" in response.request.url:
            with self.lock:
                self.statuses.append(response.status_code)
                self.seconds.append(response.elapsed.total_seconds())

    def snapshot(self) -> tuple[list[int], list[float]]:
        """Copies of what was recorded so far."""
        with self.lock:
            return list(self.statuses), list(self.seconds)


@dataclass
class Release:
    """Tracks when each client of the changed project first sees the released flag."""

    clients: list[Posthog]
    changed_at: float | None = None
    seen_after: dict[int, float] = field(default_factory=dict)

    def check(self) -> None:
        """Evaluate the flag locally in every client; note the first time each one sees it on."""
        if self.changed_at is None:
            return
        for index, client in enumerate(self.clients):
            if index in self.seen_after:
                continue
            flags = client.get_all_flags("demo-user", only_evaluate_locally=True) or {}
            if flags.get(CHANGED_FLAG) is True:
                self.seen_after[index] = time.monotonic() - self.changed_at


class Demo:
    """One run: the processes, the clients and the live summary."""

    def __init__(self, args: argparse.Namespace, workdir: Path, exits: ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.exits = exits
        self.backend: Backend
        self.proxy: Proxy
        self.projects: dict[str, dict[str, Any]] = {}
        self.key = ""

    # Setup ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Redis, the backend (with three projects and a personal API key), and edge-proxy."""
        say(f"{BOLD}edge-proxy demo{RESET}: starting everything on 127.0.0.1 (logs in {self.workdir})")
        redis_process, redis_url = start_redis(self.workdir)
        self.exits.callback(redis_process.stop)
        say(f"  redis-server        {redis_url}")
        self.backend = start_backend(self.workdir, redis_url, workers=2)
        self.exits.callback(self.backend.stop)
        say(f"  legacy backend      {self.backend.url}   (Django + gunicorn, 2 sync workers, SQLite)")
        admin = self.backend.admin
        for name in PROJECTS:
            team = admin.create_team(name)
            for key, filters in FLAGS.items():
                admin.set_flag(team["id"], key, filters=filters)
            self.projects[name] = team
        _, self.key = admin.create_key(label="demo")
        self.proxy = start_proxy(
            self.workdir,
            redis_url,
            self.backend.url,
            env={
                "EDGE_PROXY__DEFINITIONS__REFRESH_INTERVAL_SECONDS": "0.2",
                # The demo's clients poll far faster than real SDKs (every 30 s): allow it.
                "EDGE_PROXY__RATE_LIMITS__ENABLED": "false",
            },
        )
        self.exits.callback(self.proxy.stop)
        say(f"  edge-proxy          {self.proxy.url}   (python -m proxy serve, pid {self.proxy.managed.pid})")
        say(
            f"  {len(PROJECTS)} projects with {len(FLAGS)} flags each; "
            f"the backend wrote them to Redis through django-redis, as PostHog does\n"
        )

    def backend_direct_latency(self, samples: int = 40) -> list[float]:
        """Client-side latency of the same SDK poll answered by Django itself (for comparison)."""
        traffic = Traffic(self.backend.url)
        hooks = posthog.request._get_session().hooks["response"]
        hooks.append(traffic.hook)
        client = self.client(PROJECTS[0], self.backend.url)
        try:
            for _ in range(samples):
                load(client)  # 304s after the first, as a polling SDK gets
        finally:
            client.shutdown()
            hooks.remove(traffic.hook)
        return traffic.snapshot()[1][1:]

    def client(self, project: str, host: str) -> Posthog:
        """A posthog-python client in local-evaluation mode for `project` at `host`."""
        return Posthog(
            self.projects[project]["api_token"],
            host=host,
            secret_key=self.key,
            poll_interval=self.args.poll_interval,
            send=False,
        )

    # The run --------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Drive the clients for the configured time, printing a line every --every seconds."""
        direct = self.backend_direct_latency()
        say(
            f"Without edge-proxy an SDK poll is answered by Django: p50 {ms(percentile(direct, 50))}, "
            f"p99 {ms(percentile(direct, 99))} (measured just now, {len(direct)} polls).\n"
        )
        traffic = Traffic(self.proxy.url)
        hooks = posthog.request._get_session().hooks["response"]
        hooks.append(traffic.hook)
        self.exits.callback(hooks.remove, traffic.hook)
        backend_before = self.backend.admin.requests_seen()["definitions"]

        clients = [self.client(PROJECTS[i % len(PROJECTS)], self.proxy.url) for i in range(self.args.clients)]
        for client in clients:
            self.exits.callback(client.shutdown)
        release = Release(
            [c for i, c in enumerate(clients) if PROJECTS[i % len(PROJECTS)] == CHANGED_PROJECT]
        )
        say(
            f"{self.args.clients} posthog-python clients poll edge-proxy every {self.args.poll_interval:g} s "
            f"(real SDKs poll every 30 s) for {self.args.seconds:g} s:\n"
        )
        say(f"{DIM}{HEADER}{RESET}")
        for client in clients:
            load(client)  # the first load starts the client's poller

        started = time.monotonic()
        next_line = started + self.args.every
        change_at = started + self.args.seconds / 2
        previous = 0
        while (now := time.monotonic()) < started + self.args.seconds:
            if release.changed_at is None and now >= change_at:
                etag = self.backend.admin.set_flag(
                    self.projects[CHANGED_PROJECT]["id"], CHANGED_FLAG, filters=rollout(100)
                )
                release.changed_at = time.monotonic()
                say(
                    f"{GREEN}  >> the backend releases '{CHANGED_FLAG}' to 100 % of {CHANGED_PROJECT} users "
                    f"(new ETag {etag}){RESET}"
                )
            release.check()
            if now >= next_line:
                previous = self.line(now - started, traffic, backend_before, previous)
                next_line += self.args.every
            time.sleep(0.05)
        release.check()
        self.summary(traffic, backend_before, direct, release)

    def line(self, elapsed: float, traffic: Traffic, backend_before: int, previous: int) -> int:
        """One line of the live summary; returns the request count, for the next line's rate."""
        statuses, seconds = traffic.snapshot()
        total = len(statuses)
        asked = self.backend.admin.requests_seen()["definitions"] - backend_before
        local = max(0, total - asked)
        not_modified = statuses.count(304)
        rate = (total - previous) / self.args.every
        p50, p99 = ms(percentile(seconds, 50)), ms(percentile(seconds, 99))
        local_share, not_modified_share = share(local, total), share(not_modified, total)
        say(
            f"  {elapsed:4.0f}s  {total:8d}  {rate:5.0f}   {local_share:>7}  {not_modified_share:>7}"
            f"  {asked:7d}  {local:7d}   {p50:>7}  {p99:>7}  {mib(self.proxy.rss_bytes()):>8}"
        )
        return total

    def summary(self, traffic: Traffic, backend_before: int, direct: list[float], release: Release) -> None:
        """The closing paragraph: what edge-proxy saved, in plain words."""
        statuses, seconds = traffic.snapshot()
        total = len(statuses)
        asked = self.backend.admin.requests_seen()["definitions"] - backend_before
        local = max(0, total - asked)
        say(f"\n{BOLD}In {self.args.seconds:g} s:{RESET}")
        say(
            f"  {total} flag-definition polls from {self.args.clients} SDK clients; the Django backend "
            f"answered {asked} of them ({share(asked, total)}), edge-proxy the other {local}."
        )
        say(
            f"  {statuses.count(304)} were 304 Not Modified (no body sent); "
            f"{statuses.count(200)} were 200 with the definitions; other statuses: "
            f"{total - statuses.count(304) - statuses.count(200)}."
        )
        say(
            f"  Client-side latency through edge-proxy: p50 {ms(percentile(seconds, 50))}, "
            f"p99 {ms(percentile(seconds, 99))} ({self.args.clients} clients at once); "
            f"straight from Django (one client alone): p50 {ms(percentile(direct, 50))}, "
            f"p99 {ms(percentile(direct, 99))}."
        )
        if release.changed_at is not None:
            seen = sorted(release.seen_after.values())
            if len(seen) == len(release.clients):
                say(
                    f"  The flag change reached all {len(seen)} {CHANGED_PROJECT} clients within "
                    f"{seen[-1]:.1f} s of the backend writing it to Redis."
                )
            else:
                reached = f"{len(seen)} of {len(release.clients)} {CHANGED_PROJECT} clients"
                say(f"  The flag change reached {reached}.")
        say(f"  edge-proxy's resident memory at the end: {mib(self.proxy.rss_bytes())}.\n")


def load(client: Posthog) -> None:
    """One poll now (the SDK's poller then repeats it every poll_interval)."""
    client.load_feature_flags()  # type: ignore[no-untyped-call]


def say(text: str) -> None:
    """Print a line at once (the output is live)."""
    print(text, flush=True)


def ms(seconds: float) -> str:
    """Seconds as milliseconds, readable."""
    return f"{seconds * 1000:.1f} ms"


def share(part: int, whole: int) -> str:
    """A percentage, readable."""
    return f"{100 * part / whole:.1f} %" if whole else "-"


def mib(size: int) -> str:
    """Bytes as MiB, readable."""
    return f"{size / 2**20:.1f} MiB"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the clients poll (default 20)")
    parser.add_argument("--clients", type=int, default=12, help="posthog-python clients (default 12)")
    parser.add_argument(
        "--poll-interval", type=float, default=0.25, help="seconds between polls (default 0.25)"
    )
    parser.add_argument("--every", type=float, default=2.0, help="seconds between summary lines (default 2)")
    return parser


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; everything started is stopped on the way out, whatever happens."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the SDK warns about several clients per project: intended here
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="edge-proxy-demo-") as tmp, ExitStack() as exits:
        demo = Demo(args, Path(tmp), exits)
        try:
            demo.start()
            demo.run()
        except KeyboardInterrupt:
            say("\ninterrupted: stopping everything the demo started")
            return 130
        finally:
            say(f"{DIM}stopping the SDK clients, edge-proxy, the backend and redis-server...{RESET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
