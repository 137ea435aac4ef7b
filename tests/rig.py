"""The test rig: a real redis-server (or Redis Cluster) on free ports and a recording in-process upstream."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from aiohttp import web
from multidict import CIMultiDictProxy
from redis.crc import key_slot

# One implementation for the test rig and the demo (examples/stack.py imports neither proxy nor Django).
from examples.stack import free_port, redis_server_binary

__all__ = ["RedisClusterServers", "RedisServer", "Seen", "Upstream", "free_port", "redis_server_binary"]


@dataclass
class RedisServer:
    """A redis-server process the tests own: they can stop, restart and flush it."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    # More redis-server options (a cluster node's).
    options: tuple[str, ...] = ()

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
                *self.options,
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


def _free_cluster_port(taken: set[int]) -> int:
    # Redis 6.2 puts a node's cluster bus on its port + 10000 (no cluster-port option before 7.0), so both
    # must be free; below the kernel's ephemeral range, so the bus port stays under 65536.
    while True:
        port = random.randrange(20000, 30000)
        if {port, port + 10000} & taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


@dataclass
class RedisClusterServers:
    """A real Redis Cluster: `masters` redis-server processes, every slot assigned, `replicas` per master.

    No replicas by default. With replicas, `node_timeout_ms` (redis-server's `cluster-node-timeout`, 15 s by
    default) bounds how long a dead master goes unnoticed before its replica is promoted.
    """

    workdir: Path
    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int | None = None
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The redis+cluster:// URL listing every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> None:
        """Start the nodes, join them with `redis-cli --cluster create`, wait until every one is in place."""
        taken: set[int] = set()
        options: tuple[str, ...] = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        if self.node_timeout_ms is not None:
            options += ("--cluster-node-timeout", str(self.node_timeout_ms))
        for _ in range(self.masters * (1 + self.replicas)):
            port = _free_cluster_port(taken)
            taken |= {port, port + 10000}
            workdir = self.workdir / str(port)
            workdir.mkdir()
            node = RedisServer(port=port, workdir=workdir, options=options)
            self.nodes.append(node)
            node.start()
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        replicas = ("--cluster-replicas", str(self.replicas))
        subprocess.run(
            [cli, "--cluster", "create", *addresses, *replicas, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in self.nodes:
            while not self._in_place(node):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)

    def _in_place(self, node: RedisServer) -> bool:
        # cluster_state:ok, every node known to this one, and a replica in sync with its master.
        with node.client() as client:
            info = client.execute_command("CLUSTER INFO")
            if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(self.nodes):
                return False
            replication = client.info("replication")
        return bool(replication["role"] == "master" or replication.get("master_link_status") == "up")

    def stop(self) -> None:
        """Kill every node."""
        for node in self.nodes:
            node.stop()

    def live(self) -> list[RedisServer]:
        """The nodes whose process runs."""
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def flush(self) -> None:
        """Empty every master (each holds its own slots' keys; replicas follow)."""
        for node in self.live():
            with node.client() as client:
                if client.info("replication")["role"] == "master":
                    client.flushall()

    def client(self) -> redis.RedisCluster:
        """A synchronous cluster client for arranging and inspecting state (through a live node)."""
        return redis.RedisCluster(host="127.0.0.1", port=self.live()[0].port, socket_timeout=2)

    def node_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s slot."""
        with self.client() as client:
            port = client.get_node_from_key(key).port
        return next(node for node in self.nodes if node.port == port)

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The nodes replicating `master`, as `master` sees them."""
        with master.client() as client:
            info = client.info("replication")
        ports = {int(info[f"slave{i}"]["port"]) for i in range(int(info["connected_slaves"]))}
        return [node for node in self.nodes if node.port in ports]

    def promoted(self, key: str, dead: RedisServer, within: float = 30) -> RedisServer:
        """The new master of `key`'s slot once `dead` has failed over: waits (bounded) until every live node
        reports cluster_state:ok and names the same live master for the slot."""
        slot = key_slot(key.encode())
        deadline = time.monotonic() + within
        while True:
            owners: set[int] = set()
            ok = True
            for node in self.live():
                with node.client() as client:
                    try:
                        ok &= client.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                        # CLUSTER SLOTS rows: [start, end, [master host, port, id], replicas...]
                        owners |= {
                            int(row[2][1])
                            for row in client.execute_command("CLUSTER SLOTS")
                            if row[0] <= slot <= row[1]
                        }
                    except redis.RedisError:
                        ok = False
            if ok and len(owners) == 1 and (owner := owners.pop()) != dead.port:
                return next(node for node in self.nodes if node.port == owner)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica promoted for slot {slot} within {within} s")
            time.sleep(0.05)


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
        # Request bodies recorded as they arrived, compressed or not (aiohttp would decompress them).
        app = web.Application(client_max_size=1024**3, handler_args={"auto_decompress": False})
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)  # "." misses a line feed
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, request.raw_path, request.headers, body))
        handler = self.routes.get(request.path)
        if handler is not None:
            response: web.StreamResponse = await handler(request, body)
            return response
        return web.json_response({"upstream": True, "method": request.method, "path": request.path})
