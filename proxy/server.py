"""Running the app: one process on an event loop, or N worker processes sharing the port."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import http_writer, web, web_response

from proxy import keys
from proxy.app import create_app
from proxy.settings import Settings
from proxy.telemetry import expect_continue, metrics_handler

log = logging.getLogger(__name__)

# SIGHUP too (a closed terminal, an init system): its default action would end the process with no drain
# and no final billing flush, and a supervisor's workers would outlive it, still serving the port.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The stop signals, less SIGHUP when this process was started ignoring it (nohup): kept ignored."""
    ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    return tuple(sig for sig in _STOP_SIGNALS if not (ignored and sig == signal.SIGHUP))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    _write_without_joining()
    return uvloop.new_event_loop()


def _write_without_joining() -> None:
    """Let aiohttp hand a response's head and body to the transport as two buffers (one writev).

    On Python < 3.12.9 aiohttp joins them into a new bytes first, a malloc and a copy of every body, because
    asyncio's own selector transport lacked flow control in writelines() on 3.12.0-3.12.8 and 3.13.0-3.13.1
    (CVE-2024-12254). uvloop's transport is not that code: its writelines() takes the same buffered,
    flow-controlled path as write(). Measured on 50 KB 200s: 276k -> 222k instructions per request
    (`bench/callgrind.py --baseline`), +4 % req/s over 9 interleaved wrk runs (`bench/run.py --baseline`).
    Only for uvloop, whose loop every serving process runs on; tests/test_server.py checks the flag is still
    read where this expects it.
    """
    http_writer.SKIP_WRITELINES = False


def _server_header(value: str) -> None:
    """The Server header aiohttp gives every answer that has none (settings.server_header).

    aiohttp adds `Python/3.x aiohttp/3.y` with `setdefault` when a response is prepared, reading the module's
    SERVER_SOFTWARE at that moment, and has no setting for it. An answer's own header (a forwarded upstream's)
    is left alone. Set once per serving process, like SKIP_WRITELINES above, so it also reaches the 400s
    aiohttp writes for malformed requests, which no handler or signal sees, and costs no request anything
    (an on_response_prepare signal would cost every answer ~1 µs). tests/test_server.py checks the answers of
    a real process, so an aiohttp that moved the name fails there.
    """
    web_response.SERVER_SOFTWARE = value  # type: ignore[attr-defined]  # imported there from aiohttp.http


