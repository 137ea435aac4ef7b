"""How many clients a process admits: the open-file limit less what its own connections need."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import pytest

from proxy import client_cap as client_cap_module
from proxy.client_cap import client_cap, reserved_descriptors
from proxy.settings import ConfigError, Settings


def settings(**client_limits: int) -> Settings:
    return Settings.model_validate(
        {
            "upstream": {"max_connections": 100},
            "redis": {"max_connections": 10},
            "client_limits": client_limits,
        }
    )


def test_the_reserve_is_the_upstream_pool_redis_twice_and_spares() -> None:
    assert reserved_descriptors(settings()) == 100 + 2 * 10 + 64


@pytest.mark.parametrize(
    ("open_files", "cap"),
    [
        (1_048_576, 1_048_576 - 184),  # a container's usual limit: all but the reserve
        (1024, 1024 - 184),
        (300, 150),  # the reserve would leave 116: half the limit instead, so a low limit still serves
        (100, 50),
        (1, 1),
    ],
)
def test_unset_the_cap_follows_the_open_file_limit(open_files: int, cap: int) -> None:
    assert client_cap(settings(), open_files, memory=NO_MEMORY_LIMIT) == cap


def test_no_open_file_limit_means_no_cap_to_speak_of() -> None:
    assert client_cap(settings(), resource.RLIM_INFINITY, memory=NO_MEMORY_LIMIT) == sys.maxsize - 184
    assert client_cap(settings(max_connections=100_000), resource.RLIM_INFINITY) == 100_000


MiB = 2**20
NO_MEMORY_LIMIT = None


@pytest.mark.parametrize(
    ("memory", "budget", "workers", "cap"),
    [
        # The chart's fleet pod: 768Mi, the default 256 MiB cache: (768 - 128 - 256) MiB at 16 KiB each.
        (768 * MiB, 256 * MiB, 1, 24_576),
        # Its sidecar: 256Mi, a 64 MiB cache.
        (256 * MiB, 64 * MiB, 1, 4096),
        # Two workers share the container: nothing left beside two caches, and a small floor still serves.
        (768 * MiB, 256 * MiB, 2, 1024),
        # Memory to spare: the open-file limit decides.
        (64 * 1024 * MiB, 256 * MiB, 1, 1_048_576 - 184),
    ],
)
def test_unset_the_cap_is_also_what_the_containers_memory_holds(
    memory: int, budget: int, workers: int, cap: int
) -> None:
    """Found by a reviewer: the open-file limit alone (a million in most clusters) let a reconnect storm
    take a 768Mi pod (8.3 KiB per idle connection, measured) past its memory limit long before the cap
    refused any."""
    configured = settings().model_copy(
        update={
            "workers": workers,
            "definitions": Settings().definitions.model_copy(update={"cache_budget_bytes": budget}),
        }
    )
    assert client_cap(configured, 1_048_576, memory=memory) == cap


@pytest.mark.parametrize(
    ("text", "limit"),
    [("805306368\n", 805306368), ("max\n", None), ("9223372036854771712\n", None), (None, None)],
    ids=["limited", "v2-no-limit", "v1-no-limit", "no-cgroup-file"],
)
def test_the_containers_memory_limit_is_read_from_its_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, limit: int | None
) -> None:
    path = tmp_path / "memory.max"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(client_cap_module, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"), str(path)))
    assert client_cap_module.container_memory() == limit


def test_a_cap_within_the_limit_is_kept_as_set() -> None:
    assert client_cap(settings(max_connections=840), 1024) == 840


def test_a_cap_the_limit_cannot_hold_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        client_cap(settings(max_connections=841), 1024)
    message = str(refused.value)
    assert "client_limits.max_connections: 841 client connections" in message
    assert "need 1025 open files; this process may open 1024" in message
