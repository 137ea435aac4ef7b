"""Child processes for the bench: each in its own process group, pinned to a core, always killed on exit."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Cores: the server under test on one, the load generator on the other (when the machine has two).
SERVER_CORE = 0
LOAD_CORE = 1


class StartError(RuntimeError):
    """A child process did not come up (it exited, or never answered)."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_pin() -> bool:
    """Whether pinning means anything here: taskset exists and there are at least two cores."""
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(command: Sequence[str], core: int) -> list[str]:
    """`command` prefixed with `taskset -c core` when pinning is possible, else unchanged."""
    return ["taskset", "-c", str(core), *command] if can_pin() else list(command)


class Supervisor:
    """Starts children in new sessions and kills every group still alive on exit (also on Ctrl-C)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `command` in its own process group, output to <log_dir>/<name>.log."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self._children.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after `timeout`, and forget it."""
        _kill_group(process, timeout)
        self._children = [(n, p) for n, p in self._children if p is not process]

    def stop_all(self) -> None:
        """Stop every child, newest first."""
        for _, process in reversed(self._children):
            _kill_group(process, 10.0)
        self._children.clear()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Children started inside the block are stopped when it ends (older ones keep running)."""
        mark = len(self._children)
        try:
            yield
        finally:
            for _, process in reversed(self._children[mark:]):
                _kill_group(process, 10.0)
            del self._children[mark:]

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines a child wrote (for error messages)."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _kill_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    # Whatever is left in the group (the leader gone or not) is killed outright.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def wait_http(port: int, path: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll GET `path` until it answers below 500; StartError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"exited with code {process.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            if response.status < 500:
                return
            last = f"HTTP {response.status}"
        except OSError as exc:
            last = type(exc).__name__
        finally:
            connection.close()
        time.sleep(0.1)
    raise StartError(f"did not answer GET {path} within {timeout:.0f}s ({last})")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (nginx: master and workers)."""
    found = [pid]
    index = 0
    while index < len(found):
        for task in Path(f"/proc/{found[index]}/task").glob("*"):
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in (task / "children").read_text().split())
        index += 1
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants, in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of `pid` and its descendants, in seconds."""
    user = system = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{member}/stat").read_text()
            # The command name may hold spaces: fields are counted after its closing parenthesis.
            fields = stat[stat.rindex(")") + 2 :].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def core_times() -> dict[int, tuple[int, int, int]]:
    """Per core: (busy, idle, steal) ticks since boot, from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            # user nice system idle iowait irq softirq steal
            user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            times[int(name[3:])] = (user + nice + system + irq + softirq, idle + iowait, steal)
    return times


def busy_share(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]], core: int
) -> float:
    """Fraction of `core`'s time spent busy (stolen time counted as not ours) between two core_times()."""
    if core not in before or core not in after:
        return float("nan")
    deltas = [a - b for a, b in zip(after[core], before[core], strict=True)]
    total = sum(deltas)
    return deltas[0] / total if total else float("nan")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (`echo 5 > clear_refs`, Linux >= 4.0); silently a no-op if refused."""
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{member}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of `pid` and its descendants, in MiB."""
    total_kib = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def rss_mib(pid: int) -> float:
    """VmRSS (current resident set) of `pid` and its descendants, in MiB."""
    total_kib = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024
