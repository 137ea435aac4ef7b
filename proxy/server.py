"""Running the app: one process on an event loop, or N worker processes sharing the port."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from aiohttp import web

from proxy import keys
from proxy.app import create_app
from proxy.settings import Settings

log = logging.getLogger(__name__)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, readiness 503, finish in-flight, clean up."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        access_log=logging.getLogger("proxy.access") if settings.logging.access_log else None,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # SO_REUSEPORT always: N workers (or a new pod process during a restart) share the port.
        site = web.TCPSite(runner, settings.bind_host, settings.bind_port, reuse_port=True, backlog=1024)
        await site.start()
        log.info("listening on %s (mode %s)", settings.bind, settings.service_mode.value)
        await stop.wait()
        log.info("draining: up to %.1fs for in-flight requests", settings.shutdown_timeout_seconds)
        app[keys.HEALTH].draining = True
    finally:
        # Closes the listener, lets in-flight handlers finish within shutdown_timeout, then runs the
        # cleanup contexts in reverse (billing and telemetry flush last).
        await runner.cleanup()
    log.info("stopped")


def run(settings: Settings) -> int:
    """Run one serving process on uvloop when available; the exit code."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(serve(settings))
    return 0


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Start `settings.workers` one-worker copies of this command; relay signals; restart crashes."""
    child_argv = [sys.executable, "-m", "proxy", *argv, "--workers", "1"]
    stopping = False
    children: list[subprocess.Popen[bytes]] = []

    def relay(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    children.extend(subprocess.Popen(child_argv) for _ in range(settings.workers))  # noqa: S603
    log.info("started %d workers: %s", settings.workers, [c.pid for c in children])
    worst = 0
    while children:
        time.sleep(0.2)
        for index, child in enumerate(list(children)):
            code = child.poll()
            if code is None:
                continue
            children.remove(child)
            worst = worst or code
            if not stopping:
                log.error("worker %d exited with %s; restarting it", child.pid, code)
                time.sleep(min(5.0, 0.5 * (index + 1)))
                children.append(subprocess.Popen(child_argv))  # noqa: S603
                worst = 0
    return worst
