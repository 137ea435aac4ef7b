"""Driving wrk: the command line, the Lua script every run uses, and parsing what it prints.

Every run gets a generated Lua script (bench/wrk.py `write_script`) that can:
- rotate over many requests (one per team), each thread from its own offset;
- pace requests to a fixed total rate (the half-saturation pass): wrk calls `delay()` before each request
  of a connection, and the script hands out send slots spaced 1/rate apart on a monotonic clock
  (clock_gettime through LuaJIT's FFI), so the connections together send at `rate` whatever their
  latency; a slot already past is not caught up (no bursts). wrk's delays have 1 ms granularity, so
  individual sends jitter by up to 1 ms around their slot; the rate holds on average. wrk times a request
  from its send, so latencies at the paced rate are service latencies (no coordinated-omission correction,
  which only matters when the server falls behind, and at half its saturating rate it does not);
- count responses by status (only for small answers: wrk then hands every response to Lua);
- print p50/p95/p99/p99.9 from wrk's own latency histogram (its `--latency` table has no p95).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import LOAD_CORE, pinned

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_OK = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_PERCENTILES = re.compile(r"^BENCH-LATENCY-US (\d+) (\d+) (\d+) (\d+)$", re.MULTILINE)
_STATUS = re.compile(r"^BENCH-STATUS (\d+) (\d+)$", re.MULTILINE)


class WrkError(RuntimeError):
    """wrk failed or printed something this parser does not understand."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, as it reported it."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    non_2xx_3xx: int
    socket_errors: int
    statuses: dict[int, int] = field(default_factory=dict)


def parse(output: str) -> WrkResult:
    """The numbers of a wrk report with the bench script's lines; WrkError if any is missing."""
    total, rps, latency = _TOTAL.search(output), _RPS.search(output), _PERCENTILES.search(output)
    if total is None or rps is None or latency is None:
        raise WrkError(f"unexpected wrk output:\n{output}")
    non_ok = _NON_OK.search(output)
    errors = _SOCKET_ERRORS.search(output)
    statuses: dict[int, int] = {}
    for status, count in _STATUS.findall(output):
        statuses[int(status)] = statuses.get(int(status), 0) + int(count)
    p50, p95, p99, p999 = (int(v) / 1000 for v in latency.groups())
    return WrkResult(
        requests=int(total[1]),
        seconds=float(total[2]) * _UNITS_S[total[3]],
        rps=float(rps[1]),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        p999_ms=p999,
        non_2xx_3xx=int(non_ok[1]) if non_ok else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        statuses=statuses,
    )


@dataclass(frozen=True)
class Load:
    """What wrk sends: one fixed request (path and headers), or many sent round-robin (one per team)."""

    path: str
    headers: Mapping[str, str]
    rotation: Sequence[tuple[str, Mapping[str, str]]] = ()
    # Count answers by status (small answers only: wrk then passes every response to Lua).
    count_statuses: bool = False
    # Statuses that are the point of the scenario (401s of a bad-credential flood are not errors).
    expected: frozenset[int] = frozenset({200})


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_PACING = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end
local interval_ms = {interval}
local next_slot = nil
function delay()
  local now = now_ms()
  if next_slot == nil or next_slot < now then next_slot = now end
  local wait = next_slot - now
  next_slot = next_slot + interval_ms
  return wait
end
"""

_ROTATION = """\
local requests = {{
{rows}
}}
local n = #requests
local i = 0
function request()
  i = i % n + 1
  local r = requests[i]
  return wrk.format("GET", r[1], r[2])
end
"""

_COMMON = """\
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
  thread:set("offset", math.random(1000000))
end
function init(args)
  if offset ~= nil and n ~= nil then i = offset % n end
end
{status_counting}
function done(summary, latency, requests)
  io.write(string.format("BENCH-LATENCY-US %d %d %d %d\\n", latency:percentile(50),
    latency:percentile(95), latency:percentile(99), latency:percentile(99.9)))
  for _, thread in ipairs(threads) do
    local counted = thread:get("statuses")
    if counted ~= nil then
      for status, count in pairs(counted) do
        io.write(string.format("BENCH-STATUS %d %d\\n", status, count))
      end
    end
  end
end
"""

_STATUS_COUNTING = """\
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
"""


def write_script(path: Path, load: Load, *, rate: float | None, threads: int) -> Path:
    """The Lua script of one run: rotation, pacing to `rate` req/s in total, status counts, percentiles."""
    parts = ["-- Generated by bench/wrk.py."]
    if load.rotation:
        rows = []
        for request_path, headers in load.rotation:
            fields = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
            rows.append(f"  {{{_lua_string(request_path)}, {{{fields}}}}},")
        parts.append(_ROTATION.format(rows="\n".join(rows)))
    else:
        parts.append("local n = nil\nlocal i = 0\n")
    if rate is not None:
        parts.append(_PACING.replace("{interval}", repr(1000.0 * threads / max(rate, 1.0))))
    parts.append(_COMMON.format(status_counting=_STATUS_COUNTING if load.count_statuses else ""))
    path.write_text("\n".join(parts))
    return path


def run(
    port: int,
    load: Load,
    *,
    seconds: int,
    connections: int,
    threads: int,
    script_dir: Path,
    rate: float | None = None,
) -> WrkResult:
    """Run wrk against loopback `port` for `seconds` (paced to `rate` if given), pinned to the load core."""
    script = write_script(
        script_dir / f"wrk-{port}-{'paced' if rate else 'open'}.lua", load, rate=rate, threads=threads
    )
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
    ]
    for name, value in load.headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(f"http://127.0.0.1:{port}{load.path}")
    try:
        done = subprocess.run(
            pinned(command, LOAD_CORE), capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {seconds + 30}s") from exc
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse(done.stdout)
