"""The serving process as Kubernetes runs it: a real `python -m proxy serve` subprocess, signals, workers."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import aiohttp
import pytest
from aiohttp import http_writer, web
from aiohttp.test_utils import TestServer, make_mocked_request
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client.parser import text_string_to_metric_families

from proxy import server, supervisor
from proxy.app import create_app
from proxy.config_loader import ENV_ALIASES
from proxy.settings import Settings
from tests.backend_writer import BackendWriter
from tests.rig import Upstream, free_port

pytestmark = pytest.mark.slow

BODY = b"0123456789abcdef" * 4096  # 64 KiB: big enough that a truncated answer would show


@contextmanager
def proxy_process(
    tmp_path: Path,
    env: Mapping[str, str],
    *args: str,
    open_files: tuple[int, int] | None = None,
    own_group: bool = False,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start `python -m proxy serve` configured by `env` alone; killed on the way out, whatever happened.

    `open_files`: the (soft, hard) RLIMIT_NOFILE it starts with, as a container runtime would set it.
    `own_group`: in a process group of its own (as a shell's foreground job), to be signalled as a group.
    """
    base = {k: v for k, v in os.environ.items() if k not in ENV_ALIASES and not k.startswith("EDGE_PROXY")}
    log_path = tmp_path / f"proxy-{len(list(tmp_path.glob('proxy-*.log')))}.log"

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", *args],
            env={**base, "LOG_FORMAT": "text", **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_open_files if open_files is not None else None,
            process_group=0 if own_group else None,
        )
    try:
        yield process, log_path
    finally:
        for pid in _children(process.pid):
            _kill(pid)
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may contain spaces, so split after ')'.
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def _listening_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port` (its fds against /proc/net/tcp*)."""
    inodes = set()
    try:
        # tcp6 is absent on a kernel without IPv6; the bind in these tests is IPv4 anyway.
        table = Path(f"/proc/{pid}/net/tcp").read_text()
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fds / fd) in inodes for fd in os.listdir(fds))
    except OSError:  # the process exited meanwhile
        return False


def _open_files(pid: int) -> tuple[int, int]:
    """Process `pid`'s (soft, hard) RLIMIT_NOFILE, from /proc."""
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if "open files" in line)
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def _command_line(pid: int) -> list[bytes]:
    """Process `pid`'s arguments, from /proc."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _log(path: Path) -> str:
    return path.read_text()


def _in_flight(recorder: Upstream) -> int:
    return sum(seen.path_qs.startswith("/slow?") for seen in recorder.seen)


def _listening_workers(supervisor: int, port: int) -> list[int]:
    """The supervisor's children that listen on `port`."""
    return [pid for pid in _children(supervisor) if _listening_on(pid, port)]


async def wait_ready(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll /_readiness until 200 (Redis reachable, startup done); fail fast if the process died."""
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"proxy exited with {process.returncode}:\n{_log(log_path)}"
            try:
                async with session.get(f"http://127.0.0.1:{port}/_readiness") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"proxy never became ready:\n{_log(log_path)}")


async def wait_exit(process: subprocess.Popen[bytes], within: float) -> int:
    """The exit code, waiting without blocking the loop (the in-process upstream must keep answering)."""
    return await asyncio.to_thread(process.wait, within)


async def wait_until(predicate: Callable[[], bool], what: str, within: float = 10) -> None:
    """Poll `predicate()` until true."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def refused(port: int) -> bool:
    """Whether a new TCP connection to `port` is refused."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@asynccontextmanager
async def gated_upstream(upstream: tuple[Upstream, TestServer]) -> AsyncIterator[asyncio.Event]:
    """Route /slow answers BODY once the yielded event is set, so the test decides when requests finish."""
    recorder, _ = upstream
    release = asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        # Bounded, so a failing test cannot leave the upstream handler hanging at teardown.
        await asyncio.wait_for(release.wait(), 30)
        return web.Response(body=BODY, content_type="application/octet-stream")

    recorder.routes["/slow"] = slow
    try:
        yield release
    finally:
        release.set()


def _env(port: int, upstream: TestServer, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "BIND": f"127.0.0.1:{port}",
        "UPSTREAM_URL": str(upstream.make_url("/")),
        "REDIS_URL": redis_url,
        **extra,
    }


async def _fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str | None]:
    async with session.get(url) as response:
        return response.status, await response.read(), response.headers.get("Connection")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_drains_in_flight_requests_and_exits_0(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str, stop: signal.Signals
) -> None:
    recorder, server = upstream
    port = free_port()
    health_port = _two_free_ports(avoid=port)
    timeout = 10.0
    env = _env(
        port,
        server,
        redis_url,
        SHUTDOWN_TIMEOUT_SECONDS=str(timeout),
        EDGE_PROXY__HEALTH_PORT=str(health_port),
    )
    async with gated_upstream(upstream) as release, aiohttp.ClientSession() as session:
        with proxy_process(tmp_path, env) as (process, log_path):
            await wait_ready(port, process, log_path)
            # An idle keep-alive connection, open before the signal.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /_readiness HTTP/1.1\r\nHost: proxy\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(len(b'{"status":"ok"}'))

            tasks = [
                asyncio.create_task(_fetch(session, f"http://127.0.0.1:{port}/slow?i={i}")) for i in range(50)
            ]
            await wait_until(lambda: _in_flight(recorder) == 50, "50 requests upstream")
            process.send_signal(stop)
            signalled = time.monotonic()

            # While the 50 are still held upstream: the listener is closed, so new connections are refused.
            deadline = time.monotonic() + 5
            while not await refused(port):
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                await asyncio.sleep(0.02)
            # A kept-alive client's next request, sent after the drain began, is answered and told to close
            # (aiohttp closed idle connections at once: a request already on its way met the close and was
            # lost; found by a reviewer). Then the connection ends cleanly (EOF, not a reset).
            writer.write(b"GET /_readiness HTTP/1.1\r\nHost: proxy\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 503")
            assert b"Connection: close" in head
            rest = await asyncio.wait_for(reader.read(), 5)
            assert b"draining" in rest
            writer.close()
            await writer.wait_closed()
            # The probes' own port stays open to the end: alive, and not ready because draining.
            assert (await _raw_exchange(health_port, LIVENESS)).startswith(b"HTTP/1.1 200 ")
            answer = await _raw_exchange(health_port, READINESS)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert answer.endswith(b'{"status":"unavailable","reasons":["draining"]}')
            assert not any(task.done() for task in tasks)

            release.set()
            results = await asyncio.gather(*tasks)
            code = await wait_exit(process, timeout + 5)
            elapsed = time.monotonic() - signalled

    assert code == 0, log_path.read_text()
    assert elapsed < timeout + 5
    assert [status for status, _, _ in results] == [200] * 50
    assert all(body == BODY for _, body, _ in results)
    # Prepared after draining began: each tells its client not to reuse the connection.
    assert {connection for _, _, connection in results} == {"close"}
    log = log_path.read_text()
    assert f"{stop.name}: draining" in log
    # uvloop is a dependency on Linux, so the serving loop must be uvloop's.
    assert "loop uvloop" in log


async def test_a_second_stop_signal_cuts_the_drain_short_and_the_same_one_delivered_twice_does_not(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Ctrl-C twice ends a drain waiting for a slow backend at once (it waited out the whole budget, a minute
    here); one stop delivered twice in a moment (Ctrl-C or systemd signal the whole process group, and a
    supervisor relays the signal to its workers as well) is one stop, and the drain goes on."""
    recorder, backend = upstream
    port = free_port()
    env = _env(port, backend, redis_url, SHUTDOWN_TIMEOUT_SECONDS="60")
    async with gated_upstream(upstream), aiohttp.ClientSession() as session:
        with proxy_process(tmp_path, env) as (process, log_path):
            await wait_ready(port, process, log_path)
            tasks = [
                asyncio.create_task(_fetch(session, f"http://127.0.0.1:{port}/slow?i={i}")) for i in range(5)
            ]
            await wait_until(lambda: _in_flight(recorder) == 5, "5 requests upstream")
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGINT)
            await wait_until(lambda: "SIGINT while draining: still draining" in _log(log_path), "the second")
            # Past the window in which a signal is taken for the same stop: still draining, none cut.
            await asyncio.sleep(server.SAME_STOP_SECONDS + 0.2)
            assert process.poll() is None, _log(log_path)
            assert not any(task.done() for task in tasks)

            process.send_signal(signal.SIGINT)
            code = await wait_exit(process, 15)
            results = await asyncio.gather(*tasks, return_exceptions=True)
    log = _log(log_path)
    assert code == 0, log
    # Cut off, not answered: the backend never released them.
    assert all(isinstance(result, aiohttp.ClientError) for result in results), results
    assert "SIGINT again: cutting the drain short" in log
    assert "drain cut short: 5 connection(s) still busy" in log
    assert log.rstrip().endswith("stopped")  # the clean path to the end: cleanup ran (billing's final flush)


async def test_an_upload_still_arriving_when_the_drain_begins_reaches_the_backend_whole(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """A request body still on its way past the idle grace (a slow client's capture batch) is read to its
    end and forwarded, and its answer sent: aiohttp's shutdown drops every byte that arrives once it begins,
    and such an upload was cut off, its upstream request reset and its client left without an answer."""
    recorder, server = upstream

    async def length(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(text=str(len(body)))

    recorder.routes["/upload"] = length
    port = free_port()
    size, parts, pause = 1_000_000, 20, 0.1  # 2 s to send, the drain beginning 0.5 s in
    env = _env(port, server, redis_url, SHUTDOWN_TIMEOUT_SECONDS="10")
    with proxy_process(tmp_path, env) as (process, log_path):
        await wait_ready(port, process, log_path)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        for part in range(parts):
            if part == parts // 4:
                process.send_signal(signal.SIGTERM)
            writer.write(b"u" * (size // parts))
            await writer.drain()
            await asyncio.sleep(pause)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        code = await wait_exit(process, 15)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.endswith(str(size).encode())
    assert [len(seen.body) for seen in recorder.seen if seen.path_qs == "/upload"] == [size]
    assert code == 0


async def test_streams_get_the_whole_timeout_and_the_process_exits_by_it(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    recorder, server = upstream
    ends = {"/endless": asyncio.Event(), "/finite": asyncio.Event()}

    async def ticking(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while not ends[request.path].is_set():
                await response.write(b"tick\n")
                await asyncio.sleep(0.05)
        except ConnectionResetError:
            pass  # the proxy gave up on the stream, as it should at its shutdown timeout
        await response.write(b"end\n")
        return response

    recorder.routes.update(dict.fromkeys(ends, ticking))
    port = free_port()
    # 4 s and a 3 s margin: long enough to tell "exits at the timeout" from aiohttp's own worst case of
    # twice the timeout (8 s), which would outlive Kubernetes' grace period at the 25 s default.
    timeout = 4.0
    env = _env(port, server, redis_url, SHUTDOWN_TIMEOUT_SECONDS=str(timeout))
    try:
        async with aiohttp.ClientSession() as session:
            with proxy_process(tmp_path, env) as (process, log_path):
                await wait_ready(port, process, log_path)
                endless = await session.get(f"http://127.0.0.1:{port}/endless")
                finite = await session.get(f"http://127.0.0.1:{port}/finite")
                async with endless, finite:
                    assert await endless.content.readline() == b"tick\n"
                    assert await finite.content.readline() == b"tick\n"
                    process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                    # Past half the budget (where aiohttp alone would start cutting), well before the end.
                    await asyncio.sleep(timeout * 0.75)
                    ends["/finite"].set()
                    assert (await finite.read()).endswith(b"tick\nend\n")
                    code = await wait_exit(process, timeout + 5)
                    elapsed = time.monotonic() - signalled
                    # Cut at the timeout: the chunked body never gets its terminating chunk.
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await endless.read()
    finally:
        for end in ends.values():
            end.set()
    assert code == 0, log_path.read_text()
    assert elapsed < timeout + 3
    # Cut, and said so: the endless stream (and the finite one, when its end comes as the drain hands over).
    assert re.search(
        r"drain out of time: [12] connection\(s\) still busy .*, cut in 1s at most", _log(log_path)
    )


async def test_workers_share_the_port_restart_and_stop_together(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    recorder, backend = upstream
    port = free_port()
    env = _env(port, backend, redis_url, SHUTDOWN_TIMEOUT_SECONDS="10")
    async with gated_upstream(upstream) as release, aiohttp.ClientSession() as session:
        with proxy_process(tmp_path, env, "--workers", "2", own_group=True) as (supervisor, log_path):
            await wait_ready(port, supervisor, log_path)
            await wait_until(
                lambda: len(_listening_workers(supervisor.pid, port)) == 2, "two workers listening"
            )
            first = _children(supervisor.pid)

            os.kill(first[0], signal.SIGKILL)
            await wait_until(
                lambda: (w := _listening_workers(supervisor.pid, port)) != first and len(w) == 2,
                "the killed worker replaced",
            )
            workers = _children(supervisor.pid)
            assert first[0] not in workers
            assert first[1] in workers
            await wait_ready(port, supervisor, log_path)

            tasks = [
                asyncio.create_task(_fetch(session, f"http://127.0.0.1:{port}/slow?i={i}")) for i in range(20)
            ]
            await wait_until(lambda: _in_flight(recorder) == 20, "20 requests upstream")
            # To the whole group, as Ctrl-C or systemd's stop: each worker gets it twice (the supervisor
            # relays it too; the kernel merges the two if the first is still pending), which is one stop,
            # not a second one that cuts the drain short.
            os.killpg(supervisor.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not await refused(port):
                assert time.monotonic() < deadline, "a worker still accepts connections after SIGTERM"
                await asyncio.sleep(0.02)
            await asyncio.sleep(server.SAME_STOP_SECONDS + 0.2)
            assert not any(task.done() for task in tasks)
            release.set()
            results = await asyncio.gather(*tasks)
            code = await wait_exit(supervisor, 10 + 5)
            # Reaped by the supervisor before it exited: neither running (orphaned) nor a zombie.
            leftover = [pid for pid in workers if _exists(pid)]

    assert code == 0, log_path.read_text()
    assert [(status, body) for status, body, _ in results] == [(200, BODY)] * 20
    assert leftover == []
    assert "restarting it" in log_path.read_text()


def _two_free_ports(avoid: int) -> int:
    """A port P such that P and P + 1 are both free right now (and neither is `avoid`)."""
    while True:
        first = free_port()
        if avoid in (first, first + 1):
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first


async def _forwarded_counts(session: aiohttp.ClientSession, port: int) -> tuple[float, set[str]]:
    """From one worker's own metrics port: its count of forwarded requests, and its instance ids."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    count = 0.0
    instances = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "edge_proxy_request_duration_seconds_count"
                and sample.labels["route"] == "forward"
            ):
                count += sample.value
            if "service_instance_id" in sample.labels:
                instances.add(sample.labels["service_instance_id"])
    return count, instances


async def test_each_worker_serves_its_own_metrics_on_a_port_of_its_own(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    _, server = upstream
    port = free_port()
    metrics_port = _two_free_ports(avoid=port)
    env = _env(port, server, redis_url, EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT=str(metrics_port))
    async with aiohttp.ClientSession() as session:
        with proxy_process(tmp_path, env, "--workers", "2") as (supervisor, log_path):
            await wait_ready(port, supervisor, log_path)
            await wait_until(
                lambda: all(len(_listening_workers(supervisor.pid, metrics_port + i)) == 1 for i in (0, 1)),
                "each worker listening on its metrics port",
            )
            for i in range(60):
                # A new connection each time, so that the kernel spreads them over both workers.
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.get(f"http://127.0.0.1:{port}/x?i={i}") as r,
                ):
                    assert r.status == 200
            counts = [await _forwarded_counts(session, metrics_port + i) for i in (0, 1)]
            async with session.get(f"http://127.0.0.1:{metrics_port}/x") as response:
                only_metrics = response.status
            # Found by a review: its expect handler read settings this app did not have (a 500).
            expecting = b"GET /metrics HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
            expected = await _raw_exchange(metrics_port, expecting + b"Connection: close\r\n\r\nok")

    # Each worker counts only what it answered; together, every request once.
    assert counts[0][0] + counts[1][0] == 60
    assert counts[0][1]
    assert counts[1][1]
    assert counts[0][1] != counts[1][1]  # two processes, two instance ids
    assert only_metrics == 404
    assert expected.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), expected[:200]


LIVENESS = b"GET /_liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
READINESS = b"GET /_readiness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
FORWARDED = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def _raw_exchange(port: int, request: bytes) -> bytes:
    """`request` on a fresh connection, and everything read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return answer


def _server_headers(answer: bytes) -> list[bytes]:
    head = answer.partition(b"\r\n\r\n")[0]
    return [
        line.partition(b":")[2].strip()
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"server:")
    ]


async def test_answers_name_the_configured_server_never_python_or_aiohttp(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    _, server = upstream
    port = free_port()
    with BackendWriter(redis_url) as backend:
        backend.set_team("phc_server_header", {"id": 41, "api_token": "phc_server_header"})
    with proxy_process(tmp_path, _env(port, server, redis_url)) as (process, log_path):
        await wait_ready(port, process, log_path)
        health = await _raw_exchange(port, LIVENESS)
        definitions = b"GET /flags/definitions?token=phc_server_header HTTP/1.1\r\nHost: x\r\n"
        denied = await _raw_exchange(port, definitions + b"Connection: close\r\n\r\n")
        # A malformed head: aiohttp answers 400 itself, before any handler runs.
        malformed = await _raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        # The upstream here is aiohttp too, with its own Server header: a forwarded answer keeps it.
        forwarded = await _raw_exchange(port, FORWARDED)

    assert health.startswith(b"HTTP/1.1 200 ")
    assert denied.startswith(b"HTTP/1.1 401 ")
    assert malformed.split(b"\r\n")[0] == b"HTTP/1.0 400 Bad Request"  # aiohttp's own error answer
    for answer in (health, denied, malformed):
        assert _server_headers(answer) == [b"gunicorn"], answer
    assert forwarded.startswith(b"HTTP/1.1 200 ")
    assert _server_headers(forwarded) == [
        f"Python/{sys.version_info[0]}.{sys.version_info[1]} aiohttp/{aiohttp.__version__}".encode()
    ]

    # An upstream that sends no Server header: the forwarded answer gets the configured one.
    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    bare_upstream = await asyncio.start_server(bare, "127.0.0.1", 0)
    bare_port = bare_upstream.sockets[0].getsockname()[1]
    env = {
        **_env(port, server, redis_url, EDGE_PROXY__SERVER_HEADER="edge-proxy"),
        "UPSTREAM_URL": f"http://127.0.0.1:{bare_port}",
    }
    try:
        with proxy_process(tmp_path, env) as (process, log_path):
            await wait_ready(port, process, log_path)
            bare_forwarded = await _raw_exchange(port, FORWARDED)
            local = await _raw_exchange(port, LIVENESS)
    finally:
        bare_upstream.close()
        await bare_upstream.wait_closed()
    assert bare_forwarded.startswith(b"HTTP/1.1 200 OK\r\n")
    assert bare_forwarded.endswith(b"\r\n\r\nok")
    assert _server_headers(bare_forwarded) == [b"edge-proxy"]
    assert _server_headers(local) == [b"edge-proxy"]


def test_responses_reach_uvloop_as_head_and_body_without_a_joined_copy() -> None:
    """The serving loop lets aiohttp pass head and body to uvloop's writelines (no joined copy of the body).

    The switch is aiohttp's module flag, read in StreamWriter._writelines: if an aiohttp upgrade stops
    reading it there, this fails and the optimisation in proxy/server.py needs a new look.
    """
    assert "SKIP_WRITELINES" in inspect.getsource(http_writer.StreamWriter._writelines)
    saved = http_writer.SKIP_WRITELINES
    try:
        loop = server._new_loop()
        loop.close()
        assert type(loop).__module__.startswith("uvloop")
        assert http_writer.SKIP_WRITELINES is False
    finally:
        http_writer.SKIP_WRITELINES = saved


# Paths whose resolution the catch-all shortcut must not change: plain routes with and without a trailing
# slash, their prefixes and extensions, the root, encoded slashes, percents and newlines, dot segments.
ROUTED_PATHS = (
    "/",
    "//",
    "/api/unknown/3",
    "/api/unknown/3/",
    "/flags/definitions",
    "/flags/definitions/",
    "/flags/definitions//",
    "/flags/definitions/extra",
    "/flags",
    "/api/feature_flag/local_evaluation",
    "/api/feature_flag/local_evaluation/",
    "/api/feature_flag/local_evaluation/x",
    "/_liveness",
    "/_liveness/",
    "/_readiness",
    "/_startup",
    "/metrics",
    "/metrics/",
    "/a%2Fb",
    "/a%2Fb%25c",
    "/a%25",
    "/a%0Ab",
    "/a%0D",
    "/a/../b",
    "/%2E%2E/x",
    "/caf%C3%A9",
)


@pytest.mark.parametrize("health_port_only", [False, True])
async def test_the_catch_all_shortcut_resolves_every_path_as_aiohttps_walk(health_port_only: bool) -> None:
    """aiohttp_internals.resolve_catch_all_directly: the same route, match dict and error as the router's own
    resolve, for every method; and the shortcut is taken for a forwarded path and a definitions one (an
    aiohttp whose internals it reads moved would make it fall back to the walk: this fails then, so the
    saving is not lost unseen)."""
    settings = Settings.model_validate(
        {
            "upstream": {"url": "http://127.0.0.1:9"},
            "redis": {"url": "redis://127.0.0.1:1/0"},
            "health_port": 9999 if health_port_only else None,
            "health_port_only": health_port_only,
        }
    )
    app = create_app(settings)
    app.router.freeze()
    router = app.router
    assert "resolve" in vars(router)  # the shortcut is installed
    walked: list[str] = []

    def counted(match: Callable[[str], dict[str, str] | None]) -> Callable[[str], dict[str, str] | None]:
        def matched(path: str) -> dict[str, str] | None:
            walked.append(path)
            return match(path)

        return matched

    for routed in router.resources():
        routed._match = counted(routed._match)  # type: ignore[attr-defined]
    for path in ROUTED_PATHS:
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"):
            request = make_mocked_request(method, path, app=app)
            direct = await router.resolve(request)
            walk = await web.UrlDispatcher.resolve(router, request)
            assert type(direct) is type(walk), (method, path)
            assert dict(direct) == dict(walk), (method, path)
            assert direct.route is walk.route or (
                isinstance(walk, MatchInfoError)
                and isinstance(direct, MatchInfoError)
                and direct.http_exception.status == walk.http_exception.status
            ), (method, path)
    walked.clear()
    forwarded = await router.resolve(make_mocked_request("GET", "/api/unknown/3", app=app))
    assert dict(forwarded) == {"tail": "api/unknown/3"}
    definitions = await router.resolve(make_mocked_request("GET", "/flags/definitions", app=app))
    assert definitions.route.resource is not None
    assert definitions.route.resource.canonical == "/flags/definitions"
    assert walked == []  # the shortcut, not the walk


async def _slow_exchange(port: int, request: bytes, pipelined: int) -> list[tuple[bytes, bytes]]:
    """`pipelined` copies of `request` on one connection with a 4 KiB receive buffer, read in small sips.

    The proxy's socket buffer fills, so its transport must buffer and pause (flow control) mid-body.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    writer.write(request * pipelined)
    answers = []
    try:
        for _ in range(pipelined):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(
                next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:]
            )
            body = bytearray()
            while len(body) < length:
                body += await asyncio.wait_for(reader.read(min(8192, length - len(body))), 30)
                if len(body) % (64 * 8192) < 8192:
                    await asyncio.sleep(0.005)
            answers.append((head, bytes(body)))
    finally:
        writer.close()
    return answers


async def test_large_payloads_reach_slow_readers_byte_for_byte(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    _, upstream_server = upstream
    token, secret, team_id = "phc_server_large", "phs_server_large", 4242
    with BackendWriter(redis_url) as backend:
        backend.set_team(token, {"id": team_id, "api_token": token, "secret_api_token": secret})
        flags = [
            {"id": i, "key": f"flag-{i}", "active": True, "filters": {"note": "x" * 900}} for i in range(2500)
        ]
        text, etag = backend.set_definitions(team_id, flags)
    assert len(text) > 2_000_000
    request = (
        f"GET /flags/definitions?token={token} HTTP/1.1\r\nHost: proxy\r\n"
        f"Authorization: Bearer {secret}\r\n\r\n"
    ).encode()
    port = free_port()
    with proxy_process(tmp_path, _env(port, upstream_server, redis_url)) as (process, log_path):
        await wait_ready(port, process, log_path)
        exchanges = await asyncio.gather(*(_slow_exchange(port, request, pipelined=3) for _ in range(6)))
    for answers in exchanges:
        assert len(answers) == 3
        for head, body in answers:
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
            assert f'ETag: W/"{etag}"'.encode() in head
            assert body == text.encode()


async def test_a_supervisor_whose_workers_cannot_start_exits_1(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """A port held without SO_REUSEPORT: no worker can ever listen. It used to restart them forever (with
    none serving) and exit 0 at the end; the orchestrator must see the failure instead."""
    _, server = upstream
    port = free_port()
    holder = socket.socket()
    holder.bind(("0.0.0.0", port))
    holder.listen()
    try:
        env = _env(port, server, redis_url)
        with proxy_process(tmp_path, env, "--workers", "2") as (supervisor, log_path):
            code = await wait_exit(supervisor, 90)
            log = log_path.read_text()
    finally:
        holder.close()
    assert code == 1, log
    assert "failed 5 times in a row within 10s of starting: stopping every worker" in log
    assert "cannot listen on" in log


async def test_a_sigterm_while_the_workers_start_stops_them_cleanly(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Relayed before a worker has its handlers (its first second), SIGTERM used to kill it (-15: exit 1)."""
    _, server = upstream
    env = _env(free_port(), server, redis_url)
    with proxy_process(tmp_path, env, "--workers", "2") as (supervisor, log_path):
        deadline = time.monotonic() + 10
        while len(_children(supervisor.pid)) < 2:
            assert time.monotonic() < deadline, "no workers started"
            await asyncio.sleep(0.005)
        supervisor.send_signal(signal.SIGTERM)
        code = await wait_exit(supervisor, 30)
        log = log_path.read_text()
    assert code == 0, log
    assert "while stopping" not in log


async def test_a_worker_whose_loop_is_stuck_is_killed_and_replaced(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Found by a reviewer: a worker frozen (SIGSTOP here; a blocked event loop alike) kept taking its share
    of new connections, answering none, for as long as it lived; the supervisor never noticed."""
    _, server = upstream
    port = free_port()
    env = _env(port, server, redis_url, EDGE_PROXY__WORKER_TIMEOUT_SECONDS="5")
    with proxy_process(tmp_path, env, "--workers", "2") as (supervisor, log_path):
        await wait_ready(port, supervisor, log_path)
        await wait_until(lambda: len(_listening_workers(supervisor.pid, port)) == 2, "two workers listening")
        stuck, other = _children(supervisor.pid)
        # Told the count (its share of the container's memory) and its index (which makes it serve).
        command = _command_line(stuck)
        assert command[command.index(b"--workers") + 1] == b"2"
        assert command[command.index(b"--worker-index") + 1] == b"0"
        os.kill(stuck, signal.SIGSTOP)
        await wait_until(
            lambda: stuck not in (w := _listening_workers(supervisor.pid, port)) and len(w) == 2,
            "the stuck worker replaced",
            within=20,
        )
        assert other in _children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert await wait_exit(supervisor, 30) == 0
    log = log_path.read_text()
    assert re.search(
        rf"worker 0 \(pid {stuck}\): no heartbeat for [5-9]s \(its event loop is stuck\)", log
    ), log


async def test_a_stop_does_not_wait_out_the_worker_timeout_for_a_stuck_worker(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """A worker stuck when the stop came (SIGSTOP here) was killed only at worker_timeout_seconds (30 s: the
    supervisor exited at 28 s, past the drain budget, a reviewer's); a draining worker still beats every
    second, so one silent for 3 s while stopping is stuck. A crash says which worker and which signal."""
    _, server = upstream
    port = free_port()
    env = _env(port, server, redis_url)  # worker_timeout_seconds at its 30 s
    with proxy_process(tmp_path, env, "--workers", "2") as (supervisor, log_path):
        await wait_ready(port, supervisor, log_path)
        await wait_until(lambda: len(_listening_workers(supervisor.pid, port)) == 2, "two workers listening")
        crashed, _ = _children(supervisor.pid)
        os.kill(crashed, signal.SIGSEGV)
        await wait_until(
            lambda: len(_listening_workers(supervisor.pid, port)) == 2, "the crashed one replaced"
        )
        stuck = _children(supervisor.pid)[0]
        command = _command_line(stuck)
        index = int(command[command.index(b"--worker-index") + 1])
        os.kill(stuck, signal.SIGSTOP)
        supervisor.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        code = await wait_exit(supervisor, 30)
        took = time.monotonic() - stopped_at
    log = log_path.read_text()
    assert code == 1, log  # not a clean stop: one worker had to be killed
    assert took < 10, log
    assert re.search(rf"worker 0 \(pid {crashed}\) was killed by SIGSEGV; restarting it in 0\.0s", log), log
    assert "Fatal Python error: Segmentation fault" in log  # faulthandler's traceback
    assert re.search(rf"worker {index} \(pid {stuck}\): no heartbeat for [3-5]s", log), log
    assert re.search(rf"worker {index} \(pid {stuck}\) was killed by SIGKILL while stopping", log), log


async def test_workers_drain_and_exit_when_their_supervisor_dies(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Found by a reviewer: a supervisor killed without passing the stop on (SIGKILL, an OOM kill) left its
    workers serving the port, as orphans no one restarts or stops."""
    _, server = upstream
    port = free_port()
    with proxy_process(tmp_path, _env(port, server, redis_url), "--workers", "2") as (supervisor, log_path):
        await wait_ready(port, supervisor, log_path)
        await wait_until(lambda: len(_listening_workers(supervisor.pid, port)) == 2, "two workers listening")
        workers = _children(supervisor.pid)
        supervisor.kill()
        await wait_exit(supervisor, 5)
        await wait_until(lambda: not any(_exists(pid) for pid in workers), "the workers gone", within=15)
        assert await refused(port)
    assert log_path.read_text().count("the supervisor is gone: draining") == 2


async def test_a_sigterm_during_startup_imports_ends_the_process(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """The first thing the command does is catch SIGTERM: as PID 1 in a container the kernel drops a signal
    whose action is the default, and one sent during the second of imports before `serve` installs its own
    handlers was lost (`docker stop` then waited 10 s for its SIGKILL). Caught, it ends the process at once
    (143); the drain's own handler would have exited 0."""
    _, server = upstream
    with proxy_process(tmp_path, _env(free_port(), server, redis_url)) as (process, log_path):
        deadline = time.monotonic() + 10
        while not _catches(process.pid, signal.SIGTERM):
            assert time.monotonic() < deadline, "SIGTERM never caught"
            await asyncio.sleep(0.001)
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process, 5) == 128 + signal.SIGTERM, log_path.read_text()
        assert "listening on" not in log_path.read_text()


async def test_the_access_log_in_text_at_warning_level_has_every_field(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Found by a reviewer: at LOG_LEVEL=WARNING the access log asked for was silently off, and the text
    format (the message only) left out the route and the trace id."""
    _, server = upstream
    port = free_port()
    env = _env(port, server, redis_url, LOG_LEVEL="WARNING", EDGE_PROXY__LOGGING__ACCESS_LOG="true")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with proxy_process(tmp_path, env) as (process, log_path):
        await wait_ready(port, process, log_path)
        async with aiohttp.ClientSession() as session:
            headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
            async with session.get(f"http://127.0.0.1:{port}/_liveness", headers=headers) as response:
                assert response.status == 200
        await wait_until(lambda: trace_id in log_path.read_text(), "the access line")
    line = next(line for line in log_path.read_text().splitlines() if trace_id in line)
    assert re.search(
        rf"proxy\.access: GET /_liveness 200 local [0-9.]+ms route=health trace_id={trace_id}$", line
    )


def _docker_healthcheck() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (exec form)."""
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    check = dockerfile[dockerfile.index("HEALTHCHECK") :]
    line = check[check.index("CMD") + 3 :].partition("\n")[0]
    command: list[str] = json.loads(line)
    return command


async def test_the_images_healthcheck_follows_bind_and_ignores_http_proxy(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Found by a reviewer: it asked port 8080 whatever BIND said, through any http_proxy set."""
    _, server = upstream
    port = free_port()
    command = [sys.executable if part == "python3" else part for part in _docker_healthcheck()]
    # EDGE_PROXY__BIND wins over BIND, in the app as in the check.
    env = {
        "EDGE_PROXY__BIND": f"0.0.0.0:{port}",
        "BIND": "0.0.0.0:1",
        "http_proxy": f"http://127.0.0.1:{free_port()}",
    }

    async def check() -> tuple[int | None, bytes]:
        checking = await asyncio.create_subprocess_exec(*command, env=env, stderr=subprocess.PIPE)
        _, stderr = await checking.communicate()
        return checking.returncode, stderr

    assert (await check())[0] == 1  # nothing listens there yet
    with proxy_process(tmp_path, _env(port, server, redis_url)) as (process, log_path):
        await wait_ready(port, process, log_path)
        assert await check() == (0, b"")
        # EDGE_PROXY__HEALTH_PORT wins over both: the probes' own listener, outside the client connection
        # limit (this process has none, so the check fails there while bind's port answers).
        health_port = _two_free_ports(avoid=port)
        env["EDGE_PROXY__HEALTH_PORT"] = str(health_port)
        assert (await check())[0] == 1
    with proxy_process(tmp_path, _env(port, server, redis_url, EDGE_PROXY__HEALTH_PORT=str(health_port))) as (
        process,
        log_path,
    ):
        await wait_ready(port, process, log_path)
        assert await check() == (0, b"")
        assert _listening_on(process.pid, health_port)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (sig - 1)))


async def test_a_proxy_started_ignoring_sighup_keeps_ignoring_it(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Started under nohup (SIGHUP ignored), a closed terminal must not stop it; SIGTERM still does."""
    _, server = upstream
    port = free_port()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited by the child, as nohup does
    try:
        with proxy_process(tmp_path, _env(port, server, redis_url)) as (process, log_path):
            signal.signal(signal.SIGHUP, previous)
            await wait_ready(port, process, log_path)
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert process.poll() is None, log_path.read_text()
            await wait_ready(port, process, log_path)
            process.send_signal(signal.SIGTERM)
            assert await wait_exit(process, 15) == 0
            assert "SIGHUP" not in log_path.read_text()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_only_quick_failures_in_a_row_count_towards_giving_up() -> None:
    """A crash after a healthy run is not one of them: give up after 5 quick ones, not 4 after it."""

    class Exited:
        pid = 4242

        def poll(self) -> int:
            return 1

    slot = supervisor._Slot(process=Exited(), started_at=time.monotonic() - 3600)  # type: ignore[arg-type]
    supervisor._reap([slot], stopping=False)
    assert (slot.crashes, slot.quick_failures) == (1, 0)
    for expected in range(1, supervisor._GIVE_UP_CRASHES + 1):
        slot.process, slot.started_at = Exited(), time.monotonic()  # type: ignore[assignment]
        supervisor._reap([slot], stopping=False)
        assert slot.quick_failures == expected


async def _hold_connections(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` idle client connections, opened one by one (each accepted before the next)."""
    held = []
    for _ in range(count):
        held.append(await asyncio.open_connection("127.0.0.1", port))
    return held


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes this connection (EOF or reset) without answering, within 5 s."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


async def _release(held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in held:
        writer.close()
    for _, writer in held:
        with suppress(ConnectionError):
            await writer.wait_closed()


async def _client_connection_samples(
    port: int, prefix: str = "edge_proxy_client_connections"
) -> dict[str, float]:
    """The `prefix`* samples (edge_proxy_client_connections*) from /metrics on `port`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefix)
    }


