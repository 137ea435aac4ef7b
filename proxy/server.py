"""Running the app: one serving process on an event loop (proxy/supervisor.py runs N of them)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Coroutine

from aiohttp import web

from proxy import __version__, aiohttp_internals, connections, health, keys, telemetry
from proxy.app import create_app
from proxy.settings import Settings
from proxy.stop_signals import STOP_SIGNALS, stop_signals
from proxy.tasks import cancelled
from proxy.telemetry import expect_continue, metrics_handler

log = logging.getLogger(__name__)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    aiohttp_internals.write_without_joining()
    return uvloop.new_event_loop()


async def serve(settings: Settings, worker_index: int = 0, heartbeat_fd: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, readiness 503, finish in-flight, clean up.

    `worker_index` (0 to workers-1) picks this worker's own metrics port (telemetry.worker_metrics_port);
    `heartbeat_fd`, a worker's end of its supervisor's pipe, gets a byte a second while the loop runs.
    """
    aiohttp_internals.set_server_header(settings.server_header)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        # Only what the drain leaves (see handler_wait): the drain waits for requests in progress itself.
        shutdown_timeout=handler_wait(settings),
        # aiohttp's own access log prints the query string, project tokens included: telemetry writes a
        # structured line per request instead (logging.access_log, proxy/access_log.py).
        access_log=None,
    )
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second stop signal: cut the drain short
    loop = asyncio.get_running_loop()
    stopped_at = 0.0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal stopped_at
        if not stop.is_set():
            log.info(
                "%s: draining (another stop signal, %gs or more later, cuts it short)",
                sig.name,
                SAME_STOP_SECONDS,
            )
            stopped_at = loop.time()
            stop.set()
        elif loop.time() - stopped_at < SAME_STOP_SECONDS:
            # The same stop delivered twice: Ctrl-C (or systemd's stop) signals the whole process group, and a
            # supervisor relays it to its workers too.
            log.info("%s while draining: still draining", sig.name)
        elif not hurry.is_set():
            log.warning("%s again: cutting the drain short", sig.name)
            hurry.set()

    # Installed before startup, so a SIGTERM while Redis connects ends the process through the same
    # clean path instead of the default action.
    stops = stop_signals()
    for sig in stops:
        loop.add_signal_handler(sig, on_signal, sig)
    # A worker of a supervisor starts with them blocked (see _spawn): one that came meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    metrics_runner: web.AppRunner | None = None
    health_runner: web.AppRunner | None = None
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
            if not await _listen(site, settings.bind):
                return 1
            if settings.health_port is not None:
                health_runner = _health_runner(app)
                await health_runner.setup()
                assert health_runner.server is not None
                # Capped too (idle ones make room, as on bind's port): uncapped, idle connections there
                # took the descriptors kept for the upstream pool and Redis.
                connections.ClientConnections(HEALTH_CONNECTIONS).admit_on(health_runner.server)
                port = settings.health_port
                side = web.TCPSite(health_runner, settings.bind_host, port, reuse_port=True)
                if not await _listen(side, f"health_port {port}"):
                    return 1
            if settings.telemetry.worker_metrics_port is not None:
                port = settings.telemetry.worker_metrics_port + worker_index
                metrics_runner = _worker_metrics_runner(app, settings)
                await metrics_runner.setup()
                side = web.TCPSite(metrics_runner, settings.bind_host, port, reuse_port=True)
                if not await _listen(
                    side, f"port {port} (telemetry.worker_metrics_port + worker {worker_index})"
                ):
                    return 1
            # Everything startup made (modules, settings, the app, pools) lives as long as the process:
            # moved out of the collector's sight, so the full collections that churn triggers (a
            # connection per request to an upstream that closes them) no longer traverse it (profiled:
            # gc_collect_main was ~10 % of the CPU of forwarding to gunicorn's sync workers).
            gc.collect()
            gc.freeze()
            log.info(
                "edge-proxy %s listening on %s (mode %s, loop %s, up to %d client connections)",
                __version__,
                settings.bind,
                settings.service_mode.value,
                type(loop).__module__.partition(".")[0],
                app[keys.CONNECTIONS].limit,
            )
            await stop.wait()
            drain_ends = loop.time() + settings.shutdown_timeout_seconds - 2 * handler_wait(settings)
            log.info("draining: up to %.1fs for in-flight requests", settings.shutdown_timeout_seconds)
            if heartbeat_fd is not None:
                # A worker: every worker's listener closes before any tells its clients Connection: close.
                # They reconnect, and one queued on a sibling's listening socket, not yet accepted, was reset
                # when that sibling closed it a moment later (the supervisor relays the stop to each in turn):
                # the request written, and no answer (a reviewer's: 0-16 per stop under 32 clients, none with
                # one process). With every listener closed first, a reconnect is refused, nothing sent.
                await site.stop()
                await asyncio.sleep(SIBLINGS_CLOSE_SECONDS)
            # So every response from here on says 503 / Connection: close.
            app[keys.HEALTH].draining = True
            if heartbeat_fd is None:
                # No new connections (another replica, or the process sharing the port, takes them); then a
                # moment in which a kept-alive client's next request, perhaps already on its way, is
                # answered (Connection: close) rather than met by the close: aiohttp closes idle connections
                # at once, and a busy keep-alive client lost a request or two at every drain (a reviewer's).
                await site.stop()
            await _unless(hurry, _drain(app[keys.CONNECTIONS], _idle_grace(settings), drain_ends))
            if busy := app[keys.CONNECTIONS].busy():
                log.warning(
                    "drain %s: %d connection(s) still busy (a request in progress, an answer unsent), "
                    "cut in %gs at most",
                    "cut short" if hurry.is_set() else "out of time",
                    busy,
                    2 * handler_wait(settings),
                )
        finally:
            if sweeper is not None:
                await cancelled(sweeper)
            # aiohttp 3.14 BaseRunner.cleanup: close the listening sockets; RequestHandler.close() on every
            # connection (idle keep-alive ones close at once, busy ones after their current response); wait
            # for running handlers (see shutdown_timeout above), then cancel the rest; then the cleanup
            # contexts in reverse (billing's final flush last).
            await runner.cleanup()
            # Last, so the drain can still be watched (and the liveness probe answered).
            for side_runner in (metrics_runner, health_runner):
                if side_runner is not None:
                    await side_runner.cleanup()
    finally:
        if beats is not None:
            await cancelled(beats)
        for sig in stops:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


