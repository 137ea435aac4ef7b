"""How many clients a process admits: the open-file limit less what its own connections need."""

from __future__ import annotations

import resource
import sys

import pytest

from proxy.connections import client_cap, reserved_descriptors
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
    assert client_cap(settings(), open_files) == cap


def test_no_open_file_limit_means_no_cap_to_speak_of() -> None:
    assert client_cap(settings(), resource.RLIM_INFINITY) == sys.maxsize - 184
    assert client_cap(settings(max_connections=100_000), resource.RLIM_INFINITY) == 100_000


def test_a_cap_within_the_limit_is_kept_as_set() -> None:
    assert client_cap(settings(max_connections=840), 1024) == 840


def test_a_cap_the_limit_cannot_hold_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        client_cap(settings(max_connections=841), 1024)
    message = str(refused.value)
    assert "client_limits.max_connections: 841 client connections" in message
    assert "need 1025 open files; this process may open 1024" in message