async def test_requests_aiohttp_answers_400_before_any_handler_are_counted(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """A head aiohttp cannot parse is answered 400 before any handler or middleware runs: no request metric
    saw them, and a flood of them (a load balancer speaking TLS to the plain port) left nothing to alert
    on."""
    recorder, server = upstream
    port = free_port()
    malformed = [
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",  # a method the parser does not know
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),  # a TLS ClientHello
    ]
    with proxy_process(tmp_path, _env(port, server, redis_url)) as (process, log_path):
        await wait_ready(port, process, log_path)
        for request in malformed:
            assert (await _raw_exchange(port, request)).split(b"\r\n")[0] == b"HTTP/1.0 400 Bad Request"
        # Handled requests, a 400 of the proxy's own among them, are not malformed.
        assert (await _raw_exchange(port, FORWARDED)).startswith(b"HTTP/1.1 200 ")
        no_token = b"GET /flags/definitions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert (await _raw_exchange(port, no_token)).startswith(b"HTTP/1.1 400 ")
        samples = await _client_connection_samples(port, "edge_proxy_client_requests_malformed")
    assert samples == {"edge_proxy_client_requests_malformed_total": 3.0}
    assert [seen.raw_path for seen in recorder.seen] == ["/x"]  # the forwarded one only