async def _drain(clients: connections.ClientConnections, idle_grace: float, until: float) -> None:
    await clients.wait_closed(idle_grace)
    # Then idle connections close, and requests in progress finish within the budget, before aiohttp's
    # shutdown: that drops every byte arriving on every connection from its start (RequestHandler.close, then
    # data_received), so an upload still arriving a second into the drain was cut off, its upstream request
    # reset and its client left without an answer.
    await clients.drain(until)


async def _unless(event: asyncio.Event, work: Coroutine[None, None, None]) -> None:
    """Run `work` until it ends or `event` is set, whichever comes first."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancelled(waiter)
        if not task.done():
            await cancelled(task)
    if not task.cancelled():
        task.result()  # a failure of the work is raised, not lost


# A stop signal this soon after the first is the same stop delivered twice (to the process group, and relayed
# by a supervisor); one later cuts the drain short (a second Ctrl-C, as uvicorn takes it).
SAME_STOP_SECONDS = 1.0
# How long a worker waits, its listener closed, before it tells clients Connection: close: its siblings get
# the same stop from the supervisor milliseconds apart, and close theirs meanwhile. Measured under 32
# keep-alive clients, three workers: resets in 3 of 8 stops without the wait, 1 of 14 with it (a connection
# already queued on a listener as it closes is still reset, as with one process); a reviewer's 0 of 9 at 0.1.
SIBLINGS_CLOSE_SECONDS = 0.2


# How long, at most, a drain waits for kept-alive clients to send their next request before their idle
# connections are closed: taken from shutdown_timeout_seconds, so the drain ends when it did.
IDLE_GRACE_SECONDS = 1.0


def _idle_grace(settings: Settings) -> float:
    return min(IDLE_GRACE_SECONDS, settings.shutdown_timeout_seconds / 4)


def handler_wait(settings: Settings) -> float:
    """aiohttp's shutdown_timeout: what a drain leaves (requests past the budget) is cut within twice this.

    The drain itself waits for requests in progress (ClientConnections.drain) until the budget less twice
    this, since aiohttp 3.14's RequestHandler.shutdown waits twice (for the handler, then again after failing
    its body stream); short enough that aiohttp never rounds it up to a whole second (helpers.ceil_timeout,
    over 5 s), so a stuck request ends the drain within shutdown_timeout_seconds.
    """
    return min(0.5, settings.shutdown_timeout_seconds / 8)


# Connections the health_port listener admits at once (probes and a scraper need a few; at the cap an idle one
# makes room). Within client_cap.SPARE_DESCRIPTORS' margin, with the other listeners.
HEALTH_CONNECTIONS = 32


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
        settings.telemetry.metrics_path, metrics_handler(), allow_head=False, expect_handler=expect_continue
    )
    return web.AppRunner(metrics_app, handle_signals=False, access_log=None)


async def _listen(site: web.TCPSite, what: str) -> bool:
    """Start `site`; False (logged, naming `what`) if it cannot listen."""
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", what, exc.strerror or exc)  # noqa: TRY400 - no traceback to show
        return False
    return True


def _health_runner(app: web.Application) -> web.AppRunner:
    """The health probes and metrics on a listener of their own (health_port), outside the client limit."""
    health_app = web.Application()
    health_app[keys.TELEMETRY] = app[keys.TELEMETRY]
    health_app[keys.HEALTH] = app[keys.HEALTH]
    health_app[keys.SETTINGS] = app[keys.SETTINGS]
    health.add_routes(health_app)
    telemetry.add_routes(health_app)
    return web.AppRunner(
        health_app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=app[keys.SETTINGS].client_limits.keepalive_timeout_seconds,
    )


def run(settings: Settings, worker_index: int = 0, heartbeat_fd: int | None = None) -> int:
    """Run one serving process on uvloop when available; the exit code."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(serve(settings, worker_index, heartbeat_fd))
