"""The bench's results: rows of samples, medians and ratios, the bar of issue 8, Markdown and JSON."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROXY = "proxy"
# The proxy holding most payloads compressed only (definitions.cache_decoded_budget_bytes), for memory.
COMPACT = "proxy, compact cache"
CEILING = "aiohttp ceiling"
NGINX = "nginx ceiling"
DJANGO = "django"
VIA = "proxy -> django"
# nginx forwarding in the proxy's place, to the same Django: the reference for the forwarding rows.
NGINX_VIA = "nginx -> django"
# The proxy with upstream.max_connections set to the kept-alive Django's threads (forward-keepalive).
SIZED_VIA = "proxy, pool = django threads -> django"
DIRECT = "django direct"
FAST_VIA = "proxy -> aiohttp upstream"
FAST_DIRECT = "aiohttp upstream direct"

# The bar (issue 8), one core, same run.
TARGET_200_BACKEND = 10.0
TARGET_200_CEILING = 0.80
TARGET_304_CEILING = 0.75
TARGET_REDIS = 0.05
TARGET_FORWARD_CPU_US = 150.0
TARGET_FORWARD_RATIO = 0.90
TARGET_RSS_MIB = 80.0
# Unknown routes forwarded: to Django under sync workers (a connection per request), to Django under
# gthread workers (kept alive), and to a no-op aiohttp upstream (the proxy is the bottleneck).
FORWARD_SCENARIOS = ("forward", "forward-keepalive", "forward-fast")
RSS_DATASET = "1000x50 KB"
COMPACT_SUFFIX = ", compact cache"

MEDIANS = (
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "cpu_us_per_req",
    "backend_cpu_us_per_req",
    "server_core_busy",
    "load_core_busy",
    "peak_rss_mib",
    "redis_per_req",
    "backend_hits",
)


@dataclass
class Sample:
    """One measured wrk run against one server."""

    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    cpu_us_per_req: float
    backend_cpu_us_per_req: float | None
    peak_rss_mib: float
    redis_per_req: float | None
    redis_by_command: dict[str, float]
    bad_responses: int
    statuses: dict[str, int]
    backend_hits: int | None
    # Share of the server core and of the load core that was busy during the run (steal excluded).
    server_core_busy: float
    load_core_busy: float
    # The paced rate asked of wrk (None: saturation).
    target_rps: float | None = None
    # Which round of interleaved saturating runs it belongs to (None: a paced pass, or saved before rounds
    # were recorded): the servers of one round ran within seconds of each other, under the same noise.
    round: int | None = None


@dataclass
class Row:
    """All runs of one (dataset, scenario, server), or why it has none."""

    payload: str
    teams: int
    scenario: str
    server: str
    samples: list[Sample] = field(default_factory=list)
    half: Sample | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        """Median of a Sample field over the saturating runs (None when no run has it)."""
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return statistics.median(values) if values else None

    def redis_rate(self, command: str | None = None) -> float | None:
        """Redis commands (all, or one command) per request over all saturating runs together.

        Not a median of per-run ratios: background writes come in bursts (a billing flush every 30 s), so a
        3 s run holds one or none of them and the median of a few runs says "none" or "all" by the phase of
        the runs against the flush; commands over requests across the runs is the steady-state rate.
        """
        runs = [s for s in self.samples if s.redis_per_req is not None]
        requests = sum(s.requests for s in runs)
        if not runs or not requests:
            return None
        if command is None:
            return sum((s.redis_per_req or 0.0) * s.requests for s in runs) / requests
        return sum(s.redis_by_command.get(command, 0.0) * s.requests for s in runs) / requests

    def all_samples(self) -> list[Sample]:
        """Saturating runs and the half-rate pass."""
        return [*self.samples, *([self.half] if self.half else [])]

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.payload, self.teams, self.scenario)


def _find(rows: Sequence[Row], row: Row, server: str) -> Row | None:
    return next((r for r in rows if r.key == row.key and r.server == server and r.samples), None)


def baseline_of(row: Row) -> str | None:
    """The backend row a row is compared with (Django for 200/304, the direct row when forwarding)."""
    if row.scenario in ("200", "304"):
        return DJANGO if row.server != DJANGO else None
    if row.server in (VIA, PROXY, NGINX_VIA, SIZED_VIA):
        return DIRECT
    if row.server == FAST_VIA:
        return FAST_DIRECT
    return None


def ratio(rows: Sequence[Row], row: Row, base_server: str | None, name: str = "rps") -> float | None:
    """row/base (base/row for CPU per request, so that higher is better either way): the median over rounds
    of the two servers' runs in the same round.

    The machine's noise comes and goes over seconds to minutes (one server's runs spread by +-25 % on
    2026-12-06), and the runs of one round are seconds apart, so a same-round ratio cancels most of it: the
    twelve 304 rows of two runs that day (identical code) spread 0.66-1.02 as a ratio of medians, 0.74-0.91
    as a median of same-round ratios. Samples saved without rounds fall back to the ratio of medians.
    """
    if base_server is None or not row.samples:
        return None
    base = _find(rows, row, base_server)
    if base is None:
        return None

    theirs_by_round: dict[int, float] = {
        s.round: value for s in base.samples if s.round is not None and (value := getattr(s, name))
    }
    pairs: list[tuple[float, float]] = [
        (value, theirs_by_round[s.round])
        for s in row.samples
        if s.round in theirs_by_round and (value := getattr(s, name))
    ]
    if not pairs:
        ours, theirs = row.median(name), base.median(name)
        if not ours or not theirs:
            return None
        pairs = [(ours, theirs)]
    if name == "cpu_us_per_req":
        return statistics.median(theirs / ours for ours, theirs in pairs)
    return statistics.median(ours / theirs for ours, theirs in pairs)


def ceiling_ratio(rows: Sequence[Row], row: Row, name: str = "rps") -> float | None:
    """Against the aiohttp ceiling (200/304), or nginx forwarding to Django in the proxy's place."""
    if row.scenario in ("200", "304") and row.server != CEILING:
        return ratio(rows, row, CEILING, name)
    if row.server in (VIA, SIZED_VIA) and row.scenario in FORWARD_SCENARIOS:
        return ratio(rows, row, NGINX_VIA, name)
    return None


