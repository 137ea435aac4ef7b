"""The request path's hot functions under pytest-benchmark: a regression guard, with no timing assertion.

`make test` runs each once for its result (--benchmark-disable); `make microbench` times them and saves the
run under .benchmarks/, so the next `make microbench` can be read against it (pytest-benchmark's compare).
Whole-request numbers come from bench/ (wrk, same-run ratios), never from here.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
import zstandard
from pytest_benchmark.fixture import BenchmarkFixture

from proxy.conditional import bearer, none_match
from proxy.contract import RedisContract, library_from_user_agent
from proxy.payload import is_billable
from proxy.settings import RedisLayout
from proxy.verdicts import Verdict, VerdictStore

ETAG = "5f2b7c1d9e3a4b60"
CREDENTIAL = "phx_" + "a1b2c3d4" * 5


def payload(flags: int) -> str:
    """Definitions JSON as the backend dumps it (sorted keys), ~170 bytes per flag."""
    return json.dumps(
        {
            "flags": [
                {
                    "id": i,
                    "key": f"flag-{i}",
                    "active": True,
                    "filters": {"groups": [{"rollout_percentage": i}]},
                }
                for i in range(flags)
            ],
            "group_type_mapping": {},
            "cohorts": {},
        },
        sort_keys=True,
    )


@pytest.mark.parametrize(
    ("header", "matches"),
    [(f'W/"{ETAG}"', True), (f'"other", W/"{ETAG}"', True), ('W/"0000000000000000"', False), ("*", True)],
)
def test_if_none_match(benchmark: BenchmarkFixture, header: str, matches: bool) -> None:
    assert benchmark(none_match, header, ETAG) is matches


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        (f"Bearer {CREDENTIAL}", CREDENTIAL),
        (f"bearer   {CREDENTIAL} ", CREDENTIAL),
        ("Basic abc", None),
        # Three parts are malformed, as for the backend (found by mutation testing: read as credential "a").
        ("Bearer a b", None),
    ],
)
def test_bearer(benchmark: BenchmarkFixture, header: str, credential: str | None) -> None:
    """The credential of a well-formed Bearer header; None for anything else (the backend decides)."""
    assert benchmark(bearer, header) == credential


def test_library_from_user_agent(benchmark: BenchmarkFixture) -> None:
    assert benchmark(library_from_user_agent, "posthog-python/7.9.1") == "posthog-python"


@pytest.mark.parametrize("flags", [10, 300])
def test_decode_compressed_payload(benchmark: BenchmarkFixture, flags: int) -> None:
    text = payload(flags)
    # As django-redis stores it past 512 bytes: pickled, then zstd-compressed.
    raw = zstandard.ZstdCompressor().compress(pickle.dumps(text, pickle.HIGHEST_PROTOCOL))
    contract = RedisContract(RedisLayout())
    assert benchmark(contract.decode_text, raw) == text


def test_decode_etag(benchmark: BenchmarkFixture) -> None:
    contract = RedisContract(RedisLayout())
    assert benchmark(contract.decode_text, pickle.dumps(ETAG, pickle.HIGHEST_PROTOCOL)) == ETAG


def test_is_billable(benchmark: BenchmarkFixture) -> None:
    assert benchmark(is_billable, payload(300).encode(), ("survey-targeting-",)) is True


def test_learned_verdict_lookup(benchmark: BenchmarkFixture) -> None:
    # key() and cached() never touch Redis, and without an HMAC key learn() does not either: no client.
    client: Any = None
    store = VerdictStore(client, hmac_key=None, key_prefix="v", allowed_ttl_seconds=60, denied_ttl_seconds=60)
    store.learn(store.key(7, CREDENTIAL), Verdict(200))

    def lookup() -> Verdict | None:
        return store.cached(store.key(7, CREDENTIAL))

    verdict = benchmark(lookup)
    assert verdict is not None
    assert verdict.allowed
