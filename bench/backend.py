"""The Django baseline: examples/legacy_backend under gunicorn, reading the bench's Redis.

Its view finds the team in its SQLite database by token, then reads the payload and ETag from the same
Redis entries the proxy reads (django-redis, `posthog:1:cache/teams/<id>/...`), so the bench only has to
give it team rows whose ids and tokens match what bench/dataset.py writes to Redis. They are inserted
straight into the migrated SQLite file (one transaction for all teams; the app's services would also
rewrite Redis payloads for each team, which the bench writes itself).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench import procs

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_MODULE = "examples.legacy_backend.settings"


@dataclass
class Backend:
    """The running gunicorn (master pid; its worker is a child) and its port."""

    port: int
    pid: int

    def pin(self, core: int) -> None:
        """Move master and workers (every thread) to `core` (the bench measures it on either core)."""
        for member in procs.descendants(self.pid):
            for task in Path(f"/proc/{member}/task").glob("*"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {core})

    def requests_seen(self) -> dict[str, int]:
        """The backend's own counters (total, definitions, other), kept in Redis by its middleware."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", "/_requests")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise AssertionError(f"GET /_requests: HTTP {response.status}")
            return {str(k): int(v) for k, v in json.loads(body).items()}
        finally:
            connection.close()


def _env(workdir: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_PROXY__", "LEGACY_BACKEND_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(
        {
            "LEGACY_BACKEND_DB": str(workdir / "legacy_backend.sqlite3"),
            "LEGACY_BACKEND_REDIS_URL": redis_url,
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        }
    )
    return env


def migrate(workdir: Path, redis_url: str) -> Path:
    """Create the backend's SQLite schema; the database file."""
    done = subprocess.run(
        [sys.executable, "-m", "examples.legacy_backend", "migrate"],
        cwd=ROOT,
        env=_env(workdir, redis_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise procs.StartError(f"legacy backend migrate failed:\n{done.stdout}{done.stderr}")
    return workdir / "legacy_backend.sqlite3"


def insert_teams(database: Path, teams: Iterable[tuple[int, str, str]]) -> None:
    """Team rows (id, api_token, secret_api_token), replacing rows with the same id."""
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.executemany(
                "INSERT OR REPLACE INTO legacy_backend_team "
                "(id, name, api_token, secret_api_token, secret_api_token_backup) VALUES (?, ?, ?, ?, NULL)",
                [(team_id, f"Bench team {team_id}", token, secret) for team_id, token, secret in teams],
            )
    finally:
        connection.close()


def start(
    sup: procs.Supervisor,
    workdir: Path,
    redis_url: str,
    *,
    workers: int,
    core: int,
    threads: int = 0,
    name: str = "django",
) -> Backend:
    """gunicorn serving the backend on a free loopback port, pinned to `core`: sync workers (a connection
    per request), or with `threads` gthread workers that keep connections alive."""
    port = procs.free_port()
    command = [
        sys.executable,
        "-m",
        "examples.legacy_backend",
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
    ]
    process = sup.start(name, procs.pinned(command, core), _env(workdir, redis_url), cwd=ROOT)
    try:
        procs.wait_http(port, "/_requests", process, timeout=60)
    except procs.StartError as exc:
        raise procs.StartError(f"legacy backend: {exc}\n{sup.log_tail(name)}") from None
    return Backend(port, process.pid)
