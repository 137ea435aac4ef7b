"""Per-process memory of the proxy against one sync Django worker, side by side: `python -m bench.memory`.

Starts redis-server (one team's ~50 KB payload written as the backend writes it), the reference backend
under gunicorn (one sync worker, as bench/run.py does) and `python -m proxy serve --config
config/edge-proxy.yaml` (one worker, as the image runs it; the bench's unlimited rate limits), then reads
each server process's /proc/PID/status and /proc/PID/smaps_rollup: idle (started, one request of each kind
answered), and after a wrk burst of 200s then 304s (`--seconds` each, 32 connections). With `--baseline
REV`, that revision's proxy is measured too (a detached work tree), each proxy started `--repeat` times,
interleaved; the table shows medians.

VmRSS counts every resident page, shared or not; RssFile is the file-backed part (libraries, the
interpreter's executable), which N processes on a node share. PSS charges each shared page to its sharers
in equal parts; USS (Private_Clean + Private_Dirty) is what one more process costs: the honest per-process
figures. Django's are its worker's; the gunicorn master (which only forks and watches the worker) is shown
apart: bench/run.py's "peak RSS" sums a server's process tree, so its Django figure is master + worker.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import backend, dataset, procs, run, wrk  # noqa: E402
from bench.dataset import Team  # noqa: E402

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Pss", "USS", "threads")


def read_memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile (status), Pss and USS (smaps_rollup) in MiB, and the thread count."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
        elif name == "Threads":
            out["threads"] = int(value)
    rollup: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        rollup[name] = int(value.split()[0])
    out["Pss"] = rollup["Pss"] / 1024
    out["USS"] = (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024
    return out


def _get(port: int, path: str, headers: Mapping[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=dict(headers))
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _warm(port: int, team: Team) -> None:
    for conditional, expected in ((False, 200), (True, 304)):
        status = _get(port, team.path, team.headers(conditional=conditional))
        if status != expected:
            raise procs.StartError(f"GET {team.path} on port {port}: HTTP {status}, expected {expected}")


def measure(
    port: int, pids: Sequence[int], team: Team, seconds: int, workdir: Path
) -> list[tuple[str, list[dict[str, float]]]]:
    """Each of `pids` idle (after one 200 and one 304), then after `seconds` of 200s and `seconds` of 304s
    under wrk."""
    _warm(port, team)
    time.sleep(1.0)
    idle = [read_memory(pid) for pid in pids]
    for conditional in (False, True):
        load = wrk.Load(team.path, team.headers(conditional=conditional))
        wrk.run(port, load, seconds=seconds, connections=32, threads=1, script_dir=workdir)
    time.sleep(1.0)
    return [("idle", idle), ("after load", [read_memory(pid) for pid in pids])]


def start_proxy(
    sup: procs.Supervisor,
    tree: Path,
    redis_url: str,
    upstream_url: str,
    name: str,
    workers: int = 1,
    python: str = sys.executable,
) -> tuple[int, int]:
    """`python -m proxy serve` of the work tree `tree` with its own config file; (port, pid). The package's
    bytecode is compiled first, as the image does (with PYTHONDONTWRITEBYTECODE the process would compile
    every module of the package from source at each start)."""
    subprocess.run([python, "-m", "compileall", "-q", str(tree / "proxy")], check=True)
    port = procs.free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY") and k != "PYTHONPATH"},
        "PYTHONPATH": str(tree),
        "BIND": f"127.0.0.1:{port}",
        "REDIS_URL": redis_url,
        "UPSTREAM_URL": upstream_url,
        "VERDICT_HMAC_KEY": run.HMAC_KEY,
        "EDGE_PROXY__RATE_LIMITS__DEFAULT": run.UNLIMITED,
        "EDGE_PROXY__RATE_LIMITS__ETAG": run.UNLIMITED,
        "WORKERS": str(workers),
    }
    command = [python, "-m", "proxy", "serve", "--config", str(tree / "config" / "edge-proxy.yaml")]
    process = sup.start(name, procs.pinned(command, procs.SERVER_CORE), env, tree)
    try:
        procs.wait_http(port, "/_startup", process)
    except procs.StartError as exc:
        raise procs.StartError(f"{name}: {exc}\n{sup.log_tail(name)}") from None
    return port, process.pid


def _row(name: str, state: str, samples: Sequence[dict[str, float]]) -> str:
    cells = []
    for key in FIELDS:
        value = statistics.median(s[key] for s in samples)
        cells.append(f"{value:.0f}" if key == "threads" else f"{value:.1f}")
    return f"| {name} | {state} | " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    """Start everything, measure, print a Markdown table (MiB), stop everything."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5, help="wrk burst per kind (200s, then 304s)")
    parser.add_argument("--size", type=int, default=50_000, help="the team's payload, bytes")
    parser.add_argument("--repeat", type=int, default=1, help="proxy starts per variant (medians)")
    parser.add_argument("--baseline", metavar="REV", help="also measure this revision's proxy")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the proxy's interpreter, e.g. a virtualenv of requirements/image.lock alone: the image's "
        "packages (this one's test tools bring psutil and cryptography, which the proxy's dependencies "
        "import when present)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="the proxy's --workers: with N > 1 its supervisor is a row too"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.memory: wrk is not installed", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="edge-proxy-memory-"))
    variants: list[tuple[str, Path]] = [("proxy", ROOT)]
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        if args.baseline:
            base = run.checkout_revision(args.baseline, workdir / "base")
            variants.append((f"proxy @{args.baseline}", base))
        with procs.Supervisor(workdir) as sup:
            redis_url, client = run.start_redis(sup, workdir)
            database = backend.migrate(workdir, redis_url)
            backend.insert_teams(database, dataset.backend_rows(1))
            django = backend.start(sup, workdir, redis_url, workers=1, core=procs.SERVER_CORE)
            writer, _ = dataset.open_writer(redis_url)
            try:
                (team,) = dataset.fill(writer, redis_url, teams=1, target_bytes=args.size, www=workdir)
            finally:
                writer.close()
                client.close()
            workers = [p for p in procs.descendants(django.pid) if p != django.pid]
            if len(workers) != 1:
                raise procs.StartError(f"expected one gunicorn worker, found {workers}")
            for state, (worker, master) in measure(
                django.port, [workers[0], django.pid], team, args.seconds, workdir
            ):
                samples[("django worker (gunicorn sync)", state)] = [worker]
                samples[("gunicorn master (not serving)", state)] = [master]
            for _ in range(args.repeat):
                for name, tree in variants:
                    with sup.scope():
                        upstream = f"http://127.0.0.1:{django.port}"
                        port, pid = start_proxy(
                            sup, tree, redis_url, upstream, name, args.workers, args.python
                        )
                        pids = {name: pid}
                        if args.workers > 1:
                            # The supervisor, and one of its workers (they serve alike).
                            first = min(p for p in procs.descendants(pid) if p != pid)
                            pids = {f"{name} supervisor": pid, f"{name} worker": first}
                        for state, values in measure(port, list(pids.values()), team, args.seconds, workdir):
                            for row, value in zip(pids, values, strict=True):
                                samples.setdefault((row, state), []).append(value)
    finally:
        if args.baseline:
            run.remove_checkout(workdir / "base")
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"| process | state | {' | '.join(FIELDS)} |")
    print("|---|---|" + "---:|" * len(FIELDS))
    for (name, state), rows in samples.items():
        print(_row(name, state, rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