async def serve(settings: Settings, worker_index: int = 0, heartbeat_fd: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, readiness 503, finish in-flight, clean up.

    `worker_index` (0 to workers-1) picks this worker's own metrics port (telemetry.worker_metrics_port);
    `heartbeat_fd`, a worker's end of its supervisor's pipe, gets a byte a second while the loop runs.
    """
    _server_header(settings.server_header)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        # Halved because aiohttp 3.14's RequestHandler.shutdown waits twice: up to shutdown_timeout for the
        # handler, then fails only the request body stream and waits up to shutdown_timeout again before
        # cancelling. A response stream keeps going through both halves, so it still gets the whole budget,
        # and the process is gone by shutdown_timeout_seconds instead of twice that (Kubernetes SIGKILLs at
        # 30 s). A handler still reading a request body sees it fail at the half.
        shutdown_timeout=settings.shutdown_timeout_seconds / 2,
        # aiohttp's own access log prints the query string, project tokens included: telemetry writes a
        # structured line per request instead (logging.access_log, proxy/access_log.py).
        access_log=None,
    )
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s while draining: still draining", sig.name)
        else:
            log.info("%s: draining", sig.name)
            stop.set()

    loop = asyncio.get_running_loop()
    # Installed before startup, so a SIGTERM while Redis connects ends the process through the same
    # clean path instead of the default action.
    stops = _stop_signals()
    for sig in stops:
        loop.add_signal_handler(sig, on_signal, sig)
    # A worker of a supervisor starts with them blocked (see _spawn): one that came meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    metrics_runner: web.AppRunner | None = None
    sweeper: asyncio.Task[None] | None = None
    beats = None if heartbeat_fd is None else asyncio.create_task(_beat(heartbeat_fd, stop), name="heartbeat")
    try:
        await runner.setup()
        try:
            if stop.is_set():
                return 0
            assert runner.server is not None  # set by setup()
            app[keys.CONNECTIONS].admit_on(runner.server)
            sweeper = asyncio.create_task(app[keys.CONNECTIONS].run_sweeper(), name="client-send-timeouts")
            # SO_REUSEPORT always: N workers (or a new pod process during a restart) share the port.
            site = web.TCPSite(runner, settings.bind_host, settings.bind_port, reuse_port=True, backlog=1024)
            try:
                await site.start()
            except OSError as exc:
                log.error("cannot listen on %s: %s", settings.bind, exc.strerror or exc)  # noqa: TRY400
                return 1
            if settings.telemetry.worker_metrics_port is not None:
                port = settings.telemetry.worker_metrics_port + worker_index
                metrics_runner = _worker_metrics_runner(app, settings)
                await metrics_runner.setup()
                try:
                    await web.TCPSite(metrics_runner, settings.bind_host, port, reuse_port=True).start()
                except OSError as exc:
                    log.error(  # noqa: TRY400
                        "cannot listen on port %d (telemetry.worker_metrics_port + worker %d): %s",
                        port,
                        worker_index,
                        exc.strerror or exc,
                    )
                    return 1
            # Everything startup made (modules, settings, the app, pools) lives as long as the process:
            # moved out of the collector's sight, so the full collections that churn triggers (a
            # connection per request to an upstream that closes them) no longer traverse it (profiled:
            # gc_collect_main was ~10 % of the CPU of forwarding to gunicorn's sync workers).
            gc.collect()
            gc.freeze()
            log.info(
                "listening on %s (mode %s, loop %s, up to %d client connections)",
                settings.bind,
                settings.service_mode.value,
                type(loop).__module__.partition(".")[0],
                app[keys.CONNECTIONS].limit,
            )
            await stop.wait()
            # Before the listener closes, so every response from here on says 503 / Connection: close.
            app[keys.HEALTH].draining = True
            log.info("draining: up to %.1fs for in-flight requests", settings.shutdown_timeout_seconds)
        finally:
            if sweeper is not None:
                sweeper.cancel()
            # aiohttp 3.14 BaseRunner.cleanup: close the listening sockets; RequestHandler.close() on every
            # connection (idle keep-alive ones close at once, busy ones after their current response); wait
            # for running handlers (see shutdown_timeout above), then cancel the rest; then the cleanup
            # contexts in reverse (billing's final flush last).
            await runner.cleanup()
            # Last, so the drain can still be watched.
            if metrics_runner is not None:
                await metrics_runner.cleanup()
    finally:
        if beats is not None:
            beats.cancel()
        for sig in stops:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


# A worker writes a byte this often to its supervisor's pipe: the supervisor's proof that its loop runs.
HEARTBEAT_SECONDS = 1.0


async def _beat(fd: int, stop: asyncio.Event) -> None:
    """Tell the supervisor this worker's loop runs, until cancelled; drain when the supervisor is gone."""
    os.set_blocking(fd, False)
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass  # its pipe is full: the supervisor is alive, only behind on reading it
        except OSError:
            # The pipe's other end closed: the supervisor died (SIGKILL, an OOM kill) without stopping its
            # workers, which would otherwise serve the port on as orphans, restarted by no one.
            if not stop.is_set():
                log.error("the supervisor is gone: draining")  # noqa: TRY400 - no traceback to show
                stop.set()
            return
        await asyncio.sleep(HEARTBEAT_SECONDS)


def _worker_metrics_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """This worker's own metrics, alone on a port of its own (telemetry.worker_metrics_port)."""
    metrics_app = web.Application()
    metrics_app[keys.TELEMETRY] = app[keys.TELEMETRY]
    metrics_app[keys.SETTINGS] = settings  # telemetry.expect_continue reads the body limit there
    metrics_app.router.add_get(
        settings.telemetry.metrics_path, metrics_handler, allow_head=False, expect_handler=expect_continue
    )
    return web.AppRunner(metrics_app, handle_signals=False, access_log=None)


def run(settings: Settings, worker_index: int = 0, heartbeat_fd: int | None = None) -> int:
    """Run one serving process on uvloop when available; the exit code."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(serve(settings, worker_index, heartbeat_fd))


@dataclass
class _Slot:
    """One worker position: its process (None while a restart waits) and its crash history."""

    process: subprocess.Popen[bytes] | None = None
    heartbeats: int | None = None  # the read end of the worker's heartbeat pipe
    last_beat: float = 0.0
    started_at: float = 0.0
    restart_at: float = 0.0
    crashes: int = 0
    quick_failures: int = 0  # in a row, each within _HEALTHY_RUN_SECONDS of starting


# A worker that lived this long before crashing is restarted at once; quicker crashes back off
# exponentially, so a worker that cannot start (port taken, upstream DNS) does not spin.
_HEALTHY_RUN_SECONDS = 10.0
_MAX_BACKOFF_SECONDS = 30.0
# A worker that fails this many times in a row, each within _HEALTHY_RUN_SECONDS of starting (a port it
# cannot listen on, a config it refuses), will not start: the supervisor stops the others and exits 1, for
# the orchestrator to see, rather than run on with a worker short, or none, and exit 0 at the end.
_GIVE_UP_CRASHES = 5


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Start `settings.workers` one-worker copies of this command; relay signals; restart crashes, and
    workers silent on their heartbeat pipe for `worker_timeout_seconds`."""
    # Each worker is told the count (its share of the container's memory: connections.client_cap) and its
    # index (which makes it serve rather than supervise).
    child_argv = [sys.executable, "-m", "proxy", *argv, "--workers", str(settings.workers)]
    timeout = settings.worker_timeout_seconds
    # The handlers only wake the loop below (the wakeup fd carries the signal numbers), so every decision
    # about the children is made in one place and no signal can land between a check and a spawn.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stops = _stop_signals()  # a SIGHUP ignored here stays ignored, in the workers too (they inherit it)
    handled = (*stops, signal.SIGCHLD)
    previous = {sig: signal.signal(sig, _noop) for sig in handled}
    previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    slots = [_Slot() for _ in range(settings.workers)]
    stopping = False
    clean = True
    try:
        for index, slot in enumerate(slots):
            _spawn(slot, child_argv, index)
        log.info("started %d workers: %s", len(slots), [s.process.pid for s in slots if s.process])
        while True:
            now = time.monotonic()
            for index, slot in enumerate(slots):
                if slot.process is None and not stopping and slot.restart_at <= now:
                    _spawn(slot, child_argv, index)
            if all(slot.process is None for slot in slots) and stopping:
                break
            waits = [s.restart_at - now for s in slots if s.process is None and not stopping]
            waits += [s.last_beat + timeout - now for s in slots if s.heartbeats is not None]
            pipes = [s.heartbeats for s in slots if s.heartbeats is not None]
            # Blocks until a signal (SIGCHLD included), a heartbeat, the next scheduled restart or the next
            # heartbeat deadline: no polling.
            readable, _, _ = select.select(
                [wake_r.fileno(), *pipes], [], [], max(0.0, min(waits)) if waits else None
            )
            _read_heartbeats(slots, readable)
            _kill_silent(slots, timeout)
            for signum in _read_signals(wake_r):
                if signum in stops:
                    if not stopping:
                        log.info("%s: stopping %d workers", signal.Signals(signum).name, len(slots))
                    stopping = True
                    for slot in slots:
                        if slot.process is not None:
                            slot.process.send_signal(signum)
            clean = _reap(slots, stopping) and clean
            failing = next((i for i, s in enumerate(slots) if s.quick_failures >= _GIVE_UP_CRASHES), None)
            if failing is not None and not stopping:
                log.error(
                    "worker %d failed %d times in a row within %.0fs of starting: stopping every worker",
                    failing,
                    _GIVE_UP_CRASHES,
                    _HEALTHY_RUN_SECONDS,
                )
                stopping = True
                clean = False
                for slot in slots:
                    if slot.process is not None:
                        slot.process.send_signal(signal.SIGTERM)
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake_r.close()
        wake_w.close()
    return 0 if clean else 1


def _noop(_signum: int, _frame: object) -> None:
    """A Python-level handler, so the wakeup fd receives the signal."""


def _spawn(slot: _Slot, argv: list[str], index: int) -> None:
    # The worker starts with the stop signals blocked (a child inherits the mask) and unblocks them once its
    # handlers are in place (serve): one relayed in its first second waits for them instead of killing it.
    beats_r, beats_w = os.pipe()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        worker = [*argv, "--worker-index", str(index), "--heartbeat-fd", str(beats_w)]
        # Its own pipe's write end only: no worker holds another's, so each pipe's EOF means its own exit.
        slot.process = subprocess.Popen(worker, pass_fds=(beats_w,))  # noqa: S603 - our own interpreter
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(beats_w)
    os.set_blocking(beats_r, False)
    _close_heartbeats(slot)
    slot.heartbeats = beats_r
    slot.started_at = slot.last_beat = time.monotonic()


def _read_heartbeats(slots: list[_Slot], readable: list[int]) -> None:
    now = time.monotonic()
    for slot in slots:
        if slot.heartbeats is None or slot.heartbeats not in readable:
            continue
        try:
            data = os.read(slot.heartbeats, 4096)
        except BlockingIOError:
            continue
        if data:
            slot.last_beat = now
        else:
            _close_heartbeats(slot)  # the worker is exiting: SIGCHLD follows


def _kill_silent(slots: list[_Slot], timeout: float) -> None:
    """SIGKILL the workers whose loop has not run for `timeout` (a restart follows, as for a crash)."""
    now = time.monotonic()
    for index, slot in enumerate(slots):
        if slot.process is not None and slot.heartbeats is not None and now - slot.last_beat > timeout:
            log.error(
                "worker %d (pid %d): no heartbeat for %.0fs (its event loop is stuck): killing it",
                index,
                slot.process.pid,
                now - slot.last_beat,
            )
            slot.process.kill()
            _close_heartbeats(slot)


def _close_heartbeats(slot: _Slot) -> None:
    if slot.heartbeats is not None:
        os.close(slot.heartbeats)
        slot.heartbeats = None


def _read_signals(sock: socket.socket) -> list[int]:
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            return list(data)
        if not chunk:
            return list(data)
        data += chunk


def _reap(slots: list[_Slot], stopping: bool) -> bool:
    """Collect exited workers (no zombies) and schedule restarts; False if one stopped uncleanly."""
    clean = True
    now = time.monotonic()
    for slot in slots:
        process = slot.process
        if process is None or (code := process.poll()) is None:
            continue
        slot.process = None
        _close_heartbeats(slot)
        if stopping:
            if code != 0:
                log.error("worker %d exited with %s while stopping", process.pid, code)
                clean = False
            continue
        quick = now - slot.started_at < _HEALTHY_RUN_SECONDS
        slot.crashes = slot.crashes + 1 if quick else 1
        slot.quick_failures = slot.quick_failures + 1 if quick else 0
        delay = 0.0 if slot.crashes == 1 else min(_MAX_BACKOFF_SECONDS, 0.5 * 2 ** (slot.crashes - 2))
        slot.restart_at = now + delay
        log.error("worker %d exited with %s; restarting it in %.1fs", process.pid, code, delay)
    return clean