async def test_aiohttps_400s_never_echo_the_request_bytes(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """aiohttp's 400 quoted what its parser refused: a Cookie line with the HttpOnly session cookie in it, an
    Authorization line, or the first 100 bytes of a header over 16 KiB (a page's script can make a browser
    send one by setting a few large cookies, and read the 400)."""
    _, server = upstream
    port = free_port()
    secret = b"sessionid=HTTPONLYSESSIONMARK0123456789abcdef"
    pad = b"; ".join(b"pad%d=" % i + b"a" * 4000 for i in range(5))
    malformed = [
        b"GET /app/ HTTP/1.1\r\nHost: x\r\nCookie: " + secret + b"; " + pad + b"\r\n\r\n",
        b"GET /app/ HTTP/1.1\r\nHost: x\r\nCookie: " + secret + b"; x=\x7f\r\n\r\n",
        b"GET /flags/definitions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer HTTPONLYSESSIONMARK\x01\r\n\r\n",
        b"GET /HTTPONLYSESSIONMARK\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    with proxy_process(tmp_path, _env(port, server, redis_url)) as (process, log_path):
        await wait_ready(port, process, log_path)
        for request in malformed:
            answer = await _raw_exchange(port, request)
            assert answer.split(b"\r\n")[0] == b"HTTP/1.0 400 Bad Request"
            assert b"HTTPONLYSESSIONMARK" not in answer


async def test_at_the_connection_cap_the_oldest_idle_connection_makes_room_and_busy_ones_never_do(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    recorder, server = upstream
    port = free_port()
    metrics_port = _two_free_ports(avoid=port)  # uncapped: scraping never takes one of the places
    health_port = metrics_port + 1  # the same
    env = _env(
        port,
        server,
        redis_url,
        EDGE_PROXY__CLIENT_LIMITS__MAX_CONNECTIONS="3",
        EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT=str(metrics_port),
        EDGE_PROXY__HEALTH_PORT=str(health_port),
    )

    async def open_now() -> float:
        return (await _client_connection_samples(metrics_port))["edge_proxy_client_connections"]

    async def wait_open(count: int) -> None:
        deadline = time.monotonic() + 10
        while await open_now() != count:
            assert time.monotonic() < deadline, f"never {count} client connections open"
            await asyncio.sleep(0.02)

    async with gated_upstream(upstream) as release:
        with proxy_process(tmp_path, env) as (process, log_path):
            await wait_ready(port, process, log_path)  # its connection is closed once ready
            assert "up to 3 client connections" in _log(log_path)
            await wait_open(0)
            idle = []
            for _ in range(3):  # one by one, so the proxy sees them in this order
                idle.append(await asyncio.open_connection("127.0.0.1", port))
                await wait_open(len(idle))
            # A fourth: the oldest idle one is closed to make room, and the new one is served.
            assert await _raw_exchange(port, LIVENESS) != b""
            assert await _closed_by_server(idle[0][0])
            for reader, _ in idle[1:]:
                assert not await _closed_by_server_within(reader, 0.2)
            await wait_open(2)
            # Three busy ones (answers held by the upstream): a fourth is closed on arrival, unread.
            busy = [*idle[1:], await asyncio.open_connection("127.0.0.1", port)]
            for i, (_, writer) in enumerate(busy):
                writer.write(b"GET /slow?busy=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
            await wait_until(lambda: _in_flight(recorder) == 3, "three requests held upstream")
            over_reader, over_writer = await asyncio.open_connection("127.0.0.1", port)
            over_writer.write(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await _closed_by_server(over_reader)
            over_writer.close()
            # The kubelet's liveness probe on the health port is still answered (on bind's port it met the
            # same close, and a busy proxy was restarted), and takes no place.
            assert (await _raw_exchange(health_port, LIVENESS)).startswith(b"HTTP/1.1 200 ")
            scrape = await _raw_exchange(
                health_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert scrape.startswith(b"HTTP/1.1 200 ")
            assert b"\nedge_proxy_client_connections_refused_total 1.0\n" in scrape
            assert await open_now() == 3
            release.set()
            answers = [await asyncio.wait_for(reader.read(), 10) for reader, _ in busy]
            samples = await _client_connection_samples(metrics_port)
            await _release([*idle, *busy])
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers), answers
    assert samples["edge_proxy_client_connections_limit"] == 3
    assert samples["edge_proxy_client_connections_closed_idle_total"] == 1
    assert samples["edge_proxy_client_connections_refused_total"] == 1
    assert "/never" not in [seen.path_qs for seen in recorder.seen]  # a refused request is never forwarded
    assert _log(log_path).count("client connection refused: all 3 places") == 1
    assert "Traceback" not in _log(log_path)


async def test_with_health_port_only_probes_and_scrapes_go_to_the_health_port_alone(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    recorder, server = upstream
    port = free_port()
    health_port = _two_free_ports(avoid=port)
    env = _env(
        port, server, redis_url, EDGE_PROXY__HEALTH_PORT=str(health_port), EDGE_PROXY__HEALTH_PORT_ONLY="true"
    )
    with proxy_process(tmp_path, env) as (process, log_path):
        await wait_ready(health_port, process, log_path)
        scrape = await _raw_exchange(
            health_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        public = await _raw_exchange(port, READINESS)
    assert scrape.startswith(b"HTTP/1.1 200 ")
    assert b"\nedge_proxy_client_connections_limit " in scrape
    # On bind's port the path is the upstream's (a sidecar's app answers its own): no reasons, no metrics.
    assert public.startswith(b"HTTP/1.1 200 ")
    assert public.endswith(b'{"upstream": true, "method": "GET", "path": "/_readiness"}')
    assert [seen.path_qs for seen in recorder.seen] == ["/_readiness"]


async def _closed_by_server_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_surge_of_clients_cannot_take_the_descriptors_forwards_need(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """More clients than the process may open files: the oldest idle ones make room, forwards still connect.

    Started with RLIMIT_NOFILE 100 (soft) / 400 (hard): the proxy raises its soft limit to 400 and admits
    400 - (256 + 2 x 16 + 64) = 48, or half the limit when that is more: 200 clients (and warns that the
    reserve is short). Without the cap the 450 idle clients below would take every descriptor, and the
    forward's upstream connect would fail (EMFILE: a 502).
    """
    recorder, server = upstream
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:  # this test process holds 450 client sockets itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    with proxy_process(tmp_path, _env(port, server, redis_url), open_files=(100, 400)) as (process, log_path):
        await wait_ready(port, process, log_path)
        assert _open_files(process.pid) == (400, 400)
        assert "up to 200 client connections" in _log(log_path)
        assert "open-file limit (400) is too low to keep 352 descriptors" in _log(log_path)
        held = await _hold_connections(port, 450)
        try:
            # The 250 oldest were closed to make room for the newest 200.
            closed = await asyncio.gather(*(_closed_by_server(reader) for reader, _ in held[:250]))
            assert all(closed)
            # The newest are open: a forward on one still gets an upstream connection.
            reader, writer = held[-1]
            writer.write(FORWARDED)
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert recorder.seen[-1].path_qs == "/x"
            # So does Redis: the readiness check, on yet another new connection.
            ready = await _raw_exchange(
                port, b"GET /_readiness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
        finally:
            await _release(held)
    assert ready.startswith(b"HTTP/1.1 200 "), ready


@pytest.mark.parametrize("budget", [1.0, 4.0, 10.0, 12.0, 20.0, 25.0, 60.0])
def test_the_drain_fits_its_budget_after_aiohttps_rounding(budget: float) -> None:
    """The idle grace, then aiohttp's two waits for a handler, each rounded up to a whole second when over
    5 s (helpers.ceil_timeout): at most shutdown_timeout_seconds together (found by a reviewer: a stuck
    request ran the drain 0.6-1.3 s over at the default 20 s)."""
    settings = Settings(shutdown_timeout_seconds=budget)
    wait = server.handler_wait(settings)
    rounded = wait + 1 if wait > 5 else wait  # the worst case of ceil(now + wait)
    # The drain waits until the budget less aiohttp's two waits, then aiohttp waits at most those two.
    assert (budget - 2 * wait) + 2 * rounded <= budget
    assert min(server.IDLE_GRACE_SECONDS, budget / 4) < budget - 2 * wait
    assert wait > 0


async def test_the_health_port_holds_no_more_than_its_cap_of_connections(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str
) -> None:
    """Idle connections on health_port (uncapped, kept an hour by aiohttp's default) took every descriptor
    the client cap keeps for the upstream pool and Redis: new clients on bind's port were reset."""
    _, server = upstream
    port = free_port()
    health_port = _two_free_ports(avoid=port)
    env = _env(port, server, redis_url, EDGE_PROXY__HEALTH_PORT=str(health_port))
    held = []
    with proxy_process(tmp_path, env, open_files=(1024, 1024)) as (process, log_path):
        await wait_ready(port, process, log_path)
        try:
            for _ in range(1100):
                held.append(await asyncio.open_connection("127.0.0.1", health_port))
            await wait_until(
                lambda: len(os.listdir(f"/proc/{process.pid}/fd")) < 200, "idle health connections closed"
            )
            assert (await _raw_exchange(health_port, LIVENESS)).startswith(b"HTTP/1.1 200 ")
            assert (await _raw_exchange(port, FORWARDED)).startswith(b"HTTP/1.1 200 ")
        finally:
            for _, writer in held:
                writer.close()


@pytest.mark.parametrize("leaving", ["reset", "half-close", "mid-body"])
async def test_a_client_that_leaves_frees_its_upstream_connection_at_once(
    tmp_path: Path, upstream: tuple[Upstream, TestServer], redis_url: str, leaving: str
) -> None:
    """Found by a reviewer: once sent, a request whose client left held its pooled connection (and a backend
    worker) until the backend answered, up to the read timeout; the next request waited behind it (nginx
    drops the upstream request at once). aiohttp does not cancel the handler of a client that left, so this
    needs a real process: the test server does cancel it."""
    recorder, server = upstream
    ended: list[str] = []

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            if leaving != "mid-body":
                await asyncio.sleep(30)
                return web.Response(body=b"late")
            response = web.StreamResponse()  # no length: streamed through the proxy
            await response.prepare(request)
            await response.write(BODY)
            await asyncio.sleep(30)
            return response
        except asyncio.CancelledError:
            ended.append("cancelled")  # the proxy closed the upstream connection
            raise

    recorder.routes["/slow"] = slow
    port = free_port()
    env = _env(port, server, redis_url, EDGE_PROXY__UPSTREAM__MAX_CONNECTIONS="1")
    with proxy_process(tmp_path, env) as (process, log_path):
        await wait_ready(port, process, log_path)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: proxy\r\n\r\n")
        await wait_until(
            lambda: _in_flight(recorder) == 0 and len(recorder.seen) == 1, "the request upstream"
        )
        if leaving == "mid-body":
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            await reader.readexactly(len(BODY) // 2)
        sock = writer.get_extra_info("socket")
        if leaving == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.close()
        elif leaving == "half-close":
            writer.write_eof()
        else:
            writer.close()
        await wait_until(lambda: ended == ["cancelled"], "the upstream request dropped", within=5)
        # The only pooled connection is free: the next request is answered now, not after the slow one.
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/next") as answer:
            assert answer.status == 200
            assert await answer.json() == {"upstream": True, "method": "GET", "path": "/next"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as scrape,
        ):
            families = list(text_string_to_metric_families(await scrape.text()))
        writer.close()
    samples = [sample for family in families for sample in family.samples]
    # Not the upstream's failure; before its head, nginx's 499 (after it, the 200 already sent).
    assert [s.value for s in samples if s.name == "edge_proxy_upstream_errors_total" and s.value] == []
    statuses = {
        s.labels["status_code"]: s.value
        for s in samples
        if s.name == "edge_proxy_request_duration_seconds_count" and s.labels["route"] == "forward"
    }
    assert statuses == ({"200": 2} if leaving == "mid-body" else {"499": 1, "200": 1})
    log = log_path.read_text()
    assert "upstream failed" not in log, log
    assert "unreachable" not in log, log