def _median_of(rows: Sequence[Row], row: Row, server: str, name: str) -> float | None:
    other = _find(rows, row, server)
    return None if other is None else other.median(name)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _check(name: str, where: str, value: float | None, target: str, ok: bool | None) -> dict[str, Any]:
    return {"check": name, "where": where, "value": value, "target": target, "ok": ok}


def checks(rows: Sequence[Row], memory: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's bar, one line per target and dataset (ok None: reported, no target)."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if not row.samples:
            continue
        where = f"{row.payload} x {row.teams} team(s)" if row.teams and row.payload != "-" else row.scenario
        if row.server == PROXY and row.scenario in ("200", "304"):
            backend = ratio(rows, row, DJANGO)
            if row.scenario == "200":
                out.append(
                    _check(
                        "200 proxy/Django req/s",
                        where,
                        backend,
                        f">= {TARGET_200_BACKEND:g}",
                        None if backend is None else backend >= TARGET_200_BACKEND,
                    )
                )
            else:
                out.append(_check("304 proxy/Django req/s", where, backend, "(report)", None))
            goal = TARGET_200_CEILING if row.scenario == "200" else TARGET_304_CEILING
            for label, name in (("req/s", "rps"), ("CPU/req, noise-robust view", "cpu_us_per_req")):
                value = ceiling_ratio(rows, row, name)
                out.append(
                    _check(
                        f"{row.scenario} proxy/ceiling {label}",
                        where,
                        value,
                        f">= {goal}",
                        None if value is None else value >= goal,
                    )
                )
            steady = row.extra.get("steady")
            redis_rate = steady["redis_per_req"] if steady else row.redis_rate()
            out.append(
                _check(
                    f"{row.scenario} Redis cmds/req"
                    + (f" (one {steady['seconds']} s run)" if steady else ""),
                    where,
                    redis_rate,
                    f"<= {TARGET_REDIS}",
                    None if redis_rate is None else redis_rate <= TARGET_REDIS,
                )
            )
        elif row.server in (VIA, FAST_VIA) and row.scenario in FORWARD_SCENARIOS:
            cpu = row.median("cpu_us_per_req")
            out.append(
                _check(
                    f"{row.scenario}: proxy CPU us per forwarded request",
                    where,
                    cpu,
                    f"<= {TARGET_FORWARD_CPU_US:g}",
                    None if cpu is None else cpu <= TARGET_FORWARD_CPU_US,
                )
            )
            is_django = row.scenario != "forward-fast"
            # The same cost in units of the upstream's own CPU per request, measured in the same runs (so at
            # the same rate): comparable across machines and days where µs are not.
            upstream = row.median("backend_cpu_us_per_req")
            out.append(
                _check(
                    f"{row.scenario}: proxy CPU per forward / the upstream's CPU per request",
                    where,
                    cpu / upstream if cpu and upstream else None,
                    "(report)",
                    None,
                )
            )
            for like, sample in row.extra.get("at_django_rates", {}).items():
                paced = Sample(**sample)
                out.append(
                    _check(
                        f"forward-fast paced at {like}'s rate: proxy CPU us per forward",
                        f"{paced.rps:,.0f} req/s",
                        paced.cpu_us_per_req,
                        "(report)",
                        None,
                    )
                )
                if paced.backend_cpu_us_per_req:
                    out.append(
                        _check(
                            f"forward-fast paced at {like}'s rate: proxy CPU per forward / the upstream's",
                            f"{paced.rps:,.0f} req/s",
                            paced.cpu_us_per_req / paced.backend_cpu_us_per_req,
                            "(report)",
                            None,
                        )
                    )
            value = ratio(rows, row, baseline_of(row))
            out.append(
                _check(
                    f"{row.scenario}: proxy/direct req/s",
                    where,
                    value,
                    f">= {TARGET_FORWARD_RATIO}" if is_django else "(report: proxy-bound)",
                    None if value is None or not is_django else value >= TARGET_FORWARD_RATIO,
                )
            )
            nginx = _find(rows, row, NGINX_VIA) if is_django else None
            if nginx is not None:
                # The same forwards through nginx from the same core: what any forwarder in that place
                # costs Django's throughput, and the proxy against it.
                out += [
                    _check(
                        f"{row.scenario}: nginx in the proxy's place, nginx/direct req/s",
                        where,
                        ratio(rows, nginx, DIRECT),
                        "(report)",
                        None,
                    ),
                    _check(
                        f"{row.scenario}: proxy/nginx req/s, each in front of the same Django",
                        where,
                        ratio(rows, row, NGINX_VIA),
                        "(report)",
                        None,
                    ),
                    _check(
                        f"{row.scenario}: nginx CPU us per forwarded request",
                        where,
                        nginx.median("cpu_us_per_req"),
                        "(report)",
                        None,
                    ),
                ]
            sized = _find(rows, row, SIZED_VIA) if is_django else None
            if sized is not None:
                # The same proxy with its upstream pool no larger than Django's threads (README, "Sizing
                # the upstream pool"): a deployment choice, reported beside the default's verdict.
                out.append(
                    _check(
                        f"{row.scenario}: proxy with upstream.max_connections = Django's threads, "
                        "proxy/direct req/s",
                        where,
                        ratio(rows, sized, DIRECT),
                        "(report)",
                        None,
                    )
                )
                django_cpu = {
                    "behind the default pool": row.median("backend_cpu_us_per_req"),
                    "behind the sized pool": sized.median("backend_cpu_us_per_req"),
                    "direct": _median_of(rows, row, DIRECT, "cpu_us_per_req"),
                }
                out += [
                    _check(
                        f"{row.scenario}: Django CPU us per request, {how}", where, value, "(report)", None
                    )
                    for how, value in django_cpu.items()
                ]
        elif row.server == VIA and row.scenario in ("miss", "shadow"):
            out.append(
                _check(
                    f"{row.scenario}: proxy/direct req/s", where, ratio(rows, row, DIRECT), "(report)", None
                )
            )
            out.append(
                _check(
                    f"{row.scenario}: proxy CPU us/req", where, row.median("cpu_us_per_req"), "(report)", None
                )
            )
        elif row.server == PROXY and row.scenario == "badcred":
            hits = row.extra.get("backend_hits_through_proxy")
            allowed = row.extra.get("allowed_hits")
            out.append(
                _check(
                    f"badcred: backend hits (<= 1 per {row.extra.get('denied_ttl_seconds', 30):g} s "
                    "denied TTL)",
                    f"{row.extra.get('proxy_requests', 0):,} requests in "
                    f"{row.extra.get('scenario_seconds')} s",
                    hits,
                    f"<= {allowed}",
                    None if hits is None or allowed is None else hits <= allowed,
                )
            )
        elif row.server == PROXY and row.scenario == "ratelimited":
            out.append(
                _check(
                    "ratelimited: 429s per second", where, row.extra.get("rps_429_median"), "(report)", None
                )
            )
    for suffix, how in (("", "all decoded"), (COMPACT_SUFFIX, "compact cache")):
        dataset = memory.get("datasets", {}).get(RSS_DATASET + suffix)
        if dataset and dataset.get("peak_under_load_mib") is not None:
            peak = dataset["peak_under_load_mib"]
            out.append(
                _check(
                    f"peak RSS MiB, 1,000 teams x 50 KB cached ({how})",
                    RSS_DATASET,
                    peak,
                    f"<= {TARGET_RSS_MIB:g} (or a measured reason)",
                    peak <= TARGET_RSS_MIB,
                )
            )
    return out


def _lat(sample: Sample | None, row: Row | None = None) -> str:
    if row is not None:
        values = [row.median("p50_ms"), row.median("p95_ms"), row.median("p99_ms")]
    elif sample is not None:
        values = [sample.p50_ms, sample.p95_ms, sample.p99_ms]
    else:
        return "- | - | -"
    return " | ".join(_fmt(v, ".2f") for v in values)


def table(rows: Sequence[Row]) -> list[str]:
    """The main table."""
    lines = [
        "| payload | teams | scenario | server | req/s | x backend | x ceiling | p50 ms | p95 ms | p99 ms "
        "| half-rate req/s | p50 ms | p95 ms | p99 ms | CPU us/req | cores busy | peak RSS MiB "
        "| Redis cmds/req | bad |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        teams = str(row.teams) if row.teams else "-"
        if not row.samples:
            reason = (row.error or "not run").splitlines()[0][:120].replace("|", "/")
            lines.append(
                f"| {row.payload} | {teams} | {row.scenario} | {row.server} | {reason} " + "| " * 15 + "|"
            )
            continue
        half = row.half
        lines.append(
            f"| {row.payload} | {teams} | {row.scenario} | {row.server} "
            f"| {_fmt(row.median('rps'), ',.0f')} "
            f"| {_fmt(ratio(rows, row, baseline_of(row)), '.2f')} "
            f"| {_fmt(ceiling_ratio(rows, row), '.2f')} "
            f"| {_lat(None, row)} "
            f"| {_fmt(half.rps if half else None, ',.0f')} | {_lat(half)} "
            f"| {_fmt(row.median('cpu_us_per_req'), ',.0f')} "
            f"| {_fmt(row.median('server_core_busy'), '.0%')}/{_fmt(row.median('load_core_busy'), '.0%')} "
            f"| {_fmt(row.median('peak_rss_mib'), '.0f')} | {_fmt(row.redis_rate(), '.4f')} "
            f"| {sum(s.bad_responses for s in row.all_samples())} |"
        )
    return lines


def memory_section(memory: Mapping[str, Any]) -> list[str]:
    """Where the proxy's resident memory goes, stage by stage, per dataset."""
    datasets = memory.get("datasets") or {}
    if not datasets:
        return []
    interpreter = memory.get("interpreter") or {}
    lines = [
        "",
        "## Proxy memory",
        "",
        "RSS of the proxy process (MiB) at each stage: just started (nothing cached); after one conditional "
        "GET per team (team records and ETags held, no payloads); after one full GET per team (every payload "
        "held); peak under the measured load (VmHWM, reset before each run). Per team = stage delta / teams.",
        "",
        "| dataset | started | + team records & ETags | + payloads | payload bytes held | peak under load "
        "| per team (record+ETag) KiB | per payload KiB (payload size KiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in datasets.items():
        teams = max(int(m.get("teams", 1)), 1)
        per_team = (m["etags_cached_mib"] - m["started_mib"]) * 1024 / teams
        per_payload = (m["payloads_cached_mib"] - m["etags_cached_mib"]) * 1024 / teams
        lines.append(
            f"| {name} | {m['started_mib']:.1f} | {m['etags_cached_mib']:.1f} "
            f"| {m['payloads_cached_mib']:.1f} "
            f"| {m.get('cache_bytes_held', 0) / 2**20:.2f} MiB | {_fmt(m.get('peak_under_load_mib'), '.1f')} "
            f"| {per_team:.1f} | {per_payload:.1f} ({m['payload_bytes'] / 1024:.1f}) |"
        )
    if interpreter:
        base = interpreter.get("+ aiohttp, uvloop")
        parts = []
        for name, value in interpreter.items():
            if name.startswith("aiohttp, uvloop + ") and base is not None:
                parts.append(f"{name.removeprefix('aiohttp, uvloop ')} {value - base:+.1f}")
            else:
                parts.append(f"{name} {value:.1f}")
        lines += [
            "",
            "Interpreter baselines (fresh processes, RSS MiB; `+ X` rows: what importing X adds to "
            "aiohttp and uvloop): " + ", ".join(parts) + ".",
        ]
    return lines


def extras_section(rows: Sequence[Row]) -> list[str]:
    """Details of the flood and shadow scenarios."""
    lines: list[str] = []
    for row in rows:
        if not row.extra:
            continue
        if row.scenario == "shadow":
            outcomes = row.extra.get("shadow_comparisons") or {}
            text = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(outcomes.items())) or "none exported"
            lines.append(
                f"- shadow: {row.extra.get('proxy_requests', 0):,} requests through the proxy; "
                f"`edge_proxy_shadow_comparisons_total` {text}"
            )
        elif row.scenario == "badcred":
            lines.append(
                f"- badcred: {row.extra.get('proxy_requests', 0):,} requests with one invalid personal "
                "API key "
                f"over {row.extra.get('scenario_seconds')} s; the backend saw "
                f"{row.extra.get('backend_hits_through_proxy')} of them (allowed: 1 per "
                f"{row.extra.get('denied_ttl_seconds'):g} s = {row.extra.get('allowed_hits')}); answer "
                f"`{row.extra.get('first_answer')}`"
            )
        elif row.scenario == "dead-upstream":
            lines.append(
                f"- dead-upstream, {row.server}: log written while every forward failed "
                f"{_fmt(row.extra.get('log_bytes_per_second'), ',.0f')} bytes/s"
            )
        elif row.scenario == "ratelimited":
            lines.append(
                f"- ratelimited: limit {row.extra.get('limit')}; 429s at "
                f"{_fmt(row.extra.get('rps_429_median'), ',.0f')}/s (median), "
                f"{_fmt(row.extra.get('share_429'), '.2%')} of answers"
            )
    return ["", "## Floods and shadow", "", *lines] if lines else []


def render(
    rows: Sequence[Row], meta: Mapping[str, Any], memory: Mapping[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown report and the target checks."""
    lines = [
        "# edge-proxy bench",
        "",
        f"{meta['date']} - `{meta['command']}` - {meta.get('wall_seconds', '?')} s",
        "",
        f"Machine: {meta['nproc']} cores, {meta['cpu_model']}, Linux {meta['kernel']}; "
        f"Python {meta['python']}, aiohttp {meta['aiohttp']}, uvloop {meta['uvloop']}, "
        f"Django {meta['django']}, "
        f"{meta['gunicorn']}; {meta['redis_server']}; {meta['wrk_version']}; {meta['nginx']}. "
        f"Pinning: {meta['pinning']}. Git {meta['git_head']} "
        f"({meta['proxy_uncommitted_files']} uncommitted file(s) in proxy/). Writer: {meta['writer']}.",
        "",
        f"Medians of {meta['runs']} saturating run(s) of `wrk {meta['wrk_args']}` per server, servers "
        f"interleaved; then one {meta['half_rate_seconds']} s pass paced at half the median saturating rate "
        "(bench/wrk.py: a Lua `delay()` handing out send slots 1/rate apart on a monotonic clock). "
        "x backend = req/s over Django's (200/304: the Django row, one sync gunicorn worker on core 0; "
        "forwarded scenarios: over the same requests sent straight to Django, which then sits on core 1 with "
        "wrk, standing for another machine). x ceiling = over the aiohttp app serving the same bytes from "
        "memory with no logic (200/304), or over nginx forwarding the same requests to the same Django from "
        "the proxy's core (proxy -> django rows; the nginx -> django row shows what it costs itself). "
        "Both are medians over the rounds of the ratio of the two servers' runs in the "
        "same round (a round runs every server once, seconds apart, so it cancels most of the machine's "
        "noise); the req/s columns are each server's own median. CPU us/req and peak RSS are the measured "
        "server process's (the proxy's in proxy -> django rows); cores busy = server core / load core; "
        "Redis cmds/req counts every command "
        "Redis executed (INFO commandstats) per request, the backend's included where it takes part; "
        "bad = answers with an unexpected status plus socket errors. Caveat of 2 cores: in forwarded rows "
        "the backend shares core 1 with wrk, and gunicorn's sync worker closes every connection, so wrk's "
        "reconnects cost that core more in the direct row than in the proxy row (where the proxy, on core 0, "
        "reconnects): a proxy/direct ratio above 1 there is that, not a faster backend.",
        "",
        *table(rows),
    ]
    notes = [f"- {r.key} {r.server}: {r.error.splitlines()[0]}" for r in rows if r.samples and r.error]
    if notes:
        lines += ["", "Notes:", "", *notes]
    found = checks(rows, memory)
    lines += [
        "",
        "## The bar (issue 8)",
        "",
        "| check | where | value | target | verdict |",
        "|---|---|---:|---|---|",
    ]
    for check in found:
        verdict = {True: "ok", False: "**MISS**", None: "-"}[check["ok"]]
        value = "-" if check["value"] is None else format(check["value"], ".4g")
        lines.append(f"| {check['check']} | {check['where']} | {value} | {check['target']} | {verdict} |")
    lines += extras_section(rows)
    lines += memory_section(memory)
    busiest = []
    for row in rows:
        if row.server in (PROXY, VIA, FAST_VIA) and row.samples:
            commands = {name for sample in row.samples for name in sample.redis_by_command}
            top = sorted(((row.redis_rate(name) or 0.0, name) for name in commands), reverse=True)[:5]
            if top:
                where = f"{row.payload} x {row.teams}" if row.payload != "-" else "-"
                busiest.append(f"- {where}, {row.scenario}: " + ", ".join(f"{k} {v:.4f}" for v, k in top))
    if busiest:
        lines += [
            "",
            "Redis commands per request, by command (commands over requests, all runs together):",
            "",
            *busiest,
        ]
    return "\n".join(lines) + "\n", found


def write(rows: Sequence[Row], meta: Mapping[str, Any], memory: Mapping[str, Any], out: Path) -> str:
    """Write latest.md and latest.json; the Markdown."""
    markdown, found = render(rows, meta, memory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(markdown)
    document = {
        "meta": dict(meta),
        "checks": found,
        "memory": dict(memory),
        "rows": [
            {
                **{k: v for k, v in asdict(row).items() if k not in ("samples", "half")},
                "medians": {name: row.median(name) for name in MEDIANS},
                "ratio_backend": ratio(rows, row, baseline_of(row)),
                "ratio_ceiling": ceiling_ratio(rows, row),
                "half_rate": asdict(row.half) if row.half else None,
                "samples": [asdict(s) for s in row.samples],
            }
            for row in rows
        ],
    }
    (out / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
    return markdown


def load(path: Path) -> tuple[list[Row], dict[str, Any], dict[str, Any]]:
    """Rows, meta and memory back from a latest.json that `write` wrote."""
    document = json.loads(path.read_text())
    rows = []
    for item in document["rows"]:
        half = item.get("half_rate")
        rows.append(
            Row(
                payload=item["payload"],
                teams=item["teams"],
                scenario=item["scenario"],
                server=item["server"],
                samples=[Sample(**sample) for sample in item["samples"]],
                half=Sample(**half) if half else None,
                error=item.get("error"),
                extra=item.get("extra") or {},
            )
        )
    return rows, document["meta"], document["memory"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.report RESULTS.json OUT_DIR`: render saved results again (after a report change)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    rows, meta, memory = load(args.results)
    print(write(rows, meta, memory, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
