"""`python -m proxy` and the `edge-proxy` command."""

import signal
import sys


def _stop_before_serving(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run() -> int:
    """Entry point: a SIGTERM handler first, then the command."""
    # Until `serve` installs its own handlers (after ~1 s of imports): as PID 1 in a container the kernel
    # drops a signal whose action is the default, so a SIGTERM in that second was lost and `docker stop`
    # waited for its SIGKILL. A worker of a supervisor starts with the stop signals blocked instead
    # (supervisor._spawn), so this never runs there.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    from proxy.cli import main  # after the handler, which must not wait for these imports

    return main()


if __name__ == "__main__":
    sys.exit(run())
