"""The signals that stop a serving process or a supervisor, in a module of their own: the supervisor of
`--workers N` needs them without importing the app (proxy/server.py), which only its workers run."""

from __future__ import annotations

import signal

# SIGHUP too (a closed terminal, an init system): its default action would end the process with no drain
# and no final billing flush, and a supervisor's workers would outlive it, still serving the port.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The stop signals, less SIGHUP when this process was started ignoring it (nohup): kept ignored."""
    ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    return tuple(sig for sig in STOP_SIGNALS if not (ignored and sig == signal.SIGHUP))
