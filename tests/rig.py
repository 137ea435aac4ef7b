"""The test rig: a real redis-server on a free port and a recording in-process upstream."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from aiohttp import web
from multidict import CIMultiDictProxy

# One implementation for the test rig and the demo (examples/stack.py imports neither proxy nor Django).
from examples.stack import free_port, redis_server_binary

__all__ = ["RedisServer", "Seen", "Upstream", "free_port", "redis_server_binary"]


@dataclass
class RedisServer:
    """A redis-server process the tests own: they can stop, restart and flush it."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server on the same port, without persistence."""
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Kill the server (as a crash would)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def client(self) -> redis.Redis:
        """A synchronous client for arranging and inspecting state."""
        return redis.Redis(port=self.port, socket_timeout=2)


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path_qs: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Upstream:
    """A real aiohttp app that records every request and answers through replaceable handlers."""

    seen: list[Seen] = field(default_factory=list)
    routes: dict[str, Any] = field(default_factory=dict)

    def app(self) -> web.Application:
        """The upstream application (a catch-all that records, then dispatches by path)."""
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, request.raw_path, request.headers, body))
        handler = self.routes.get(request.path)
        if handler is not None:
            response: web.StreamResponse = await handler(request, body)
            return response
        return web.json_response({"upstream": True, "method": request.method, "path": request.path})
