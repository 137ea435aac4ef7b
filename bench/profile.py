"""Profile the proxy under wrk load with py-spy: where the CPU goes, per scenario.

Usage: python bench/profile.py [--scenario 200|304|forward] [--teams 1] [--size 50k] [--seconds 10] [--native]
                               [--upstream aiohttp|django]
(--upstream django: forward to the reference Django backend under gunicorn, one sync worker on core 1, which
closes every connection, instead of the bench's keep-alive aiohttp upstream.)
Writes bench/results/profile-<scenario>.txt (top frames) and .speedscope.json (open in speedscope.app).
Needs py-spy in the venv (`.venv/bin/pip install py-spy`) and ptrace rights (root).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import backend, dataset, procs, wrk  # noqa: E402
from bench.run import (  # noqa: E402
    FORWARD_PATH,
    RESULTS,
    Config,
    definitions_load,
    start_proxy,
    start_python_app,
    start_redis,
)


def summarize(collapsed: Path, top: int) -> str:
    """Self and inclusive sample shares per frame, from py-spy's collapsed (raw) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    ours = 0
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        # Per function (all lines together): "name (file:line)" -> "name (file)".
        for function in {frame.rpartition(":")[0] for frame in frames}:
            functions[function] += count
        if any("proxy/" in frame and "proxy/__main__" not in frame for frame in frames[6:]):
            ours += count
    lines = [f"{total} samples; {100 * ours / max(total, 1):.1f}% under a proxy/ frame below the loop"]
    lines += ["", f"top {top} by self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", f"top {top} by inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", f"top {top} functions by inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {function})" for function, n in functions.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Start Redis, upstream and proxy, load the proxy with wrk, record it with py-spy, summarize."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=("200", "304", "forward"), default="200")
    parser.add_argument("--teams", type=int, default=1)
    parser.add_argument("--size", default="50k")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (uvloop, aiohttp's parser)")
    parser.add_argument("--nonblocking", action="store_true", help="do not pause the proxy per sample")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--target", choices=("proxy", "ceiling"), default="proxy", help="what to profile")
    parser.add_argument("--upstream", choices=("aiohttp", "django"), default="aiohttp", help="forwarded to")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile: py-spy not found (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    size = int(float(args.size.lower().rstrip("k")) * (1000 if args.size.lower().endswith("k") else 1))
    workdir = Path(tempfile.mkdtemp(prefix="edge-proxy-profile-"))
    config = Config.for_tool(
        workdir,
        seconds=args.seconds,
        sizes=[size],
        team_counts=[args.teams],
        scenarios=[args.scenario],
        out=RESULTS,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"profile-{args.target}-{args.scenario}-{args.teams}x{args.size}"
    if args.upstream == "django":
        stem = stem.with_name(stem.name + "-django")
    try:
        with procs.Supervisor(workdir) as sup:
            redis_url, client = start_redis(sup, workdir)
            if args.upstream == "django":
                database = backend.migrate(workdir, redis_url)
                backend.insert_teams(database, dataset.backend_rows(args.teams))
                django = backend.start(sup, workdir, redis_url, workers=1, core=procs.LOAD_CORE)
                upstream_url = f"http://127.0.0.1:{django.port}"
            else:
                upstream = start_python_app(sup, "upstream", "upstream.py", core=procs.LOAD_CORE)
                upstream_url = f"http://127.0.0.1:{upstream.port}"
            writer, _ = dataset.open_writer(redis_url)
            try:
                teams = dataset.fill(
                    writer, redis_url, teams=args.teams, target_bytes=size, www=workdir / "www"
                )
            finally:
                writer.close()
                client.close()
            if args.target == "ceiling":
                manifest = dataset.write_manifest(workdir / "manifest.json", teams, workdir / "www")
                proxy = start_python_app(
                    sup, "ceiling", "ceiling.py", "--manifest", str(manifest), core=procs.SERVER_CORE
                )
            else:
                proxy = start_proxy(sup, config, redis_url, upstream_url)
            if args.scenario == "forward":
                load = wrk.Load(FORWARD_PATH, {"User-Agent": "bench/1.0"})
            else:
                load = definitions_load(teams, args.scenario == "304")
            # Warm-up (and loads every team).
            wrk.run(proxy.port, load, seconds=2, connections=32, threads=1, script_dir=workdir)
            results: list[wrk.WrkResult] = []
            loader = threading.Thread(
                target=lambda: results.append(
                    wrk.run(
                        proxy.port,
                        load,
                        seconds=args.seconds + 2,
                        connections=32,
                        threads=1,
                        script_dir=workdir,
                    )
                )
            )
            loader.start()
            record = [py_spy, "record", "--pid", str(proxy.pid), "--duration", str(args.seconds)]
            record += ["--rate", str(args.rate)] + (["--native"] if args.native else [])
            # Non-blocking sampling costs the proxy less but tears many stacks; blocking is the default.
            record += ["--nonblocking"] if args.nonblocking else []
            raw = stem.with_suffix(".collapsed")
            subprocess.run(
                [*record, "--format", "raw", "--output", str(raw)], check=True, timeout=args.seconds + 60
            )
            loader.join(args.seconds + 40)
            summary = summarize(raw, args.top)
            if results:
                result = results[0]
                summary = f"under load: {result.rps:.0f} req/s, p50 {result.p50_ms:.2f} ms\n" + summary
            stem.with_suffix(".txt").write_text(summary)
            print(summary)
            print(f"written {stem.with_suffix('.txt')} and {raw}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
