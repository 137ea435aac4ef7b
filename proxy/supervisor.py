"""`--workers N`: N serving processes on one port, restarted if they crash or go silent, stopped together."""

from __future__ import annotations

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

from proxy.settings import Settings
from proxy.stop_signals import STOP_SIGNALS, stop_signals

log = logging.getLogger(__name__)


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
# Once stopping, a worker silent this long is stuck, whatever worker_timeout_seconds says: a draining
# worker still beats every second. A stop waited out the whole timeout (30 s: exit 1 at 28 s, past the
# drain budget and at the edge of Kubernetes' grace period, a reviewer's) for a worker that cannot drain.
_STOPPING_SILENCE_SECONDS = 3.0


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Start `settings.workers` one-worker copies of this command; relay signals; restart crashes, and
    workers silent on their heartbeat pipe for `worker_timeout_seconds`."""
    # Each worker is told the count (its share of the container's memory: client_cap.client_cap) and its
    # index (which makes it serve rather than supervise).
    # faulthandler: a worker killed by SIGSEGV (a C extension) leaves its Python traceback in the log.
    child_argv = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "proxy",
        *argv,
        "--workers",
        str(settings.workers),
    ]
    timeout = settings.worker_timeout_seconds
    # The handlers only wake the loop below (the wakeup fd carries the signal numbers), so every decision
    # about the children is made in one place and no signal can land between a check and a spawn.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stops = stop_signals()  # a SIGHUP ignored here stays ignored, in the workers too (they inherit it)
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
            silence = min(timeout, _STOPPING_SILENCE_SECONDS) if stopping else timeout
            waits = [s.restart_at - now for s in slots if s.process is None and not stopping]
            waits += [s.last_beat + silence - now for s in slots if s.heartbeats is not None]
            pipes = [s.heartbeats for s in slots if s.heartbeats is not None]
            # Blocks until a signal (SIGCHLD included), a heartbeat, the next scheduled restart or the next
            # heartbeat deadline: no polling.
            readable, _, _ = select.select(
                [wake_r.fileno(), *pipes], [], [], max(0.0, min(waits)) if waits else None
            )
            _read_heartbeats(slots, readable)
            _kill_silent(slots, silence)
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
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
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
        index = slots.index(slot)
        if stopping:
            if code != 0:
                log.error("worker %d (pid %d) %s while stopping", index, process.pid, _ended(code))
                clean = False
            continue
        quick = now - slot.started_at < _HEALTHY_RUN_SECONDS
        slot.crashes = slot.crashes + 1 if quick else 1
        slot.quick_failures = slot.quick_failures + 1 if quick else 0
        delay = 0.0 if slot.crashes == 1 else min(_MAX_BACKOFF_SECONDS, 0.5 * 2 ** (slot.crashes - 2))
        slot.restart_at = now + delay
        log.error("worker %d (pid %d) %s; restarting it in %.1fs", index, process.pid, _ended(code), delay)
    return clean


def _ended(code: int) -> str:
    """How a worker ended, for the log: its exit code, or the signal that killed it, by name."""
    if code >= 0:
        return f"exited with {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"
